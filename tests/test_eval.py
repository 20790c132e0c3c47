"""Greedy evaluation per user and overall, LaMP-format predictions, and official-style scoring."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cdcda_export.data import sample_paths
from cdcda_export.errors import UserError
from cdcda_export.train import evaluate, score_predictions, write_predictions

TASK = "LaMP-3"


def _qo(task: str = TASK) -> tuple[Path, Path]:
    q, o = sample_paths(task)
    return Path(q), Path(o)


@pytest.fixture(scope="module")
def adapter_root(tiny_base, tmp_path_factory) -> Path:
    """ADAPTERS/<user>/ with a random non-zero LoRA adapter for one user only."""
    import torch
    from peft import LoraConfig, get_peft_model

    from cdcda_export.train.modeling import load_base

    root = tmp_path_factory.mktemp("adapters")
    model, _ = load_base(tiny_base)
    torch.manual_seed(0)
    cfg = LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    get_peft_model(model, cfg).save_pretrained(str(root / "3001"), safe_serialization=True)
    return root


def test_eval_metrics_save_and_score_predictions(tiny_base, adapter_root, tmp_path):
    q, o = _qo()
    pred_path = tmp_path / "preds.json"
    rep = evaluate(tiny_base, TASK, q, o, adapter_root, save_predictions=pred_path, progress=False)
    assert rep["task"] == TASK and rep["n_users"] == 4 and rep["n_scored"] == 4 and rep["n_with_adapter"] == 1
    assert rep["per_user"]["3001"]["adapter"] == str(adapter_root / "3001")
    assert all(rep["per_user"][u]["adapter"] is None for u in ("3000", "3002", "3003"))
    assert set(rep["overall"]) == {"MAE", "RMSE"} and rep["primary_metric"] == "MAE"
    for r in rep["per_user"].values():
        assert set(r["metrics"]) == {"MAE", "RMSE"}

    preds = json.loads(pred_path.read_text())
    assert preds["task"] == "LaMP_3"
    assert [g["id"] for g in preds["golds"]] == ["3000", "3001", "3002", "3003"]
    assert {g["id"]: g["output"] for g in preds["golds"]} == {u: r["prediction"] for u, r in rep["per_user"].items()}
    scored = score_predictions(TASK, pred_path, o)
    assert scored["n"] == 4
    for k, v in rep["overall"].items():
        assert abs(scored["metrics"][k] - v) <= 1e-12, f"{k}: scored {scored['metrics'][k]} vs eval {v} (tol 1e-12)"

    again = evaluate(tiny_base, TASK, q, o, adapter_root, users=["3001", "3002"], progress=False)
    assert {u: again["per_user"][u]["raw"] for u in ("3001", "3002")} == {
        u: rep["per_user"][u]["raw"] for u in ("3001", "3002")}, "greedy evaluation must be deterministic"
    # after a user with an adapter, the base model must be restored for the next user
    base_only = evaluate(tiny_base, TASK, q, o, None, users=["3002"], progress=False)
    assert base_only["per_user"]["3002"]["raw"] == rep["per_user"]["3002"]["raw"]


def test_score_predictions_hand_computed(tmp_path):
    _, o = _qo()
    golds = {g["id"]: g["output"] for g in json.loads(o.read_text())["golds"]}
    # golds: 3000->2, 3001->5, 3002->3, 3003->2 (the sample); one unparseable prediction
    assert golds == {"3000": "2", "3001": "5", "3002": "3", "3003": "2"}
    p = write_predictions(tmp_path / "p.json", "LaMP_3", {"3000": "2", "3001": "4", "3002": "oops", "3003": "5"})
    m = score_predictions(TASK, p, o)["metrics"]
    # errors: 0, 1, 2, 3. "oops" is unparseable: the official rule maps it to 1.0 when
    # abs(1 - gold) > abs(5 - gold), else 5.0; for gold 3 that is a tie, so 5.0 -> error 2.
    assert abs(m["MAE"] - (0 + 1 + 2 + 3) / 4) <= 1e-12
    assert abs(m["RMSE"] - ((0 + 1 + 4 + 9) / 4) ** 0.5) <= 1e-12


def test_score_predictions_ids_must_match_exactly(tmp_path):
    _, o = _qo()
    p = write_predictions(tmp_path / "p.json", "LaMP_3", {"3000": "2", "3001": "4", "3002": "3", "9999": "1"})
    with pytest.raises(UserError, match="do not match") as e:
        score_predictions(TASK, p, o)
    assert "3003" in str(e.value) and "9999" in str(e.value)
    wrong_task = write_predictions(tmp_path / "w.json", "LaMP_2", {"3000": "2"})
    with pytest.raises(UserError, match="task is 'LaMP_2'"):
        score_predictions(TASK, wrong_task, o)
    (tmp_path / "bad.json").write_text('{"task": "LaMP_3", "golds": [{"output": "2"}]}')
    with pytest.raises(UserError, match=r"golds\[0\]"):
        score_predictions(TASK, tmp_path / "bad.json", o)


def test_adapter_from_another_base_is_refused(tiny_base, adapter_root, tmp_path):
    q, o = _qo()
    root = tmp_path / "ad"
    shutil.copytree(adapter_root / "3001", root / "3001")
    (root / "3001" / "training.json").write_text(json.dumps(
        {"task": TASK, "base_model": {"source": "/elsewhere", "sha256": "0" * 64}}))
    with pytest.raises(UserError, match="different base model"):
        evaluate(tiny_base, TASK, q, o, root, progress=False)
    with pytest.raises(UserError, match="no adapter for any"):
        evaluate(tiny_base, TASK, q, o, tmp_path, progress=False)
