"""Follow the base's own precision, tensor by tensor (``quantization.follow_source``, ONNX int4 recipes).

A base converted from a GGUF file keeps, in ``cdcda_base.json``, the quantization type each tensor was stored in
(``type_by_tensor``; :func:`..models.gguf.source_tensor_types`). A K-quant file mixes types: Gemma 3 270M's
Q4_K_M stores attn_output and half the ffn_down in Q4_K (4 bit), but attn_q/k, ffn_gate/up and half the attn_v
in Q5_0 (5 bit, symmetric: llama.cpp falls back from Q4_K when a row, 640 here, is not a multiple of 256), the
other attn_v in Q8_0 and the other ffn_down in Q6_K. A 4-bit grid reproduces the Q4_K tensors exactly but rounds
every Q5_0 / Q6_K / Q8_0 weight again (measured on that model: each such layer matrix 0.068 relative error, the
int4 artifact KL 0.136 against the float base). With ``follow_source`` an export keeps each layer matrix whose
source tensors were stored above the recipe's bits at 8 bit (symmetric blocks, scale searched per block: exact
on a Q5_0 or Q8_0 block), as llama.cpp's K-quant mixtures do, and the rest on the recipe's 4-bit grid.

The decision reads the base's provenance, not the weights, so a LoRA-merged model (off every grid) gets the same
mixture as its base. A base with no GGUF provenance (a float checkpoint) keeps every layer at the recipe's bits.

Matching a decoder linear to its ONNX MatMul: the dynamo exporter drops module names, so each float weight
[K, N] in the graph is matched by its first row (= the first column of the torch weight [N, K], 16 float32
values), which the export leaves bit-exact. A fingerprint shared by two planned linears is an error.
"""

from __future__ import annotations

import numpy as np

# bits per weight of the GGUF types llama.cpp writes (the float types as their width)
GGUF_BITS = {"Q2_K": 2, "Q3_K": 3, "IQ4_NL": 4, "IQ4_XS": 4, "Q4_0": 4, "Q4_1": 4, "Q4_K": 4, "Q5_0": 5, "Q5_1": 5,
             "Q5_K": 5, "Q6_K": 6, "Q8_0": 8, "Q8_K": 8, "BF16": 16, "F16": 16, "F32": 32}
# decoder projection -> GGUF tensor kind (llama.cpp's names; Llama/SmolLM2 and Gemma 3 use the same ones)
GGUF_KIND = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
             "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
FINGERPRINT_VALUES = 16


def fingerprint(first_row: np.ndarray) -> bytes:
    """The first ``FINGERPRINT_VALUES`` float32 values of a weight's [K, N] layout (its first row)."""
    return np.ascontiguousarray(np.asarray(first_row, dtype=np.float32).reshape(-1)[:FINGERPRINT_VALUES]).tobytes()


def decoder_linears(dec) -> list[tuple[str, object, tuple[str, ...]]]:
    """(name, nn.Linear, projections it holds) for every layer linear the decoder exports, fused ones included."""
    out = []
    for i, layer in enumerate(dec.layers):
        a, m = layer.self_attn, layer.mlp
        if a.qkv_proj is not None:
            out.append((f"layers.{i}.qkv_proj", a.qkv_proj, ("q_proj", "k_proj", "v_proj")))
        else:
            out += [(f"layers.{i}.{p}", getattr(a, p), (p,)) for p in ("q_proj", "k_proj", "v_proj")]
        out.append((f"layers.{i}.o_proj", a.o_proj, ("o_proj",)))
        if m.gate_up_proj is not None:
            out.append((f"layers.{i}.gate_up_proj", m.gate_up_proj, ("gate_proj", "up_proj")))
        else:
            out += [(f"layers.{i}.{p}", getattr(m, p), (p,)) for p in ("gate_proj", "up_proj")]
        out.append((f"layers.{i}.down_proj", m.down_proj, ("down_proj",)))
    return out


def plan(dec, types: dict[str, str] | None, bits: int) -> dict:
    """The layer linears to keep at 8 bit: {"by_fingerprint": {fingerprint: name}, "linears": {name: {GGUF
    tensor: type}}, "kept_bits": count at ``bits``, "unknown": count with no recorded type}. ``types``: GGUF
    tensor name -> type (None: no provenance, nothing planned)."""
    by_fp: dict[bytes, str] = {}
    linears: dict[str, dict[str, str]] = {}
    kept = unknown = 0
    if not types:
        return {"by_fingerprint": by_fp, "linears": linears, "kept_bits": 0, "unknown": 0, "provenance": False}
    for name, lin, projs in decoder_linears(dec):
        layer = name.split(".")[1]
        src = {f"blk.{layer}.{GGUF_KIND[p]}.weight": types.get(f"blk.{layer}.{GGUF_KIND[p]}.weight") for p in projs}
        if any(t is None or t not in GGUF_BITS for t in src.values()):
            unknown += 1
            continue
        if max(GGUF_BITS[t] for t in src.values()) <= bits:
            kept += 1
            continue
        fp = fingerprint(lin.weight.detach()[:, 0].float().numpy())
        if fp in by_fp:
            raise RuntimeError(f"quantization.follow_source: {name} and {by_fp[fp]} have the same first weight "
                               "column; their ONNX MatMuls cannot be told apart")
        by_fp[fp] = name
        linears[name] = src
    return {"by_fingerprint": by_fp, "linears": linears, "kept_bits": kept, "unknown": unknown, "provenance": True}
