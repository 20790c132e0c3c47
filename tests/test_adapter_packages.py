"""Adapter delivery: one base package, per-user adapter packages, in the three formats (tiny models).

Real exports and real runtimes: ONNX Runtime (our runner and ORT GenAI's ``og.Adapters``), the ExecuTorch
runtime, and Core ML structural checks (Core ML predicts only on macOS). Each user's adapter package must
give that user's own outputs, i.e. the eager model with that user's adapter merged.
Tolerances: the LoRA inputs are fp16, so base + adapter differs from the merged float model by the fp16
rounding of A and B (measured ~8e-4 on these logits); 5e-3 absolute. Without an adapter, the base package is
the plain base to 1e-5 (the LoRA product is exactly zero).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cdcda_export.errors import UserError
from cdcda_export.utils import sha256_dir

IDS = [1, 5, 9, 33, 2, 7, 11, 40]
FP16_TOL = 5e-3
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _adapter(base: Path, out: Path, seed: int, targets=("q_proj", "v_proj", "down_proj", "gate_proj"), r: int = 4):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets), init_lora_weights=False)
    get_peft_model(model, cfg).save_pretrained(out, safe_serialization=True)
    (out / "training.json").write_text(json.dumps({"user_id": out.name, "task": "LaMP-3",
                                                   "base_model": {"sha256": sha256_dir(base)}}))
    return out


@pytest.fixture(scope="module")
def users(tiny_model_dir, tmp_path_factory):
    base = tiny_model_dir("tiny")
    root = tmp_path_factory.mktemp("users")
    return base, [_adapter(base, root / "u1", 1), _adapter(base, root / "u2", 2, targets=TARGETS)]


def _eager_logits(base: Path, adapter: Path | None) -> np.ndarray:
    import torch

    from cdcda_export.export.api import load_merged_model

    m = load_merged_model(base, adapter)
    with torch.no_grad():
        return m(input_ids=torch.tensor([IDS])).logits[0].numpy()


@pytest.fixture(scope="module")
def eager(users):
    base, (u1, u2) = users
    return {None: _eager_logits(base, None), "u1": _eager_logits(base, u1), "u2": _eager_logits(base, u2)}


def _layout(rank=8):
    from cdcda_export.export.lora import LoraLayout

    return LoraLayout(rank=rank, targets=TARGETS)


@pytest.mark.integration
@pytest.mark.parametrize("recipe", ["onnx/fp32", "executorch/xnnpack-fp32"])
def test_two_users_on_one_base_package_each_get_their_own_model(users, eager, recipe, tmp_path, monkeypatch):
    from cdcda_export import runtime
    from cdcda_export.export.packages import adapter_package, base_package

    monkeypatch.setenv("CDCDA_CACHE", str(tmp_path / "cache"))
    base, (u1, u2) = users
    bp = base_package(base, recipe, _layout(), progress=False)
    assert base_package(base, recipe, _layout(), progress=False) == bp        # cached: built once
    bm = json.loads((bp / "manifest.json").read_text())
    assert bm["delivery"] == "base-package" and bm["adapter"] is None and bm["lora"]["rank"] == 8
    p1 = adapter_package(bp, u1, tmp_path / "p1")
    p2 = adapter_package(bp, u2, tmp_path / "p2")
    m1 = json.loads((p1 / "manifest.json").read_text())
    assert m1["base_package"]["sha256"] and m1["adapter"]["rank"] == 4 and m1["user_id"] == "u1"
    assert m1["adapter"]["dtype"] == "float16" and m1["adapter"]["scale"] == 2.0

    r = runtime.load(bp, adapter=p1)
    got1 = r.prefill(IDS)
    np.testing.assert_allclose(got1, eager["u1"], atol=FP16_TOL)
    r.reset()
    r.set_adapter(p2)                      # switch users: same loaded program
    got2 = r.prefill(IDS)
    np.testing.assert_allclose(got2, eager["u2"], atol=FP16_TOL)
    assert np.abs(got1 - got2).max() > 100 * FP16_TOL       # the two users really differ
    r.reset()
    r.set_adapter(None)
    np.testing.assert_allclose(r.prefill(IDS), eager[None], atol=1e-4)
    # decoding one token at a time with an adapter gives the same logits as the prefill
    r.reset()
    r.set_adapter(p1)
    r.prefill(IDS[:4])
    steps = [r.decode(t) for t in IDS[4:]]
    np.testing.assert_allclose(np.stack(steps), eager["u1"][4:], atol=FP16_TOL)


@pytest.mark.integration
def test_ort_genai_applies_adapter_packages_with_og_adapters(users, eager, tmp_path, monkeypatch):
    from cdcda_export import runtime
    from cdcda_export.export.packages import adapter_package, base_package

    monkeypatch.setenv("CDCDA_CACHE", str(tmp_path / "cache"))
    base, (u1, u2) = users
    bp = base_package(base, "onnx/fp32", _layout(), progress=False)
    p1, p2 = adapter_package(bp, u1, tmp_path / "p1"), adapter_package(bp, u2, tmp_path / "p2")
    r = runtime.load(bp, adapter=p1, engine="onnxruntime-genai")
    np.testing.assert_allclose(np.asarray(r.prefill_last(IDS)).reshape(-1), eager["u1"][-1], atol=FP16_TOL)
    r.set_adapter(p2)
    np.testing.assert_allclose(np.asarray(r.prefill_last(IDS)).reshape(-1), eager["u2"][-1], atol=FP16_TOL)
    r.set_adapter(None)
    np.testing.assert_allclose(np.asarray(r.prefill_last(IDS)).reshape(-1), eager[None][-1], atol=1e-4)


@pytest.mark.integration
def test_quantized_base_package_keeps_the_float_delta(users, eager, tmp_path, monkeypatch):
    """onnx/int4: base weights on the 4-bit grid, the user's delta in fp16 beside them. The adapter package's
    error against the eager merged model is the base's own quantization error, not more."""
    from cdcda_export import runtime
    from cdcda_export.export.packages import adapter_package, base_package

    monkeypatch.setenv("CDCDA_CACHE", str(tmp_path / "cache"))
    base, (u1, _) = users
    bp = base_package(base, "onnx/int4", _layout(), progress=False)
    bm = json.loads((bp / "manifest.json").read_text())
    assert bm["quantization_applied"]["quantized_matmuls"] > 0
    assert bm["quantization_applied"]["op_counts"].get("MatMul", 0) >= 2 * 4 * 2   # the LoRA products stay float
    r = runtime.load(bp, adapter=adapter_package(bp, u1, tmp_path / "p1"))
    with_adapter = r.prefill(IDS)
    r.reset()
    r.set_adapter(None)
    plain = r.prefill(IDS)
    base_err = np.abs(plain - eager[None]).max()
    delta_err = np.abs((with_adapter - plain) - (eager["u1"] - eager[None])).max()
    # the delta is carried through the quantized graph up to the nonlinear interaction with the base's own error
    assert delta_err < 0.5 * np.abs(eager["u1"] - eager[None]).max(), (delta_err, base_err)


@pytest.mark.integration
def test_adapter_package_for_another_base_package_is_refused(users, tmp_path, monkeypatch):
    from cdcda_export import runtime
    from cdcda_export.export.packages import adapter_package, base_package

    monkeypatch.setenv("CDCDA_CACHE", str(tmp_path / "cache"))
    base, (u1, _) = users
    bp8 = base_package(base, "onnx/fp32", _layout(8), progress=False)
    # the identity of a base package is its files: an ONNX graph takes any rank, so other layouts of the same
    # recipe are the same package; another recipe is another package
    bp4 = base_package(base, "onnx/int8", _layout(4), progress=False)
    p = adapter_package(bp8, u1, tmp_path / "p")
    with pytest.raises(UserError) as e:
        runtime.load(bp4, adapter=p)
    assert "base_package.sha256" in str(e.value) and "manifest.json" in str(e.value)
    r = runtime.load(bp4)
    with pytest.raises(UserError, match="base_package.sha256"):
        r.set_adapter(p)
    # a merged artifact takes no adapter package
    merged = tmp_path / "merged"
    from cdcda_export.export.api import export

    export(base, None, "onnx/fp32", merged, progress=False)
    with pytest.raises(UserError, match="delivery"):
        runtime.load(merged, adapter=p)


@pytest.mark.integration
def test_adapter_of_another_base_or_rank_is_refused_when_packaging(users, tiny_model_dir, tmp_path, monkeypatch):
    from cdcda_export.export.packages import adapter_package, base_package

    monkeypatch.setenv("CDCDA_CACHE", str(tmp_path / "cache"))
    base, (u1, _) = users
    bp = base_package(base, "executorch/xnnpack-fp32", _layout(2), progress=False)
    with pytest.raises(UserError) as e:   # rank 4 adapter, the ExecuTorch graph's LoRA rank is fixed at 2
        adapter_package(bp, u1, tmp_path / "p")
    assert "rank 4 exceeds" in str(e.value) and "adapter_config.json" in str(e.value)
    other = _adapter(tiny_model_dir("tiny", seed=1), tmp_path / "other", 3, r=2)
    with pytest.raises(UserError, match="base_model.sha256"):
        adapter_package(bp, other, tmp_path / "p2")
    p = adapter_package(bp, other, tmp_path / "p3", allow_base_mismatch=True)
    assert "base_mismatch" in json.loads((p / "manifest.json").read_text())["adapter"]
    assert not (tmp_path / "p").exists() and not (tmp_path / "p2").exists()


@pytest.mark.integration
def test_damaged_adapter_package_is_named(users, tmp_path, monkeypatch):
    from cdcda_export import runtime
    from cdcda_export.export.packages import adapter_package, base_package

    monkeypatch.setenv("CDCDA_CACHE", str(tmp_path / "cache"))
    base, (u1, _) = users
    bp = base_package(base, "onnx/fp32", _layout(), progress=False)
    p = adapter_package(bp, u1, tmp_path / "p")
    f = p / "adapter.onnx_adapter"
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(UserError) as e:
        runtime.load(bp, adapter=p)
    assert "adapter.onnx_adapter" in str(e.value)


@pytest.mark.integration
def test_coreml_base_package_structure_and_adapter_package(users, tmp_path, monkeypatch):
    """Core ML: LoRA-as-inputs (fp16 model inputs named lora_{layer}_{target}_A|B); checked structurally on
    Linux (Core ML predicts only on macOS)."""
    from cdcda_export.export.coreml import coreml_structural_check
    from cdcda_export.export.packages import adapter_package, base_package

    monkeypatch.setenv("CDCDA_CACHE", str(tmp_path / "cache"))
    base, (u1, _) = users
    bp = base_package(base, "coreml/int4-block32", _layout(), progress=False)
    res = coreml_structural_check(bp)
    assert res["passed"], res["problems"]
    assert res["checks"]["lora_input_shapes"] and res["checks"]["compressed_weights"]
    assert res["signature"]["inputs"]["lora_0_q_proj_A"]["dtype"] == "float16"
    p = adapter_package(bp, u1, tmp_path / "p")
    from safetensors.numpy import load_file

    t = load_file(str(p / "adapter.safetensors"))
    assert t["lora.0.q_proj.A"].shape == (64, 8) and t["lora.0.q_proj.A"].dtype == np.float16
    assert not t["lora.0.k_proj.A"].any()       # a target the adapter lacks: zeros


@pytest.mark.integration
def test_cli_base_package_adapter_only_check_and_generate(users, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from cdcda_export.cli import app

    monkeypatch.setenv("CDCDA_CACHE", str(tmp_path / "cache"))
    base, (u1, _) = users
    cli = CliRunner()
    r = cli.invoke(app, ["export", "--base", str(base), "--recipe", "onnx/fp32", "--out", str(tmp_path / "bp"),
                         "--base-package", "--quiet"])
    assert r.exit_code == 0, r.output
    r = cli.invoke(app, ["export", "--base", str(base), "--recipe", "onnx/fp32", "--out", str(tmp_path / "u1"),
                         "--adapter", str(u1), "--adapter-only", "--base-package-dir", str(tmp_path / "bp")])
    assert r.exit_code == 0, r.output
    assert "adapter package" in r.output
    r = cli.invoke(app, ["check", str(tmp_path / "u1"), "--report", str(tmp_path / "r.json")])
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "r.json").read_text())
    rep = rep["reports"][0] if "reports" in rep else rep
    assert rep["artifact"]["delivery"] == "adapter-package" and rep["passed"]
    assert rep["metrics"]["max_abs_logit_err"] < 1e-4      # an fp32 recipe's adapter defaults to float32 inputs
    assert json.loads((tmp_path / "u1" / "manifest.json").read_text())["adapter"]["dtype"] == "float32"
    r = cli.invoke(app, ["generate", str(tmp_path / "bp"), "--adapter", str(tmp_path / "u1"), "--prompt", "hi",
                         "--max-new-tokens", "3"])
    assert r.exit_code == 0, r.output


@pytest.mark.integration
def test_bench_reports_adapter_load_and_switch_times(users, tmp_path, monkeypatch):
    from device_harness import BenchConfig
    from device_harness.protocol import bench

    from cdcda_export.export.packages import adapter_package, base_package

    monkeypatch.setenv("CDCDA_CACHE", str(tmp_path / "cache"))
    base, (u1, _) = users
    bp = base_package(base, "onnx/fp32", _layout(), progress=False)
    p = adapter_package(bp, u1, tmp_path / "p")
    res = bench(bp, "host", BenchConfig(prompt_len=8, gen_len=4, runs=2, warmup=0, adapter=str(p)))
    for k in ("adapter_load_ms", "adapter_switch_ms"):
        m = res["metrics"][k]
        assert len(m["samples"]) == 2 and 0 < m["median"] < 5000, m
    assert res["config"]["adapter"] == str(p)
    with pytest.raises(UserError, match="delivery"):     # a merged artifact takes no adapter package
        from cdcda_export.export.api import export

        bench(export(base, None, "onnx/fp32", tmp_path / "merged", progress=False), "host",
              BenchConfig(prompt_len=8, gen_len=4, runs=1, warmup=0, adapter=str(p)))


@pytest.mark.integration
def test_demo_answers_come_from_the_base_package_with_and_without_the_users_adapter(tiny_model_dir, tmp_path,
                                                                                       monkeypatch):
    """The demo's answer table: the LaMP user's prompts through the shipped base package, alone and with the
    user's adapter package, equal a direct run of each."""
    from cdcda_export import runtime
    from cdcda_export.data import get_task, sample_paths
    from cdcda_export.export.packages import adapter_package, base_package
    from cdcda_export.pipeline.answers import artifact_answers

    monkeypatch.setenv("CDCDA_CACHE", str(tmp_path / "cache"))
    base = tiny_model_dir("tiny")
    ad = _adapter(base, tmp_path / "3000", 5)
    (ad / "training.json").write_text(json.dumps({"user_id": "3000", "task": "LaMP-3",
                                                  "base_model": {"sha256": sha256_dir(base)}}))
    bp = base_package(base, "onnx/fp32", _layout(), progress=False)
    pkg = adapter_package(bp, ad, tmp_path / "pkg")
    q, o = sample_paths("LaMP-3")
    summary = {"per_user": [{"task": "LaMP-3", "user": "3000",
                             "deliverables": {"onnx/fp32": {"path": str(pkg), "delivery": "adapter-package"}}}]}
    rows = artifact_answers(summary, {"LaMP-3": str(q)}, {"LaMP-3": str(o)}, max_prompts=2)
    assert len(rows) == 2 and rows[-1]["kind"] == "user-query" and rows[-1]["gold"] is not None
    from transformers import AutoTokenizer

    from cdcda_export.check.core import _read_manifest
    from cdcda_export.check.prompts import user_prompts
    from cdcda_export.train.format import encode_prompt

    tok = AutoTokenizer.from_pretrained(str(bp))
    prompts, _ = user_prompts(_read_manifest(pkg), "LaMP-3", q, o, ad, pkg, max_heldout=1)
    n = get_task("LaMP-3").max_new_tokens
    for row, p in zip(rows, prompts[-2:]):
        for who, adapter in (("base", None), ("personalized", pkg)):
            r = runtime.load(bp, adapter=adapter)
            ids = encode_prompt(tok, p.text, r.max_seq_len - n)
            want = tok.decode(runtime.greedy_generate(r, ids, n).tokens, skip_special_tokens=True).strip()
            # the table stops at the end of turn / EOS; the direct run does not: compare the prefix
            assert want.startswith(row[who]), (who, row[who], want)
