"""The one export-ready decoder every format exports (``ExportDecoder``).

Hugging Face modeling code carries traps for exporters (``torch.diff`` in the masking utilities,
``alias``/``index_copy`` in the static cache, cache objects that become hidden buffers when the
static-cache program is exported to ONNX). Instead of patching them per format, every exporter builds
this small pure-torch decoder from the loaded HF model. It reuses the HF weights (the same
``nn.Linear``/``nn.Embedding`` modules; Phi-3's fused ``qkv_proj``/``gate_up_proj`` are split once at
load) and has nothing but linears, a hand-written RMSNorm, precomputed RoPE tables and attention.

Families: Llama (SmolLM2, Llama-3.2 with ``llama3`` rope scaling), Qwen2 (qkv bias), Qwen3 (per-head
q/k RMSNorm, explicit ``head_dim``), Phi-3 (fused projections, partial rotary), Gemma 3 (see below), tied
or untied embeddings.

Gemma 3 (``gemma3_text``, ``Gemma3ForCausalLM``), as transformers 5.23's ``modeling_gemma3.py`` computes it:
RMSNorm scales by ``(1 + weight)`` (the decoder stores ``1 + weight`` once: the same float32 product),
embeddings are multiplied by ``sqrt(hidden_size)`` in the embedding dtype, GeGLU MLP
(``gelu(approximate="tanh")``), per-head q/k norms, four norms per layer (input, post-attention on the
attention output, pre- and post-feedforward around the MLP), attention scale
``query_pre_attn_scalar ** -0.5``, final logit softcapping when the config sets it. Layers follow
``config.layer_types``: ``sliding_attention`` layers see only the last ``sliding_window`` positions
(key k visible to query q iff ``q - window < k <= q``) and use the local RoPE base
(``rope_local_base_freq``); ``full_attention`` layers are causal with ``rope_theta``. HF 5.23 does not
pass ``attn_logit_softcapping`` to Gemma 3's attention, so neither do we. Every cache strategy applies
the window as a mask over a full-length cache (see ``CacheStrategy.layer_mask``); no strategy yet keeps
only the window for sliding layers.

Interface
---------
``ExportDecoder.from_hf(model, max_seq_len=..., cache="io" | "buffer" | <CacheStrategy>,
delegate_friendly_norm=False)`` -> ``nn.Module`` whose ``forward(*inputs)`` signature is the cache
strategy's. The KV cache / attention is a pluggable :class:`CacheStrategy` (an ``nn.Module``
attached as ``decoder.cache``, so the strategy may register its own buffers):

* ``prepare(dec, *inputs) -> AttnContext``: read the forward inputs, give the token ids, the RoPE
  ``cos``/``sin`` rows of the fed positions (``dec.rope_at(position_ids)`` or
  ``dec.rope_slice(start, T)``) and whatever the strategy needs later (mask, past caches ...).
* ``attend(layer_idx, q, k, v, ctx) -> Tensor [B, T, H*D]``: q/k/v come RoPE'd in the strategy's
  ``layout`` (``"bhtd"``: [B, heads, T, D]; ``"bthd"``: [B, T, heads, D], what ExecuTorch's
  ``custom_sdpa``/``update_cache`` take). Update the cache, return the attention output.
* ``outputs(logits, ctx)``: what ``forward`` returns (logits [B, T, vocab] of every fed position,
  plus present caches for "io").
* ``input_names()/output_names()``, ``example_inputs(dec, seq_len, past_len)`` and
  ``io_description()`` (for the manifest) help exporters.

Built-in strategies (``register_cache_strategy`` adds more; an exporter may also pass an instance --
``export/onnx.py`` adds ``"ort-gqa"``, ``export/executorch.py`` its custom-op caches):

* ``"io"`` -- explicit KV inputs/outputs, ORT GenAI names and layout:
  ``input_ids`` [1, T] int64, ``attention_mask`` [1, P+T] int64, ``position_ids`` [1, T] int64,
  ``past_key_values.{i}.key|value`` [1, kv_heads, P, head_dim] -> ``logits`` [1, T, vocab],
  ``present.{i}.key|value`` [1, kv_heads, P+T, head_dim] (present = concat(past, new)).
* ``"buffer"`` -- caches as registered buffers ``k_cache_{i}``/``v_cache_{i}``
  [1, kv_heads, max_seq_len, head_dim] written by slice assignment; inputs ``input_ids`` [1, T] and an
  additive causal mask [1, 1, T, end] (0 = attend, large negative = masked); the fed tokens take
  positions ``end - T .. end - 1``. Prefill (T > 1) and decode (T = 1) are one function.

A strategy with ``applies_rope = True`` gets q/k *before* RoPE and rotates them itself (ONNX's fused
``GroupQueryAttention`` with ``do_rotary``); ``ctx.cos/sin`` may then be None. If it also sets
``packed_qkv = True``, layers with a fused qkv projection (and no per-head q/k norm) call
``attend_packed(layer_idx, qkv, ctx)`` with the qkv matmul output [B, T, (H + 2 * KVH) * D] instead:
no split and no reshapes between the matmul and the fused op (GroupQueryAttention's packed-QKV form).

Options of ``from_hf`` for speed, same numbers (to ~1e-6): ``delegate_friendly_norm=True`` computes
RMSNorm's mean as a 4-D mean over dims (2, 3), the only mean XNNPACK takes; ``fuse_projections=True``
uses one qkv and one gate_up matmul per layer; ``untie_lm_head=True`` gives a tied lm_head its own weight copy
(quantizers skip a MatMul whose weight is the transposed embedding table).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ..errors import UserError

SUPPORTED_FAMILIES = ("llama", "qwen2", "qwen3", "phi3", "gemma3_text")
# config.model_type -> the family name the decoder records (spec.family, the manifest)
_FAMILY_NAMES = {"gemma3_text": "gemma3"}
SLIDING = "sliding_attention"


# ----------------------------------------------------------------------------- spec


@dataclass
class DecoderSpec:
    """Shape facts of the exported decoder (also written to the manifest's ``io``)."""

    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rotary_dim: int
    intermediate_size: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    rope_type: str
    max_seq_len: int
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    pad_token_id: int | None = None
    # Gemma 3 (None / defaults for the other families)
    hidden_act: str = "silu"
    query_pre_attn_scalar: float | None = None   # attention scale = query_pre_attn_scalar ** -0.5
    embed_scale: float | None = None             # embeddings * sqrt(hidden_size)
    final_logit_softcapping: float | None = None
    sliding_window: int | None = None            # keys k with q - window < k <= q, on sliding layers
    layer_types: list[str] | None = None         # per layer: "sliding_attention" | "full_attention"
    rope_local_theta: float | None = None        # RoPE base of the sliding layers
    rope_global_theta: float | None = None       # RoPE base of the global layers (recorded for the manifest)

    def is_sliding(self, layer_idx: int) -> bool:
        return bool(self.layer_types) and self.layer_types[layer_idx] == SLIDING


def _ids(x: Any) -> list[int]:
    if x is None:
        return []
    if isinstance(x, (list, tuple)):
        return [int(i) for i in x]
    return [int(x)]


# ----------------------------------------------------------------------------- building blocks


class RMSNorm(nn.Module):
    """HF's RMSNorm, computed in float32 exactly as ``LlamaRMSNorm`` does."""

    def __init__(self, weight: torch.Tensor, eps: float, delegate_friendly: bool = False):
        super().__init__()
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight)
        self.eps = eps
        self.delegate_friendly = delegate_friendly

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(torch.float32)
        if self.delegate_friendly:
            # XNNPACK lowers only 4-D means over dims (2, 3) (keepdim): view [..., C] as [1, N, 1, C].
            shape = x.shape
            var = x.pow(2).reshape(1, -1, 1, shape[-1]).mean((2, 3), keepdim=True).reshape(*shape[:-1], 1)
        else:
            var = x.pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(var + self.eps)
        return self.weight * x.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotate_half_matrix(dim: int) -> torch.Tensor:
    """W with ``linear(x, W) == rotate_half(x) == cat(-x[..., h:], x[..., :h])`` for ``x[..., dim]``."""
    h = dim // 2
    w = torch.zeros(dim, dim)
    idx = torch.arange(h)
    w[idx, idx + h] = -1.0
    w[idx + h, idx] = 1.0
    return w


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int, head_dim: int,
               rot_w: torch.Tensor | None = None) -> torch.Tensor:
    """RoPE; with ``rot_w`` (:func:`rotate_half_matrix`) rotate_half is ``linear(x, rot_w)`` (exact: W holds 0/+-1)."""
    def rot(t):
        return nn.functional.linear(t, rot_w) if rot_w is not None else rotate_half(t)

    if rotary_dim == head_dim:
        return x * cos + rot(x) * sin
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]  # Phi-3 partial rotary
    return torch.cat((x_rot * cos + rot(x_rot) * sin, x_pass), dim=-1)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, kv_heads, S, D] -> [B, kv_heads * n_rep, S, D] (GQA)."""
    if n_rep == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None, :, :].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                    scale: float) -> torch.Tensor:
    """HF eager attention in ``bhtd`` layout: q [B,H,T,D], k/v [B,KVH,S,D], additive mask [*,*,T,S].

    Returns [B, T, H*D].
    """
    n_rep = q.shape[1] // k.shape[1]
    k = repeat_kv(k, n_rep)
    v = repeat_kv(v, n_rep)
    w = torch.matmul(q, k.transpose(2, 3)) * scale
    if mask is not None:
        w = w + mask
    w = torch.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
    out = torch.matmul(w, v)  # [B, H, T, D]
    b, h, t, d = out.shape
    return out.transpose(1, 2).reshape(b, t, h * d)


def mask_value(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).min


# Masked value of the sliding-window masks built inside graphs: finite in float16 too (Core ML), and still
# exp(-65504 - max) == 0 in float32, so the softmax equals the one under finfo(float32).min.
WINDOW_MASK_VALUE = -65504.0


def window_allowed(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int) -> torch.Tensor:
    """[T, S] bool: key position k is inside the sliding window of query position q (``k > q - window``;
    HF's ``sliding_window_overlay``). Combine with the causal condition ``k <= q``."""
    return k_pos[None, :] > q_pos[:, None] - window


def causal_mask(t: int, end: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Additive causal mask [1, 1, T, end] for T new tokens at positions end-T .. end-1 (numpy-free)."""
    q = torch.arange(end - t, end)[:, None]
    k = torch.arange(end)[None, :]
    m = torch.where(k <= q, 0.0, mask_value(dtype)).to(dtype)
    return m[None, None]


def _cat_linears(*lins: nn.Linear) -> nn.Linear:
    w = torch.cat([lin.weight for lin in lins], 0)
    b = torch.cat([lin.bias for lin in lins], 0) if lins[0].bias is not None else None
    return _linear_from(w, b)


class Attention(nn.Module):
    """q/k/v/o projections; with ``qkv_proj`` set, one fused matmul replaces q/k/v (split after)."""

    def __init__(self, q_proj, k_proj, v_proj, o_proj: nn.Linear, q_norm: RMSNorm | None, k_norm: RMSNorm | None,
                 qkv_proj: nn.Linear | None = None, split: tuple[int, int, int] | None = None):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = q_proj, k_proj, v_proj, o_proj
        self.qkv_proj, self.split = qkv_proj, split
        self.q_norm, self.k_norm = q_norm, k_norm

    def project(self, x: torch.Tensor):
        if self.qkv_proj is not None:
            return self.qkv_proj(x).split(list(self.split), dim=-1)
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)


_ACTS = {"silu": nn.functional.silu,
         "gelu_pytorch_tanh": lambda x: nn.functional.gelu(x, approximate="tanh")}   # Gemma's GeGLU


def gelu_tanh_spelled_out(x: torch.Tensor) -> torch.Tensor:
    """``gelu(x, approximate="tanh")`` written as its formula (same values to float rounding)."""
    return 0.5 * x * (1.0 + torch.tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))


def spell_out_gelu_tanh(dec) -> int:
    """Replace ``gelu(approximate="tanh")`` in ``dec``'s MLPs by :func:`gelu_tanh_spelled_out`; the number of MLPs
    changed.

    Why: executorch 1.5.1's XNNPACK delegate serializes every ``aten.gelu`` as XNNPACK's exact (erf) GELU and
    ignores ``approximate``, so a tanh-GELU model runs up to 4.73e-4 off per activation after lowering (fixed
    upstream by pytorch/executorch PR #22851, "XNNPACK: Route tanh GELU to approxgelu", after 1.5.1). On the real
    Gemma 3 270M that put the fp32 ``.pte`` 1e-2..6e-2 logits away from eager. The formula lowers to XNNPACK's
    tanh / mul / add and matches to ~1e-6 (``tests/test_export_executorch.py``)."""
    n = 0
    for layer in dec.layers:
        if layer.mlp.act_name == "gelu_pytorch_tanh":
            layer.mlp.act = gelu_tanh_spelled_out
            n += 1
    return n


class MLP(nn.Module):
    """SwiGLU (GeGLU with ``act="gelu_pytorch_tanh"``); with ``gate_up_proj`` set, one fused matmul replaces gate/up."""

    def __init__(self, gate_proj, up_proj, down_proj: nn.Linear, gate_up_proj: nn.Linear | None = None,
                 act: str = "silu"):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj, self.gate_up_proj = gate_proj, up_proj, down_proj, gate_up_proj
        if act not in _ACTS:
            raise UserError(f"MLP activation {act!r} is not supported by the export decoder",
                            field="hidden_act", expected=" or ".join(_ACTS))
        self.act, self.act_name = _ACTS[act], act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(self.act(gate) * up)
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Layer(nn.Module):
    """Pre-norm block. With ``pre_ff_norm``/``post_ff_norm`` (Gemma) it is the sandwich form: the attention
    output goes through ``post_attention_layernorm`` before the residual add, and the MLP sits between
    ``pre_feedforward_layernorm`` and ``post_feedforward_layernorm``; otherwise ``post_attention_layernorm``
    is the MLP's input norm (Llama naming)."""

    def __init__(self, attn: Attention, mlp: MLP, input_norm: RMSNorm, post_norm: RMSNorm,
                 pre_ff_norm: RMSNorm | None = None, post_ff_norm: RMSNorm | None = None):
        super().__init__()
        self.self_attn, self.mlp = attn, mlp
        self.input_layernorm, self.post_attention_layernorm = input_norm, post_norm
        self.pre_feedforward_layernorm, self.post_feedforward_layernorm = pre_ff_norm, post_ff_norm


# ----------------------------------------------------------------------------- cache strategies


@dataclass
class AttnContext:
    """Per-forward state shared by the decoder and its cache strategy."""

    input_ids: torch.Tensor
    cos: torch.Tensor          # [B or 1, T, rotary_dim]
    sin: torch.Tensor
    mask: torch.Tensor | None = None
    start: Any = None           # first position of the fed tokens (int or 0-d tensor)
    past: list | None = None    # strategy-specific
    present: list = field(default_factory=list)
    extra: dict = field(default_factory=dict)


class CacheStrategy(nn.Module):
    """Base of the KV-cache/attention strategies (see the module docstring for the protocol)."""

    name = "base"
    layout = "bhtd"
    applies_rope = False   # True: attend() gets q/k before RoPE and rotates them itself (e.g. a fused op)
    packed_qkv = False     # True (with applies_rope): fused qkv layers call attend_packed(i, qkv [B, T, (H+2KVH)*D], ctx)

    def setup(self, dec: "ExportDecoder") -> None:  # register buffers etc.
        self.spec = dec.spec
        self.scale = dec.scale

    def is_sliding(self, layer_idx: int) -> bool:
        """Gemma 3: this layer attends within ``spec.sliding_window`` positions only."""
        return self.spec.is_sliding(layer_idx)

    def layer_mask(self, layer_idx: int, ctx: "AttnContext"):
        """The additive mask of this layer: ``ctx.extra["sliding_mask"]`` on sliding layers, else ``ctx.mask``."""
        return ctx.extra["sliding_mask"] if self.is_sliding(layer_idx) else ctx.mask

    def prepare(self, dec: "ExportDecoder", *inputs) -> AttnContext:  # pragma: no cover - abstract
        raise NotImplementedError

    def attend(self, layer_idx: int, q, k, v, ctx: AttnContext) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def attend_packed(self, layer_idx: int, qkv, ctx: AttnContext) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def outputs(self, logits: torch.Tensor, ctx: AttnContext):
        return logits

    def input_names(self) -> list[str]:  # pragma: no cover - abstract
        raise NotImplementedError

    def output_names(self) -> list[str]:
        return ["logits"]

    def example_inputs(self, dec: "ExportDecoder", seq_len: int, past_len: int = 0) -> tuple:
        raise NotImplementedError  # pragma: no cover

    def io_description(self) -> dict:
        return {}


_STRATEGIES: dict[str, Callable[[], CacheStrategy]] = {}


def register_cache_strategy(name: str):
    """Decorator: ``@register_cache_strategy("et-custom")`` on a zero-arg factory or CacheStrategy class."""

    def deco(factory):
        _STRATEGIES[name] = factory
        return factory

    return deco


def available_cache_strategies() -> list[str]:
    return sorted(_STRATEGIES)


@register_cache_strategy("io")
class IOCache(CacheStrategy):
    """Explicit past/present KV inputs/outputs (ONNX Runtime / ORT GenAI layout)."""

    name = "io"
    layout = "bhtd"

    def prepare(self, dec, input_ids, attention_mask, position_ids, *past) -> AttnContext:
        n = self.spec.num_layers
        assert len(past) == 2 * n, f"expected {2 * n} past tensors, got {len(past)}"
        t = input_ids.shape[1]
        s = attention_mask.shape[1]
        cos, sin = dec.rope_at(position_ids)
        q_pos = torch.arange(t, device=input_ids.device) + (s - t)
        k_pos = torch.arange(s, device=input_ids.device)
        allowed = (k_pos[None, :] <= q_pos[:, None])[None, None] & (attention_mask[:, None, None, :] > 0)
        mask = torch.where(allowed, 0.0, mask_value(torch.float32))
        extra = {}
        if self.spec.sliding_window:   # Gemma 3 sliding layers: causal and within the window
            win = allowed & window_allowed(q_pos, k_pos, self.spec.sliding_window)[None, None]
            extra["sliding_mask"] = torch.where(win, 0.0, mask_value(torch.float32))
        pairs = [(past[2 * i], past[2 * i + 1]) for i in range(n)]
        return AttnContext(input_ids=input_ids, cos=cos, sin=sin, mask=mask, past=pairs, extra=extra)

    def attend(self, layer_idx, q, k, v, ctx):
        pk, pv = ctx.past[layer_idx]
        k = torch.cat([pk, k], dim=2)
        v = torch.cat([pv, v], dim=2)
        ctx.present.append((k, v))
        return eager_attention(q, k, v, self.layer_mask(layer_idx, ctx), self.scale)

    def outputs(self, logits, ctx):
        flat = [t for kv in ctx.present for t in kv]
        return (logits, *flat)

    def input_names(self) -> list[str]:
        names = ["input_ids", "attention_mask", "position_ids"]
        for i in range(self.spec.num_layers):
            names += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        return names

    def output_names(self) -> list[str]:
        names = ["logits"]
        for i in range(self.spec.num_layers):
            names += [f"present.{i}.key", f"present.{i}.value"]
        return names

    def example_inputs(self, dec, seq_len: int, past_len: int = 0) -> tuple:
        sp = self.spec
        ids = torch.randint(0, sp.vocab_size, (1, seq_len), dtype=torch.long)
        am = torch.ones(1, past_len + seq_len, dtype=torch.long)
        pos = torch.arange(past_len, past_len + seq_len, dtype=torch.long)[None]
        past = [torch.zeros(1, sp.num_kv_heads, past_len, sp.head_dim) for _ in range(2 * sp.num_layers)]
        return (ids, am, pos, *past)

    def io_description(self) -> dict:
        sp = self.spec
        kv = [1, sp.num_kv_heads, "past_seq", sp.head_dim]
        inputs = {"input_ids": {"shape": [1, "seq"], "dtype": "int64"},
                  "attention_mask": {"shape": [1, "past_seq+seq"], "dtype": "int64"},
                  "position_ids": {"shape": [1, "seq"], "dtype": "int64"},
                  "past_key_values.{i}.key": {"shape": kv, "dtype": "float32"},
                  "past_key_values.{i}.value": {"shape": kv, "dtype": "float32"}}
        tot = [1, sp.num_kv_heads, "past_seq+seq", sp.head_dim]
        outputs = {"logits": {"shape": [1, "seq", sp.vocab_size], "dtype": "float32"},
                   "present.{i}.key": {"shape": tot, "dtype": "float32"},
                   "present.{i}.value": {"shape": tot, "dtype": "float32"}}
        return {"inputs": inputs, "outputs": outputs,
                "kv_cache": {"kind": "explicit_io", "layout": "[batch, kv_heads, seq, head_dim]",
                             "num_layers": sp.num_layers, "num_kv_heads": sp.num_kv_heads,
                             "head_dim": sp.head_dim, "past_names": "past_key_values.{i}.key|value",
                             "present_names": "present.{i}.key|value", "present": "concat(past, new)"}}


@register_cache_strategy("buffer")
class BufferCache(CacheStrategy):
    """KV caches as registered buffers updated by slice assignment (Core ML state)."""

    name = "buffer"
    layout = "bhtd"

    def setup(self, dec):
        super().setup(dec)
        sp = dec.spec
        shape = (1, sp.num_kv_heads, sp.max_seq_len, sp.head_dim)
        for i in range(sp.num_layers):
            self.register_buffer(f"k_cache_{i}", torch.zeros(shape), persistent=False)
            self.register_buffer(f"v_cache_{i}", torch.zeros(shape), persistent=False)

    def reset(self) -> None:
        for b in self.buffers():
            b.zero_()

    def prepare(self, dec, input_ids, causal_mask) -> AttnContext:
        t = input_ids.shape[1]
        end = causal_mask.shape[-1]
        start = end - t
        cos, sin = dec.rope_slice(start, t)
        extra = {"end": end}
        if self.spec.sliding_window:
            # Gemma 3 sliding layers: the caller's mask (causal, padding) and, built in the graph from its
            # shape, the window -- so the model's inputs are the same as for every other family.
            q_pos = torch.arange(t) + start
            k_pos = torch.arange(end)
            win = window_allowed(q_pos, k_pos, self.spec.sliding_window)[None, None]
            extra["sliding_mask"] = torch.where(win, causal_mask, WINDOW_MASK_VALUE)
        return AttnContext(input_ids=input_ids, cos=cos, sin=sin, mask=causal_mask,
                           start=start, extra=extra)

    def attend(self, layer_idx, q, k, v, ctx):
        kc = getattr(self, f"k_cache_{layer_idx}")
        vc = getattr(self, f"v_cache_{layer_idx}")
        start, end = ctx.start, ctx.extra["end"]
        kc[:, :, start:end] = k
        vc[:, :, start:end] = v
        return eager_attention(q, kc[:, :, :end], vc[:, :, :end], self.layer_mask(layer_idx, ctx), self.scale)

    def input_names(self) -> list[str]:
        return ["input_ids", "causal_mask"]

    def example_inputs(self, dec, seq_len: int, past_len: int = 0) -> tuple:
        ids = torch.randint(0, self.spec.vocab_size, (1, seq_len), dtype=torch.long)
        return ids, causal_mask(seq_len, past_len + seq_len)

    def io_description(self) -> dict:
        sp = self.spec
        return {"inputs": {"input_ids": {"shape": [1, "seq"], "dtype": "int32"},
                           "causal_mask": {"shape": [1, 1, "seq", "end"], "dtype": "float16|float32",
                                           "meaning": "additive; fed tokens take positions end-seq..end-1"}},
                "outputs": {"logits": {"shape": [1, "seq", sp.vocab_size], "dtype": "float32"}},
                "kv_cache": {"kind": "state", "names": "k_cache_{i}|v_cache_{i}",
                             "layout": "[1, kv_heads, max_seq_len, head_dim]", "num_layers": sp.num_layers,
                             "num_kv_heads": sp.num_kv_heads, "head_dim": sp.head_dim}}


def get_cache_strategy(cache: str | CacheStrategy) -> CacheStrategy:
    if isinstance(cache, CacheStrategy):
        return cache
    if cache not in _STRATEGIES:
        raise UserError(f"Cache strategy {cache!r} not available. Available: {available_cache_strategies()}")
    return _STRATEGIES[cache]()


# ----------------------------------------------------------------------------- decoder


def _family(config) -> str:
    mt = getattr(config, "model_type", "")
    if mt in SUPPORTED_FAMILIES:
        return _FAMILY_NAMES.get(mt, mt)
    src = getattr(config, "_name_or_path", "") or ""   # the base directory the model was loaded from
    raise UserError(f"model_type {mt!r} is not supported by the export decoder",
                    file=f"{str(src).rstrip('/')}/config.json" if src else "config.json of the base model",
                    field="model_type", expected=f"one of {', '.join(SUPPORTED_FAMILIES)}",
                    hint="export a base of a supported family (Llama/SmolLM, Qwen2, Qwen3, Phi-3, Gemma 3), e.g. the real "
                         "SmolLM2-135M-Instruct: `cdcda init-model --arch smollm2-135m-instruct --out DIR`, then "
                         "`cdcda export --base DIR ...`")


def _linear_from(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    lin.weight = nn.Parameter(weight.detach().clone().contiguous(), requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias.detach().clone().contiguous(), requires_grad=False)
    return lin


class ExportDecoder(nn.Module):
    """Export-ready causal LM: embeddings -> N x (RMSNorm, attention, RMSNorm, SwiGLU) -> norm -> lm_head."""

    def __init__(self, spec: DecoderSpec, embed: nn.Embedding, layers: list[Layer], norm: RMSNorm,
                 lm_head: nn.Linear, rope_cos: torch.Tensor, rope_sin: torch.Tensor, cache: CacheStrategy):
        super().__init__()
        self.spec = spec
        # Gemma: query_pre_attn_scalar ** -0.5 (a Python float, as HF's ``self.scaling``)
        self.scale = (spec.query_pre_attn_scalar if spec.query_pre_attn_scalar else spec.head_dim) ** -0.5
        self.embed_tokens = embed
        # Gemma: embeddings * sqrt(hidden), a 0-d tensor in the embedding dtype (HF rounds it the same way)
        self.register_buffer("embed_scale", None if spec.embed_scale is None else
                             torch.tensor(spec.embed_scale).to(embed.weight.dtype), persistent=False)
        self.layers = nn.ModuleList(layers)
        self.norm = norm
        self.lm_head = lm_head
        # [max_seq_len, rotary_dim]; Gemma 3: [max_seq_len, 2 * rotary_dim], the global table then the local
        # one, so every strategy's row lookup serves both (forward splits them; see rope_table)
        self.register_buffer("rope_cos", rope_cos, persistent=False)
        self.register_buffer("rope_sin", rope_sin, persistent=False)
        self.register_buffer("rotate_half_w", None, persistent=False)   # set by from_hf(rope_as_matmul=True)
        self.last_logits_only = False   # True: lm_head on the last fed position only -> [B, 1, vocab]
        # LoRA as inputs (export/lora.py ``attach``): forward takes them after the strategy's inputs
        self.lora_layout = None
        self.lora_names: list[str] = []
        self.lora_feed = None     # export/lora.py LoraFeed
        self.cache = cache
        cache.setup(self)

    # -- RoPE rows for the strategies
    def rope_at(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [B, T, rotary_dim] for explicit positions [B, T]."""
        return self.rope_cos[position_ids], self.rope_sin[position_ids]

    def rope_slice(self, start, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [1, T, rotary_dim] for positions start .. start+T-1."""
        return self.rope_cos[start:start + t][None], self.rope_sin[start:start + t][None]

    @property
    def two_ropes(self) -> bool:
        """Gemma 3: the RoPE rows hold the global table then the local (sliding-layer) one."""
        return self.spec.rope_local_theta is not None

    def rope_table(self, sliding: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The cos/sin table [max_seq_len, rotary_dim] of global (or, Gemma 3, sliding) layers."""
        if not self.two_ropes:
            return self.rope_cos, self.rope_sin
        rd = self.spec.rotary_dim
        sl = slice(rd, 2 * rd) if sliding else slice(0, rd)
        return self.rope_cos[:, sl], self.rope_sin[:, sl]

    @classmethod
    def from_hf(cls, model, *, max_seq_len: int, cache: str | CacheStrategy = "io",
                delegate_friendly_norm: bool = False, untie_lm_head: bool = False,
                fuse_projections: bool = False, rope_as_matmul: bool = False) -> "ExportDecoder":
        """Build from a loaded HF ``*ForCausalLM`` (float32, adapters merged), reusing its weights.

        ``untie_lm_head``: give a tied lm_head its own weight copy, so exporters see it as a constant
        matrix (ONNX quantizers skip a MatMul whose weight is a transposed Gather table).
        ``fuse_projections``: one qkv and one gate_up matmul per layer (Phi-3's own fused weights are
        reused; other families are concatenated once), the same numbers to ~1e-7. ``rope_as_matmul``: RoPE's
        rotate_half as ``linear(x, W)`` with a constant 0/+-1 matrix (exact): no slices on the dynamic
        sequence axis, which XNNPACK cannot take (see ``export_executorch`` in ``export/executorch.py``).
        """
        cfg = model.config
        family = _family(cfg)
        base = model.model
        n_heads = cfg.num_attention_heads
        n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
        rotary = base.rotary_emb
        rope_params = getattr(cfg, "rope_parameters", None) or {}
        gemma = family == "gemma3"
        if gemma:   # one rope per layer type: {"full_attention": {...}, "sliding_attention": {...}}
            types = {lt: (rope_params.get(lt) or {}).get("rope_type", "default") for lt in ("full_attention", SLIDING)}
            if set(types.values()) != {"default"}:
                # linear scaling (the larger Gemma 3s) would need the factor on the tables; not checked yet
                raise UserError(f"Gemma 3 rope types {types} are not supported by the export decoder",
                                field="rope_parameters", expected="rope_type 'default' for both layer types")
            rope_params = rope_params["full_attention"]
        rope_type = getattr(rotary, "rope_type", rope_params.get("rope_type", "default"))
        if isinstance(rope_type, dict):
            rope_type = rope_type.get("full_attention", "default")
        if rope_type in ("dynamic", "longrope"):
            # These change their frequencies with the sequence length at run time; our tables are fixed.
            max_pos = rope_params.get("original_max_position_embeddings") or cfg.max_position_embeddings
            if max_seq_len > max_pos:
                raise UserError(f"rope_type {rope_type!r} with max_seq_len {max_seq_len} > {max_pos} is not supported",
                                field="max_seq_len", expected=f"<= {max_pos}")
        # RoPE tables from HF's own rope init (inv_freq + attention_scaling), same float32 math as HF.
        pos = torch.arange(max_seq_len, dtype=torch.float32)

        def tables(inv_freq, scaling):
            freqs = pos[:, None] * inv_freq.detach().to(torch.float32)[None, :]
            emb = torch.cat((freqs, freqs), dim=-1)
            return emb.cos() * float(scaling), emb.sin() * float(scaling)

        if gemma:   # global then local table side by side (see rope_table)
            cos, sin = tables(rotary.full_attention_inv_freq, rotary.full_attention_attention_scaling)
            lcos, lsin = tables(getattr(rotary, f"{SLIDING}_inv_freq"), getattr(rotary, f"{SLIDING}_attention_scaling"))
            rotary_dim = cos.shape[-1]
            cos, sin = torch.cat([cos, lcos], -1), torch.cat([sin, lsin], -1)
        else:
            cos, sin = tables(rotary.inv_freq, getattr(rotary, "attention_scaling", 1.0))
            rotary_dim = cos.shape[-1]

        gen = getattr(model, "generation_config", None)
        eos = _ids(getattr(gen, "eos_token_id", None)) or _ids(cfg.eos_token_id)
        bos = getattr(gen, "bos_token_id", None) if gen is not None else None
        bos = bos if bos is not None else getattr(cfg, "bos_token_id", None)
        tie = bool(getattr(cfg, "tie_word_embeddings", False))
        embed = base.embed_tokens
        if gemma:
            # Gemma3TextScaledWordEmbedding scales inside its forward: use a plain nn.Embedding over the same
            # weight (tied lm_head stays tied) and scale in ExportDecoder.forward, so quantizers that swap
            # nn.Embedding (ExecuTorch's) keep the scale.
            plain = nn.Embedding(embed.num_embeddings, embed.embedding_dim, embed.padding_idx, device="meta")
            plain.weight = embed.weight
            embed = plain
        lm_head = model.lm_head
        if tie and lm_head.weight is not embed.weight:
            lm_head.weight = embed.weight
        if tie and untie_lm_head:
            lm_head = _linear_from(embed.weight, None)
        spec = DecoderSpec(
            family=family, vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
            num_layers=cfg.num_hidden_layers, num_heads=n_heads, num_kv_heads=n_kv, head_dim=head_dim,
            rotary_dim=rotary_dim, intermediate_size=cfg.intermediate_size, rms_norm_eps=float(cfg.rms_norm_eps),
            tie_word_embeddings=tie, rope_type=str(rope_type), max_seq_len=max_seq_len,
            bos_token_id=None if bos is None else int(bos), eos_token_ids=eos,
            pad_token_id=getattr(cfg, "pad_token_id", None))
        if gemma:
            window = getattr(cfg, "sliding_window", None)
            spec.hidden_act = cfg.hidden_activation
            spec.query_pre_attn_scalar = float(cfg.query_pre_attn_scalar)
            spec.embed_scale = float(base.embed_tokens.scalar_embed_scale)
            spec.final_logit_softcapping = getattr(cfg, "final_logit_softcapping", None)
            spec.layer_types = list(cfg.layer_types)
            spec.sliding_window = int(window) if window and SLIDING in spec.layer_types else None
            spec.rope_local_theta = float(cfg.rope_parameters[SLIDING]["rope_theta"])
            spec.rope_global_theta = float(cfg.rope_parameters["full_attention"]["rope_theta"])
            if getattr(cfg, "use_bidirectional_attention", False):
                raise UserError("Gemma 3 with use_bidirectional_attention is an encoder, not a causal LM",
                                field="use_bidirectional_attention", expected="false")
        else:
            spec.hidden_act = getattr(cfg, "hidden_act", "silu")
        eps = spec.rms_norm_eps

        def norm(mod) -> RMSNorm:
            weight = mod.weight
            if gemma:   # Gemma3RMSNorm: x_normed * (1 + weight), in float32
                weight = nn.Parameter(1.0 + weight.detach().to(torch.float32), requires_grad=False)
            return RMSNorm(weight, getattr(mod, "variance_epsilon", getattr(mod, "eps", eps)),
                           delegate_friendly_norm)

        layers = []
        split = (n_heads * head_dim, n_kv * head_dim, n_kv * head_dim)
        for hl in base.layers:
            a = hl.self_attn
            qkv = gate_up = None
            if family == "phi3":
                if fuse_projections:
                    qkv, gate_up = a.qkv_proj, hl.mlp.gate_up_proj
                    q = k = v = None
                    mlp = MLP(None, None, hl.mlp.down_proj, gate_up)
                else:
                    w = a.qkv_proj.weight
                    q = _linear_from(w[:split[0]], None)
                    k = _linear_from(w[split[0]:split[0] + split[1]], None)
                    v = _linear_from(w[split[0] + split[1]:], None)
                    gu = hl.mlp.gate_up_proj.weight
                    inter = gu.shape[0] // 2
                    mlp = MLP(_linear_from(gu[:inter], None), _linear_from(gu[inter:], None), hl.mlp.down_proj)
            elif fuse_projections:
                qkv = _cat_linears(a.q_proj, a.k_proj, a.v_proj)
                q = k = v = None
                mlp = MLP(None, None, hl.mlp.down_proj, _cat_linears(hl.mlp.gate_proj, hl.mlp.up_proj),
                          act=spec.hidden_act)
            else:
                q, k, v = a.q_proj, a.k_proj, a.v_proj
                mlp = MLP(hl.mlp.gate_proj, hl.mlp.up_proj, hl.mlp.down_proj, act=spec.hidden_act)
            qn = norm(a.q_norm) if hasattr(a, "q_norm") else None
            kn = norm(a.k_norm) if hasattr(a, "k_norm") else None
            sandwich = (norm(hl.pre_feedforward_layernorm), norm(hl.post_feedforward_layernorm)) if gemma else ()
            layers.append(Layer(Attention(q, k, v, a.o_proj, qn, kn, qkv, split), mlp,
                                norm(hl.input_layernorm), norm(hl.post_attention_layernorm), *sandwich))
        dec = cls(spec, embed, layers, norm(base.norm), lm_head, cos, sin, get_cache_strategy(cache))
        if rope_as_matmul:
            dec.rotate_half_w = rotate_half_matrix(rotary_dim)
        dec.eval()
        for p in dec.parameters():
            p.requires_grad_(False)
        return dec

    def forward(self, *inputs):
        if self.lora_names:   # trailing inputs: the LoRA A/B tensors, read by the wrapped linears
            n = len(self.lora_names)
            inputs, lora = inputs[:-n], inputs[-n:]
            self.lora_feed.set(self.lora_names, lora)
        ctx = self.cache.prepare(self, *inputs)
        bthd = self.cache.layout == "bthd"
        cos, sin = ctx.cos, ctx.sin
        if not self.cache.applies_rope:
            cos = cos[:, :, None, :] if bthd else cos[:, None, :, :]
            sin = sin[:, :, None, :] if bthd else sin[:, None, :, :]
        ropes = {False: (cos, sin)}
        if self.two_ropes and not self.cache.applies_rope:   # Gemma 3: [global | local] rows
            rd = self.spec.rotary_dim
            ropes = {False: (cos[..., :rd], sin[..., :rd]), True: (cos[..., rd:], sin[..., rd:])}
        h = self.embed_tokens(ctx.input_ids)
        if self.embed_scale is not None:
            h = h * self.embed_scale
        for i, layer in enumerate(self.layers):
            a = layer.self_attn
            x = layer.input_layernorm(h)
            if self.cache.packed_qkv and a.qkv_proj is not None and a.q_norm is None and self.cache.applies_rope:
                # the strategy's fused op takes the qkv matmul output as is (no split, no reshapes)
                attn = self.cache.attend_packed(i, a.qkv_proj(x), ctx)
            else:
                lc, ls = ropes[self.spec.is_sliding(i) and len(ropes) > 1]
                attn = self._attend(i, a, x, lc, ls, ctx)
            if layer.post_feedforward_layernorm is not None:   # Gemma's sandwich norms
                h = h + layer.post_attention_layernorm(a.o_proj(attn))
                h = h + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(h)))
            else:
                h = h + a.o_proj(attn)
                h = h + layer.mlp(layer.post_attention_layernorm(h))
        if self.last_logits_only:
            h = h[:, -1:, :]      # one slice_copy (portable kernel: XNNPACK takes no dynamic-axis slice)
        logits = self.lm_head(self.norm(h))
        cap = self.spec.final_logit_softcapping
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return self.cache.outputs(logits, ctx)

    def _attend(self, i: int, a: Attention, x: torch.Tensor, cos, sin, ctx: AttnContext) -> torch.Tensor:
        """Project q/k/v, split heads, per-head norm, layout and RoPE as the strategy wants; attend."""
        sp = self.spec
        b, t = x.shape[0], x.shape[1]
        q, k, v = a.project(x)
        q = q.view(b, t, sp.num_heads, sp.head_dim)
        k = k.view(b, t, sp.num_kv_heads, sp.head_dim)
        v = v.view(b, t, sp.num_kv_heads, sp.head_dim)
        if a.q_norm is not None:
            q, k = a.q_norm(q), a.k_norm(k)
        if self.cache.layout != "bthd":
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if not self.cache.applies_rope:
            q = apply_rope(q, cos, sin, sp.rotary_dim, sp.head_dim, self.rotate_half_w)
            k = apply_rope(k, cos, sin, sp.rotary_dim, sp.head_dim, self.rotate_half_w)
        return self.cache.attend(i, q, k, v, ctx)

    def io_description(self) -> dict:
        sp = self.spec
        return {"cache_strategy": self.cache.name, "max_seq_len": sp.max_seq_len,
                "vocab_size": sp.vocab_size, "bos_token_id": sp.bos_token_id, "eos_token_ids": sp.eos_token_ids,
                "num_layers": sp.num_layers, "num_heads": sp.num_heads, "num_kv_heads": sp.num_kv_heads,
                "head_dim": sp.head_dim, "hidden_size": sp.hidden_size, "intermediate_size": sp.intermediate_size,
                "family": sp.family,
                **self._gemma_io(),
                **self.cache.io_description()}

    def _gemma_io(self) -> dict:
        """Gemma 3's attention layout for the manifest (nothing for the other families)."""
        sp = self.spec
        if not sp.layer_types:
            return {}
        sliding = [i for i in range(sp.num_layers) if sp.is_sliding(i)]
        return {"attention_layers": {
            "sliding_window": sp.sliding_window, "sliding_layers": sliding,
            "global_layers": [i for i in range(sp.num_layers) if i not in sliding],
            "rope_theta": {"global": sp.rope_global_theta, "sliding": sp.rope_local_theta},
            "sliding_kv_cache": "full length (max_seq_len); the window is applied by the attention mask, so "
                                "positions before q - window + 1 are kept but never read",
            "query_pre_attn_scalar": sp.query_pre_attn_scalar,
            "final_logit_softcapping": sp.final_logit_softcapping}}


def hf_reference_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Eager HF logits for ``ids`` [1, T] (no cache) -- the reference the tests compare to."""
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


__all__ = ["ExportDecoder", "DecoderSpec", "CacheStrategy", "AttnContext", "IOCache", "BufferCache",
           "RMSNorm", "register_cache_strategy", "available_cache_strategies", "get_cache_strategy",
           "eager_attention", "causal_mask", "repeat_kv", "apply_rope", "rotate_half", "hf_reference_logits",
           "SUPPORTED_FAMILIES"]
