"""ONNX format: the export decoder with explicit past/present KV I/O, for ONNX Runtime and ORT GenAI.

Engine ``decoder`` (default): ``ExportDecoder`` with explicit KV I/O, exported with
``torch.onnx.export(dynamo=True)`` with dynamic ``seq`` and ``past_seq`` (never the static-cache
program: its cache turns into hidden buffers with no inputs/outputs, so the model silently stops
caching -- see STACK-NOTES). ``onnx.attention: gqa`` (default) uses the ``"ort-gqa"`` strategy below:
one ``com.microsoft.GroupQueryAttention`` node per layer (RoPE, causal mask, KV concat inside), with
one qkv and one gate_up MatMul per layer and an RMSNorm ORT fuses (``onnx.fuse_projections``) -- the
graph shape ORT GenAI's builder writes. ``onnx.attention: portable`` uses the plain ``"io"`` strategy
(standard ONNX ops only). Quantization is ONNX Runtime's:

* ``int8`` / ``int8-dynamic``: ``quantize_dynamic`` (MatMul weights int8, activations quantized at
  run time);
* ``int4``: ``MatMulNBitsQuantizer`` (MatMulNBits, symmetric, ``block_size``, ``accuracy_level``),
  optionally the embedding Gather as ``GatherBlockQuantized`` (``quantization.embeddings: int4``).

Engine ``genai-builder``: ``onnxruntime_genai.models.builder`` on the merged HF directory (fused
GroupQueryAttention/RotaryEmbedding/SkipSimplifiedLayerNorm contrib ops). Same I/O names.

Both write ``genai_config.json`` so ``onnxruntime_genai`` runs the artifact as well as
``cdcda_export.runtime.onnx``.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ..errors import UserError
from .registry import register_exporter

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"


# ----------------------------------------------------------------------------- fused attention strategy
#
# ONNX Runtime's fastest CPU decoder graphs (what ORT GenAI's builder writes) use the contrib op
# com.microsoft.GroupQueryAttention: GQA + causal mask + KV concat + RoPE in one kernel. We emit it from
# the same export decoder: a torch custom op ``cdcda::ort_gqa`` (eager reference implementation, so
# the torch model still runs and is tested) that the ONNX exporter translates to the contrib op.

_GQA_OP = None


def _gqa_op():
    """Define ``torch.ops.cdcda.ort_gqa`` once (lazily: torch is only imported by exporters)."""
    global _GQA_OP
    if _GQA_OP is not None:
        return _GQA_OP
    import torch
    from .decoder import WINDOW_MASK_VALUE, apply_rope, causal_mask, eager_attention, window_allowed

    schema = ("(Tensor q, Tensor? k, Tensor? v, Tensor past_k, Tensor past_v, Tensor seqlens_k, Tensor total_len, "
              "Tensor cos_cache, Tensor sin_cache, int num_heads, int kv_heads, float scale, int do_rotary, "
              "int share_buffer, int local_window=-1) "
              "-> (Tensor, Tensor, Tensor)")  # explicit: this module uses postponed annotations

    @torch.library.custom_op("cdcda::ort_gqa", mutates_args=(), schema=schema)
    def ort_gqa(q, k, v, past_k, past_v, seqlens_k, total_len, cos_cache, sin_cache, num_heads, kv_heads,
                scale, do_rotary, share_buffer, local_window=-1):
        """Reference semantics of GroupQueryAttention (batch 1, no padding): q [B,T,H*D], k/v [B,T,KVH*D]
        (or k = v = None and q the packed [B,T,(H+2*KVH)*D] qkv), past [B,KVH,P,D] -> out [B,T,H*D],
        present = concat(past, new) [B,KVH,P+T,D]; with ``share_buffer`` past is a [B,KVH,max_seq_len,D]
        buffer and present is that buffer with rows total-T..total-1 written (ORT does it in place when past
        and present are bound to the same memory). ``local_window`` >= 0 (Gemma 3 sliding layers): a query at
        position q also sees only keys k > q - local_window, i.e. ``local_window`` keys including itself: what
        ONNX Runtime 1.31's CPU GroupQueryAttention does with ``local_window_size`` (measured: with 3, the query
        at position 3 no longer sees key 0), and HF's ``sliding_window``."""
        b, t, _ = q.shape
        d = past_k.shape[-1]
        if k is None:   # packed qkv
            q, k, v = q.split([num_heads * d, kv_heads * d, kv_heads * d], dim=-1)
        share = share_buffer != 0
        p = int(total_len) - t if share else past_k.shape[2]
        qh = q.view(b, t, num_heads, d)
        kh = k.view(b, t, kv_heads, d)
        if do_rotary:
            pos = torch.arange(p, p + t)
            cos = torch.cat([cos_cache[pos], cos_cache[pos]], -1)[None, :, None, :]
            sin = torch.cat([sin_cache[pos], sin_cache[pos]], -1)[None, :, None, :]
            qh, kh = apply_rope(qh, cos, sin, d, d), apply_rope(kh, cos, sin, d, d)
        vh = v.view(b, t, kv_heads, d).transpose(1, 2)
        if share:  # present is the past buffer (max_seq_len long) with the new rows written at p .. p+t-1
            pk, pv = past_k.clone(), past_v.clone()
            pk[:, :, p:p + t] = kh.transpose(1, 2)
            pv[:, :, p:p + t] = vh
            ak, av = pk[:, :, :p + t], pv[:, :, :p + t]
        else:
            pk = ak = torch.cat([past_k, kh.transpose(1, 2)], 2)
            pv = av = torch.cat([past_v, vh], 2)
        mask = causal_mask(t, p + t, q.dtype)
        if local_window >= 0:
            win = window_allowed(torch.arange(p, p + t), torch.arange(p + t), local_window)
            mask = torch.where(win[None, None], mask, WINDOW_MASK_VALUE)
        out = eager_attention(qh.transpose(1, 2), ak, av, mask, scale)
        return out, pk, pv

    @ort_gqa.register_fake
    def _(q, k, v, past_k, past_v, seqlens_k, total_len, cos_cache, sin_cache, num_heads, kv_heads, scale, do_rotary,
          share_buffer, local_window=-1):
        b, t, _ = q.shape
        d = past_k.shape[-1]   # q may be packed qkv: the output width is num_heads * d either way
        s = past_k.shape[2] if share_buffer else past_k.shape[2] + t
        return (q.new_empty(b, t, num_heads * d), past_k.new_empty(b, kv_heads, s, d),
                past_v.new_empty(b, kv_heads, s, d))

    _GQA_OP = torch.ops.cdcda.ort_gqa.default
    return _GQA_OP


def _gqa_onnx(q, k, v, past_k, past_v, seqlens_k, total_len, cos_cache, sin_cache, num_heads, kv_heads, scale,
              do_rotary, share_buffer, local_window=-1):
    """ONNX translation of ``cdcda::ort_gqa``: one com.microsoft.GroupQueryAttention node."""
    # torch's exporter has no public helper for a contrib-domain node with several outputs; this is the
    # one it uses itself for control flow (torch 2.13). The domain's opset is set to 1 after export.
    from torch.onnx._internal.exporter._torchlib.ops.hop import call_op

    return call_op("GroupQueryAttention", q, k, v, past_k, past_v, seqlens_k, total_len, cos_cache, sin_cache,
                   _num_outputs=3, _domain="com.microsoft", num_heads=num_heads, kv_num_heads=kv_heads,
                   scale=scale, do_rotary=do_rotary, rotary_interleaved=0,
                   **({"local_window_size": local_window} if local_window >= 0 else {}))


def _make_gqa_strategy():
    import torch

    from .decoder import AttnContext, IOCache

    class OrtGQACache(IOCache):
        """``io`` I/O (same names/shapes), attention as com.microsoft.GroupQueryAttention (+ RoPE when full)."""

        name = "ort-gqa"
        layout = "bthd"
        packed_qkv = True   # fused qkv layers feed the matmul output straight in (no Split/Reshape nodes)

        def __init__(self, share_buffer: bool = True):
            super().__init__()
            self.share_buffer = share_buffer

        def setup(self, dec):
            super().setup(dec)
            sp = dec.spec
            self.applies_rope = sp.rotary_dim == sp.head_dim   # partial rotary (Phi-3 variants): decoder rotates
            half = sp.rotary_dim // 2
            cos, sin = dec.rope_table()
            self.register_buffer("cos_cache", cos[:, :half].clone(), persistent=False)
            self.register_buffer("sin_cache", sin[:, :half].clone(), persistent=False)
            if dec.two_ropes:   # Gemma 3: the sliding layers' RoPE base
                cos, sin = dec.rope_table(sliding=True)
                self.register_buffer("cos_cache_local", cos[:, :half].clone(), persistent=False)
                self.register_buffer("sin_cache_local", sin[:, :half].clone(), persistent=False)
            self.op = _gqa_op()

        def prepare(self, dec, input_ids, attention_mask, position_ids, *past) -> AttnContext:
            n = self.spec.num_layers
            cos = sin = None
            if not self.applies_rope:
                cos, sin = dec.rope_at(position_ids)
            total = attention_mask.shape[1]
            seqlens = (attention_mask.sum(1) - 1).to(torch.int32)
            total_len = (attention_mask[0, 0] * 0 + total).to(torch.int32)  # 0-d int32 tensor of a symbolic size
            pairs = [(past[2 * i], past[2 * i + 1]) for i in range(n)]
            return AttnContext(input_ids=input_ids, cos=cos, sin=sin, past=pairs,
                               extra={"seqlens_k": seqlens, "total_len": total_len})

        def attend(self, layer_idx, q, k, v, ctx):
            b, t = q.shape[0], q.shape[1]
            return self._gqa(layer_idx, q.reshape(b, t, -1), k.reshape(b, t, -1), v.reshape(b, t, -1), ctx)

        def attend_packed(self, layer_idx, qkv, ctx):
            return self._gqa(layer_idx, qkv, None, None, ctx)   # GroupQueryAttention's packed-QKV form

        def _gqa(self, layer_idx, q, k, v, ctx):
            sp = self.spec
            pk, pv = ctx.past[layer_idx]
            cos, sin, window = self.cos_cache, self.sin_cache, -1
            if self.is_sliding(layer_idx):   # Gemma 3: keys k > q - sliding_window, local RoPE base
                window = sp.sliding_window
                if hasattr(self, "cos_cache_local"):
                    cos, sin = self.cos_cache_local, self.sin_cache_local
            out, nk, nv = self.op(q, k, v, pk, pv, ctx.extra["seqlens_k"], ctx.extra["total_len"], cos, sin,
                                  sp.num_heads, sp.num_kv_heads, float(self.scale), int(self.applies_rope),
                                  int(self.share_buffer), *([window] if window >= 0 else []))
            ctx.present.append((nk, nv))
            return out

        def example_inputs(self, dec, seq_len: int, past_len: int = 0) -> tuple:
            ex = super().example_inputs(dec, seq_len, past_len)
            if not self.share_buffer:
                return ex
            sp = self.spec
            buf = [torch.zeros(1, sp.num_kv_heads, sp.max_seq_len, sp.head_dim) for _ in range(2 * sp.num_layers)]
            return (*ex[:3], *buf)

        def io_description(self) -> dict:
            d = super().io_description()
            d["kv_cache"]["attention_op"] = "com.microsoft.GroupQueryAttention"
            if self.share_buffer:
                buf = [1, self.spec.num_kv_heads, "max_seq_len", self.spec.head_dim]
                for k in list(d["inputs"]):
                    if k.startswith("past_key_values"):
                        d["inputs"][k]["shape"] = buf
                for k in list(d["outputs"]):
                    if k.startswith("present"):
                        d["outputs"][k]["shape"] = buf
                d["kv_cache"]["present"] = ("past_present_share_buffer: present is the past buffer, updated in "
                                            "place when both are bound to the same memory (IOBinding)")
                d["share_buffer"] = True
            return d

    return OrtGQACache


def cache_strategy(name: str, share_buffer: bool = True):
    """``"io"`` (portable ONNX ops) or ``"ort-gqa"`` (fused contrib op, ONNX Runtime only)."""
    if name == "ort-gqa":
        return _make_gqa_strategy()(share_buffer=share_buffer)
    return name


def _dynamic_shapes(n_layers: int, n_lora: int = 0):
    from torch.export import Dim

    seq = Dim("seq", min=1, max=32768)
    past = Dim("past_seq", min=0, max=32768)
    shapes = [{1: seq}, {1: Dim.AUTO}, {1: seq}]
    shapes += [{2: past}] * (2 * n_layers)
    rank = Dim("lora_rank", min=2, max=1024)
    shapes += [{1: rank}, {0: rank}] * (n_lora // 2)    # A [in, r], B [r, out]: any rank fits the graph
    return tuple(shapes)


def lora_defaults(proto, names: list[str]) -> None:
    """Give every LoRA graph input an empty default initializer (A [in, 0], B [0, out]), in place.

    ONNX Runtime's adapters (``onnxruntime.LoraAdapter`` / ORT GenAI ``og.Adapters``) override inputs that
    have a same-named initializer; with no adapter active the defaults apply, and a rank-0 product adds
    zeros, so the base package runs as the plain base. Empty defaults cost no bytes, and the rank stays a
    free dimension: one base package takes adapters of any rank."""
    import numpy as np
    from onnx import TensorProto, numpy_helper

    g = proto.graph
    have = {i.name for i in g.initializer}
    for inp in g.input:
        if inp.name not in names or inp.name in have:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else 0 for d in inp.type.tensor_type.shape.dim]
        dtype = {TensorProto.FLOAT16: np.float16, TensorProto.FLOAT: np.float32}[inp.type.tensor_type.elem_type]
        g.initializer.append(numpy_helper.from_array(np.zeros(dims, dtype=dtype), inp.name))


def _load_external(proto, names, base_dir: Path) -> int:
    """Read the external data of the initializers ``names`` (None: every one still outside) of a graph loaded
    with ``load_external_data=False`` into the graph, in place; returns how many were read. The quantizer loads
    each group's float weights just before it rounds them (ORT's quantizer drops them after each group), so the
    float graph is never in memory whole: a Gemma 3 270M onnx/int4 export peaked at 6.7 GB RSS with the whole
    float graph (1.7 GB with its untied head copy) loaded up front."""
    from onnx import TensorProto
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    n = 0
    for t in proto.graph.initializer:
        if (names is None or t.name in names) and uses_external_data(t):
            load_external_data_for_tensor(t, str(base_dir))
            t.data_location = TensorProto.DEFAULT
            del t.external_data[:]
            n += 1
    return n


def _save(model_proto, path: Path) -> None:
    import onnx

    for p in (path, path.with_name(path.name + ".data")):
        if p.exists():
            p.unlink()
    onnx.save_model(model_proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=1024)


def ort_fusions(model) -> dict[str, int]:
    """Fuse RMSNorm -> ``SimplifiedLayerNormalization`` and residual Add + RMSNorm ->
    ``com.microsoft.SkipSimplifiedLayerNormalization`` (its 4th output carries the residual sum), in place
    on the exported ``onnx_ir`` model, with onnxscript's ORT fusion rules. ORT's own online optimizer
    fuses the RMSNorm but not the Add: its SkipLayerNormFusion wants an Add with one consumer, and a
    residual Add feeds both the norm and the next residual. ORT GenAI's builder writes the skip form
    directly; this gives our graph the same nodes (one per norm instead of Add + norm). Returns counts."""
    from onnx_ir.passes.common import RemoveUnusedNodesPass
    from onnxscript.rewriter.ort_fusions.rms_normalization import fuse_rms_normalization
    from onnxscript.rewriter.ort_fusions.skip_normalization import fuse_skip_rms_normalization

    counts = {"rms_normalization": fuse_rms_normalization(model),
              "skip_rms_normalization": fuse_skip_rms_normalization(model)}
    RemoveUnusedNodesPass()(model)   # the replaced norms' constants (eps, exponent) are left unused
    return counts


def export_decoder_onnx(dec, path: Path, opset: int, fuse: bool = False) -> dict[str, int]:
    """torch.onnx.export (dynamo) of an ``io``-strategy decoder to ``path`` (+ ``.data``); ``fuse``
    applies :func:`ort_fusions` (ONNX Runtime contrib ops). Returns the fusion counts."""
    import torch

    example = dec.cache.example_inputs(dec, seq_len=3, past_len=5)
    if dec.lora_names:   # base package: the LoRA A/B tensors are graph inputs (export/lora.py)
        from .lora import example_tensors

        example = (*example, *example_tensors(dec.lora_layout, dec.spec))
    table = {_gqa_op(): _gqa_onnx} if dec.cache.name == "ort-gqa" else None
    prog = torch.onnx.export(
        dec, example, dynamo=True, opset_version=opset, optimize=True, external_data=True,
        input_names=dec.cache.input_names() + dec.lora_names, output_names=dec.cache.output_names(),
        dynamic_shapes=(_dynamic_shapes(dec.spec.num_layers, len(dec.lora_names)),), verbose=False, report=False,
        custom_translation_table=table)
    fused = ort_fusions(prog.model) if fuse else {}
    if "com.microsoft" in prog.model.opset_imports:
        prog.model.opset_imports["com.microsoft"] = 1   # contrib ops are opset 1; the exporter stamps the default
    # onnx_ir writes the initializers straight from the exported program's tensors into the data file. Going
    # through ``prog.model_proto`` + ``onnx.save_model`` first copied every weight into an in-memory proto
    # (and again while externalizing it): the peak RSS of the export phase.
    import onnx_ir as ir

    for p in (path, path.with_name(path.name + ".data")):
        if p.exists():
            p.unlink()
    ir.save(prog.model, path, external_data=path.name + ".data", size_threshold_bytes=1024)
    return fused


def count_ops(path: Path) -> dict[str, int]:
    """Nodes per op type; the low-rank error correction's MatMuls (``quantization.error_rank``) are counted
    apart, as ``MatMul (error correction)``, so ``MatMul`` stays the float linears left unquantized."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    out: dict[str, int] = {}
    for n in m.graph.node:
        op = "MatMul (error correction)" if n.op_type == "MatMul" and "_lorc_" in n.name else n.op_type
        out[op] = out.get(op, 0) + 1
    return out


def _tie_embedding_to_head(proto, bits: int, block: int) -> bool:
    """Tied embeddings: replace the float embedding ``Gather`` by a ``GatherBlockQuantized`` that reads the
    quantized lm_head's own weights and scales (as ORT GenAI's builder does), so the table is stored once,
    at the head's precision. For a symmetric head (default zero point) or an asymmetric one with integer
    zero points (uint8, packed like MatMulNBits'; GatherBlockQuantized takes no float zero points, so not a
    min-scale head). Returns whether it was done."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    g = proto.graph
    inits = {i.name: i for i in g.initializer}
    lm = _head_node(proto)
    if lm is None or len(lm.input) not in (3, 4):
        return False
    if len(lm.input) == 4 and (lm.input[3] not in inits or inits[lm.input[3]].data_type != TensorProto.UINT8):
        return False
    attrs = {a.name: helper.get_attribute_value(a) for a in lm.attribute}
    n_rows, k = int(attrs["N"]), int(attrs["K"])
    if int(attrs.get("bits", 4)) != bits or int(attrs.get("block_size", 0)) != block or k % block:
        return False
    emb = [n for n in g.node if n.op_type in ("Gather", "GatherBlockQuantized") and n.input[0] in inits
           and inits[n.input[0]].dims[0] == n_rows]
    if len(emb) != 1:
        return False
    emb = emb[0]
    old = [x for x in emb.input if x in inits]
    shape_name, flat = f"{lm.name}_tied_shape", f"{lm.name}_tied_weight"
    g.initializer.append(numpy_helper.from_array(np.array([n_rows, k * bits // 8], dtype=np.int64), shape_name))
    idx = list(g.node).index(emb)
    # the head's scales are [N, K / block] already: what GatherBlockQuantized reads for data [N, K]
    gbq = helper.make_node("GatherBlockQuantized", [flat, emb.input[1], *lm.input[2:4]], list(emb.output),
                           name=f"{emb.name}_tied", domain="com.microsoft", bits=bits, block_size=block,
                           gather_axis=0, quantize_axis=1)
    g.node.remove(emb)
    for node in reversed([helper.make_node("Reshape", [lm.input[1], shape_name], [flat], name=f"{flat}_reshape"),
                          gbq]):
        g.node.insert(idx, node)
    for name in old:
        if not any(name in n.input for n in g.node):
            g.initializer.remove(inits[name])
    return True


def pack_int4(q, block: int):
    """MatMulNBits' 4-bit layout of q [N, K] (values 0..15): data [N, K / block, block / 2] uint8, element
    2i in the low nibble and 2i + 1 in the high one (checked against ONNX Runtime's own quantizer in
    tests/test_calibrate.py)."""
    import numpy as np

    q = np.asarray(q, dtype=np.uint8)
    n, k = q.shape
    return (q[:, 0::2] | (q[:, 1::2] << 4)).astype(np.uint8).reshape(n, k // block, block // 2)


def pack_int4_zero_points(zp):
    """Integer zero points [N, K / block] (0..15) as MatMulNBits / GatherBlockQuantized store them at 4 bit:
    [N, ceil(blocks / 2)] uint8, two per byte, low nibble first, an odd row padded with 8 (the default zero
    point, as ONNX Runtime's quantizer pads)."""
    import numpy as np

    zp = np.asarray(zp, dtype=np.uint8)
    if zp.shape[1] % 2:
        zp = np.concatenate([zp, np.full((zp.shape[0], 1), 8, np.uint8)], 1)
    return (zp[:, 0::2] | (zp[:, 1::2] << 4)).astype(np.uint8)


def nbits_dequant(node, inits: dict, scale_dtype: str = "float32"):
    """The float weight [K, N] that a MatMulNBits node computes with (4 or 8 bit; integer zero points packed as
    ONNX Runtime stores them, float ones, or none = 2^(bits-1)): (q - zero point) * scale per block. Scales (and
    float zero points) rounded to ``scale_dtype`` first, as :func:`_fp16_scales` stores them later."""
    import numpy as np
    from onnx import TensorProto, numpy_helper

    att = {a.name: a.i for a in node.attribute}
    k, n, bits, block = att["K"], att["N"], att["bits"], att["block_size"]
    blocks = -(-k // block)
    data = numpy_helper.to_array(inits[node.input[1]]).reshape(n, blocks, block * bits // 8)
    if bits == 4:
        q = np.empty((n, blocks, block), np.uint8)
        q[..., 0::2], q[..., 1::2] = data & 0x0F, data >> 4
    elif bits == 8:
        q = data
    else:
        raise ValueError(f"MatMulNBits {node.name}: {bits}-bit weights are not read here (4 or 8)")
    cast = np.float16 if scale_dtype == "float16" else np.float32
    scale = numpy_helper.to_array(inits[node.input[2]]).astype(cast).astype(np.float32).reshape(n, blocks)
    z_name = node.input[3] if len(node.input) > 3 else ""
    if not z_name:
        zp = np.full((n, blocks), 2.0 ** (bits - 1), np.float32)
    elif inits[z_name].data_type == TensorProto.UINT8:
        packed = numpy_helper.to_array(inits[z_name]).reshape(n, -1)
        if bits == 4:
            zp = np.empty((n, packed.shape[1] * 2), np.uint8)
            zp[:, 0::2], zp[:, 1::2] = packed & 0x0F, packed >> 4
        else:
            zp = packed
        zp = zp[:, :blocks].astype(np.float32)
    else:
        zp = numpy_helper.to_array(inits[z_name]).astype(cast).astype(np.float32).reshape(n, blocks)
    w = (q.astype(np.float32) - zp[..., None]) * scale[..., None]
    return np.ascontiguousarray(w.reshape(n, blocks * block)[:, :k].T)


def _error_correction(proto, floats: dict, rank: int, scale_dtype: str) -> dict:
    """Low-rank error compensation (LoRC, ZeroQuant-V2; LQER; EoRA) of the quantized layer matmuls: for each
    MatMulNBits quantized from a MatMul named in ``floats`` (-> its float weight [K, N]), E = W - Q(W) is
    approximated by its best rank-``rank`` factorization (truncated SVD, torch.linalg.svd), E ~ A B with
    A = U sqrt(S) [K, r], B = sqrt(S) V^T [r, N] stored in fp16 (a Cast each, constant-folded by ONNX Runtime
    when the session loads), and the node's output y becomes y + (x A) B. Matrices on their grid
    (``calibrate.ON_GRID_REL_ERR``) are skipped."""
    import re

    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from .calibrate import error_correction_facts, error_factors

    g = proto.graph
    inits = {i.name: i for i in g.initializer}
    done, skipped, extra, rel_before, rel_after = 0, 0, 0, [], []
    for node in [nd for nd in g.node if nd.op_type == "MatMulNBits"]:
        name = re.sub(r"_Q\d+$", "", node.name)   # MatMulNBitsQuantizer names it <MatMul>_Q<bits>
        if name not in floats:
            continue
        w = floats[name]
        wq = nbits_dequant(node, inits, scale_dtype)
        got = error_factors(np.asarray(w, np.float32), wq, rank)
        if got is None:
            skipped += 1
            continue
        a, b = got[0].numpy().astype(np.float16), got[1].numpy().astype(np.float16)   # [K, r], [r, N]
        rel_before.append(got[2])
        e = np.asarray(w, np.float64) - wq   # what the stored (fp16) factors leave
        rel_after.append(float(np.linalg.norm(e - a.astype(np.float64) @ b.astype(np.float64)))
                         / float(np.linalg.norm(w)))
        base = f"{name}_lorc"
        g.initializer.extend([numpy_helper.from_array(a, f"{base}.A"), numpy_helper.from_array(b, f"{base}.B")])
        x, y = node.input[0], node.output[0]
        node.output[0] = f"{y}__q"
        idx = list(g.node).index(node)
        for j, nd in enumerate([
            helper.make_node("Cast", [f"{base}.A"], [f"{base}.A32"], name=f"{base}_castA", to=TensorProto.FLOAT),
            helper.make_node("Cast", [f"{base}.B"], [f"{base}.B32"], name=f"{base}_castB", to=TensorProto.FLOAT),
            helper.make_node("MatMul", [x, f"{base}.A32"], [f"{base}.xa"], name=f"{base}_xa"),
            helper.make_node("MatMul", [f"{base}.xa", f"{base}.B32"], [f"{base}.xab"], name=f"{base}_xab"),
            helper.make_node("Add", [node.output[0], f"{base}.xab"], [y], name=f"{base}_add"),
        ]):
            g.node.insert(idx + 1 + j, nd)
        done += 1
        extra += a.nbytes + b.nbytes
    if not done + skipped:
        raise RuntimeError("quantization.error_rank: no MatMulNBits matched a layer MatMul (quantizer naming "
                           f"changed?); float weights for {sorted(floats)[:3]}...")
    return error_correction_facts("low-rank error compensation (truncated SVD of W - Q(W), fp16 factors)", rank,
                                  done, skipped, extra, rel_before, rel_after)


def _head_node(proto):
    """The lm_head MatMulNBits (the one writing ``logits``), or None."""
    lm = [n for n in proto.graph.node if n.op_type == "MatMulNBits" and "logits" in n.output]
    return lm[0] if len(lm) == 1 else None


def _write_int4(inits: dict, node, q, scale, zp, block: int) -> None:
    """Overwrite a 4-bit MatMulNBits' data, scales and zero points in place, keeping their shapes and the
    scales' dtype; float zero points (min-scale grid) are stored as they are, integer ones packed."""
    from onnx import TensorProto, numpy_helper

    data, sc, z = (inits[node.input[i]] for i in (1, 2, 3))
    old_sc = numpy_helper.to_array(sc)
    data.CopyFrom(numpy_helper.from_array(pack_int4(q.numpy(), block).reshape(tuple(data.dims)), data.name))
    sc.CopyFrom(numpy_helper.from_array(scale.numpy().astype(old_sc.dtype).reshape(old_sc.shape), sc.name))
    zp_arr = (pack_int4_zero_points(zp.numpy()) if z.data_type == TensorProto.UINT8
              else zp.numpy().astype(numpy_helper.to_array(z).dtype))
    z.CopyFrom(numpy_helper.from_array(zp_arr.reshape(tuple(z.dims)), z.name))


def _gptq_head(proto, w_kn, calib, bits: int, block: int, scale_dtype: str) -> dict:
    """Re-round the (asymmetric, integer zero point) 4-bit lm_head MatMulNBits in place with GPTQ on the
    calibration inputs (export/calibrate.py). ``w_kn``: the head's float weight [K, N] as exported."""
    import numpy as np
    import torch

    from .calibrate import dequant, gptq, rtn

    lm = _head_node(proto)
    if lm is None or len(lm.input) != 4:
        raise RuntimeError("quantization.head_calibration: no asymmetric 4-bit lm_head MatMulNBits to calibrate")
    inits = {i.name: i for i in proto.graph.initializer}
    w = torch.from_numpy(np.ascontiguousarray(w_kn.T)).float()
    x = calib.hidden.float()
    q, scale, zp = gptq(w, x, block, bits, scale_dtype=scale_dtype)
    # what the rounding bought, on the calibration inputs: relative output error, GPTQ vs round-to-nearest
    xs = x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))[:1024]]   # [<=1024, K]: the
    with torch.no_grad():                                                                  # logits stay small
        ref = xs @ w.T
        err = lambda deq: float(((xs @ deq.T - ref).norm() / ref.norm()).item())   # noqa: E731
        facts = {"method": "gptq", "damp": 0.01, "calibration_output_rel_err": round(err(dequant(q, scale, zp, block)), 5),
                 "rtn_output_rel_err": round(err(dequant(rtn(w, scale, zp, block, bits), scale, zp, block)), 5)}
    _write_int4(inits, lm, q, scale, zp, block)
    return facts


def _gptq_layers(proto, floats: dict, calib, grid: str, bits: int, block: int, scale_dtype: str) -> dict:
    """Re-round the 4-bit layer MatMulNBits (``grid`` min-scale: float zero points; asymmetric: packed uint8)
    in place with GPTQ, each on its input Hessian from the float model (export/calibrate.py). ``floats``: the
    float weights [K, N] by original MatMul name. A weight whose linear the calibration did not see keeps
    round-to-nearest (counted)."""
    import numpy as np
    import torch

    from .calibrate import gptq

    inits = {i.name: i for i in proto.graph.initializer}
    done, missed = 0, []
    for node in proto.graph.node:
        orig = node.name.rsplit(f"_Q{bits}", 1)[0]
        if node.op_type != "MatMulNBits" or orig not in floats or len(node.input) != 4:
            continue
        w_kn = floats[orig]
        h = calib.hessian_for(w_kn)
        if h is None:
            missed.append(orig)
            continue
        q, scale, zp = gptq(torch.from_numpy(np.ascontiguousarray(w_kn.T)), None, block, bits, hessian=h,
                            scale_dtype=scale_dtype, grid=grid)
        _write_int4(inits, node, q, scale, zp, block)
        done += 1
    if not done:
        raise RuntimeError("quantization.layers_calibration: no 4-bit layer matched a calibrated linear "
                           f"(missed: {missed[:3]}...)")
    return {"method": "gptq", "damp": 0.01, "matmuls": done, "round_to_nearest": len(missed)}


def _hot_rows(proto, w_kn, calib, n_rows: int, block: int, accuracy_level: int, bits: int = 8) -> dict:
    """Keep the ``n_rows`` vocabulary rows with the most calibration probability mass at 8 bit (Q8_0 blocks,
    scale searched): a second, small MatMulNBits computes their logits, which ScatterElements writes over
    the 4-bit head's; a tied embedding lookup reads those rows from the same 8-bit table (Where on a row
    map). In place; returns the facts for the manifest.

    ``bits`` 32: the rows' float weights in a plain MatMul on the head's unrounded input instead. That is for an
    int8 head at ``accuracy_level`` 4, whose error is not its weights but the int8 rounding of its input (per
    block of ``block_size``, where the residual stream's outlier channels set the scale). Real SmolLM2-135M, ``onnx/int8-fast``
    emulated (benchmarks/int8_fast_error_budget.py), the head's rounding alone: top-1 0.975 -> 0.999 with 1024
    float rows, KL 0.00095 -> 0.00027. The tied embedding keeps reading the int8 table (a lookup has no input
    to round, and Q8_0 blocks are SmolLM2's own embedding grid)."""
    import hashlib

    import numpy as np
    import torch
    from onnx import helper, numpy_helper

    from .calibrate import hot_rows

    g = proto.graph
    lm = _head_node(proto)
    k, v = w_kn.shape
    rows = hot_rows(torch.from_numpy(np.ascontiguousarray(w_kn.T)), calib.hidden, n_rows).numpy().astype(np.int64)
    rows.sort()
    n = len(rows)
    pre = "lm_head_hot"
    g.initializer.append(numpy_helper.from_array(rows, f"{pre}_rows"))
    cold = "logits_cold"
    idx = list(g.node).index(lm)
    lm.output[0] = cold
    if bits == 32:
        g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w_kn[:, rows]).astype(np.float32),
                                                     f"{pre}_W"))
        g.node.insert(idx + 1, helper.make_node("MatMul", [lm.input[0], f"{pre}_W"], [f"{pre}_logits"],
                                                name=f"{pre}_MatMul"))
    else:
        q8, scale = _q8_blocks_searched(np.ascontiguousarray(w_kn.T[rows]), block)
        g.initializer.extend([numpy_helper.from_array(q8.reshape(n, k // block, block), f"{pre}_Q8"),
                              numpy_helper.from_array(scale, f"{pre}_scales")])
        g.node.insert(idx + 1, helper.make_node(
            "MatMulNBits", [lm.input[0], f"{pre}_Q8", f"{pre}_scales"], [f"{pre}_logits"],
            name=f"{pre}_MatMulNBits", domain="com.microsoft", K=k, N=n, bits=8, block_size=block,
            accuracy_level=accuracy_level))
    g.node.insert(idx + 2, helper.make_node("Shape", [f"{pre}_logits"], [f"{pre}_shape"], name=f"{pre}_shape"))
    g.node.insert(idx + 3, helper.make_node("Expand", [f"{pre}_rows", f"{pre}_shape"], [f"{pre}_idx"],
                                            name=f"{pre}_expand"))
    g.node.insert(idx + 4, helper.make_node("ScatterElements", [cold, f"{pre}_idx", f"{pre}_logits"], ["logits"],
                                            name=f"{pre}_scatter", axis=-1))
    facts = {"hot_rows": n, "hot_rows_bits": bits, "hot_rows_sha256": hashlib.sha256(rows.tobytes()).hexdigest()[:16]}
    tied = ([nd for nd in g.node if nd.op_type == "GatherBlockQuantized" and nd.name.endswith("_tied")]
            if bits == 8 else [])
    if tied:   # the embedding reads hot rows from the 8-bit table: pos = map[id] (-1: cold), Where(pos >= 0, hot, cold)
        gbq = tied[0]
        ids, out = gbq.input[1], gbq.output[0]
        row_map = np.full(v, -1, np.int32)
        row_map[rows] = np.arange(n, dtype=np.int32)
        g.initializer.extend([numpy_helper.from_array(row_map, f"{pre}_map"),
                              numpy_helper.from_array(np.array([n, k], np.int64), f"{pre}_table_shape"),
                              numpy_helper.from_array(np.array(0, np.int32), f"{pre}_zero"),
                              numpy_helper.from_array(np.array([-1], np.int64), f"{pre}_last_axis")])
        gbq.output[0] = f"{out}__cold"
        at = list(g.node).index(gbq) + 1
        new = [
            helper.make_node("Gather", [f"{pre}_map", ids], [f"{pre}_pos"], name=f"{pre}_map_gather", axis=0),
            helper.make_node("GreaterOrEqual", [f"{pre}_pos", f"{pre}_zero"], [f"{pre}_is_hot"], name=f"{pre}_is_hot"),
            helper.make_node("Max", [f"{pre}_pos", f"{pre}_zero"], [f"{pre}_pos0"], name=f"{pre}_pos0"),
            helper.make_node("Reshape", [f"{pre}_Q8", f"{pre}_table_shape"], [f"{pre}_table"], name=f"{pre}_table"),
            helper.make_node("GatherBlockQuantized", [f"{pre}_table", f"{pre}_pos0", f"{pre}_scales"], [f"{out}__hot"],
                             name=f"{pre}_embedding", domain="com.microsoft", bits=8, block_size=block,
                             gather_axis=0, quantize_axis=1),
            helper.make_node("Unsqueeze", [f"{pre}_is_hot", f"{pre}_last_axis"], [f"{pre}_is_hot3"], name=f"{pre}_unsq"),
            helper.make_node("Where", [f"{pre}_is_hot3", f"{out}__hot", f"{out}__cold"], [out], name=f"{pre}_where"),
        ]
        for j, nd in enumerate(new):
            g.node.insert(at + j, nd)
        facts["hot_rows_embedding"] = True
    return facts


def _linear_kind(node, inits, spec) -> str:
    """Which linear a weight MatMul is, from its weight shape [K, N] (names are lost in the dynamo export)."""
    k, n = (list(inits[node.input[1]].dims) + [0, 0])[:2]
    if "logits" in node.output:
        return "lm_head"
    if spec is not None and k == spec.intermediate_size and n == spec.hidden_size and k != n:
        return "down_proj"
    return "linear"


def _min_scale_quantizer(cfg):
    """ONNX Runtime's HQQ node quantizer with the optimisation and the zero-point rounding turned off: per
    block, scale = (max - min) / (2^bits - 1) and zero point = -min / scale kept in float (MatMulNBits takes
    float zero points). That is llama.cpp Q4_1's grid (w = d*q + m), so a base dequantized from Q4_1 with the
    same block size is reproduced exactly, and an off-grid (LoRA-merged) weight keeps a min-max grid."""
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    class MinScaleQuantizer(mnq.HQQWeightOnlyQuantizer):
        def quantize_internal(self, tensor, bits=4, channel_wise=True, group_size=64, optimize=True,
                              round_zero=True, axis=1):
            if axis != 1 or tensor.shape[1] % group_size:
                return super().quantize_internal(tensor, bits, channel_wise, group_size, optimize=False,
                                                 round_zero=False, axis=axis)
            return min_scale_blocks(tensor, bits, group_size)

    return MinScaleQuantizer(cfg)


SNAP_TOL = 2e-3   # |code - round(code)| allowed when a block is matched to a coarser step (float32 dequantization ~1e-5)


def min_scale_blocks(w, bits: int, block: int):
    """Min-scale rounding of ``w`` [N, K] (torch) in blocks of ``block`` along K, as ORT's HQQ quantizer returns it
    (codes [N, K] int, step [N, K/block], float zero point -min/step [N, K/block]): dequantized (q - zp) * step.

    The step is (max - min) / j with the smallest j in 1 .. 2^bits - 1 that puts every weight of the block on a
    grid point (within ``SNAP_TOL`` of a step), else (max - min) / (2^bits - 1), the min-max grid of llama.cpp's
    Q4_1. A Q4_1 block uses both ends of its 16 levels, so min-max reproduces it; a K-quant block (Q4_K: a
    6-bit scale and minimum per 32, chosen by search) often uses fewer levels than 16 and sits on step
    (max - min) / j for its own j < 15: Gemma 3 270M's Q4_K tensors are reproduced exactly this way. An off-grid
    (LoRA-merged) block matches no j < 15 and keeps min-max."""
    import torch

    levels = 2 ** bits - 1
    x = w.float()
    n, k = x.shape
    blocks = x.reshape(n, k // block, block)
    lo, hi = blocks.min(-1, keepdim=True).values, blocks.max(-1, keepdim=True).values
    span = hi - lo
    j_best = torch.full_like(span, float(levels))
    found = span <= 0
    for j in range(1, levels):
        step = torch.where(span > 0, span / j, torch.ones_like(span))
        c = (blocks - lo) / step
        ok = ((c - c.round()).abs() <= SNAP_TOL).all(-1, keepdim=True) & ~found
        j_best = torch.where(ok, torch.full_like(span, float(j)), j_best)
        found = found | ok
    step = torch.where(span > 0, span / j_best, torch.ones_like(span))   # HQQ's convention for a constant block
    zero = -lo / step
    q = torch.round(blocks / step + zero).clamp(0, levels).reshape(n, k).int()
    return q, step.reshape(n, -1).to(w.dtype), zero.reshape(n, -1).to(w.dtype)


def _q8_0_blocks(w, block: int):
    """llama.cpp Q8_0's rounding of a float [rows, K] matrix in blocks of ``block`` along K: (data [rows, K]
    uint8 holding q + 128, the default zero point of MatMulNBits / GatherBlockQuantized at 8 bit; scales
    [rows, K / block] float32 = max|w| / 127)."""
    import numpy as np

    n, k = w.shape
    blocks = w.astype(np.float32).reshape(n, k // block, block)
    scale = np.abs(blocks).max(-1) / 127.0
    safe = np.where(scale == 0, 1.0, scale)[..., None]
    q = (np.clip(np.rint(blocks / safe), -127, 127) + 128).astype(np.uint8).reshape(n, k)
    return q, scale.astype(np.float32)


def _q8_blocks_searched(w, block: int, kmax: int = 8):
    """Symmetric 8-bit blocks like :func:`_q8_0_blocks`, with the scale of each block chosen by error: Q8_0's
    max|w| / 127, or (max - min) / j for j = 15 k (k = 1 .. ``kmax``) and j = 1 .. 31 (when it still fits 127
    levels), whichever rounds the block with the least squared error (a scale search, as llama.cpp's K-quants
    do). A block dequantized from Q4_1 (w = d * q + m, q in 0..15) sits on a grid of step d / k whenever m is
    close to a multiple of it, which 8-bit symmetric with scale max|w| / 127 misses by up to half a step; a
    Q5_0 block (d * (q - 16), q in 0..31) sits on (max - min) / j for its own j <= 31; a Q8_0 block keeps its
    own scale (error 0); any other block is rounded no worse than Q8_0's rule."""
    import numpy as np

    n, k = w.shape
    blocks = w.astype(np.float32).reshape(n, k // block, block)
    amax = np.abs(blocks).max(-1, keepdims=True)
    span = blocks.max(-1, keepdims=True) - blocks.min(-1, keepdims=True)
    best_s = amax / 127.0
    safe = np.where(best_s == 0, 1.0, best_s)
    best_err = ((np.clip(np.rint(blocks / safe), -127, 127) * safe - blocks) ** 2).sum(-1, keepdims=True)
    # The search runs only on the blocks Q8_0's rule does not already reproduce (relative error above 1e-6: a
    # Q8_0-derived block, e.g. Gemma 3's 262,144-row tied head, is left as it is, at no cost)
    todo = (best_err > 1e-12 * (blocks ** 2).sum(-1, keepdims=True))[..., 0]
    sub, sub_span, sub_amax = blocks[todo], span[todo], amax[todo]
    sub_s, sub_err = best_s[todo], best_err[todo]
    # steps of a 4-bit block's grid and its sub-steps (15 k), and every step that puts a block's extremes j <= 31
    # levels apart (a Q5_0 block, d * (q - 16) with q in 0..31, sits on span / j for its own j)
    for j in sorted({15 * kk for kk in range(1, kmax + 1)} | set(range(1, 32))) if sub.size else ():
        s = sub_span / float(j)
        ok = (s > 0) & (sub_amax / np.where(s > 0, s, 1.0) <= 127.0)
        s_safe = np.where(ok, s, 1.0)
        err = ((np.clip(np.rint(sub / s_safe), -127, 127) * s_safe - sub) ** 2).sum(-1, keepdims=True)
        better = ok & (err < sub_err)
        sub_s = np.where(better, s, sub_s)
        sub_err = np.where(better, err, sub_err)
    best_s[todo] = sub_s
    safe = np.where(best_s == 0, 1.0, best_s)
    q = (np.clip(np.rint(blocks / safe), -127, 127) + 128).astype(np.uint8).reshape(n, k)
    return q, best_s[..., 0].astype(np.float32)


def _q8_0_rule(proto, floats: dict, block: int, search: bool = False) -> None:
    """Re-round ONNX Runtime's symmetric 8-bit blocks, in place, with llama.cpp Q8_0's rule or (``search``,
    recipe ``quantization.scale_search``) a per-block scale search that includes it (:func:`_q8_blocks_searched`).
    On the real SmolLM2-135M (Q4_1 layers), `cdcda check`'s LaMP-3 chat prompts: onnx/int8 (float compute) top-1
    0.969 / KL 0.0016 with Q8_0's rule, 0.981 / 0.0009 searched; onnx/int8-fast (int8 compute) 0.9645 / 0.0055 /
    max 2.14 with Q8_0's rule, 0.956 / 0.0052 / max 3.02 searched.

    ORT's symmetric 8-bit quantizer maps the signed extreme of a block to -128 (scale = extreme / -128, the
    Q4_0 convention carried to 8 bit); Q8_0 uses scale = max|w| / 127 and q = round(w / scale). On a base
    dequantized from Q8_0 (SmolLM2's embedding, so its tied lm_head) only Q8_0's rule lands every weight on
    its own grid point, and off grid the two differ by < half a step. MatMulNBits' 8-bit layout is kept:
    data [N, K/block, block] uint8 holding q + 128 (its default zero point), scales [N, K/block]."""
    from onnx import TensorProto, helper, numpy_helper

    inits = {i.name: i for i in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type != "MatMulNBits" or node.name.rsplit("_Q8", 1)[0] not in floats or len(node.input) != 3:
            continue
        rounding = _q8_blocks_searched if search else _q8_0_blocks
        w = floats[node.name.rsplit("_Q8", 1)[0]].T       # weights [N, K]
        # rows are rounded independently: in chunks, so the float temporaries of the 49k-row lm_head stay small
        # (~550 MB of peak RSS at once on SmolLM2-135M otherwise)
        q = np.empty(w.shape, dtype=np.uint8)
        scale = np.empty((w.shape[0], w.shape[1] // block), dtype=np.float32)
        for i in range(0, w.shape[0], 4096):
            q[i:i + 4096], scale[i:i + 4096] = rounding(w[i:i + 4096], block)
        del w
        data, scales = inits[node.input[1]], inits[node.input[2]]
        # in place, same shapes and types (uint8 data, float scales): no second copy of a large head
        if data.data_type != TensorProto.UINT8 or int(np.prod(data.dims)) != q.size:
            raise RuntimeError(f"{node.name}: unexpected 8-bit MatMulNBits data {data.dims} (type {data.data_type})")
        data.raw_data = q.tobytes()
        del q
        scale_dtype = helper.tensor_dtype_to_np_dtype(scales.data_type)
        scales.CopyFrom(numpy_helper.from_array(scale.astype(scale_dtype).reshape(tuple(scales.dims)), scales.name))


def _gather_q8_0(proto, block: int) -> bool:
    """The embedding ``Gather`` of an untied model as an 8-bit ``GatherBlockQuantized`` (Q8_0 blocks: scale =
    max|w| / 127, data q + 128 = its default zero point), in place. Returns whether a table was quantized."""
    from onnx import helper, numpy_helper

    g = proto.graph
    inits = {i.name: i for i in g.initializer}
    for node in list(g.node):
        if node.op_type != "Gather" or node.input[0] not in inits or len(inits[node.input[0]].dims) != 2:
            continue
        w = numpy_helper.to_array(inits[node.input[0]])
        if w.shape[1] % block:
            continue
        q, scale = _q8_0_blocks(w, block)
        name = node.input[0]
        g.initializer.remove(inits[name])
        g.initializer.extend([numpy_helper.from_array(q, f"{name}_Q8"),
                              numpy_helper.from_array(scale, f"{name}_scales")])
        gbq = helper.make_node("GatherBlockQuantized", [f"{name}_Q8", node.input[1], f"{name}_scales"],
                               list(node.output), name=f"{node.name}_Q8", domain="com.microsoft", bits=8,
                               block_size=block, gather_axis=0, quantize_axis=1)
        idx = list(g.node).index(node)
        g.node.remove(node)
        g.node.insert(idx, gbq)
        return True
    return False


def check_block_size(dec, q) -> None:
    """Weight-only int8/int4 (MatMulNBits) blocks run along each weight's input width K, and along the hidden
    width of a quantized embedding table: ``quantization.block_size`` must divide every one. Checked on the
    torch decoder, before the ONNX export (the Q8_0 re-rounding would fail on a ragged block, and a tied or
    8-bit embedding table would silently stay float)."""
    import torch

    from .recipe import check_size_divides

    widths = {n: m.in_features for n, m in dec.named_modules() if isinstance(m, torch.nn.Linear)}
    if q.embeddings != "none":
        widths["embed_tokens"] = int(dec.embed_tokens.weight.shape[1])
    check_size_divides(widths, q.block_size or 32, field="quantization.block_size", axis="input width",
                       why="MatMulNBits would pad ragged blocks and the Q8_0 / embedding steps assume whole ones")


def _fp16_scales(proto) -> int:
    """Every MatMulNBits' scales (and float zero points) to float16, in place: the node then computes in fp16
    (its type T is the scales' type), so its input is cast to fp16 and its output back to float32. A
    GatherBlockQuantized reading fp16 scales (the tied embedding) gets a Cast after it. Returns the number of
    MatMulNBits converted. llama.cpp stores its block scales and minimums (Q4_1 d/m, Q8_0 d) in fp16, so a base
    dequantized from them loses nothing here."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    g = proto.graph
    inits = {i.name: i for i in g.initializer}
    done = set()

    def to_fp16(name: str) -> None:
        if name in inits and name not in done and inits[name].data_type == TensorProto.FLOAT:
            inits[name].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(inits[name]).astype(np.float16), name))
            done.add(name)

    n_mm = 0
    for node in list(g.node):
        if node.op_type == "MatMulNBits":
            for k in (2, 3):
                if len(node.input) > k and node.input[k]:
                    to_fp16(node.input[k])
            a, y = node.input[0], node.output[0]
            node.input[0], node.output[0] = f"{a}__fp16_{node.name}", f"{y}__fp16"
            idx = list(g.node).index(node)
            g.node.insert(idx, helper.make_node("Cast", [a], [node.input[0]], name=f"{node.name}_in_fp16",
                                                to=TensorProto.FLOAT16))
            g.node.insert(idx + 2, helper.make_node("Cast", [node.output[0]], [y], name=f"{node.name}_out_fp32",
                                                    to=TensorProto.FLOAT))
            n_mm += 1
    for node in list(g.node):
        if node.op_type != "GatherBlockQuantized":
            continue
        for k in (2, 3):   # its own table's scales (an untied Q8_0 gather); a tied one reads the head's, done above
            if len(node.input) > k:
                to_fp16(node.input[k])
        if node.input[2] in done:   # fp16 scales: fp16 rows, cast back for the float residual stream
            y = node.output[0]
            node.output[0] = f"{y}__fp16"
            idx = list(g.node).index(node)
            g.node.insert(idx + 1, helper.make_node("Cast", [node.output[0]], [y], name=f"{node.name}_out_fp32",
                                                    to=TensorProto.FLOAT))
    return n_mm


class _FloatWeights(Mapping):
    """MatMul name -> its float weight [K, N], read from the float ONNX file ``src`` when asked: one matrix in
    memory at a time. Copying every weight out of the loaded graph up front (``numpy_helper.to_array``) cost
    an onnx/int8 export of the real SmolLM2-135M ~600 MB of peak RSS (``export.timings.peak_rss_mb_after`` in
    the manifest). Offsets come from the graph loaded without its data; a tensor stored inline is read there."""

    def __init__(self, src: Path, names: dict[str, str], inits: dict | None = None):
        import onnx

        self._src, self._names = Path(src), names
        if inits is None:   # name -> TensorProto of the graph loaded without its data
            inits = {i.name: i for i in onnx.load(str(src), load_external_data=False).graph.initializer}
        self._inits = {n: inits[n] for n in set(names.values())}

    def __getitem__(self, mm: str):
        return self._read(mm)

    def first_row(self, mm: str):
        """The first row (N values) of MatMul ``mm``'s float weight [K, N], without reading the rest."""
        return self._read(mm, rows=1)[0]

    def _read(self, mm: str, rows: int | None = None):
        """MatMul ``mm``'s float weight, or its first ``rows`` rows."""
        from onnx import numpy_helper

        t = self._inits[self._names[mm]]
        ext = {e.key: e.value for e in t.external_data}
        if t.data_location != 1 or not ext:   # inline (onnx.TensorProto.EXTERNAL = 1)
            return numpy_helper.to_array(t)[:rows]
        if t.data_type != 1:   # FLOAT
            raise ValueError(f"{self._src}: initializer {t.name} is not float32 (data_type {t.data_type})")
        shape = tuple(t.dims) if rows is None else (rows, *t.dims[1:])
        return np.fromfile(self._src.parent / ext["location"], dtype=np.float32, count=int(np.prod(shape)),
                           offset=int(ext.get("offset", 0))).reshape(shape)

    def subset(self, keys) -> _FloatWeights:
        return _FloatWeights(self._src, {k: self._names[k] for k in keys if k in self._names}, inits=self._inits)

    def __iter__(self):
        return iter(self._names)

    def __len__(self):
        return len(self._names)


def _weight_only(proto, recipe, spec, calib=None, merged: bool = False, *, src: Path,
                 source_plan: dict | None = None) -> tuple[object, dict]:
    """Weight-only MatMulNBits quantization (ONNX Runtime's ``MatMulNBitsQuantizer``), per linear kind:
    ``quantization.bits`` / ``grid`` for the layers, ``head_bits`` for the lm_head, ``eight_bit`` kinds at
    8 bit (symmetric); then the tied embedding reads the head (``embeddings: same``). ``source_plan``
    (``source_grid.plan``, recipe ``follow_source``): the layer matrices stored above ``bits`` in the base's
    GGUF go to 8 bit, symmetric, float compute, each block's scale searched (exact on Q5_0 / Q8_0 blocks)."""
    import logging

    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    logging.getLogger(mnq.__name__).setLevel(logging.WARNING)   # one INFO line per node otherwise
    q, acc = recipe.quantization, recipe.onnx.accuracy_level
    bits = q.bits or (8 if q.scheme == "int8" else 4)
    block = q.block_size or 32
    grid = q.grid or "symmetric"
    head_bits = q.head_bits or bits
    inits = {i.name: i for i in proto.graph.initializer}
    weight_mm = [n for n in proto.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    kinds = {n.name: _linear_kind(n, inits, spec) for n in weight_mm}
    plan: dict[tuple[int, str], list[str]] = {}
    by_fp = (source_plan or {}).get("by_fingerprint") or {}
    matched: dict[str, str] = {}   # MatMul name -> planned decoder linear
    if by_fp:
        from .source_grid import fingerprint

        rows = _FloatWeights(src, {n.name: n.input[1] for n in weight_mm if kinds[n.name] != "lm_head"})
        for mm in rows:
            hit = by_fp.get(fingerprint(rows.first_row(mm)))
            if hit is not None:
                matched[mm] = hit
        if sorted(matched.values()) != sorted(by_fp.values()):
            missing = sorted(set(by_fp.values()) - set(matched.values()))
            raise RuntimeError(f"quantization.follow_source: {len(matched)} ONNX MatMuls matched {len(by_fp)} planned "
                               f"linears (unmatched: {missing[:4]}); the float graph's weights differ from the decoder's")
    for name, kind in kinds.items():
        if name in matched:
            key = (8, "source")
        elif kind == "lm_head":
            key = (head_bits, q.head_grid or ("symmetric" if head_bits == 8 else grid))
        elif kind in (q.eight_bit or []):
            key = (8, "symmetric")
        else:
            key = (bits, grid)
        plan.setdefault(key, []).append(name)
    all_nodes = {n.name for n in proto.graph.node}

    # the MatMuls' float weights, read from ``src`` (the float graph's file) when asked: ORT's quantizer replaces
    # the loaded graph's copies
    eight = set(plan.get((8, "symmetric"), [])) | set(plan.get((8, "source"), []))
    wanted = {n.name: n.input[1] for n in weight_mm if n.name in eight or q.layers_calibration or q.error_rank}
    floats = _FloatWeights(src, wanted)
    q8_floats = floats.subset(n.name for n in weight_mm if n.name in eight)
    # float layer weights [K, N] by MatMul name, for GPTQ (the (bits, grid) layers) and the error correction
    # (every layer matmul); one array each, shared
    all_floats = floats.subset(n.name for n in weight_mm
                               if (q.layers_calibration or q.error_rank) and kinds[n.name] != "lm_head")
    layer_floats = all_floats.subset(n.name for n in weight_mm
                                     if q.layers_calibration and n.name in plan.get((bits, grid), []))
    head_float = None
    if q.head_calibration or q.hot_rows or q.layers_calibration:   # read from the float file: a copy only when used
        head = next((n for n in weight_mm if kinds[n.name] == "lm_head"), None)
        head_float = None if head is None else _FloatWeights(src, {head.name: head.input[1]})[head.name]
    if (q.head_calibration or q.hot_rows or q.layers_calibration) and (calib is None or head_float is None):
        raise RuntimeError("quantization.head_calibration / hot_rows need calibration inputs and an lm_head MatMul")
    for (nbits, g), names in sorted(plan.items(), reverse=True):
        if g == "min-scale":
            cfg = mnq.HQQWeightOnlyQuantConfig(block_size=block, bits=nbits, op_types_to_quantize=("MatMul",))
        elif g == "source":   # float compute: these layers are kept for their source precision
            cfg = mnq.DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=True, bits=nbits,
                                                   accuracy_level=0, op_types_to_quantize=("MatMul",))
        else:
            cfg = mnq.DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=g == "symmetric", bits=nbits,
                                                   accuracy_level=acc, op_types_to_quantize=("MatMul",))
        _load_external(proto, {n.input[1] for n in weight_mm if n.name in names}, src.parent)
        quant = mnq.MatMulNBitsQuantizer(proto, nodes_to_exclude=sorted(all_nodes - set(names)), algo_config=cfg)
        if g == "min-scale":
            quant.node_quantizer = _min_scale_quantizer(cfg)
        quant.process()
        proto = quant.model.model
    # The scale search snaps a block onto the base's own (Q4_1) grid when most of its weights sit there. On a
    # LoRA-merged model the personal delta is smaller than that step and coherent (low rank), so it is rounded
    # away: user 3000's merged model, onnx/int8 with the search, KL 0.148 on the user's own text vs 0.0049 for
    # llama.cpp Q8_0. A merged export keeps Q8_0's rule (unbiased rounding of the delta).
    search = bool(q.scale_search or matched) and not merged
    _q8_0_rule(proto, q8_floats, block, search=search)
    calib_facts: dict = {}
    if q.layers_calibration == "gptq":
        if bits != 4 or grid not in ("min-scale", "asymmetric"):
            raise UserError("quantization.layers_calibration: gptq needs 4-bit layers on a min-scale or asymmetric grid",
                            field="quantization.layers_calibration", expected="bits: 4 and grid: min-scale or asymmetric")
        calib_facts["layers_rounding"] = _gptq_layers(proto, layer_floats, calib, grid, bits, block, q.scale_dtype)
    if q.error_rank:   # after every rounding step of the layers, before the scales become fp16 (read as such)
        calib_facts["error_correction"] = _error_correction(proto, all_floats, q.error_rank, q.scale_dtype)
    if q.head_calibration == "gptq":
        calib_facts["head_rounding"] = _gptq_head(proto, head_float, calib, head_bits, block, q.scale_dtype)
    tied = False
    if q.embeddings in ("same", "int8", "int4"):
        emb_bits = head_bits if q.embeddings == "same" else int(q.embeddings[3:])
        # only a tied model's table IS the head's matrix (an untied Phi-3 has its own embedding table)
        tied = (spec is not None and spec.tie_word_embeddings and emb_bits == head_bits
                and _tie_embedding_to_head(proto, head_bits, block))
        if not tied:   # the table itself is read: an untied model's own, or a head the Gather cannot read
            _load_external(proto, None, src.parent)
        if not tied and emb_bits == 8:   # ORT's quantizer takes 4-bit Gathers only: Q8_0 blocks, written here
            _gather_q8_0(proto, block)
        elif not tied:   # an untied model, or a head the Gather cannot read: its own blockwise table
            cfg = mnq.DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=True, bits=emb_bits,
                                                   op_types_to_quantize=("Gather",))
            quant = mnq.MatMulNBitsQuantizer(proto, algo_config=cfg)
            quant.process()
            proto = quant.model.model
    if q.hot_rows:
        calib_facts.update(_hot_rows(proto, head_float, calib, q.hot_rows, block, acc, q.hot_rows_bits))
    if calib is not None and calib_facts:
        calib_facts["calibration"] = calib.facts
    _load_external(proto, None, src.parent)   # the rest (norms, RoPE tables, a float table) before it is saved
    if q.scale_dtype == "float16":
        _fp16_scales(proto)
    by_kind = {}
    for (nbits, g), names in plan.items():
        for name in names:
            by_kind.setdefault(kinds[name], set()).add(f"int{nbits} {g}")
    facts = {"bits": bits, "block_size": block, "grid": grid, "head_bits": head_bits, "head_grid": q.head_grid,
             "eight_bit": list(q.eight_bit or []), "accuracy_level": acc,
             "linear_kinds": {k: sorted(v) for k, v in sorted(by_kind.items())},
             "embedding_shares_lm_head": bool(tied), "scale_dtype": q.scale_dtype, "scale_search": search,
             **calib_facts}
    if source_plan is not None:
        facts["follow_source"] = {
            "provenance": source_plan["provenance"], "eight_bit": len(matched),
            f"int{bits}": source_plan["kept_bits"], "unknown_type": source_plan["unknown"],
            "linears": source_plan["linears"]}   # every planned linear was matched (checked above)
    return proto, facts


def _smooth(dec, calib, q) -> dict:
    """SmoothQuant (``quantization.smooth_alpha``) for int8 compute (``accuracy_level: 4``), in place on the
    decoder before export: every layer linear becomes ``Mul(x, 1/s)`` followed by the linear with weight
    ``w * s`` (``calibrate.smooth_scales``; q/k/v and gate/up, fused or not, share their input's s).

    Why: at accuracy level 4 ONNX Runtime rounds each MatMulNBits input to int8 per block of 32 channels, and
    on the real SmolLM2-135M that rounding costs most of ``onnx/int8-fast``'s error (float compute on the same
    int8 weights: KL 0.0022 against 0.0078, user 3000's adapter package; the channels the residual stream's
    outliers land in set each block's scale). The division is a separate Mul (ONNX Runtime's fused norm keeps
    its weight), so a LoRA reading the linear's input (base packages) sees the unscaled activation and an
    adapter written for the base needs no change. The tied lm_head stays as is: the embedding lookup reads
    its matrix."""
    import torch

    from .calibrate import smooth_scales

    if calib is None or not calib.absmax:
        raise RuntimeError("smooth_alpha needs per-channel calibration statistics (calibrate(..., layers=True))")

    class Smoothed(torch.nn.Module):
        def __init__(self, linear, inv):
            super().__init__()
            self.linear = linear
            self.inv_scale = torch.nn.Parameter(inv.float(), requires_grad=False)

        @property
        def weight(self):
            return self.linear.weight

        def forward(self, x):
            return self.linear(x * self.inv_scale)

    mods = dict(dec.named_modules())
    n = 0
    ratios = []
    for name, lin in mods.items():
        if not isinstance(lin, torch.nn.Linear) or lin is dec.lm_head or getattr(lin, "float_helper", False):
            continue
        w = lin.weight.detach().float()
        amax = calib.absmax_for(w.T.numpy())
        if amax is None:
            raise RuntimeError(f"smooth_alpha: no calibration statistics for {name} (weight {tuple(w.shape)})")
        sm = smooth_scales(amax, w, q.smooth_alpha)
        with torch.no_grad():
            lin.weight.copy_(w * sm[None, :])
        parent, _, leaf = name.rpartition(".")
        setattr(mods[parent] if parent else dec, leaf, Smoothed(lin, 1.0 / sm))
        ratios.append(float(sm.max() / sm.min()))
        n += 1
    return {"method": "SmoothQuant (Xiao et al. 2022): x / s before each layer matmul, weight columns * s",
            "alpha": q.smooth_alpha, "smoothed": n, "lm_head": "not smoothed (the tied embedding reads it)",
            "scale_spread_max": round(max(ratios), 2) if ratios else None, "calibration": calib.facts}


def _quantize(src: Path, dst: Path, recipe, work: Path, spec=None, calib=None, merged: bool = False,
              source_plan: dict | None = None) -> dict:
    q = recipe.quantization
    if q.scheme == "int8-dynamic":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(str(src), str(dst), op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8,
                         per_channel=True, use_external_data_format=True,
                         extra_options={"MatMulConstBOnly": True})
        # quantize_dynamic names its data file after dst; normalize to <model>.onnx.data
        import onnx

        _save(onnx.load(str(dst)), dst)
        return {}
    elif q.scheme in ("int8", "int4"):
        import onnx

        proto, facts = _weight_only(onnx.load(str(src), load_external_data=False), recipe, spec, calib, merged, src=src,
                                    source_plan=source_plan)
        _save(proto, dst)
        return facts
    else:
        raise UserError(f"quantization.scheme {q.scheme!r} is not supported for onnx",
                        field="quantization.scheme", expected="none, int8, int8-dynamic or int4")


def genai_config(spec, recipe, *, filename: str = MODEL_FILE, pad_token_id: int | None = None,
                 share_buffer: bool = False) -> dict:
    eos = spec.eos_token_ids or [0]
    return {
        "model": {
            "bos_token_id": spec.bos_token_id if spec.bos_token_id is not None else eos[0],
            "context_length": recipe.max_seq_len,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": filename,
                "head_size": spec.head_dim,
                "hidden_size": spec.hidden_size,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "position_ids": "position_ids",
                           "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
                "num_attention_heads": spec.num_heads,
                "num_hidden_layers": spec.num_layers,
                "num_key_value_heads": spec.num_kv_heads,
            },
            "eos_token_id": eos if len(eos) > 1 else eos[0],
            "pad_token_id": pad_token_id if pad_token_id is not None else eos[0],
            # ORT GenAI's "gemma3_text" type would size sliding layers' caches to the window; our graph keeps
            # full-length caches and masks the window inside, which is the "llama" contract
            "type": spec.family if spec.family in ("llama", "qwen2", "qwen3", "phi3") else "llama",
            "vocab_size": spec.vocab_size,
        },
        "search": {"diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
                   "max_length": recipe.max_seq_len, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
                   "num_return_sequences": 1, "past_present_share_buffer": share_buffer, "repetition_penalty": 1.0,
                   "temperature": 1.0, "top_k": 1, "top_p": 1.0},
    }


def _quant_facts(path: Path, scheme: str) -> dict:
    ops = count_ops(path)
    if scheme in ("int4", "int8"):
        quantized, left = ops.get("MatMulNBits", 0), ops.get("MatMul", 0)
        emb = ops.get("GatherBlockQuantized", 0)
    elif scheme == "int8-dynamic":
        quantized = ops.get("MatMulInteger", 0) + ops.get("DynamicQuantizeMatMul", 0)
        left, emb = ops.get("MatMul", 0), 0
    else:
        quantized, left, emb = 0, ops.get("MatMul", 0) + ops.get("MatMulNBits", 0), 0
    return {"scheme": scheme, "quantized_matmuls": quantized, "float_matmuls": left,
            "quantized_embeddings": emb, "op_counts": ops}


def _via_builder(job) -> dict:
    """ORT GenAI's model builder on the merged HF dir (fused GQA); writes model.onnx + genai_config.json."""
    import subprocess
    import sys

    rec, q = job.recipe, job.recipe.quantization
    precision = {"none": "fp32", "int4": "int4"}.get(q.scheme)
    if precision is None:
        raise UserError(f"onnx.engine genai-builder supports quantization none or int4, not {q.scheme!r}",
                        field="quantization.scheme", expected="none or int4 (or onnx.engine: decoder)")
    src = job.merged_hf_dir()
    out = job.work_dir / "builder"
    extra = [f"block_size={q.block_size or 32}", f"accuracy_level={rec.onnx.accuracy_level}"]
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(src), "-o", str(out),
           "-p", precision, "-e", "cpu", "-c", str(job.work_dir / "builder-cache"), "--extra_options", *extra]
    job.progress("onnxruntime_genai builder")
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"onnxruntime_genai builder failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    for f in out.iterdir():
        if f.suffix in (".onnx", ".data") or f.name == "genai_config.json":
            shutil.copy2(f, job.out_dir / f.name)
    cfg = json.loads((job.out_dir / "genai_config.json").read_text())
    cfg["model"]["context_length"] = rec.max_seq_len
    cfg["search"]["max_length"] = rec.max_seq_len
    (job.out_dir / "genai_config.json").write_text(json.dumps(cfg, indent=4))
    return cfg


@register_exporter("onnx")
def export_onnx(job) -> dict:
    rec = job.recipe
    opts = rec.onnx
    q = rec.quantization
    # A tied lm_head exports as MatMul(x, Transpose(embedding)): no constant weight, so ORT's quantizers
    # would leave the largest matrix in fp32. Quantized recipes give it its own copy.
    dec = job.decoder(cache_strategy("ort-gqa" if opts.attention == "gqa" else "io", opts.share_kv_buffer),
                      untie_lm_head=q.scheme != "none", fuse_projections=opts.fuse_projections)
    spec = dec.spec
    if q.scheme in ("int8", "int4"):
        check_block_size(dec, q)
    calib = None
    if q.head_calibration or q.hot_rows or q.layers_calibration or q.smooth_alpha:
        from ..train.format import PromptFormat
        from .calibrate import calibrate

        job.progress("calibration (on the LaMP sample's training examples)")
        calib = calibrate(job.model, job.base_dir, PromptFormat.from_dict(job.prompt_format),
                          layers=bool(q.layers_calibration or q.smooth_alpha), hessians=bool(q.layers_calibration),
                          head=bool(q.head_calibration or q.hot_rows or q.layers_calibration))
    smoothing = _smooth(dec, calib, q) if q.smooth_alpha else None
    io = {"methods": ["forward"], "engine": opts.engine, **dec.io_description()}
    final = job.out_dir / MODEL_FILE
    if opts.engine == "genai-builder":
        if job.lora is not None:
            raise UserError("onnx.engine genai-builder cannot build a base package (LoRA inputs)",
                            field="onnx.engine", expected="decoder", hint="use onnx/int4 or onnx/int8")
        cfg = _via_builder(job)
        io["share_buffer"] = bool(cfg["search"].get("past_present_share_buffer", False))
        io["kv_cache"]["present"] = "past_present_share_buffer" if io["share_buffer"] else "concat(past, new)"
        return {"io": io, "quantization_applied": _quant_facts(final, q.scheme)}

    job.progress("torch.onnx.export (dynamo, explicit KV I/O)")
    extra_facts: dict = {}
    from ..utils import peak_rss_mb

    # the process's peak RSS so far (monotonic) after each phase: the phase where it rises holds the peak
    timings: dict = {"peak_rss_mb_after": {"model_and_calibration": round(peak_rss_mb(), 1)}}
    t0 = time.perf_counter()
    # fuse_projections recipes also get ORT's fused norms (one switch: "the graph ORT runs fastest")
    fuse = opts.fuse_projections
    if q.scheme == "none":
        fused = export_decoder_onnx(dec, final, opts.opset, fuse=fuse)
        timings["torch_onnx_export_s"] = round(time.perf_counter() - t0, 2)
    else:
        fp32 = job.work_dir / "fp32" / MODEL_FILE
        fp32.parent.mkdir(parents=True, exist_ok=True)
        fused = export_decoder_onnx(dec, fp32, opts.opset, fuse=fuse)
        timings["torch_onnx_export_s"] = round(time.perf_counter() - t0, 2)
        timings["peak_rss_mb_after"]["torch_onnx_export"] = round(peak_rss_mb(), 1)
        source_plan = None
        if q.follow_source:
            from ..models.gguf import source_tensor_types
            from .source_grid import plan

            source_plan = plan(dec, source_tensor_types(job.base_dir), q.bits or 4)
        # The float decoder (its fused/untied weight copies) and the exporter's graph are not needed while ONNX
        # Runtime quantizes the saved file: free them first (peak RSS of a 135M int8 export 3.2 GB otherwise).
        del dec
        import gc

        gc.collect()
        dec = None
        job.progress(f"onnxruntime quantization ({q.scheme})")
        t0 = time.perf_counter()
        extra_facts = _quantize(fp32, final, rec, job.work_dir, spec=spec, calib=calib,
                                merged=job.merged_adapter and job.lora is None, source_plan=source_plan)
        timings["quantize_s"] = round(time.perf_counter() - t0, 2)
        timings["peak_rss_mb_after"]["quantize"] = round(peak_rss_mb(), 1)
    del dec
    if job.lora is not None:   # base package: empty defaults for the LoRA inputs (ORT's adapter contract)
        import onnx

        proto = onnx.load(str(final))
        lora_defaults(proto, list(job.lora.shapes(spec)))
        _save(proto, final)
        del proto
        io["lora"] = {**job.lora.to_dict(), "inputs": "lora.{layer}.{target}.A [in, rank] | .B [rank, out]",
                      "rank_dim": "dynamic (any rank; empty defaults = no adapter)",
                      "adapter_file": "adapter.onnx_adapter (onnxruntime.AdapterFormat)"}
    cfg = genai_config(spec, rec, share_buffer=bool(io.get("share_buffer")))
    (job.out_dir / "genai_config.json").write_text(json.dumps(cfg, indent=4))
    facts = {**_quant_facts(final, q.scheme), **extra_facts}
    if smoothing:
        facts["smoothing"] = smoothing
    if q.scheme != "none" and facts["quantized_matmuls"] == 0:
        raise RuntimeError(f"quantization {q.scheme} did not quantize any MatMul (op counts: {facts['op_counts']})")
    return {"io": io, "quantization_applied": facts, "extra": {"timings": timings, "ort_fusions": fused}}

