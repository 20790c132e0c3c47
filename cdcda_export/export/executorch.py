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

import time
from collections import Counter

from ..errors import UserError
from .registry import register_exporter

MODEL_FILE = "model.pte"

# recipe quantization.scheme -> ExecuTorch quantize_model_ linear config
LINEAR_CONFIGS = {"none": None, "8da4w": "8da4w", "8da8w": "8da8w", "int8wo": "8w", "int4wo": "4w"}
# Weight-only linear schemes that executorch 1.5.1's XNNPACK lowering gets wrong (see ``quantize``).
WEIGHT_ONLY_BROKEN = ("int8wo", "int4wo")
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


def quantize(dec, recipe) -> dict:
    """Quantize the decoder in place with ExecuTorch's torchao recipe; returns what was applied."""
    import torch

    q = recipe.quantization
    if q.scheme not in LINEAR_CONFIGS:
        raise UserError(f"quantization.scheme {q.scheme!r} is not supported by the ExecuTorch XNNPACK exporter",
                        field="quantization.scheme", expected=", ".join(LINEAR_CONFIGS))
    if q.scheme in WEIGHT_ONLY_BROKEN and q.layers != "none":
        # executorch 1.5.1 + torchao 0.18: a weight-only (float activation) int8 linear lowered to XNNPACK
        # returns outputs ~1000x off, as if the scales were dropped (max err 1.6e3 on a single Linear whose
        # outputs are ~1.5). Minimal reproduction: benchmarks/repros/xnnpack_weight_only_int8.py. Refused
        # here rather than shipped wrong; tests/test_export_executorch.py holds the refusal.
        raise UserError(f"quantization.scheme {q.scheme!r} (weight-only) lowers to XNNPACK with wrong numerics in "
                        "executorch 1.5.1 (see benchmarks/repros/xnnpack_weight_only_int8.py)",
                        field="quantization.scheme", expected="8da8w, 8da4w or none for the XNNPACK backend",
                        hint="for near-lossless int8 on CPU use the onnx/int8 recipe (weight-only MatMulNBits)")
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

    quantize_model_(dec, qlinear_config=linear, qlinear_group_size=lin_group,
                    qembedding_config=embedding, qembedding_group_size=emb_group)

    def is_quantized(m) -> bool:  # torchao swaps the weight for a quantized tensor subclass
        return type(m.weight) is not torch.nn.Parameter and type(m.weight) is not torch.Tensor

    linears = [m for m in dec.modules() if isinstance(m, torch.nn.Linear)]
    n_lin = sum(is_quantized(m) for m in linears)
    n_emb = int(is_quantized(dec.embed_tokens))
    if linear and n_lin != len(linears):
        raise RuntimeError(f"{linear}: only {n_lin} of {len(linears)} linears were quantized")
    if embedding and not n_emb:
        raise RuntimeError(f"{embedding}: the embedding table was not quantized")
    return {**applied, "group_size": lin_group if linear else None,
            "embedding_group_size": emb_group if embedding else None,
            "quantized_linears": n_lin, "linears": len(linears), "quantized_embeddings": n_emb}


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


def _xnnpack_partitioners(quantized: bool, extended_ops: bool) -> list:
    from executorch.backends.xnnpack.partition.config.xnnpack_config import ConfigPrecisionType
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

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
    last_only = rec.xnnpack.prefill_logits == "last"
    dec.last_logits_only = last_only
    t0 = time.perf_counter()
    job.progress(f"quantizing ({q.scheme})" if quantized else "float32 (no quantization)")
    applied = quantize(dec, rec)
    t_quant = time.perf_counter() - t0
    job.progress("torch.export + XNNPACK lowering")
    partitioners = _xnnpack_partitioners(quantized, rec.xnnpack.extended_ops)
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
