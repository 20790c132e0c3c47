"""The ExecuTorch export_llm peer converts a HF Llama directory to the Meta checkpoint its exporter
reads; the conversion is checked against the HF model's logits before anything is exported."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from _peers import et_llm  # noqa: E402


def _plain_rope_llama(tiny_model_dir, tmp_path: Path) -> Path:
    """tiny-llama with SmolLM2's plain RoPE (tiny-llama carries llama3 rope scaling for a 128-token
    original context, which export_llm's fixed 8192 cannot express)."""
    base = tmp_path / "tiny-llama-plain"
    shutil.copytree(tiny_model_dir("tiny-llama"), base)
    cfg = json.loads((base / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_theta": 100000.0, "rope_type": "default"}
    cfg.pop("rope_scaling", None)
    (base / "config.json").write_text(json.dumps(cfg))
    return base


def test_conversion_reproduces_hf_logits(tiny_model_dir, tmp_path):
    base = _plain_rope_llama(tiny_model_dir, tmp_path)
    info = et_llm.convert(base, tmp_path / "ckpt")
    # tolerance: fp32 reassociation only (the check itself refuses > 1e-3)
    assert info["max_abs_logit_diff_vs_hf"] <= 1e-4, info
    params = json.loads((tmp_path / "ckpt" / "params.json").read_text())
    cfg = json.loads((base / "config.json").read_text())
    assert params["n_layers"] == cfg["num_hidden_layers"] and params["n_kv_heads"] == cfg["num_key_value_heads"]
    sd = torch.load(tmp_path / "ckpt" / "checkpoint.pth")
    assert "layers.0.attention.wq.weight" in sd and "output.weight" in sd


def test_check_catches_a_wrong_conversion(tiny_model_dir, tmp_path, monkeypatch):
    """Without undoing HF's q/k permutation, RoPE rotates the wrong pairs: the check must refuse."""
    base = _plain_rope_llama(tiny_model_dir, tmp_path)
    monkeypatch.setattr(et_llm, "_unpermute", lambda w, n: w)
    with pytest.raises(ValueError, match="conversion is wrong"):
        et_llm.convert(base, tmp_path / "ckpt")


def test_non_llama_is_refused_by_name(tiny_model_dir):
    cfg = json.loads((tiny_model_dir("tiny-qwen2") / "config.json").read_text())
    with pytest.raises(ValueError, match="model_type='qwen2'"):
        et_llm.params_from_config(cfg)


def test_rope_scaling_is_refused_by_name(tiny_model_dir):
    cfg = json.loads((tiny_model_dir("tiny-llama") / "config.json").read_text())
    with pytest.raises(ValueError, match="rope scaling"):
        et_llm.params_from_config(cfg)
