"""quantization.follow_source (ONNX int4): layer matrices keep the precision the base's GGUF stored them in.

Gemma 3 270M's Q4_K_M file mixes Q4_K (attn_output, half the ffn_down) with Q5_0 / Q6_K / Q8_0 tensors; a 4-bit
grid rounds the latter again. These tests build that situation on the tiny model: some matrices on a Q4_K-like
grid (a step and a minimum per block of 32 whose codes do not reach both ends of 0..15, as K-quant's searched
scales leave them), the others on a Q5_0 grid (d * (q - 16), q in 0..31), with a ``cdcda_base.json`` naming
each tensor's type as ``cdcda init-model`` records it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cdcda_export import runtime

PROMPT = [5, 17, 42, 99, 123, 7, 300, 64, 12, 1000]
Q4K = ("o_proj", "down_proj")          # on a 4-bit min-scale grid (Q4_K-like)
Q5 = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")   # on a Q5_0 grid
GGUF_KIND = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
             "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}


def q4k_blocks(o, i, g):
    import torch

    d = (torch.rand(o, i // 32, 1, generator=g) * 0.01 + 0.001).half().float()
    m = (-8 * d + torch.randn(o, i // 32, 1, generator=g) * 0.002).half().float()
    q = torch.randint(2, 13, (o, i // 32, 32), generator=g).float()   # neither 0 nor 15 reached
    return (d * q + m).reshape(o, i)


def q5_0_blocks(o, i, g):
    import torch

    d = (torch.rand(o, i // 32, 1, generator=g) * 0.006 + 0.0005).half().float()
    q = torch.randint(0, 32, (o, i // 32, 32), generator=g).float()
    return (d * (q - 16)).reshape(o, i)


def mixed_source_model(src, dst):
    """The tiny model with o/down on a Q4_K-like grid, q/k/v/gate/up on Q5_0, the tied embedding on Q8_0, and a
    cdcda_base.json recording those types per GGUF tensor. Returns the model."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    types = {"token_embd.weight": "Q8_0"}
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            for proj in Q4K + Q5:
                mod = getattr(layer.self_attn, proj, None) or getattr(layer.mlp, proj)
                o, k = mod.weight.shape
                mod.weight.copy_(q4k_blocks(o, k, g) if proj in Q4K else q5_0_blocks(o, k, g))
                types[f"blk.{i}.{GGUF_KIND[proj]}.weight"] = "Q4_K" if proj in Q4K else "Q5_0"
        e = model.model.embed_tokens.weight
        v, h = e.shape
        d = (e.reshape(v, h // 32, 32).abs().amax(-1, keepdim=True) / 127).clamp_min(1e-4).half().float()
        e.copy_((torch.round(e.reshape(v, h // 32, 32) / d) * d).reshape(v, h))
    model.save_pretrained(dst)
    for f in src.iterdir():
        if f.name.startswith("tokenizer") or f.name in ("generation_config.json", "chat_template.jinja"):
            (dst / f.name).write_bytes(f.read_bytes())
    counts: dict[str, int] = {}
    for t in types.values():
        counts[t] = counts.get(t, 0) + 1
    (dst / "cdcda_base.json").write_text(json.dumps({
        "source": {"gguf": "test-fixture.gguf", "sha256": None}, "gguf_architecture": "llama",
        "model_type": "llama", "dequantized_from": counts, "type_by_tensor": types, "random_weights": False}))
    return model


def test_min_scale_blocks_reproduce_a_k_quant_block_and_keep_min_max_off_grid():
    """A Q4_K-like block (codes 2..12 of 0..15) is reproduced to float rounding (tolerance 1e-6 relative) by the
    step search; the min-max grid alone (ORT's HQQ without optimisation) misses it by a few % of the weights. An
    off-grid block (noise of 1e-4 added) keeps the min-max grid: codes up to 15."""
    import torch

    from cdcda_export.export.onnx import min_scale_blocks

    g = torch.Generator().manual_seed(0)
    w = q4k_blocks(64, 128, g)

    def rel(w, codes, step, zp):
        deq = ((codes.reshape(64, 4, 32).float() - zp[..., None]) * step[..., None]).reshape(64, 128)
        return float((deq - w).norm() / w.norm())

    assert rel(w, *min_scale_blocks(w, 4, 32)) <= 1e-6
    lo = w.reshape(64, 4, 32).min(-1).values
    step = (w.reshape(64, 4, 32).max(-1).values - lo) / 15
    codes = torch.round((w.reshape(64, 4, 32) - lo[..., None]) / step[..., None]).reshape(64, 128)
    assert rel(w, codes, step, -lo / step) > 0.01
    noisy = w + 1e-4 * torch.randn(64, 128, generator=g)
    codes, step, zp = min_scale_blocks(noisy, 4, 32)
    assert int(codes.max()) == 15 and int(codes.min()) == 0


def test_searched_int8_blocks_are_exact_on_q5_0():
    """8-bit symmetric blocks with the searched scale reproduce Q5_0 blocks (tolerance 1e-6 relative); Q8_0's
    rule alone (max|w| / 127) leaves ~1e-3 relative."""
    import torch

    from cdcda_export.export.onnx import _q8_0_blocks, _q8_blocks_searched

    w = q5_0_blocks(64, 128, torch.Generator().manual_seed(0)).numpy()

    def rel(q, scale):
        deq = ((q.astype(np.float32) - 128).reshape(64, 4, 32) * scale[..., None]).reshape(64, 128)
        return float(np.linalg.norm(deq - w) / np.linalg.norm(w))

    assert rel(*_q8_blocks_searched(w, 32)) <= 1e-6
    assert rel(*_q8_0_blocks(w, 32)) > 1e-4


def test_plan_reads_types_and_refuses_nothing_without_provenance(tiny_model_dir):
    """source_grid.plan: fused qkv / gate_up whose parts are Q5_0 go to 8 bit, Q4_K ones stay; a tensor with no
    recorded type is counted as unknown and kept; no provenance plans nothing."""
    from cdcda_export.export.decoder import ExportDecoder
    from cdcda_export.export.api import load_merged_model
    from cdcda_export.export.source_grid import plan

    model = load_merged_model(tiny_model_dir("tiny"), None)
    dec = ExportDecoder.from_hf(model, max_seq_len=32, fuse_projections=True)
    n = len(dec.layers)
    types = {}
    for i in range(n):
        types.update({f"blk.{i}.{GGUF_KIND[p]}.weight": "Q4_K" if p in Q4K else "Q5_0" for p in Q4K + Q5})
    p = plan(dec, types, 4)
    assert sorted(p["linears"]) == sorted([f"layers.{i}.qkv_proj" for i in range(n)]
                                          + [f"layers.{i}.gate_up_proj" for i in range(n)])
    assert p["kept_bits"] == 2 * n and p["unknown"] == 0
    types["blk.0.attn_v.weight"] = "Q4_0"     # one part at 4 bit: the fused matrix still holds Q5_0 parts
    del types["blk.0.ffn_down.weight"]
    p = plan(dec, types, 4)
    assert "layers.0.qkv_proj" in p["linears"] and p["unknown"] == 1
    assert plan(dec, None, 4) == {"by_fingerprint": {}, "linears": {}, "kept_bits": 0, "unknown": 0,
                                  "provenance": False}


@pytest.mark.integration
def test_follow_source_keeps_a_mixed_base_exact(tiny_model_dir, tmp_path):
    """onnx/int4 on a base whose GGUF mixed Q4_K and Q5_0 tensors: with follow_source (the recipe's default) the
    Q5_0 matrices are 8-bit and exact, the Q4_K ones on their own 4-bit step: logits equal the eager model's
    within 5e-3 (fp16 scales and activations of those matmuls, as in test_min_scale_grid_reproduces_an_on_grid_base).
    Without it every matrix is rounded to 4 bit: more than 10x that error. Without provenance the recipe keeps
    every layer at 4 bit and says so in the manifest."""
    import shutil

    import torch

    from cdcda_export.export.api import export

    base = tmp_path / "mixed"
    model = mixed_source_model(tiny_model_dir("tiny"), base)
    with torch.no_grad():
        ref = model(torch.tensor([PROMPT])).logits[0].numpy()
    n = model.config.num_hidden_layers
    err, facts = {}, {}
    for label, extra in (("follow", []), ("off", ["quantization.follow_source=false"])):
        art = export(base, None, "onnx/int4", tmp_path / label, progress=False,
                     overrides=["onnx.accuracy_level=0"] + extra)
        err[label] = float(np.abs(runtime.load(art).prefill(PROMPT) - ref).max())
        facts[label] = json.loads((art / "manifest.json").read_text())["quantization_applied"]
    fs = facts["follow"]["follow_source"]
    assert fs["provenance"] is True and fs["eight_bit"] == 2 * n and fs["int4"] == 2 * n, fs
    assert fs["linears"]["layers.0.qkv_proj"] == {f"blk.0.attn_{x}.weight": "Q5_0" for x in "qkv"}
    assert "int8 source" in facts["follow"]["linear_kinds"]["linear"]
    assert "follow_source" not in facts["off"]
    assert err["follow"] <= 5e-3, err
    assert err["off"] > 10 * err["follow"], err

    plain = tmp_path / "plain"
    shutil.copytree(base, plain)
    (plain / "cdcda_base.json").unlink()
    art = export(plain, None, "onnx/int4", tmp_path / "plain-art", progress=False)
    fs = json.loads((art / "manifest.json").read_text())["quantization_applied"]["follow_source"]
    assert fs["provenance"] is False and fs["eight_bit"] == 0, fs


def test_follow_source_is_an_onnx_int4_option():
    """The recipe key is refused where no 8-bit fallback exists (ONNX int8 already is 8 bit; ExecuTorch has none)."""
    from cdcda_export.errors import ValidationErrors
    from cdcda_export.export.registry import resolve_recipe

    assert resolve_recipe("onnx/int4")[0].quantization.follow_source is True
    for recipe in ("onnx/int8", "executorch/xnnpack-8da4w"):
        with pytest.raises(ValidationErrors, match="follow_source needs ONNX int4"):
            resolve_recipe(recipe, ["quantization.follow_source=true"])
