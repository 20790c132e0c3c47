"""Gemma 3 (``gemma3_text``) through the one export decoder: eager parity per cache strategy, then ONNX
(ORT), ExecuTorch (XNNPACK fp32) and Core ML (structure; predictions need macOS).

The model is ``tiny-gemma3`` (cdcda init-model): one sliding-window layer (window 4) and one global layer,
two RoPE bases, query_pre_attn_scalar 24 != head_dim 16, norms perturbed from their zero init so that
Gemma's ``(1 + weight)`` scaling matters. Prompts are 12 tokens (3x the window) so every check runs
past the window. The eager tests also build a variant with final logit softcapping.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cdcda_export import runtime
from cdcda_export.export.decoder import ExportDecoder, causal_mask

ARCH = "tiny-gemma3"
EAGER_TOL = 1e-5    # decoder (any strategy) vs HF eager, max abs logit error (measured ~2e-6)
EXPORT_TOL = 1e-4   # ONNX Runtime / ExecuTorch fp32 artifacts vs HF eager (as the other families' export tests)
PROMPT = [5, 17, 42, 99, 123, 7, 300, 64, 12, 1000, 33, 250]   # 12 tokens > window 4
MAX_SEQ = 64


def _hf(tiny_model_dir, softcap: float | None = None, window: int | None = None):
    from cdcda_export.export.api import load_merged_model

    m = load_merged_model(tiny_model_dir(ARCH))
    if softcap is not None or window is not None:
        from transformers import AutoModelForCausalLM

        cfg = m.config
        if softcap is not None:
            cfg.final_logit_softcapping = softcap
        if window is not None:
            cfg.sliding_window = window
        m2 = AutoModelForCausalLM.from_config(cfg).eval()
        m2.load_state_dict(m.state_dict())
        m = m2
    return m


def _ref(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits[0]


def _run(dec: ExportDecoder, ids: torch.Tensor, chunks=(5, 1, 1, 5)) -> torch.Tensor:
    """Feed ``ids`` in chunks (prefill, decode steps, another prefill) through any built-in or ExecuTorch
    strategy; logits of every fed position [T, vocab]."""
    sp, pos, outs = dec.spec, 0, []
    past = [torch.zeros(1, sp.num_kv_heads, 0, sp.head_dim) for _ in range(2 * sp.num_layers)]
    with torch.no_grad():
        for n in chunks:
            x = ids[:, pos:pos + n]
            name = dec.cache.name
            if name == "io":
                out = dec(x, torch.ones(1, pos + n, dtype=torch.long), torch.arange(pos, pos + n)[None], *past)
                logits, past = out[0], list(out[1:])
            elif name == "buffer":
                logits = dec(x, causal_mask(n, pos + n))
            elif name == "executorch-state":   # one token per call
                logits = torch.cat([dec(x[:, j:j + 1], torch.tensor([pos + j])) for j in range(n)], 1)
            else:                               # executorch-custom-ops
                logits = dec(x, torch.tensor([pos]))
            outs.append(logits[0])
            pos += n
    return torch.cat(outs, 0)


def test_tiny_gemma3_shape_has_what_the_tests_need(tiny_model_dir):
    m = _hf(tiny_model_dir)
    cfg = m.config
    assert cfg.model_type == "gemma3_text" and type(m).__name__ == "Gemma3ForCausalLM"
    assert cfg.layer_types == ["sliding_attention", "full_attention"] and cfg.sliding_window == 4
    assert cfg.query_pre_attn_scalar != cfg.head_dim
    rp = cfg.rope_parameters
    assert rp["sliding_attention"]["rope_theta"] != rp["full_attention"]["rope_theta"]
    norms = [p for n, p in m.named_parameters() if n.endswith("norm.weight")]
    assert len(norms) == 1 + 2 * 6 and all(p.abs().max() > 0 for p in norms)   # perturbed (1 + w)
    assert len(PROMPT) >= 3 * cfg.sliding_window


def test_window_changes_the_reference(tiny_model_dir):
    """The sliding window really matters on these prompts: a decoder that ignored it would fail the parity
    tests below (HF with window 4 vs the same weights with a window longer than the prompt)."""
    ids = torch.tensor([PROMPT])
    a, b = _ref(_hf(tiny_model_dir), ids), _ref(_hf(tiny_model_dir, window=64), ids)
    assert torch.equal(a[:4], b[:4])                          # inside the window: identical
    assert (a[4:] - b[4:]).abs().max().item() > 100 * EAGER_TOL


@pytest.mark.parametrize("cache", ["io", "buffer"])
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_decoder_matches_hf_eager_past_the_window(tiny_model_dir, cache, softcap):
    hf = _hf(tiny_model_dir, softcap=softcap)
    ids = torch.tensor([PROMPT])
    ref = _ref(hf, ids)
    dec = ExportDecoder.from_hf(hf, max_seq_len=MAX_SEQ, cache=cache)
    assert dec.spec.family == "gemma3" and dec.spec.sliding_window == 4
    err = (_run(dec, ids) - ref).abs().max().item()
    assert err <= EAGER_TOL, f"{cache} softcap={softcap}: max |logit err| {err:.2e} > {EAGER_TOL}"
    if softcap:
        assert ref.abs().max().item() < softcap   # the cap is active


@pytest.mark.parametrize("opts", [{"fuse_projections": True}, {"delegate_friendly_norm": True},
                                  {"rope_as_matmul": True}, {"untie_lm_head": True}])
def test_decoder_speed_options_same_numbers(tiny_model_dir, opts):
    hf = _hf(tiny_model_dir)
    ids = torch.tensor([PROMPT])
    dec = ExportDecoder.from_hf(hf, max_seq_len=MAX_SEQ, cache="io", **opts)
    err = (_run(dec, ids) - _ref(hf, ids)).abs().max().item()
    assert err <= EAGER_TOL, f"{opts}: {err:.2e}"


def test_greedy_matches_hf_exactly(tiny_model_dir):
    hf = _hf(tiny_model_dir)
    dec = ExportDecoder.from_hf(hf, max_seq_len=MAX_SEQ, cache="io")
    sp = dec.spec
    ids = torch.tensor([PROMPT[:6]])
    with torch.no_grad():
        ref = hf.generate(ids, max_new_tokens=20, do_sample=False, min_new_tokens=20)[0, 6:].tolist()
        past = [torch.zeros(1, sp.num_kv_heads, 0, sp.head_dim) for _ in range(2 * sp.num_layers)]
        out, toks, x, pos = None, [], ids, 0
        for _ in range(20):
            t = x.shape[1]
            res = dec(x, torch.ones(1, pos + t, dtype=torch.long), torch.arange(pos, pos + t)[None], *past)
            logits, past = res[0], list(res[1:])
            pos += t
            tok = int(logits[0, -1].argmax())
            toks.append(tok)
            x = torch.tensor([[tok]])
    assert toks == ref


def test_executorch_and_ort_strategies_eager(tiny_model_dir):
    """The ExecuTorch strategies (custom_sdpa with a window mask; the one-token state cache) and ONNX's
    GroupQueryAttention reference op, run eagerly, against HF."""
    from cdcda_export.export.et_ops import CustomOpsKVCache, StateKVCache
    from cdcda_export.export.onnx import cache_strategy

    hf = _hf(tiny_model_dir)
    ids = torch.tensor([PROMPT])
    ref = _ref(hf, ids)
    for strategy, opts in ((CustomOpsKVCache(), {"rope_as_matmul": True, "delegate_friendly_norm": True}),
                           (StateKVCache(), {})):
        dec = ExportDecoder.from_hf(hf, max_seq_len=MAX_SEQ, cache=strategy, **opts)
        err = (_run(dec, ids) - ref).abs().max().item()
        assert err <= EAGER_TOL, f"{strategy.name}: {err:.2e}"
    for share in (True, False):
        dec = ExportDecoder.from_hf(hf, max_seq_len=MAX_SEQ, cache=cache_strategy("ort-gqa", share),
                                    fuse_projections=True)
        sp = dec.spec
        shape = (1, sp.num_kv_heads, MAX_SEQ if share else 0, sp.head_dim)
        past = [torch.zeros(shape) for _ in range(2 * sp.num_layers)]
        outs, pos = [], 0
        with torch.no_grad():
            for n in (5, 1, 6):
                res = dec(ids[:, pos:pos + n], torch.ones(1, pos + n, dtype=torch.long),
                          torch.arange(pos, pos + n)[None], *past)
                outs.append(res[0][0])
                past = list(res[1:])
                pos += n
        err = (torch.cat(outs) - ref).abs().max().item()
        assert err <= EAGER_TOL, f"ort-gqa share_buffer={share}: {err:.2e}"


def test_manifest_io_records_sliding_layers(tiny_model_dir):
    dec = ExportDecoder.from_hf(_hf(tiny_model_dir), max_seq_len=MAX_SEQ, cache="io")
    io = dec.io_description()
    al = io["attention_layers"]
    assert io["family"] == "gemma3"
    assert al["sliding_window"] == 4 and al["sliding_layers"] == [0] and al["global_layers"] == [1]
    assert al["rope_theta"] == {"global": 1000000.0, "sliding": 10000.0}
    assert "mask" in al["sliding_kv_cache"]


def test_other_families_manifest_unchanged(tiny_model_dir):
    from cdcda_export.export.api import load_merged_model

    dec = ExportDecoder.from_hf(load_merged_model(tiny_model_dir("tiny")), max_seq_len=MAX_SEQ, cache="io")
    assert "attention_layers" not in dec.io_description() and dec.embed_scale is None


# ----------------------------------------------------------------------------- exported artifacts


def _eager_steps(tiny_model_dir, prompt, n):
    """HF eager, full forward per step: logits of the prompt and of each greedy step."""
    hf = _hf(tiny_model_dir)
    ids = torch.tensor([prompt])
    with torch.no_grad():
        prefill = hf(input_ids=ids, use_cache=False).logits[0].numpy()
        toks, steps, logits = [], [], prefill[-1]
        for _ in range(n):
            tok = int(np.argmax(logits))
            toks.append(tok)
            ids = torch.cat([ids, torch.tensor([[tok]])], 1)
            logits = hf(input_ids=ids, use_cache=False).logits[0, -1].numpy()
            steps.append(logits)
    return prefill, toks, steps


def _check_runner(art, tiny_model_dir, label):
    prefill_ref, toks_ref, steps_ref = _eager_steps(tiny_model_dir, PROMPT, 16)
    r = runtime.load(art, threads=1)
    prefill = r.prefill(PROMPT)
    err = float(np.abs(prefill - prefill_ref).max())
    assert err <= EXPORT_TOL, f"{label}: prefill max |logit err| {err:.2e} > {EXPORT_TOL}"
    res = runtime.greedy_generate(r, PROMPT, 16, keep_logits=True)
    assert res.tokens == toks_ref, f"{label}: greedy tokens differ from eager"
    dec_err = max(float(np.abs(a - b).max()) for a, b in zip(res.logits[1:], steps_ref))
    assert dec_err <= EXPORT_TOL, f"{label}: decode max |logit err| {dec_err:.2e} > {EXPORT_TOL}"


@pytest.mark.integration
@pytest.mark.parametrize("attention", ["gqa", "portable"])
def test_onnx_fp32_parity(tiny_model_dir, tiny_artifact, attention):
    """gqa: GroupQueryAttention with local_window_size on the sliding layer (ORT's own window semantics);
    portable: plain ONNX ops with the window mask."""
    from cdcda_export.export.manifest import verify

    art = tiny_artifact(ARCH, "onnx/fp32", **({} if attention == "gqa" else {"onnx.attention": "portable"}))
    assert verify(art) == []
    io = json.loads((art / "manifest.json").read_text())["io"]
    assert io["family"] == "gemma3" and io["attention_layers"]["sliding_layers"] == [0]
    if attention == "gqa":
        import onnx

        g = onnx.load(str(art / "model.onnx"), load_external_data=False).graph
        windows = [next((a.i for a in n.attribute if a.name == "local_window_size"), None)
                   for n in g.node if n.op_type == "GroupQueryAttention"]
        assert windows == [4, None]          # sliding layer: keys q-3 .. q (window 4); global: none
    _check_runner(art, tiny_model_dir, f"onnx/fp32 ({attention})")


@pytest.mark.integration
def test_check_localises_a_gemma3_onnx_graph(tiny_artifact):
    """The check's per-layer localiser finds Gemma's residual stream: the embedding lookup scaled by sqrt(hidden)
    (a Mul by ``embed_scale``), then 2 sums per layer. Before, the chain stopped at the lookup (1 tensor of 2n+1)
    and the real Gemma 3 270M's failing int4 check said "graph not localisable"."""
    from cdcda_export.check import CheckOptions, check_artifacts

    art = tiny_artifact(ARCH, "onnx/fp32")
    n_layers = json.loads((art / "manifest.json").read_text())["io"]["num_layers"]
    div = check_artifacts([art], CheckOptions(max_new_tokens=4, localise="always"))[0]["divergence"]
    assert div["method"] == "onnx-extra-outputs" and "problem" not in div, div
    assert div["residual_tensors"] == 2 * n_layers + 1 and len(div["tensors"]) == n_layers + 1, div


@pytest.mark.integration
def test_executorch_xnnpack_fp32_parity(tiny_model_dir, tiny_artifact):
    from cdcda_export.export.manifest import verify

    art = tiny_artifact(ARCH, "executorch/xnnpack-fp32")
    assert verify(art) == []
    _check_runner(art, tiny_model_dir, "executorch/xnnpack-fp32")


@pytest.mark.integration
def test_coreml_fp16_structure_and_traced_parity(tiny_model_dir, tiny_artifact):
    """The Core ML package's structure (predictions need macOS), and the traced module that ct.convert
    receives against HF eager past the window (the window mask is built inside the graph)."""
    from cdcda_export.export import coreml as C
    from cdcda_export.export.manifest import verify

    art = tiny_artifact(ARCH, "coreml/fp16", max_seq_len=MAX_SEQ, prefill_len=16)
    assert verify(art) == []
    res = C.coreml_structural_check(art)
    assert res["passed"], res["problems"]
    m = json.loads((art / "manifest.json").read_text())
    assert m["io"]["decoder"]["attention_layers"]["sliding_window"] == 4
    assert len(res["signature"]["states"]) == 4
    hf = _hf(tiny_model_dir)
    dec = ExportDecoder.from_hf(hf, max_seq_len=MAX_SEQ, cache="buffer")
    traced = C.trace_decoder(dec)
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        outs = [traced(ids[:, :6], causal_mask(6, 6))[0]]
        for pos in range(6, len(PROMPT)):
            outs.append(traced(ids[:, pos:pos + 1], causal_mask(1, pos + 1))[0])
    err = (torch.cat(outs) - _ref(hf, ids)).abs().max().item()
    assert err <= EAGER_TOL, f"traced buffer decoder: {err:.2e}"
