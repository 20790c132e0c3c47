"""Merging a LoRA adapter into its base: same logits as the peft model, provenance, early return."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cdcda_export.errors import UserError
from cdcda_export.train import merge_adapter
from cdcda_export.utils import sha256_dir


def _random_adapter(base: Path, out: Path, seed: int = 0) -> Path:
    """A peft LoRA adapter with random, non-zero B (so merging really changes the weights)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from cdcda_export.train.modeling import load_base, resolve_target_modules

    model, _ = load_base(base)
    torch.manual_seed(seed)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=resolve_target_modules(model, None), init_lora_weights=False)
    get_peft_model(model, cfg).save_pretrained(str(out), safe_serialization=True)
    return out


def _logits(model, ids):
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


@pytest.mark.parametrize("arch", ["tiny", "tiny-phi3"])
def test_merged_logits_equal_peft_logits(tiny_model_dir, tmp_path, arch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cdcda_export.train.modeling import load_base

    base = tiny_model_dir(arch)
    adapter = _random_adapter(base, tmp_path / "adapter")
    out = merge_adapter(base, adapter, tmp_path / "merged")

    tok = AutoTokenizer.from_pretrained(str(out))
    ids = tok("What is the score of the following review? review: fine food\nAnswer: ")["input_ids"]
    base_model, _ = load_base(base)
    ref_base = _logits(base_model, ids)
    peft_logits = _logits(PeftModel.from_pretrained(base_model, str(adapter)).eval(), ids)
    merged = AutoModelForCausalLM.from_pretrained(str(out), use_safetensors=True).eval()
    err = (_logits(merged, ids) - peft_logits).abs().max().item()
    assert err <= 1e-5, f"merged vs peft max |logit diff| {err:.2e} > 1e-5"
    assert (peft_logits - ref_base).abs().max().item() > 1e-3, "adapter must change the logits for the test to mean anything"

    files = {p.name for p in out.iterdir()}
    assert "model.safetensors" in files and "tokenizer.json" in files and "merge.json" in files
    assert not any(f.endswith((".bin", ".pt", ".pth")) for f in files)
    assert not any("lora" in k for k in merged.state_dict())
    meta = json.loads((out / "merge.json").read_text())
    assert meta["base_model"]["sha256"] == sha256_dir(base)
    assert meta["adapter"]["sha256"] == sha256_dir(adapter)
    assert meta["output_sha256"] == sha256_dir(out)


def test_rerun_returns_early_and_refuses_foreign_dirs(tiny_base, tmp_path):
    adapter = _random_adapter(tiny_base, tmp_path / "adapter")
    out = merge_adapter(tiny_base, adapter, tmp_path / "merged")
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert merge_adapter(tiny_base, adapter, out) == out
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp  # nothing rewritten
    # another adapter into the same output: it is a previous merge output, so it is replaced
    other = _random_adapter(tiny_base, tmp_path / "adapter2", seed=1)
    merge_adapter(tiny_base, other, out)
    assert json.loads((out / "merge.json").read_text())["adapter"]["sha256"] == sha256_dir(other)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not a merge output"):
        merge_adapter(tiny_base, adapter, foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"
    (other / "training.json").write_text(json.dumps({"base_model": {"source": "/x", "sha256": "0" * 64}}))
    with pytest.raises(UserError, match="different base model"):
        merge_adapter(tiny_base, other, tmp_path / "m3")
    with pytest.raises(UserError, match="not a LoRA adapter directory"):
        merge_adapter(tiny_base, tmp_path / "nothing", tmp_path / "m2")
    assert not any(p.name.startswith(".merged.partial") for p in tmp_path.iterdir())
