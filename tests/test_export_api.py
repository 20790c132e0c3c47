"""export(): adapter merge + provenance, atomic writes, reruns, user errors, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cdcda_export.errors import UserError
from cdcda_export.export import registry
from cdcda_export.export.api import export
from cdcda_export.export.manifest import REQUIRED_KEYS, verify
from cdcda_export.utils import sha256_dir


@pytest.fixture(scope="session")
def tiny_adapter(tiny_model_dir, tmp_path_factory):
    """A real peft LoRA adapter (non-zero B, so merging changes the model) with training.json provenance."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = tiny_model_dir("tiny")
    out = tmp_path_factory.mktemp("adapters") / "user-7"
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    peft_model = get_peft_model(model, cfg)
    peft_model.save_pretrained(out, safe_serialization=True)
    (out / "training.json").write_text(json.dumps({"user_id": "u-42", "task": "LaMP-3"}))
    return out


@pytest.mark.integration
def test_adapter_is_merged_and_recorded(tiny_model_dir, tiny_adapter, tiny_artifact):
    import torch

    from cdcda_export import runtime
    from cdcda_export.export.api import load_merged_model
    from cdcda_export.utils import sha256_dir

    base = tiny_model_dir("tiny")
    art = tiny_artifact("tiny", "onnx/fp32", adapter=tiny_adapter)
    m = json.loads((art / "manifest.json").read_text())
    assert set(REQUIRED_KEYS) <= set(m)
    assert m["adapter"] == {"source": str(tiny_adapter.resolve()), "sha256": sha256_dir(tiny_adapter)}
    assert m["base_model"]["sha256"] == sha256_dir(base)
    assert (m["user_id"], m["task"]) == ("u-42", "LaMP-3")
    assert verify(art) == []

    ids = [5, 17, 42, 99, 123, 7]
    with torch.no_grad():
        merged = load_merged_model(base, tiny_adapter)(input_ids=torch.tensor([ids])).logits[0].numpy()
        plain = load_merged_model(base)(input_ids=torch.tensor([ids])).logits[0].numpy()
    got = runtime.load(art).prefill(ids)
    assert np.abs(merged - plain).max() > 1e-3, "the adapter must change the model for this test to mean anything"
    err = float(np.abs(got - merged).max())
    assert err <= 1e-4, f"artifact vs eager merged model: max |logit err| {err:.2e} > 1e-4"


@pytest.mark.integration
def test_interrupted_export_leaves_nothing_complete(tiny_model_dir, tmp_path, monkeypatch):
    def boom(job):
        (job.out_dir / "model.onnx").write_bytes(b"half a model")
        raise RuntimeError("killed mid-export")

    monkeypatch.setitem(registry._EXPORTERS, "onnx", boom)
    out = tmp_path / "art"
    with pytest.raises(RuntimeError, match="killed mid-export"):
        export(tiny_model_dir("tiny"), None, "onnx/fp32", out, progress=False)
    assert not out.exists(), "an interrupted export must not leave the artifact directory"
    assert not list(tmp_path.glob("*")), f"leftovers: {list(tmp_path.glob('*'))}"


@pytest.mark.integration
def test_rerun_is_cheap_and_existing_dir_needs_force(tiny_model_dir, tiny_artifact):
    base = tiny_model_dir("tiny")
    art = tiny_artifact("tiny", "onnx/fp32")
    before = (art / "manifest.json").stat().st_mtime_ns
    assert export(base, None, "onnx/fp32", art, progress=False) == art   # same inputs: returns at once
    assert (art / "manifest.json").stat().st_mtime_ns == before
    with pytest.raises(UserError, match="already exists .*\n  next: pass --force"):
        export(base, None, "onnx/fp32", art, progress=False, overrides=["max_seq_len=256"])


def test_bad_inputs_are_user_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a Hugging Face model directory.*\n  next: pass a Hugging Face model directory or a .gguf file"):
        export(tmp_path / "empty", None, "onnx/fp32", tmp_path / "out", progress=False)
    with pytest.raises(UserError, match="Recipe 'nope' not found. Available:"):
        export(tmp_path / "empty", None, "nope", tmp_path / "out", progress=False)


def test_bad_adapter_dir_is_user_error(tiny_model_dir, tmp_path):
    (tmp_path / "adapter").mkdir()
    with pytest.raises(UserError, match="not a peft adapter directory"):
        export(tiny_model_dir("tiny"), tmp_path / "adapter", "onnx/fp32", tmp_path / "out", progress=False)


@pytest.mark.integration
def test_cli_export_and_generate(tiny_model_dir, tmp_path):
    from typer.testing import CliRunner

    from cdcda_export.cli import app

    out = tmp_path / "art"
    cli = CliRunner()
    res = cli.invoke(app, ["export", "--base", str(tiny_model_dir("tiny")), "--recipe", "onnx/int4",
                           "--out", str(out), "--set", "max_seq_len=128", "--set", "prefill_len=16", "--quiet"])
    assert res.exit_code == 0, res.output
    assert "wrote: " in res.output and (out / "manifest.json").is_file()
    assert json.loads((out / "manifest.json").read_text())["io"]["max_seq_len"] == 128
    res = cli.invoke(app, ["generate", str(out), "--prompt", "Hello there", "--max-new-tokens", "5", "--threads", "1"])
    assert res.exit_code == 0, res.output
    assert res.output.startswith("Hello there") and "decode" in res.output and "tok/s" in res.output


def _adapter_copy(src: Path, dst: Path, base_sha: str | None) -> Path:
    import shutil

    shutil.copytree(src, dst)
    meta = {"user_id": "u-42", "task": "LaMP-3"}
    if base_sha:
        meta["base_model"] = {"source": "elsewhere", "sha256": base_sha}
    (dst / "training.json").write_text(json.dumps(meta))
    return dst


def test_adapter_trained_on_another_base_is_refused_unless_overridden(tiny_model_dir, tiny_adapter, tmp_path):
    """training.json records the base hash the adapter was trained on: another base of the same shapes
    (tiny seed 1) is refused before any work, naming training.json; --allow-base-mismatch exports and
    records the mismatch in the manifest."""
    trained_on = sha256_dir(tiny_model_dir("tiny"))
    other = tiny_model_dir("tiny", seed=1)
    ad = _adapter_copy(tiny_adapter, tmp_path / "ad", trained_on)
    with pytest.raises(UserError, match="trained on a different base model") as e:
        export(other, ad, "onnx/fp32", tmp_path / "refused", progress=False)
    assert "training.json" in str(e.value) and "--allow-base-mismatch" in str(e.value)
    assert not (tmp_path / "refused").exists()
    art = export(other, ad, "onnx/fp32", tmp_path / "forced", progress=False, allow_base_mismatch=True)
    m = json.loads((art / "manifest.json").read_text())
    assert "different base model" in m["adapter"]["base_mismatch"]
    # on its own base the same adapter exports with no mismatch recorded
    ok = export(tiny_model_dir("tiny"), ad, "onnx/fp32", tmp_path / "ok", progress=False)
    assert "base_mismatch" not in json.loads((ok / "manifest.json").read_text())["adapter"]


def test_truncated_adapter_weights_are_named(tiny_model_dir, tiny_adapter, tmp_path):
    ad = _adapter_copy(tiny_adapter, tmp_path / "ad", None)
    w = ad / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[:20])
    with pytest.raises(UserError, match="adapter weights cannot be read") as e:
        export(tiny_model_dir("tiny"), ad, "onnx/fp32", tmp_path / "out", progress=False)
    assert str(w) in str(e.value) and "cdcda train" in str(e.value)
    assert not (tmp_path / "out").exists()


def test_unsupported_model_type_names_the_config_and_a_next_step(tiny_model_dir, tmp_path):
    """A base of a family the export decoder lacks is refused naming its config.json and what to do."""
    import shutil

    from transformers import GPT2Config, GPT2LMHeadModel

    d = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=2048)).save_pretrained(d)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(tiny_model_dir("tiny") / name, d / name)
    with pytest.raises(UserError, match="model_type 'gpt2' is not supported") as e:
        export(d, None, "onnx/fp32", tmp_path / "art", progress=False)
    msg = str(e.value)
    assert str(d / "config.json") in msg and "cdcda init-model --arch smollm2-135m-instruct" in msg
    assert not (tmp_path / "art").exists()


@pytest.mark.integration
def test_merged_int8_keeps_q8_0_rounding(tiny_adapter, tiny_artifact):
    """onnx/int8's per-block scale search snaps blocks onto the base's grid, which rounds a merged LoRA delta
    away (user 3000's real merged model: KL 0.148 on the user's text vs 0.0049 for llama.cpp Q8_0): a merged
    export keeps Q8_0's rule and records it; the base export searches."""
    base = json.loads((tiny_artifact("tiny", "onnx/int8") / "manifest.json").read_text())
    merged = json.loads((tiny_artifact("tiny", "onnx/int8", adapter=tiny_adapter) / "manifest.json").read_text())
    assert base["quantization_applied"]["scale_search"] is True
    assert merged["quantization_applied"]["scale_search"] is False
