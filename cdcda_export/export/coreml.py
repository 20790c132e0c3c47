"""Core ML exporter: ``model.mlpackage`` (ML program, iOS 18+) with the KV cache as Core ML state.

Route (works on Linux; predictions need macOS):

1. :class:`~cdcda_export.export.decoder.ExportDecoder` with the ``"buffer"`` cache strategy: KV caches
   are registered buffers written by slice assignment, inputs are ``input_ids`` [1, T] and an additive
   causal mask [1, 1, T, end]; the fed tokens take positions ``end - T .. end - 1``.
2. :func:`trace_decoder` -- ``torch.jit.trace``. This traced module is exactly what gets converted, so the
   tests compare *it* with Hugging Face eager logits (Core ML itself cannot run on Linux).
3. :func:`convert_traced` -- ``ct.convert`` with ``ct.RangeDim`` on T (1..prefill_len) and on the mask's
   end (1..max_seq_len), one ``ct.StateType`` (fp16; the only state dtype Core ML has) per cache buffer.
   One function serves prefill (T > 1) and decode (T = 1). coremltools turns the buffer names
   ``cache.k_cache_{i}`` into the state names ``cache_k_cache_{i}`` (dots are not allowed).
4. :func:`compress` -- ``coremltools.optimize.coreml`` with ``op_type_configs`` for ``linear`` and (when
   the recipe asks) ``gather`` only: a global config would also quantize the RoPE tables.

The spec of a saved package can be checked without running it: :func:`coreml_structural_check`.

Limits: the KV cache as state needs iOS 18 / macOS 15 (older targets are refused with a UserError). Range
(flexible) shapes keep one function for prefill and decode, but Core ML usually runs such models on CPU/GPU,
not on the Neural Engine, so the shipped recipes use ``compute_units: all``. The state is fp16 even with
``precision: fp32``.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

from ..errors import UserError
from .registry import register_exporter

MODEL_FILE = "model.mlpackage"
INPUT_NAMES = ("input_ids", "causal_mask")
OUTPUT_NAME = "logits"

# MIL op types that hold compressed weights, per recipe scheme (iOS 18 opset).
COMPRESSED_OPS = {
    "int8-linear": ("constexpr_blockwise_shift_scale", "constexpr_affine_dequantize"),
    "int4-block": ("constexpr_blockwise_shift_scale",),
    "palettize-4bit": ("constexpr_lut_to_dense",),
}
_STATE_TARGETS = ("iOS18", "macOS15")
_COMPUTE_UNITS = {"all": "ALL", "cpu_only": "CPU_ONLY", "cpu_and_gpu": "CPU_AND_GPU", "cpu_and_ne": "CPU_AND_NE"}


# ----------------------------------------------------------------------------- upstream workaround


def patch_coremltools_numpy_cast() -> bool:
    """Work around coremltools 9.0 + numpy >= 2.4: ``int()`` on a one-element array in ``aten::Int``.

    Upstream: apple/coremltools#2633 (fixed by PR #2632, after 9.0). coremltools 9.0's torch frontend
    ``_cast`` (used by ``aten::Int``/``aten::bool``) calls ``int(x.val)`` on a compile-time constant that
    may be a 1-element, 1-D array; numpy 1.25-2.3 warn (DeprecationWarning), numpy 2.4 raises
    "only 0-dimensional arrays can be converted to Python scalars" and every conversion with such a node
    fails. We pin ``numpy<2.4`` *and* replace the constant case with ``.item()`` here, so a newer numpy
    pulled in by another package does not break Core ML export. Idempotent; returns True when patched.
    """
    import numpy as np
    from coremltools.converters.mil.frontend.torch import ops

    if getattr(ops._cast, "_cdcda_patched", False):
        return False
    original = ops._cast

    def _cast(context, node, dtype, dtype_name):
        from coremltools.converters.mil import Builder as mb

        x = ops._get_inputs(context, node, expected=1)[0]
        if x.can_be_folded_to_const() and isinstance(x.val, np.ndarray) and x.val.size == 1:
            if not (len(x.shape) == 0 or all(d == 1 for d in x.shape)):
                raise ValueError("input to cast must be either a scalar or a length 1 tensor")
            context.add(mb.const(val=dtype(x.val.reshape(()).item()), name=node.name), node.name)
            return
        original(context, node, dtype, dtype_name)

    _cast._cdcda_patched = True  # type: ignore[attr-defined]
    _cast._cdcda_original = original  # type: ignore[attr-defined]
    ops._cast = _cast
    return True


def _ct():
    """Import coremltools (quietly: its Linux import prints warnings about the missing native runtime)."""
    import logging
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("coremltools").setLevel(logging.ERROR)
        import coremltools as ct
    patch_coremltools_numpy_cast()
    return ct


# ----------------------------------------------------------------------------- recipe -> coremltools


def _coreml_options(recipe):
    opts = recipe.coreml
    if opts.minimum_deployment_target not in _STATE_TARGETS:
        raise UserError(
            f"the KV cache is exported as Core ML state, which needs iOS 18 / macOS 15; "
            f"got {opts.minimum_deployment_target!r}",
            field="coreml.minimum_deployment_target", expected=" or ".join(_STATE_TARGETS),
            hint="set `coreml: {minimum_deployment_target: iOS18}` in the recipe")
    if opts.delegate:
        raise UserError("coreml.delegate: true is an ExecuTorch recipe (Core ML-delegated .pte), not a .mlpackage",
                        field="coreml.delegate", expected="false for format: coreml",
                        hint="use an executorch recipe for the Core ML delegate")
    return opts


def optimization_config(recipe, *, tied_embeddings: bool = False):
    """``OptimizationConfig`` for the recipe's scheme (``None`` for fp16/none), and the compress function name.

    Only ``linear`` (and ``gather`` when ``quantization.embeddings`` is not ``none``) get a config: a global
    config would also quantize the RoPE cos/sin tables and the norm weights.

    With tied embeddings the embedding ``gather`` and the ``lm_head`` ``linear`` read one weight constant,
    and coremltools refuses two configs for one constant ("compression config conflict"); both then get
    the linear config (the table is stored once, compressed, whatever ``quantization.embeddings`` says).
    Recipe ``options`` (free-form): ``weight_threshold`` (default 2048: smaller weights stay fp16),
    ``palettize_mode`` (``kmeans`` | ``uniform``), ``kmeans_workers`` (processes for k-means, default 1).
    """
    _ct()
    from coremltools.optimize.coreml import OpLinearQuantizerConfig, OpPalettizerConfig, OptimizationConfig

    q = recipe.quantization
    scheme = q.scheme
    if scheme in ("none", "fp16"):
        return None, None
    extra = recipe.options or {}
    threshold = int(extra.get("weight_threshold", 2048))

    def linear_cfg(bits: int, block: int | None):
        if block:
            return OpLinearQuantizerConfig(mode="linear_symmetric", dtype=f"int{bits}", granularity="per_block",
                                           block_size=block, weight_threshold=threshold)
        return OpLinearQuantizerConfig(mode="linear_symmetric", dtype=f"int{bits}", granularity="per_channel",
                                       weight_threshold=threshold)

    if scheme == "int8-linear":
        main, fn = linear_cfg(q.bits or 8, q.block_size), "linear_quantize_weights"
    elif scheme == "int4-block":
        main, fn = linear_cfg(q.bits or 4, q.block_size or 32), "linear_quantize_weights"
    elif scheme == "palettize-4bit":
        main = OpPalettizerConfig(mode=str(extra.get("palettize_mode", "kmeans")), nbits=q.bits or 4,
                                  granularity="per_grouped_channel", group_size=q.group_size or 16,
                                  num_kmeans_workers=int(extra.get("kmeans_workers", 1)), weight_threshold=threshold)
        fn = "palettize_weights"
    else:  # the recipe schema already refuses this; keep the message for direct callers
        raise UserError(f"quantization.scheme {scheme!r} is not a Core ML scheme",
                        field="quantization.scheme", expected=", ".join(["fp16", *COMPRESSED_OPS]))
    types = {}
    if q.layers in ("linear", "all"):
        types["linear"] = main
    if q.embeddings == "same" or (q.layers == "all" and q.embeddings == "none"):
        types["gather"] = main
    elif q.embeddings in ("int8", "int4"):
        if fn != "linear_quantize_weights":
            raise UserError("embeddings int8/int4 mixes linear quantization into a palettization recipe",
                            field="quantization.embeddings", expected="none or same")
        types["gather"] = linear_cfg(int(q.embeddings[3:]), q.embedding_group_size)
    if tied_embeddings and types:
        shared = types.get("linear") or types["gather"]
        types["linear"] = types["gather"] = shared
    if not types:
        return None, None
    return OptimizationConfig(op_type_configs=types), fn


def check_compression_sizes(dec, recipe) -> None:
    """The recipe's block / group size must divide the dimension it runs along in every weight it compresses:
    coremltools skips such a weight with only a log warning (it would stay fp16 while the manifest says
    compressed). ``per_block`` runs along the input channels ([out, in] weights: a linear's in_features,
    the embedding table's hidden width), ``per_grouped_channel`` palettization along the output channels
    (out_features, the vocabulary of the table). Weights at or below ``weight_threshold`` elements are not
    compressed and not checked. Called on the torch decoder, before tracing and conversion."""
    import torch
    from coremltools.optimize.coreml import OpLinearQuantizerConfig

    from .recipe import check_size_divides

    tied = dec.spec.tie_word_embeddings
    config, _ = optimization_config(recipe, tied_embeddings=tied)
    if config is None:
        return
    q = recipe.quantization
    shapes = {"linear": {n: tuple(m.weight.shape) for n, m in dec.named_modules() if isinstance(m, torch.nn.Linear)},
              "gather": {"embed_tokens": tuple(dec.embed_tokens.weight.shape)}}
    for op, cfg in sorted(config.op_type_configs.items()):
        gran = str(getattr(cfg.granularity, "name", cfg.granularity)).lower()
        if gran == "per_block" and isinstance(cfg, OpLinearQuantizerConfig):
            size, axis, what = cfg.block_size, 1, "input channels"
            field = ("quantization.embedding_group_size" if op == "gather" and q.embeddings in ("int8", "int4")
                     and not tied else "quantization.block_size")
        elif gran == "per_grouped_channel":
            size, axis, what, field = cfg.group_size, 0, "output channels", "quantization.group_size"
        else:
            continue
        widths = {n: s[axis] for n, s in shapes[op].items() if s[0] * s[1] > cfg.weight_threshold}
        check_size_divides(widths, size, field=field, axis=what,
                           why="coremltools would skip those weights (left fp16) with only a log warning")


# ----------------------------------------------------------------------------- trace / convert / compress


def trace_decoder(dec, example_len: int = 4, past_len: int = 2):
    """``torch.jit.trace`` of a ``"buffer"``-cache decoder; the caches are zeroed afterwards.

    The example has a past (``past_len`` > 0) so that the traced slice offsets depend on the input shapes.
    """
    import torch

    from .decoder import causal_mask

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, dec.spec.vocab_size, (1, example_len), dtype=torch.long, generator=g)
    mask = causal_mask(example_len, past_len + example_len)
    lora = ()
    if dec.lora_names:   # base package: LoRA A/B inputs after input_ids / causal_mask (export/lora.py)
        from .lora import example_tensors

        lora = tuple(example_tensors(dec.lora_layout, dec.spec, dtype="float32"))
    with torch.no_grad():
        traced = torch.jit.trace(dec, (ids, mask, *lora), check_trace=False)
    dec.cache.reset()
    for name, buf in traced.named_buffers():
        if _is_cache_buffer(name):
            buf.zero_()
    return traced


def coreml_input_name(name: str) -> str:
    """Core ML input names are identifiers: ``lora.3.q_proj.A`` is fed as ``lora_3_q_proj_A``."""
    return name.replace(".", "_")


def _is_cache_buffer(name: str) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return leaf.startswith(("k_cache_", "v_cache_"))


def convert_traced(traced, dec, recipe):
    """``ct.convert`` of the traced decoder -> ``MLModel`` (not compiled: ``skip_model_load=True``)."""
    import numpy as np

    ct = _ct()
    opts = _coreml_options(recipe)
    fp16 = opts.precision == "fp16"
    act = np.float16 if fp16 else np.float32
    seq = ct.RangeDim(lower_bound=1, upper_bound=recipe.prefill_len, default=1, symbol="seq")
    end = ct.RangeDim(lower_bound=1, upper_bound=recipe.max_seq_len, default=1, symbol="end")
    states = [ct.StateType(wrapped_type=ct.TensorType(shape=tuple(b.shape), dtype=np.float16), name=n)
              for n, b in dec.named_buffers() if _is_cache_buffer(n)]
    return ct.convert(
        traced,
        inputs=[ct.TensorType(name="input_ids", shape=(1, seq), dtype=np.int32),
                ct.TensorType(name="causal_mask", shape=(1, 1, seq, end), dtype=act)]
        + [ct.TensorType(name=coreml_input_name(n), shape=s, dtype=act) for n, s in
           (dec.lora_layout.shapes(dec.spec).items() if dec.lora_names else ())],
        outputs=[ct.TensorType(name=OUTPUT_NAME, dtype=act)],
        states=states,
        minimum_deployment_target=getattr(ct.target, opts.minimum_deployment_target),
        compute_precision=ct.precision.FLOAT16 if fp16 else ct.precision.FLOAT32,
        compute_units=getattr(ct.ComputeUnit, _COMPUTE_UNITS[opts.compute_units]),
        convert_to="mlprogram",
        skip_model_load=True,
    )


def compress(mlmodel, recipe, *, tied_embeddings: bool = False):
    """Apply the recipe's weight compression; returns (model, description of what was applied)."""
    config, fn = optimization_config(recipe, tied_embeddings=tied_embeddings)
    if config is None:
        return mlmodel, {"scheme": recipe.quantization.scheme, "applied": False}
    import coremltools.optimize.coreml as cto

    t0 = time.perf_counter()
    out = getattr(cto, fn)(mlmodel, config=config)
    return out, {"scheme": recipe.quantization.scheme, "applied": True, "function": fn,
                 "op_types": sorted(config.op_type_configs), "seconds": round(time.perf_counter() - t0, 2)}


# ----------------------------------------------------------------------------- spec reading


def _array_dtype(t) -> str:
    from coremltools.proto import FeatureTypes_pb2

    return FeatureTypes_pb2.ArrayFeatureType.ArrayDataType.Name(int(t.dataType)).lower()  # "float16", "int32"


def _feature(f) -> dict:
    kind = f.type.WhichOneof("Type")
    if kind == "stateType":
        arr = f.type.stateType.arrayType
        return {"shape": [int(d) for d in arr.shape], "dtype": _array_dtype(arr)}
    arr = f.type.multiArrayType
    out: dict[str, Any] = {"dtype": _array_dtype(arr)}
    ranges = [[int(r.lowerBound), int(r.upperBound)] for r in arr.shapeRange.sizeRanges]
    if ranges:
        out["shape_range"] = ranges
    elif len(arr.shape):
        out["shape"] = [int(d) for d in arr.shape]
    return out


def read_spec(package: str | Path):
    """The saved package's spec (no compilation, works on Linux)."""
    ct = _ct()
    return ct.models.MLModel(str(package), skip_model_load=True).get_spec()


def spec_signature(spec) -> dict:
    d = spec.description
    return {"inputs": {f.name: _feature(f) for f in d.input},
            "outputs": {f.name: _feature(f) for f in d.output},
            "states": {f.name: _feature(f) for f in d.state},
            "spec_version": int(spec.specificationVersion)}


def op_counts(spec) -> dict[str, int]:
    """MIL op type -> count over every function of the ML program."""
    c: Counter[str] = Counter()
    for fn in spec.mlProgram.functions.values():
        for block in fn.block_specializations.values():
            for op in block.operations:
                c[op.type] += 1
    return dict(sorted(c.items()))


def weight_bytes(package: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(package).rglob("weight.bin"))


# ----------------------------------------------------------------------------- manifest io


def io_description(dec, recipe, signature: dict) -> dict:
    sp = dec.spec
    opts = recipe.coreml
    return {
        "methods": ["main"],
        "model_file": MODEL_FILE,
        "inputs": signature["inputs"],
        "outputs": signature["outputs"],
        "states": signature["states"],
        "kv_cache": {"kind": "state", "names": sorted(signature["states"]),
                     "layout": "[1, kv_heads, max_seq_len, head_dim]", "dtype": "float16",
                     "num_layers": sp.num_layers, "num_kv_heads": sp.num_kv_heads, "head_dim": sp.head_dim},
        "causal_mask": {"meaning": "additive; 0 = attend, mask_value = masked; fed tokens take positions "
                                   "end-seq .. end-1", "mask_value": -65504.0 if opts.precision == "fp16" else -3.4028234663852886e38},
        "prefill": {"max_tokens_per_call": recipe.prefill_len},
        "compute_units": opts.compute_units,
        "precision": opts.precision,
        "minimum_deployment_target": opts.minimum_deployment_target,
        "decoder": {k: v for k, v in dec.io_description().items() if k not in ("inputs", "outputs", "kv_cache")},
    }


# ----------------------------------------------------------------------------- exporter


@register_exporter("coreml")
def export_coreml(job) -> dict:
    """Write ``model.mlpackage`` into ``job.out_dir``; returns io / quantization_applied / extra."""
    recipe = job.recipe
    _coreml_options(recipe)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    dec = job.decoder(cache="buffer")
    check_compression_sizes(dec, recipe)
    job.progress("coreml: tracing the decoder")
    traced = trace_decoder(dec)
    timings["trace_s"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    job.progress("coreml: converting (ct.convert)")
    mlmodel = convert_traced(traced, dec, recipe)
    timings["convert_s"] = round(time.perf_counter() - t, 2)
    del traced
    job.progress(f"coreml: compressing ({recipe.quantization.scheme})")
    mlmodel, applied = compress(mlmodel, recipe, tied_embeddings=dec.spec.tie_word_embeddings)
    t = time.perf_counter()
    path = Path(job.out_dir) / MODEL_FILE
    mlmodel.save(str(path))
    timings["save_s"] = round(time.perf_counter() - t, 2)
    spec = mlmodel.get_spec()
    ops = op_counts(spec)
    expected = COMPRESSED_OPS.get(recipe.quantization.scheme, ())
    applied["compressed_ops"] = {k: v for k, v in ops.items() if k.startswith("constexpr_")}
    applied["linear_ops"] = ops.get("linear", 0)
    applied["weight_bin_bytes"] = weight_bytes(path)
    if expected and not any(ops.get(o) for o in expected):
        raise RuntimeError(f"Core ML compression {recipe.quantization.scheme} produced none of {expected}; "
                           f"ops: {applied['compressed_ops']}")
    io = io_description(dec, recipe, spec_signature(spec))
    if dec.lora_names:
        io["lora"] = {**dec.lora_layout.to_dict(), "inputs": "lora.{layer}.{target}.A [in, rank] | .B [rank, out] "
                      "(model inputs after input_ids, causal_mask; Core ML names use _ for .: lora_{layer}_{target}_A)",
                      "rank_dim": "fixed",
                      "input_dtype": "float16" if _coreml_options(recipe).precision == "fp16" else "float32",
                      "adapter_file": "adapter.safetensors (the same named tensors)",
                      "why_inputs": "LoRA-as-inputs: one package serves every user, present and future; a "
                                    "multifunction package must be rebuilt (an app update) to add a user"}
    return {"io": io, "quantization_applied": applied, "extra": timings}


# ----------------------------------------------------------------------------- structural check


def coreml_structural_check(artifact_dir: str | Path) -> dict:
    """Checks of a Core ML artifact that run without macOS.

    * the package's I/O and state signature (names, dtypes, shapes / shape ranges) equals ``manifest.io``;
    * the compressed weight op types of the recipe's scheme are present (``constexpr_blockwise_shift_scale``
      for int4 per-block, ``constexpr_lut_to_dense`` for palettization, ``constexpr_affine_dequantize`` or
      blockwise for int8) and, for fp16, absent;
    * one state per KV-cache tensor (2 x num_layers) and the ML program's spec version is iOS 18+.

    Returns ``{"passed": bool, "problems": [str], "checks": {name: bool}, "signature": {...},
    "compressed_ops": {op: count}, "weight_bin_bytes": int}``.
    """
    root = Path(artifact_dir)
    problems: list[str] = []
    checks: dict[str, bool] = {}
    mp = root / "manifest.json"
    if not mp.is_file():
        return {"passed": False, "problems": [f"{mp}: missing (incomplete artifact)"], "checks": {}}
    manifest = json.loads(mp.read_text(encoding="utf-8"))
    io = manifest.get("io", {})
    pkg = root / io.get("model_file", MODEL_FILE)
    if not (pkg / "Manifest.json").is_file():
        return {"passed": False, "problems": [f"{pkg}: not a .mlpackage (no Manifest.json)"], "checks": {}}
    spec = read_spec(pkg)
    sig = spec_signature(spec)

    def check(name: str, ok: bool, problem: str) -> None:
        checks[name] = bool(ok)
        if not ok:
            problems.append(problem)

    for part in ("inputs", "outputs", "states"):
        want, got = io.get(part, {}), sig[part]
        check(f"{part}_match", want == got, f"{part}: package has {got}, manifest.io has {want}")
    want_inputs = list(INPUT_NAMES)
    if manifest.get("delivery") == "base-package":   # + the LoRA inputs, in the runtime's order
        from ..runtime.adapters import lora_input_shapes

        shapes = {coreml_input_name(n): s for n, s in
                  lora_input_shapes(io.get("decoder") or {}, manifest.get("lora") or {}).items()}
        want_inputs += list(shapes)
        got_shapes = {n: sig["inputs"].get(n, {}).get("shape") for n in shapes}
        check("lora_input_shapes", all(got_shapes[n] == list(s) for n, s in shapes.items()),
              f"LoRA inputs: package shapes differ from the layout's ({manifest.get('lora')})")
    check("input_names", list(sig["inputs"]) == want_inputs,
          f"inputs: expected {want_inputs[:4]}{' ...' if len(want_inputs) > 4 else ''}, package has "
          f"{list(sig['inputs'])[:4]}")
    n_layers = io.get("kv_cache", {}).get("num_layers")
    check("one_state_per_kv_tensor", n_layers is not None and len(sig["states"]) == 2 * n_layers,
          f"states: {len(sig['states'])} in the package, expected 2 x num_layers ({n_layers})")
    check("spec_version_ios18", sig["spec_version"] >= 9,
          f"spec version {sig['spec_version']} < 9 (iOS 18), states need iOS 18")
    ops = op_counts(spec)
    compressed = {k: v for k, v in ops.items() if k.startswith("constexpr_")}
    scheme = (manifest.get("recipe", {}).get("resolved", {}).get("quantization") or {}).get("scheme", "none")
    expected = COMPRESSED_OPS.get(scheme, ())
    if expected:
        check("compressed_weights", any(ops.get(o) for o in expected),
              f"scheme {scheme}: none of {list(expected)} in the program (found {compressed or 'no constexpr ops'})")
    else:
        check("uncompressed_weights", not compressed, f"scheme {scheme}: unexpected compressed ops {compressed}")
    return {"passed": not problems, "problems": problems, "checks": checks, "signature": sig,
            "compressed_ops": compressed, "expected_ops": list(expected), "weight_bin_bytes": weight_bytes(pkg)}


__all__ = ["export_coreml", "coreml_structural_check", "trace_decoder", "convert_traced", "compress",
           "optimization_config", "patch_coremltools_numpy_cast", "read_spec", "spec_signature", "op_counts",
           "weight_bytes", "COMPRESSED_OPS", "MODEL_FILE"]
