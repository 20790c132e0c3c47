"""ExecuTorch exporter: ``model.pte`` with one ``forward(tokens [1, T], input_pos [1]) -> logits [1, T, V]``.

The speed comes from ExecuTorch's own LLM path, reused rather than rewritten:

* KV cache and attention: ``llama::update_cache`` + ``llama::custom_sdpa`` (:mod:`.et_ops`), caches as
  mutable buffers; T is dynamic (1 .. ``prefill_len``), so prefill takes a real sequence and decode
  one token, through the same method.
* Quantization: ExecuTorch's ``quantize_model_`` (torchao ``Int8DynamicActivationIntxWeightConfig`` /
  ``IntxWeightOnlyConfig``, HQQ scales) on linears and, when asked, embeddings.
* Lowering: ``to_edge_transform_and_lower`` with ``XnnpackDynamicallyQuantizedPartitioner`` then
  ``XnnpackPartitioner`` (extended ops), then the same ``ExecutorchBackendConfig`` as ExecuTorch's
  ``LLMEdgeManager.to_executorch`` (quant fusion, constant propagation, planned memory).
* Core ML delegate (recipe ``coreml.delegate: true``): ``CoreMLPartitioner`` with a static one-token
  ``forward(tokens [1, 1], input_pos [1])`` (Core ML takes no dynamic shapes); running needs macOS.

The result records what really happened: quantized layer counts, delegate partitions and the
fraction of graph nodes delegated (``quantization_applied`` and ``export.delegation`` in the manifest).
"""

from __future__ import annotations

import functools
import time
from collections import Counter

from ..errors import UserError
from .registry import register_exporter

MODEL_FILE = "model.pte"

# recipe quantization.scheme -> ExecuTorch quantize_model_ linear config
LINEAR_CONFIGS = {"none": None, "8da4w": "8da4w", "8da8w": "8da8w", "int8wo": "8w", "int4wo": "4w"}
# Weight-only linear schemes that executorch 1.5.1's XNNPACK lowering gets wrong (see ``quantize``). int8wo
# (per channel) is lowered through our own partitioner config instead (``_weight_only_linear_config``).
WEIGHT_ONLY_BROKEN = ("int4wo",)
# recipe quantization.embeddings -> quantize_model_ embedding config
EMBEDDING_CONFIGS = {"none": None, "int8": "8w", "int4": "4w"}
# group size 0 = per output channel (torchao PerAxis(0))
DEFAULT_GROUP = {"8da4w": 32, "4w": 32, "8da8w": 0, "8w": 0}
# Graph nodes that are bookkeeping, not compute: not counted when judging delegation.
_BOOKKEEPING = ("getitem", "sym_size", "_assert_scalar", "_local_scalar_dense", "ge", "le", "add", "sub",
                "mul", "floordiv", "eq", "lt", "gt")


# ----------------------------------------------------------------------------- quantization


def _linear_shapes(dec) -> dict[str, tuple[int, int]]:
    import torch

    return {n: tuple(m.weight.shape) for n, m in dec.named_modules() if isinstance(m, torch.nn.Linear)}


def _check_group_size(shapes: dict[str, tuple[int, int]], group: int, what: str) -> None:
    """A group size must divide every in_features, otherwise torchao would skip or fail those layers."""
    if group == 0:
        return
    bad = {n: s for n, s in shapes.items() if s[-1] % group}
    if bad:
        dims = sorted({s[-1] for s in shapes.values()})
        ok = [g for g in (16, 32, 64, 128, 256) if all(d % g == 0 for d in dims)]
        first = ", ".join(f"{n} (in_features {s[-1]})" for n, s in list(bad.items())[:3])
        raise UserError(f"group size {group} does not divide the input width of {len(bad)} {what} layer(s): {first}",
                        field="quantization.group_size" if what == "linear" else "quantization.embedding_group_size",
                        expected=f"a divisor of every input width {dims}: one of {ok or 'none; use 0 (per channel)'}")


def needs_calibration(q) -> bool:
    return bool(q.head_calibration or q.layers_calibration or q.smooth_alpha or q.float_linears)


def calibration_for(q, model, base_dir, prompt_format: dict | None):
    """The calibration inputs recipe quantization ``q`` asks for (GPTQ, SmoothQuant), from the (merged) HF
    ``model`` on the shipped LaMP sample in ``prompt_format`` (``io.prompt_format``); None when it asks for
    none. The exporter and the fidelity check's eager mirror both call this, so they round alike."""
    if not needs_calibration(q):
        return None
    from ..train.format import PromptFormat
    from .calibrate import calibrate

    return calibrate(model, base_dir, PromptFormat.from_dict(prompt_format),
                     layers=bool(q.layers_calibration or q.smooth_alpha), hessians=bool(q.layers_calibration))


def quantize(dec, recipe, calib=None) -> dict:
    """Quantize the decoder in place with ExecuTorch's torchao recipe (int8wo: :func:`_int8_weight_only`, with
    ``calib`` from :func:`.calibrate.calibrate` when the recipe asks for GPTQ); returns what was applied."""
    import torch

    q = recipe.quantization
    if q.scheme not in LINEAR_CONFIGS:
        raise UserError(f"quantization.scheme {q.scheme!r} is not supported by the ExecuTorch XNNPACK exporter",
                        field="quantization.scheme", expected=", ".join(LINEAR_CONFIGS))
    if q.scheme in WEIGHT_ONLY_BROKEN and q.layers != "none":
        # executorch 1.5.1 + torchao 0.18: XNNPACK's partitioner has no weight-only linear (see
        # _weight_only_linear_config); lowered with the stock configs the output is ~1000x off (repro:
        # benchmarks/repros/xnnpack_weight_only_int8.py). Our config takes per-channel int8 (int8wo) only:
        # XNNPACK has no float-activation kernel for 4-bit blockwise weights (qb4w needs qd8 activations).
        raise UserError(f"quantization.scheme {q.scheme!r} (weight-only 4-bit) has no XNNPACK kernel with float "
                        "activations in executorch 1.5.1 (see benchmarks/repros/xnnpack_weight_only_int8.py)",
                        field="quantization.scheme", expected="int8wo, 8da8w, 8da4w or none for the XNNPACK backend",
                        hint="for near-lossless 8-bit use executorch/xnnpack-int8 (int8wo); for 4-bit 8da4w")
    if q.float_linears and (q.scheme != "int8wo" or q.layers == "none"):
        raise UserError(f"quantization.float_linears {q.float_linears} is implemented for int8wo layers only "
                        f"(scheme {q.scheme!r}, layers {q.layers!r})", field="quantization.float_linears",
                        expected="0, or scheme int8wo with layers: linear")
    if q.scheme == "int8wo" and q.layers != "none" and q.group_size not in (None, 0):
        raise UserError(f"quantization.group_size {q.group_size} with int8wo: XNNPACK's float-activation int8 "
                        "linear takes one scale per output channel", field="quantization.group_size",
                        expected="unset or 0 (per output channel)")
    linear = LINEAR_CONFIGS[q.scheme] if q.layers != "none" else None
    emb_name = q.embeddings
    if emb_name == "same":
        emb_name = {"8da4w": "int4", "int4wo": "int4", "8da8w": "int8", "int8wo": "int8"}.get(q.scheme, "none")
    embedding = EMBEDDING_CONFIGS[emb_name]
    applied = {"scheme": q.scheme, "linear_config": linear, "embedding_config": embedding}
    if linear is None and embedding is None:
        return {**applied, "quantized_linears": 0, "quantized_embeddings": 0,
                "linears": len(_linear_shapes(dec))}
    lin_group = q.group_size if q.group_size is not None else DEFAULT_GROUP.get(linear, 32)
    emb_group = q.embedding_group_size if q.embedding_group_size is not None else DEFAULT_GROUP.get(embedding, 32)
    shapes = _linear_shapes(dec)
    if linear:
        _check_group_size(shapes, lin_group, "linear")
    if embedding:
        _check_group_size({"embed_tokens": tuple(dec.embed_tokens.weight.shape)}, emb_group, "embedding")

    from executorch.extension.llm.export.quantize import quantize_model_

    calibrated = {}
    if linear == "8w":   # int8wo: our rounding (GPTQ when calibrated), torchao's weight-only tensor, own lowering
        calibrated = _int8_weight_only(dec, q, calib)
    elif linear in ("8da4w", "8da8w") and (q.grid == "min-scale" or q.smooth_alpha or q.head_bits == 8):
        calibrated = _dynamic_activation(dec, q, calib, linear, lin_group)
    emb_float = dec.embed_tokens.weight.detach().float().clone() if embedding == "8w" else None
    # linears done above are left to quantize_model_ only for the embedding table
    quantize_model_(dec, qlinear_config=None if calibrated else linear, qlinear_group_size=lin_group,
                    qembedding_config=embedding, qembedding_group_size=emb_group)
    if emb_float is not None:
        calibrated["embedding_grid"] = _int8_embedding_grid(dec.embed_tokens, emb_float, emb_group)
        del emb_float

    def is_quantized(m) -> bool:  # torchao swaps the weight for a quantized tensor subclass
        return type(m.weight) is not torch.nn.Parameter and type(m.weight) is not torch.Tensor

    linears = [m for m in dec.modules() if isinstance(m, torch.nn.Linear) and not getattr(m, "float_helper", False)]
    n_lin = sum(is_quantized(m) for m in linears)
    n_emb = int(is_quantized(dec.embed_tokens))
    kept_float = len((calibrated.get("float_linears") or {}).get("kept") or ())
    if linear and n_lin != len(linears) - kept_float:
        raise RuntimeError(f"{linear}: only {n_lin} of {len(linears)} linears were quantized "
                           f"({kept_float} kept float by quantization.float_linears)")
    if embedding and not n_emb:
        raise RuntimeError(f"{embedding}: the embedding table was not quantized")
    return {**applied, "group_size": lin_group if linear else None,
            "embedding_group_size": emb_group if embedding else None,
            "quantized_linears": n_lin, "linears": len(linears), "float_linears_kept": kept_float,
            "quantized_embeddings": n_emb, **calibrated}


def _write_grid(t, qu, scale, bits: int) -> None:
    """Our rounding and scales in place of torchao's in its quantized tensor ``t`` (``IntxUnpackedToInt8Tensor``:
    signed ``qdata * scale``, zero point 0): ``qu`` unsigned in [0, 2^bits - 1] around 2^(bits-1), as
    :func:`.calibrate.rtn` / :func:`.calibrate.gptq` give it on a symmetric grid."""
    import torch

    with torch.no_grad():
        t.qdata.copy_((qu.to(torch.int16) - 2 ** (bits - 1)).to(torch.int8).reshape(t.qdata.shape))
        t.scale.copy_(scale.reshape(t.scale.shape).to(t.scale.dtype))
        t.zero_point.zero_()


def _int8_embedding_grid(emb, w, group: int) -> dict:
    """A quantized int8 embedding table on our symmetric grid (scale = max|w| / 127 per row, or per block of
    ``group``: llama.cpp Q8_0's grid) where that reproduces ``w`` better than torchao's choice (HQQ scales in
    executorch 1.5.1's ``quantize_model_``). Measured on SmolLM2-135M-Instruct, whose token_embd is Q8_0:
    at group 32 torchao's table came back with relative error 2.6e-3 and ours exactly (0); per row torchao's
    HQQ is slightly better (1.165e-2 vs 1.172e-2) and is kept."""
    import torch

    from .calibrate import block_grid, dequant, rtn

    block = group or w.shape[1]
    t = emb.weight
    theirs = dequant(t.qdata.reshape(w.shape).to(torch.int16) + 128, t.scale.reshape(w.shape[0], -1).float(),
                     t.zero_point.reshape(w.shape[0], -1).float() + 128, block)
    scale, zp = block_grid(w, block, 8, "float32", "symmetric")
    scale = scale.to(t.scale.dtype).float()
    qu = rtn(w, scale, zp, block, 8)
    ours = dequant(qu, scale, zp, block)
    err_theirs, err_ours = (float((x - w).norm() / w.norm()) for x in (theirs, ours))
    if err_ours < err_theirs:
        _write_grid(t, qu, scale, 8)
    return {"grid": "symmetric max|w|/127" if err_ours < err_theirs else "torchao (HQQ)", "group_size": group,
            "rel_err": round(min(err_ours, err_theirs), 7), "rel_err_torchao": round(err_theirs, 7)}


# Projections that read the same input as a sibling: a model with fused qkv_proj / gate_up_proj (Phi-3) is split
# by the export decoder, and only the first part's weight matches the calibration key of the fused HF linear.
_SAME_INPUT = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}


def _replace_module(dec, mods: dict, name: str, module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(mods[parent] if parent else dec, leaf, module)


def _sibling_stat(lookup, mods: dict, name: str):
    """A calibration statistic (``Calibration.hessian_for`` / ``absmax_for``) of linear ``name``, else of the
    sibling projection that reads the same input (``_SAME_INPUT``)."""
    w = mods[name].weight.detach().float()
    stat = lookup(w.T.numpy())
    parent, _, leaf = name.rpartition(".")
    if stat is None and leaf in _SAME_INPUT:
        sib = mods.get(f"{parent}.{_SAME_INPUT[leaf]}" if parent else _SAME_INPUT[leaf])
        if sib is not None and sib.weight.shape[1] == w.shape[1]:
            stat = lookup(sib.weight.detach().float().T.numpy())
    return stat


def _dynamic_activation(dec, q, calib, config: str, group: int) -> dict:
    """8da4w / 8da8w linears (torchao ``Int8DynamicActivationIntxWeightConfig``: int8 per-token activations),
    with the recipe's options, in place:

    * ``smooth_alpha``: SmoothQuant. Each linear's input is multiplied by 1/s (a float mul that XNNPACK runs)
      and its weight columns by s, s = max|x|^a / max|w|^(1-a) per input channel from the calibration text
      (constant over each group of a 4-bit grid, so a grid the base sits on stays exact).
    * ``grid: min-scale`` (8da4w): the base's own Q4_1-style grid, w = d * q + m per group of 32. XNNPACK's
      int4 kernels are symmetric (one bf16 scale per group, no zero point), so the weight is split as
      d * (q - 8) + (m + 8 d): the first part is an exact symmetric int4 tensor, the second a per-group offset,
      computed as a float ``block_sum`` linear (K -> K/group, ones) and a float ``offset`` linear (K/group -> N):
      1 extra fp32 value per group (1 bit per weight at group 32).
    * ``head_bits: 8``: the lm_head becomes int8 weight-only (float activations; :func:`_int8_weight_only`),
      rounded by GPTQ with ``head_calibration: gptq``.
    * ``error_rank`` (min-scale grid): low-rank error compensation (``calibrate.error_factors``). The weight's
      error against the grid it runs on, w - (sym + offset), as two float linears of rank r beside it
      (K -> r -> N, fp32 in XNNPACK). A matrix on its grid (a Q4_1-derived base) gets none; a LoRA-merged model
      gets back the personal delta that 4-bit rounding removes.
    """
    import torch
    from torchao.quantization import quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup
    from torchao.quantization.quant_api import Int8DynamicActivationIntxWeightConfig

    from .calibrate import (ON_GRID_REL_ERR, block_grid, dequant, error_correction_facts, error_factors, rtn,
                            smooth_scales)

    bits = 4 if config == "8da4w" else 8
    gran = PerGroup(group) if group else PerAxis(0)
    tconf = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4 if bits == 4 else torch.int8,
                                                  weight_granularity=gran,
                                                  intx_choose_qparams_algorithm="hqq_scale_only")
    if (q.smooth_alpha or q.head_calibration) and calib is None:
        raise RuntimeError(f"{config}: smooth_alpha / head_calibration need calibration inputs")
    head_int8 = q.head_bits == 8
    mods = dict(dec.named_modules())
    names = [n for n, m in mods.items() if isinstance(m, torch.nn.Linear) and not (head_int8 and m is dec.lm_head)]
    facts = {"smoothed": 0, "min_scale_grid": 0, "grid_max_abs_err": 0.0, "grid_max_rel_err": 0.0}
    corr = {"corrected": 0, "on_grid_skipped": 0, "bytes": 0, "rel_err_before": [], "rel_err_after": []}
    # looked up before any weight changes (the keys are weight contents)
    amaxes = {n: _sibling_stat(calib.absmax_for, mods, n) for n in names} if q.smooth_alpha else {}
    for name in names:
        lin = mods[name]
        w = lin.weight.detach().float()
        n, k = w.shape
        inv = None
        if q.smooth_alpha:
            amax = amaxes[name]
            if amax is None and lin is dec.lm_head:
                amax = calib.hidden.abs().amax(0)
            if amax is None:
                raise RuntimeError(f"smooth_alpha: no calibration statistics for {name}")
            # constant over each group of a 4-bit grid: a grid the base sits on stays exact
            sm = smooth_scales(amax, w, q.smooth_alpha, group if bits == 4 else None)
            w = w * sm[None, :]
            inv = 1.0 / sm
            facts["smoothed"] += 1
        bias = None if lin.bias is None else lin.bias.detach()
        offset = lorc = None
        if bits == 4 and q.grid == "min-scale":
            scale, zp = block_grid(w, group, 4, "float32", "min-scale")
            qu = rtn(w, scale, zp, group, 4)
            # XNNPACK stores group scales as bf16 (executorch 1.5.1, node_visitor.get_quant_params): use the bf16
            # scale here too, and give each group the least-squares offset for it (exact when bf16 holds d)
            d_bf = scale.to(torch.bfloat16).float().repeat_interleave(group, 1)
            sym_w = (qu.float() - 8) * d_bf
            offset = (w - sym_w).reshape(n, k // group, group).mean(-1)   # [N, K/group]
            sym = torch.nn.Linear(k, n, bias=False)
            with torch.no_grad():
                sym.weight.copy_(sym_w)
            quantize_(sym, tconf)
            _write_grid(sym.weight, qu, d_bf[:, ::group], 4)   # the exact grid (torchao's HQQ would pick other scales)
            back = sym_w + offset.repeat_interleave(group, 1)
            if q.error_rank:
                # on grid or not: the fp32-scale grid's own rounding error (the bf16 scales and the least-squares
                # offsets cost a Q4_1-derived base ~1.6e-3 relative on their own, which no low-rank factor fixes:
                # 0.00163 -> 0.00154 measured on SmolLM2-135M); the factors then take the error of what runs
                on_grid = float((w - dequant(qu, scale, zp, group)).norm()) < ON_GRID_REL_ERR * float(w.norm())
                got = None if on_grid else error_factors(w, back, q.error_rank, floor=0.0)   # [N, r] @ [r, K]
                if got is None:
                    corr["on_grid_skipped"] += 1
                else:
                    lorc = got[:2]
                    corr["corrected"] += 1
                    corr["bytes"] += 4 * (got[0].numel() + got[1].numel())
                    corr["rel_err_before"].append(got[2])
                    corr["rel_err_after"].append(got[3])
            err = float((back - w).abs().max())
            facts["grid_max_abs_err"] = max(facts["grid_max_abs_err"], err)   # in smoothed units (w * s)
            facts["grid_max_rel_err"] = max(facts["grid_max_rel_err"], err / max(float(w.abs().max()), 1e-12))
            facts["min_scale_grid"] += 1
            lin = sym
        else:
            lin.bias = None
            with torch.no_grad():
                lin.weight.copy_(w)
            quantize_(lin, tconf)
        if inv is not None or bias is not None or offset is not None:
            _replace_module(dec, mods, name, _wrapped_linear_class()(lin, inv, bias, offset, group, lorc))
    out = {"smooth_alpha": q.smooth_alpha, "grid": q.grid or "symmetric", **facts}
    if q.error_rank:
        out["error_correction"] = error_correction_facts(
            "low-rank error compensation (truncated SVD of W - Q(W), fp32 factor linears)", q.error_rank,
            corr["corrected"], corr["on_grid_skipped"], corr["bytes"], corr["rel_err_before"], corr["rel_err_after"])
    if head_int8:
        out["lm_head"] = _int8_weight_only(dec, q, calib, only=[dec.lm_head])
    return out


@functools.cache
def _wrapped_linear_class():
    import torch

    class WrappedLinear(torch.nn.Module):
        """``linear(x / s) [+ offset(block_sum(x / s))] [+ lorc_b(lorc_a(x / s))] [+ bias]``: SmoothQuant's
        input scaling, a min-scale grid's per-group offset, a low-rank error correction (``lorc``: (A [N, r],
        B [r, K]), w - w_q ~ A @ B) and the bias, outside the quantized linear (see ``_dynamic_activation``; an
        int8wo linear with a bias keeps only the bias here, ``_int8_weight_only``)."""

        def __init__(self, linear, inv, bias, offset, group, lorc=None):
            super().__init__()
            self.linear = linear
            p = lambda t: None if t is None else torch.nn.Parameter(t.float(), requires_grad=False)
            self.inv_scale, self.bias = p(inv), p(bias)
            self.block_sum = self.offset = None
            if offset is not None:
                n, groups = offset.shape
                self.block_sum = torch.nn.Linear(groups * group, groups, bias=False)
                self.offset = torch.nn.Linear(groups, n, bias=False)
                with torch.no_grad():
                    self.block_sum.weight.copy_(torch.eye(groups).repeat_interleave(group, 1))
                    self.offset.weight.copy_(offset)
                self.block_sum.float_helper = self.offset.float_helper = True
            self.lorc_a = self.lorc_b = None
            if lorc is not None:
                a, b = lorc                                    # [N, r], [r, K]
                self.lorc_a = torch.nn.Linear(b.shape[1], b.shape[0], bias=False)   # x -> x B^T  [.., r]
                self.lorc_b = torch.nn.Linear(a.shape[1], a.shape[0], bias=False)   # -> (x B^T) A^T [.., N]
                with torch.no_grad():
                    self.lorc_a.weight.copy_(b)
                    self.lorc_b.weight.copy_(a)
                self.lorc_a.float_helper = self.lorc_b.float_helper = True

        @property
        def weight(self):
            return self.linear.weight

        def forward(self, x):
            if self.inv_scale is not None:
                x = x * self.inv_scale
            y = self.linear(x)
            if self.offset is not None:
                y = y + self.offset(self.block_sum(x))
            if self.lorc_a is not None:
                y = y + self.lorc_b(self.lorc_a(x))
            if self.bias is not None:
                y = y + self.bias
            return y

    return WrappedLinear


def _int8_weight_only(dec, q, calib, only=None) -> dict:
    """Per-output-channel symmetric int8 weights with float activations (int8wo), in place.

    Each linear's weight becomes torchao's ``IntxUnpackedToInt8Tensor`` (int8 data, one fp32 scale per output
    channel), which exports as ``dequantize_affine(weight) -> linear``; :func:`_weight_only_linear_config`
    lowers that to XNNPACK's f32 x qc8w fully-connected kernel. Rounding: GPTQ on each decoder linear's input
    Hessian (``layers_calibration: gptq``) and on the lm_head's inputs (``head_calibration: gptq``), else round
    to nearest. A linear's bias is split off into an add (XNNPACK's visitor refuses a float bias beside a
    quantized weight with a float input)."""
    import torch
    from torchao.quantization import quantize_
    from torchao.quantization.granularity import PerAxis
    from torchao.quantization.quant_api import IntxWeightOnlyConfig

    from .calibrate import block_grid, gptq, rtn

    names = [n for n, m in dec.named_modules() if isinstance(m, torch.nn.Linear)
             and (only is None or any(m is o for o in only))]
    mods = dict(dec.named_modules())
    if calib is None and (q.head_calibration or q.layers_calibration):
        raise RuntimeError("int8wo: calibration was asked for but no calibration inputs were given")
    counts = {"gptq": 0, "round_to_nearest": 0}
    hessians = ({n: _sibling_stat(calib.hessian_for, mods, n) for n in names}
                if calib is not None and q.layers_calibration == "gptq" else {})
    rounded = {}
    for name in names:
        lin = mods[name]
        w = lin.weight.detach().float()
        k = w.shape[1]
        head_gptq = lin is dec.lm_head and q.head_calibration == "gptq"
        hess = hessians.get(name) if lin is not dec.lm_head else None
        if head_gptq or hess is not None:   # the head: its inputs (hidden states); a layer: its input Hessian
            qu, scale, zp = gptq(w, calib.hidden if head_gptq else None, k, 8, scale_dtype="float32",
                                 grid="symmetric", hessian=hess)
            counts["gptq"] += 1
        else:
            scale, zp = block_grid(w, k, 8, "float32", "symmetric")
            qu = rtn(w, scale, zp, k, 8)
            counts["round_to_nearest"] += 1
        rounded[name] = (qu, scale, zp)
    kept = _float_linears(dec, q, calib, mods, rounded) if q.float_linears else {}
    for name in names:
        lin = mods[name]
        if name in kept:
            continue
        qu, scale, _ = rounded.pop(name)
        bias = lin.bias
        lin.bias = None
        quantize_(lin, IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0)))
        _write_grid(lin.weight, qu, scale, 8)
        if bias is not None:   # the bias alone outside the linear
            _replace_module(dec, mods, name, _wrapped_linear_class()(lin, None, bias.detach(), None, 0))
    out = {"weight_rounding": counts}
    if q.float_linears:
        out["float_linears"] = {"method": "empirical Fisher x rounding error, sum over calibration sequences of "
                                          "(grad . dW)^2 (calibrate.fisher_scores)",
                                "kept": kept, "bytes_added": sum(3 * mods[n].weight.numel() for n in kept)}
    return {**out, **({"calibration": calib.facts} if calib is not None else {})}


def _float_linears(dec, q, calib, mods: dict, rounded: dict) -> dict:
    """The ``q.float_linears`` decoder linears (never the lm_head) with the largest Fisher-weighted rounding
    error (``calibrate.fisher_scores`` on the float model's calibration text): name -> share of the total score,
    largest first. ``rounded``: name -> (q, scale, zero point) of the per-channel int8 rounding each linear would
    get. A linear the float model has no weight for (a split fused projection: Phi-3's qkv) is not scored."""
    from .calibrate import dequant, weight_key

    if calib is None:
        raise RuntimeError("float_linears needs calibration inputs")
    deltas, by_key = {}, {}
    for name, (qu, scale, zp) in rounded.items():
        lin = mods[name]
        if lin is dec.lm_head:
            continue
        w = lin.weight.detach().float()
        key = weight_key(w.T.numpy())
        # built on demand from the uint8 codes (fisher_scores drops it after use): no fp32 dW held for all linears
        deltas[key] = (lambda qu=qu, scale=scale, zp=zp, w=w: dequant(qu, scale, zp, w.shape[1]) - w)
        by_key[key] = name
    scores = calib.fisher(deltas)
    total = sum(scores.values()) or 1.0
    top = sorted(scores, key=lambda k: -scores[k])[: q.float_linears]
    return {by_key[k]: round(scores[k] / total, 4) for k in top}


# ----------------------------------------------------------------------------- lowering


def delegation_facts(edge_program) -> dict:
    """Partitions per backend, and the share of compute nodes that a delegate took."""
    from executorch.devtools.backend_debug import get_delegation_info

    gm = edge_program.graph_module
    info = get_delegation_info(gm)
    backends = Counter(getattr(gm, n.name).backend_id for n in gm.graph.nodes
                       if n.op == "get_attr" and n.name.startswith("lowered_module_"))
    outside = {op: b.non_delegated for op, b in info.delegation_by_operator.items() if b.non_delegated}
    compute_outside = {op: n for op, n in outside.items()
                       if op not in _BOOKKEEPING and not op.startswith(_BOOKKEEPING[:4])}
    compute_total = info.num_delegated_nodes + sum(compute_outside.values())
    return {
        "partitions": sum(backends.values()),
        "partitions_by_backend": dict(backends),
        "delegated_nodes": info.num_delegated_nodes,
        "non_delegated_nodes": info.num_non_delegated_nodes,
        "non_delegated_compute_nodes": sum(compute_outside.values()),
        "delegated_fraction": round(info.num_delegated_nodes / compute_total, 4) if compute_total else 0.0,
        "non_delegated_ops": dict(sorted(compute_outside.items())),
    }


def _backend_config():
    from executorch.exir import ExecutorchBackendConfig
    from executorch.exir.passes import MemoryPlanningPass
    from executorch.exir.passes.sym_shape_eval_pass import ConstraintBasedSymShapeEvalPass

    # As ExecuTorch's LLMEdgeManager.to_executorch: fuse quant patterns (4-bit embedding kernels),
    # fold constants, keep graph inputs out of the planned arena, bound dynamic shapes by constraints.
    return ExecutorchBackendConfig(
        extract_delegate_segments=True,
        do_quant_fusion_and_const_prop=True,
        memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False),
        sym_shape_eval_pass=ConstraintBasedSymShapeEvalPass(),
    )


def _weight_only_linear_config():
    """XNNPACK ``LinearConfig`` that also takes a linear whose weight is a static per-channel int8
    ``dequantize`` and whose input is float (weight-only int8, torchao ``IntxWeightOnlyConfig``).

    Why (executorch 1.5.1): ``GEMMConfig._detect_precision`` calls a linear with a dequantized weight and a
    float input STATIC_QUANT, which needs a dequantized input and a quantized output, so the stock partitioner
    never takes the linear together with its weight. The weight's ``dequantize_affine`` is then lowered on its
    own and its per-channel scales are lost: the .pte returns ``x @ q^T`` exactly, ~1000x off
    (benchmarks/repros/xnnpack_weight_only_int8.py; no upstream issue found). The serializer and runtime
    already handle the pair: ``op_linear`` writes an fp32 input, a qcint8 filter with its per-channel scales
    and an fp32 output, which XNNPACK runs with its f32 x qc8w kernels. This config only adds the partition
    rule; tests/test_export_executorch.py compares such a .pte with eager, and the repro test notices an
    upstream fix. No bias: ``QuantParams.from_bias`` refuses a float bias here (``_int8_weight_only`` splits
    biases off)."""
    from executorch.backends.xnnpack.partition.config.gemm_configs import LinearConfig
    from executorch.backends.xnnpack.utils.quant_utils import is_dequant, is_per_channel, tag_as_implicit_q_dq
    from executorch.backends.xnnpack.utils.utils import get_input_node, is_param_node

    class WeightOnlyInt8LinearConfig(LinearConfig):
        def get_deps(self, node, ep):
            weight, act = get_input_node(node, self.weight_idx), get_input_node(node, self.act_idx)
            if not is_dequant(weight) or is_dequant(act):
                return super().get_deps(node, ep)
            data = get_input_node(weight, 0)
            if (len(node.all_input_nodes) > 2 or not is_param_node(ep, data) or not is_per_channel(weight)
                    or data.meta["val"].dtype.itemsize != 1):
                return False, []
            deps = [weight, data, *weight.all_input_nodes[1:3]]
            tag_as_implicit_q_dq(weight)
            return True, deps

    return WeightOnlyInt8LinearConfig


def _xnnpack_partitioners(quantized: bool, extended_ops: bool, weight_only: bool = False) -> list:
    from executorch.backends.xnnpack.partition.config import ALL_PARTITIONER_CONFIGS
    from executorch.backends.xnnpack.partition.config.gemm_configs import LinearConfig
    from executorch.backends.xnnpack.partition.config.xnnpack_config import ConfigPrecisionType
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    if weight_only:
        cfg = _weight_only_linear_config()
        configs = [cfg if c is LinearConfig else c for c in ALL_PARTITIONER_CONFIGS]
        return [XnnpackPartitioner(configs=configs)]

    # One partitioner for every precision (its default): ExecuTorch's export_llama passes a dynamically
    # quantized one and then a float one, but to_edge_transform_and_lower re-traces the whole program
    # twice per partitioner (executorch 1.5.1, exir/program/_program.py, the EDGE_DO_NOT_DECOMP path),
    # and XNNPACK preprocesses every partition with its ~15 passes. One partitioner halves the traces
    # and gives fewer, larger partitions; same kernels.
    if quantized and not extended_ops:
        return [XnnpackPartitioner(config_precisions=ConfigPrecisionType.DYNAMIC_QUANT)]
    return [XnnpackPartitioner()]


def _coreml_partitioners(recipe) -> list:
    try:
        import coremltools as ct
        from executorch.backends.apple.coreml.compiler import CoreMLBackend
        from executorch.backends.apple.coreml.partition import CoreMLPartitioner
    except ImportError as e:  # pragma: no cover - depends on the install
        raise UserError(f"the Core ML delegate needs coremltools ({e})", hint="pip install coremltools==9.0") from None
    opts = recipe.coreml
    specs = CoreMLBackend.generate_compile_specs(
        compute_unit=getattr(ct.ComputeUnit, opts.compute_units.upper()),
        minimum_deployment_target=getattr(ct.target, opts.minimum_deployment_target),
        compute_precision=ct.precision.FLOAT16 if opts.precision == "fp16" else ct.precision.FLOAT32,
    )
    return [CoreMLPartitioner(compile_specs=specs, take_over_mutable_buffer=True)]


def lower(dec, example_inputs, dynamic_shapes, partitioners, transform_passes=()):
    """torch.export (strict) -> edge + delegate -> ExecuTorch program.

    Returns (program, delegation facts, timings).
    """
    import torch
    from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower

    t0 = time.perf_counter()
    with torch.no_grad():
        ep = torch.export.export(dec, example_inputs, dynamic_shapes=dynamic_shapes, strict=True)
    t1 = time.perf_counter()
    edge = to_edge_transform_and_lower(ep, partitioner=partitioners, transform_passes=list(transform_passes),
                                       compile_config=EdgeCompileConfig(_check_ir_validity=False))
    t2 = time.perf_counter()
    facts = delegation_facts(edge.exported_program())
    program = edge.to_executorch(_backend_config())
    t3 = time.perf_counter()
    return program, facts, {"torch_export_s": round(t1 - t0, 2), "lower_s": round(t2 - t1, 2),
                            "to_executorch_s": round(t3 - t2, 2)}


# ----------------------------------------------------------------------------- exporter


def _unsupported(recipe) -> None:
    if recipe.quantization.scheme == "fp16":
        raise UserError("fp16 is not supported by the ExecuTorch XNNPACK exporter (the custom SDPA/KV-cache "
                        "path is float32)", field="quantization.scheme",
                        expected="none, 8da4w, 8da8w, int8wo or int4wo; or the Core ML delegate (coreml.delegate: true)")


@register_exporter("executorch")
def export_executorch(job) -> dict:
    """Write ``model.pte`` into ``job.out_dir``; return the manifest facts (io, quantization, delegation)."""
    from .decoder import spell_out_gelu_tanh
    from .et_ops import CustomOpsKVCache, SymbolicViewToInferred, load_custom_ops

    rec = job.recipe
    coreml = rec.coreml is not None and rec.coreml.delegate
    if coreml:
        return _export_coreml_delegate(job)
    _unsupported(rec)
    q = rec.quantization
    quantized = q.scheme != "none"
    load_custom_ops()
    job.progress("building the decoder (ExecuTorch custom SDPA + KV cache)")
    # A tied lm_head gets its own weight when quantizing: the table (gather) and the head (matmul)
    # take different quantization schemes.
    # rope_as_matmul: XNNPACK takes no slice of a dynamic-length tensor (executorch 1.5.1, SliceCopyConfig in
    # backends/xnnpack/partition/config/generic_node_configs.py), so rotate_half's slices would leave four
    # ops per layer outside the delegate and split every layer in three partitions.
    dec = job.decoder(CustomOpsKVCache(), delegate_friendly_norm=True, untie_lm_head=quantized,
                      rope_as_matmul=True)
    cache = dec.cache
    # HF's nn.Embedding(padding_idx=pad) exports as embedding(w, ids, pad); ExecuTorch's quant fusion
    # (exir/passes/_quant_patterns_and_replacements.py, executorch 1.5.1) matches only
    # embedding(dequantize_affine(...), ids), so a quantized table stayed a torchao::dequantize_affine
    # with no kernel ("Missing out variants"). padding_idx only masks gradients: dropping it changes
    # no output.
    dec.embed_tokens.padding_idx = None
    spell_out_gelu_tanh(dec)   # XNNPACK (executorch 1.5.1) runs aten.gelu(approximate="tanh") as erf GELU
    last_only = rec.xnnpack.prefill_logits == "last"
    dec.last_logits_only = last_only
    t0 = time.perf_counter()
    if needs_calibration(q):
        job.progress("calibration (linear inputs on the LaMP sample's training examples)")
    calib = calibration_for(q, job.model, job.base_dir, job.prompt_format)
    job.progress(f"quantizing ({q.scheme})" if quantized else "float32 (no quantization)")
    applied = quantize(dec, rec, calib)
    del calib
    t_quant = time.perf_counter() - t0
    job.progress("torch.export + XNNPACK lowering")
    partitioners = _xnnpack_partitioners(quantized, rec.xnnpack.extended_ops,
                                         weight_only=q.scheme == "int8wo" or q.head_bits == 8)
    example, dyn = cache.example_inputs(dec, min(2, rec.prefill_len)), cache.dynamic_shapes(rec.prefill_len)
    if dec.lora_names:   # base package: LoRA A/B as method inputs after tokens/input_pos (static shapes, fixed rank)
        from .lora import example_tensors

        dec.lora_feed.bmm = True
        # float32 inputs: a cast in the graph would be a portable op between XNNPACK partitions; the adapter file
        # keeps the layout's dtype (fp16) and the runner widens it once per user switch
        example = (*example, *example_tensors(dec.lora_layout, dec.spec, dtype="float32"))
        if dyn is not None:
            dyn = ((*dyn[0], *([None] * len(dec.lora_names))),)
    program, facts, timings = lower(dec, example, dyn, partitioners, transform_passes=[SymbolicViewToInferred()])
    with open(job.out_dir / MODEL_FILE, "wb") as f:
        program.write_to_file(f)
    io = {"methods": ["forward"], "model_file": MODEL_FILE, "prefill_logits": "last" if last_only else "all",
          "backend": "xnnpack", "runtime_ops": ["llama::update_cache", "llama::custom_sdpa"]
          + (["quantized_decomposed::embedding_*"] if applied.get("embedding_config") else []),
          **dec.io_description()}
    if last_only:
        io["outputs"] = {"logits": {"shape": [1, 1, dec.spec.vocab_size], "dtype": "float32",
                                    "meaning": "logits of the last fed position"}}
    if dec.lora_names:
        io["lora"] = {**dec.lora_layout.to_dict(), "inputs": "forward(tokens, input_pos, *lora): lora.{layer}.{target}."
                      "A [in, rank] then .B [rank, out], layer by layer", "rank_dim": "fixed", "input_dtype": "float32",
                      "adapter_file": "adapter.safetensors (the same named tensors)"}
    return {"io": io, "quantization_applied": applied,
            "extra": {"delegation": facts, "timings": {"quantize_s": round(t_quant, 2), **timings}}}


def _export_coreml_delegate(job) -> dict:
    """A .pte whose graph Core ML runs (static one-token forward; Core ML takes no dynamic shapes)."""
    rec = job.recipe
    if rec.quantization.scheme not in ("none", "fp16"):
        raise UserError(f"quantization.scheme {rec.quantization.scheme!r} is not supported with the Core ML "
                        "delegate", field="quantization.scheme", expected="none or fp16 (coreml.precision)")
    from .et_ops import StateKVCache

    job.progress("building the decoder (KV cache as Core ML state)")
    dec = job.decoder(StateKVCache())
    cache = dec.cache
    example = cache.example_inputs(dec, 1, 0)
    job.progress("torch.export + Core ML lowering")
    program, facts, timings = lower(dec, example, None, _coreml_partitioners(rec))
    with open(job.out_dir / MODEL_FILE, "wb") as f:
        program.write_to_file(f)
    io = {"methods": ["forward"], "model_file": MODEL_FILE, "prefill_logits": "all", "backend": "coreml",
          "static_seq": 1, **dec.io_description()}
    return {"io": io, "quantization_applied": {"scheme": rec.quantization.scheme, "precision": rec.coreml.precision},
            "extra": {"delegation": facts, "timings": timings}}
