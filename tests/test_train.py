"""Per-user LoRA training on a tiny real (random-weight) Llama: loss, provenance, resume, atomicity,
determinism, data splits and synthetic mixing."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from cdcda_export.data import get_task, load_lamp, sample_paths
from cdcda_export.errors import UserError
from cdcda_export.train import train as T
from cdcda_export.train import train_users

TASK = "LaMP-3"
FAST = dict(max_steps=8, lr=2e-3, progress=False)


def _qo(task: str = TASK) -> tuple[Path, Path]:
    q, o = sample_paths(task)
    return Path(q), Path(o)


@pytest.fixture(scope="module")
def trained(tiny_base, tmp_path_factory):
    out = tmp_path_factory.mktemp("adapters")
    q, o = _qo()
    results = train_users(tiny_base, TASK, q, o, out, users=["3000", "3001"], seed=0, **FAST)
    return out, results


def test_loss_falls_and_training_json_records_provenance(trained, tiny_base):
    out, results = trained
    assert [r.status for r in results] == ["trained", "trained"]
    for r in results:
        meta = json.loads((out / r.user_id / "training.json").read_text())
        curve = meta["loss_curve"]
        assert len(curve) == 8
        # Check: the mean loss of the last 3 steps is at least 0.1 nats below that of the first 3.
        first, last = sum(curve[:3]) / 3, sum(curve[-3:]) / 3
        assert last < first - 0.1, f"loss did not fall by >= 0.1: first3={first:.3f} last3={last:.3f}"
        assert meta["user_id"] == r.user_id and meta["task"] == TASK
        from cdcda_export.utils import sha256_dir

        assert meta["base_model"] == {"source": str(tiny_base), "sha256": sha256_dir(tiny_base),
                                          "provenance": {"arch": "tiny", "seed": 0, "random_weights": True,
                                                         "note": "random weights with the exact config of a real model"}}
        assert meta["data"]["real"] == 16 and meta["data"]["heldout"] == 4 and meta["data"]["synthetic"] == 0
        hp = meta["hyperparameters"]
        assert hp["rank"] == 8 and hp["alpha"] == 16 and hp["seed"] == 0 and hp["steps"] == 8
        assert set(hp["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
        assert meta["heldout_metric"]["name"] == "MAE"
        assert meta["heldout_metric"]["before"] is not None and meta["heldout_metric"]["after"] is not None
        assert meta["versions"]["peft"] and meta["duration_s"] > 0
        files = {p.name for p in (out / r.user_id).iterdir()}
        assert {"adapter_config.json", "adapter_model.safetensors", "training.json"} <= files
        assert not any(f.endswith((".bin", ".pt", ".pth")) for f in files)
    report = json.loads((out / "train_report.json").read_text())
    assert set(report["users"]) == {"3000", "3001"}


def test_rerun_skips_done_users_and_force_retrains(trained, tiny_base):
    out, _ = trained
    q, o = _qo()
    stamp = (out / "3000" / "adapter_model.safetensors").stat().st_mtime_ns
    again = train_users(tiny_base, TASK, q, o, out, users=["3000", "3001"], **FAST)
    assert [r.status for r in again] == ["exists", "exists"]
    assert (out / "3000" / "adapter_model.safetensors").stat().st_mtime_ns == stamp
    forced = train_users(tiny_base, TASK, q, o, out, users=["3000"], force=True, **FAST)
    assert forced[0].status == "trained"
    assert (out / "3000" / "adapter_model.safetensors").stat().st_mtime_ns != stamp


def test_same_seed_same_bytes_other_seed_differs(trained, tiny_base, tmp_path):
    out, _ = trained
    q, o = _qo()
    train_users(tiny_base, TASK, q, o, tmp_path / "a", users=["3001"], seed=0, **FAST)
    train_users(tiny_base, TASK, q, o, tmp_path / "b", users=["3001"], seed=1, **FAST)
    ref = (out / "3001" / "adapter_model.safetensors").read_bytes()
    assert (tmp_path / "a" / "3001" / "adapter_model.safetensors").read_bytes() == ref
    curve = lambda d: json.loads((d / "3001" / "training.json").read_text())["loss_curve"]  # noqa: E731
    assert curve(tmp_path / "a") == curve(out)
    assert (tmp_path / "b" / "3001" / "adapter_model.safetensors").read_bytes() != ref


def test_interrupted_run_leaves_nothing_that_looks_complete(tiny_base, tmp_path, monkeypatch):
    q, o = _qo()
    out = tmp_path / "ad"
    real_save = T._save_adapter

    def save_then_die(model, dest):
        real_save(model, dest)  # weights are on disk, training.json is not: then the process dies
        raise KeyboardInterrupt

    monkeypatch.setattr(T, "_save_adapter", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_users(tiny_base, TASK, q, o, out, users=["3002"], max_steps=1, progress=False)
    assert not (out / "3002").exists()
    # A hard kill (no cleanup) leaves a hidden partial folder named with its pid; it is not taken as done and,
    # its process being gone, is removed.
    import subprocess
    import sys

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    stale = out / f".3002.partial-{gone.pid}-killed"
    stale.mkdir(parents=True)
    (stale / "adapter_model.safetensors").write_bytes(b"half")
    monkeypatch.setattr(T, "_save_adapter", real_save)
    res = train_users(tiny_base, TASK, q, o, out, users=["3002"], max_steps=1, progress=False)
    assert res[0].status == "trained" and T.is_complete(out / "3002")
    assert not stale.exists()


def test_other_base_is_refused_without_force(trained, tiny_model_dir):
    out, _ = trained
    q, o = _qo()
    with pytest.raises(UserError, match="another task or base model"):
        train_users(tiny_model_dir("tiny", seed=1), TASK, q, o, out, users=["3000"], **FAST)


def test_empty_and_one_item_profiles(tiny_base, tmp_path):
    q, o = _qo()
    users = json.loads(q.read_text())[:2]
    golds = json.loads(o.read_text())
    users[0]["profile"] = []
    users[1]["profile"] = users[1]["profile"][:1]
    (tmp_path / "q.json").write_text(json.dumps(users))
    ids = {u["id"] for u in users}
    (tmp_path / "o.json").write_text(json.dumps({"task": golds["task"],
                                                 "golds": [g for g in golds["golds"] if g["id"] in ids]}))
    res = train_users(tiny_base, TASK, tmp_path / "q.json", tmp_path / "o.json", tmp_path / "ad",
                      max_steps=1, progress=False)
    by = {r.user_id: r for r in res}
    assert by[users[0]["id"]].status == "skipped" and "empty profile" in by[users[0]["id"]].reason
    assert not (tmp_path / "ad" / users[0]["id"]).exists()
    one = by[users[1]["id"]]
    assert one.status == "trained" and one.counts["real"] == 1 and one.counts["heldout"] == 0
    report = json.loads((tmp_path / "ad" / "train_report.json").read_text())
    assert report["users"][users[0]["id"]]["status"] == "skipped"


def test_heldout_rule():
    assert [T.n_heldout(n, 0.2) for n in (0, 1, 2, 3, 4, 5, 20)] == [0, 0, 0, 1, 1, 1, 4]
    assert T.n_heldout(6, 0.01) == 1  # at least one once the profile has >= 5 pairs
    assert T.n_heldout(5, 0.0) == 0   # holdout 0 asks for none


def _synthetic(tmp_path: Path, uid: str, n: int) -> Path:
    spec = get_task(TASK)
    d = tmp_path / "syn" / uid
    d.mkdir(parents=True)
    rows = [{"input": spec.question_template.format(text=f"synthetic review number {i} was fine"),
             "output": str(1 + i % 5), "provenance": {"teacher": "test"}} for i in range(n)]
    (d / "synthetic.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return tmp_path / "syn"


@pytest.mark.parametrize("ratio,available,expected", [(1.0, 30, 16), (0.5, 30, 8), (1.0, 5, 5), (0.0, 30, 0)])
def test_synthetic_mixing_counts(tmp_path, ratio, available, expected):
    q, o = _qo()
    ds = load_lamp(TASK, q, o)
    u = ds.users[0]
    rows = T.read_synthetic_dir(_synthetic(tmp_path, u.id, available), u.id)
    data = T.build_user_data(ds.task, u, [], rows, T.Hyper(synthetic_ratio=ratio, seed=3))
    assert data.counts["real"] == 16 and data.counts["synthetic"] == expected
    assert sum(1 for *_, src in data.train if src == "synthetic") == expected
    assert sum(1 for *_, src in data.train if src == "real") == 16
    # held-out items never appear in a training prompt (no leak of their answers through retrieval)
    held_questions = {p.rsplit("review: ", 1)[-1] for p, _ in data.heldout}
    assert held_questions and all(not any(h[:60] in p for h in held_questions) for p, *_ in data.train)
    again = T.build_user_data(ds.task, u, [], rows, T.Hyper(synthetic_ratio=ratio, seed=3))
    assert again.train == data.train and again.heldout == data.heldout  # seeded split and sampling


def test_synthetic_bad_line_names_file_and_line(tmp_path):
    d = tmp_path / "syn" / "u1"
    d.mkdir(parents=True)
    (d / "synthetic.jsonl").write_text('{"input": "q", "output": "3"}\n{"input": "q"\n')
    with pytest.raises(UserError, match=r"line 2") as e:
        T.read_synthetic_dir(tmp_path / "syn", "u1")
    assert "synthetic.jsonl" in str(e.value)


def test_synthetic_training_counts_end_to_end(tiny_base, tmp_path):
    q, o = _qo()
    syn = _synthetic(tmp_path, "3003", 6)
    res = train_users(tiny_base, TASK, q, o, tmp_path / "ad", users=["3003"], synthetic=syn, synthetic_ratio=0.25,
                      max_steps=1, progress=False)
    meta = json.loads((tmp_path / "ad" / "3003" / "training.json").read_text())
    assert res[0].counts["synthetic"] == 4 == meta["data"]["synthetic"]  # round(0.25 * 16) of 6 available
    assert meta["data"]["synthetic_available"] == 6 and meta["hyperparameters"]["synthetic_ratio"] == 0.25


def test_bad_flags_are_user_errors(tiny_base, tmp_path):
    q, o = _qo()
    with pytest.raises(UserError, match="--rank 0"):
        train_users(tiny_base, TASK, q, o, tmp_path, rank=0, progress=False)
    with pytest.raises(UserError, match="not found in this model"):
        train_users(tiny_base, TASK, q, o, tmp_path, users=["3000"], target_modules=["nope_proj"], progress=False)
    with pytest.raises(UserError, match="synthetic data directory not found"):
        train_users(tiny_base, TASK, q, o, tmp_path, synthetic=tmp_path / "missing", progress=False)
    with pytest.raises(UserError, match="base model directory not found"):
        train_users(tmp_path / "nobase", TASK, q, o, tmp_path, progress=False)


def test_target_modules_discovered_for_fused_phi3(tiny_model_dir):
    from cdcda_export.train.modeling import load_base, resolve_target_modules

    model, _ = load_base(tiny_model_dir("tiny-phi3"))
    assert set(resolve_target_modules(model, None)) == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}


def test_lamp1_pairs_use_other_users_as_negatives():
    q, o = _qo("LaMP-1")
    ds = load_lamp("LaMP-1", q, o)
    u = ds.users[0]
    others = [it for x in ds.users[1:] for it in x.profile]
    data = T.build_user_data(ds.task, u, others, [], T.Hyper())
    assert data.counts["real_pairs"] == len(u.profile)
    assert {a for _, a, _ in data.train} <= {"[1]", "[2]"}
    assert "LaMP-1 needs other users" in T.build_user_data(ds.task, u, [], [], T.Hyper())
    random.seed(0)  # build_user_data must not depend on the global RNG
    assert T.build_user_data(ds.task, u, others, [], T.Hyper()).train == data.train


def test_negatives_pool_excludes_own_items_and_is_capped():
    flat = [(f"u{i % 50}", {"title": f"t{i}"}) for i in range(5000)]
    pool = T.negatives_pool(flat, "u7", seed=0, cap=100)
    assert len(pool) == 100 and all(int(p["title"][1:]) % 50 != 7 for p in pool)
    assert pool == T.negatives_pool(flat, "u7", seed=0, cap=100)
    small = T.negatives_pool(flat[:50], "u7", seed=0, cap=100)
    assert len(small) == 49


def test_training_and_eval_share_one_format(tiny_base):
    from cdcda_export.train.format import IGNORE_INDEX, encode_example, encode_prompt, format_prompt
    from cdcda_export.train.modeling import load_tokenizer

    tok = load_tokenizer(tiny_base)
    prompt = format_prompt("What is the score of the following review? review: fine food")
    assert prompt.endswith("\nAnswer: ")
    ex = encode_example(tok, prompt, "4", eos_id=0, max_seq_len=512)
    n_prompt = sum(1 for x in ex.labels if x == IGNORE_INDEX)
    assert ex.input_ids[:n_prompt] == encode_prompt(tok, prompt, 512)  # eval feeds exactly the trained prefix
    assert ex.labels[n_prompt:] == ex.input_ids[n_prompt:] and ex.input_ids[-1] == 0
    assert tok.decode(ex.input_ids[n_prompt:-1]) == "4"
    long = format_prompt("word " * 2000 + "review: fine food")
    cut = encode_example(tok, long, "4", eos_id=0, max_seq_len=64)
    assert len(cut.input_ids) == 64 and tok.decode(cut.input_ids, skip_special_tokens=True).endswith("review: fine food\nAnswer: 4")


def test_user_data_rebuilds_the_trainers_split(trained):
    out, _ = trained
    q, o = _qo()
    ds = load_lamp(TASK, q, o)
    hp = T.hyper_from_training(out / "3000")
    assert hp.seed == 0 and hp.max_steps == 8 and hp.lr == 2e-3
    data = T.user_data(ds, ds.user("3000"), hp)
    meta = json.loads((out / "3000" / "training.json").read_text())
    assert len(data.heldout_items) == meta["data"]["heldout"] == 4
    assert [data.query and data.query[1]] == ["2"]
    assert [g for _, g in data.heldout] == [ds.user("3000").profile[i]["score"] for i in data.heldout_items]
