"""ExecuTorch-specific pieces of the export graph: the custom-op KV cache and the lowering passes.

* :class:`CustomOpsKVCache` plugs ExecuTorch's own LLM kernels into the shared
  :class:`~cdcda_export.export.decoder.ExportDecoder`: ``torch.ops.llama.update_cache`` writes the
  new K/V rows in place into caches laid out ``[1, max_seq_len, kv_heads, head_dim]`` and
  ``torch.ops.llama.custom_sdpa`` runs causal GQA attention over them from ``start_pos``. The
  forward takes ``(tokens [1, T] int64, input_pos [1] int64)`` with T dynamic (1 .. prefill_len),
  so one method does prefill (T > 1) and decode (T = 1), and returns the logits of every fed
  position.
* :class:`SymbolicViewToInferred` keeps XNNPACK partitions whole with a dynamic sequence length
  (RoPE's rotate_half, the other dynamic-shape trap, is a matmul in the decoder: ``rope_as_matmul``).

Import needs torch and executorch; the exporter imports this module inside its function.
"""

from __future__ import annotations

import torch
from executorch.exir.pass_base import ExportPass, PassResult

from .decoder import AttnContext, CacheStrategy, window_allowed


def load_custom_ops() -> None:
    """Register ``torch.ops.llama.*`` (AOT library + meta kernels) before tracing or running."""
    import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401


class CustomOpsKVCache(CacheStrategy):
    """KV cache + attention through ExecuTorch's ``llama::update_cache`` / ``llama::custom_sdpa``."""

    name = "executorch-custom-ops"
    layout = "bthd"

    def setup(self, dec) -> None:
        super().setup(dec)
        load_custom_ops()
        sp = dec.spec
        self.max_seq_len = sp.max_seq_len
        shape = (1, sp.max_seq_len, sp.num_kv_heads, sp.head_dim)
        for i in range(sp.num_layers):
            self.register_buffer(f"k_cache_{i}", torch.zeros(shape), persistent=False)
            self.register_buffer(f"v_cache_{i}", torch.zeros(shape), persistent=False)
        if sp.sliding_window:   # Gemma 3: positions of the cache rows, for the sliding layers' mask
            self.register_buffer("key_positions", torch.arange(sp.max_seq_len), persistent=False)

    def prepare(self, dec, tokens: torch.Tensor, input_pos: torch.Tensor) -> AttnContext:
        t = tokens.shape[1]
        start = input_pos[0].item()
        torch._check(start >= 0)
        torch._check(start + t <= self.max_seq_len)
        cos, sin = dec.rope_slice(start, t)
        extra = {}
        if self.spec.sliding_window:
            # Gemma 3 sliding layers: custom_sdpa with an explicit [T, max_seq_len] mask (causal and within
            # the window; its kernel asserts mask.size(1) == the cache length) instead of is_causal.
            q_pos = torch.arange(t) + start
            k_pos = self.key_positions
            allowed = (k_pos[None, :] <= q_pos[:, None]) & window_allowed(q_pos, k_pos, self.spec.sliding_window)
            extra["sliding_mask"] = torch.where(allowed, 0.0, torch.finfo(torch.float32).min)
        return AttnContext(input_ids=tokens, cos=cos, sin=sin, start=start, extra=extra)

    def attend(self, layer_idx: int, q, k, v, ctx: AttnContext) -> torch.Tensor:
        kc = getattr(self, f"k_cache_{layer_idx}")
        vc = getattr(self, f"v_cache_{layer_idx}")
        torch.ops.llama.update_cache(k, kc, ctx.start)
        torch.ops.llama.update_cache(v, vc, ctx.start)
        if self.is_sliding(layer_idx):
            out = torch.ops.llama.custom_sdpa(q, kc, vc, ctx.start, ctx.extra["sliding_mask"], 0.0, False, self.scale)
        else:
            out = torch.ops.llama.custom_sdpa(q, kc, vc, ctx.start, None, 0.0, True, self.scale)
        b, t = q.shape[0], q.shape[1]
        return out.reshape(b, t, q.shape[2] * q.shape[3])

    def input_names(self) -> list[str]:
        return ["tokens", "input_pos"]

    def example_inputs(self, dec, seq_len: int, past_len: int = 0) -> tuple:
        ids = torch.zeros(1, seq_len, dtype=torch.long)
        return ids, torch.tensor([past_len], dtype=torch.long)

    def dynamic_shapes(self, prefill_len: int):
        if prefill_len <= 1:
            return None
        # ExportDecoder.forward takes *inputs, which torch.export sees as one (tuple) argument.
        return (({1: torch.export.Dim("seq", min=1, max=prefill_len)}, None),)

    def io_description(self) -> dict:
        sp = self.spec
        return {
            "inputs": {"tokens": {"shape": [1, "seq"], "dtype": "int64", "seq": "1..prefill_len"},
                       "input_pos": {"shape": [1], "dtype": "int64",
                                     "meaning": "position of tokens[0]; the cache holds positions < input_pos"}},
            "outputs": {"logits": {"shape": [1, "seq", sp.vocab_size], "dtype": "float32",
                                   "meaning": "logits of every fed position"}},
            "kv_cache": {"kind": "mutable_buffers", "ops": ["llama::update_cache", "llama::custom_sdpa"],
                         "names": "cache.k_cache_{i}|cache.v_cache_{i}",
                         "layout": "[1, max_seq_len, kv_heads, head_dim]", "num_layers": sp.num_layers,
                         "num_kv_heads": sp.num_kv_heads, "head_dim": sp.head_dim,
                         "reset": "reload the method (buffers start at zero); stale rows past input_pos "
                                  "are never read (causal from input_pos)"},
        }


class StateKVCache(CacheStrategy):
    """Static one-token forward for delegates without dynamic shapes (Core ML).

    ``forward(tokens [1, 1], input_pos [1])``: the caches ``[1, kv_heads, max_seq_len, head_dim]`` are
    written with ``index_put_`` at ``input_pos`` (Core ML's iOS 18 ``slice_update`` on a state, as
    ExecuTorch's ``KVCacheCoreML``), and attention reads the whole cache under a mask built from
    ``input_pos``, so no shape depends on the position.
    """

    name = "executorch-state"
    layout = "bhtd"

    def setup(self, dec) -> None:
        super().setup(dec)
        sp = dec.spec
        self.max_seq_len = sp.max_seq_len
        shape = (1, sp.num_kv_heads, sp.max_seq_len, sp.head_dim)
        for i in range(sp.num_layers):
            self.register_buffer(f"k_cache_{i}", torch.zeros(shape), persistent=False)
            self.register_buffer(f"v_cache_{i}", torch.zeros(shape), persistent=False)
        self.register_buffer("key_positions", torch.arange(sp.max_seq_len), persistent=False)

    def prepare(self, dec, tokens: torch.Tensor, input_pos: torch.Tensor) -> AttnContext:
        cos, sin = dec.rope_at(input_pos[None])
        allowed = self.key_positions[None, :] <= input_pos[:, None]            # [1, L]
        mask = torch.where(allowed, 0.0, torch.finfo(torch.float32).min)[None, None]  # [1, 1, 1, L]
        extra = {}
        if self.spec.sliding_window:   # Gemma 3 sliding layers: also within the window
            win = allowed & window_allowed(input_pos, self.key_positions, self.spec.sliding_window)
            extra["sliding_mask"] = torch.where(win, 0.0, torch.finfo(torch.float32).min)[None, None]
        return AttnContext(input_ids=tokens, cos=cos, sin=sin, mask=mask, start=input_pos, extra=extra)

    def attend(self, layer_idx: int, q, k, v, ctx: AttnContext) -> torch.Tensor:
        from .decoder import eager_attention

        kc = torch.ops.aten.index_put_(getattr(self, f"k_cache_{layer_idx}"), [None, None, ctx.start], k)
        vc = torch.ops.aten.index_put_(getattr(self, f"v_cache_{layer_idx}"), [None, None, ctx.start], v)
        return eager_attention(q, kc, vc, self.layer_mask(layer_idx, ctx), self.scale)

    def input_names(self) -> list[str]:
        return ["tokens", "input_pos"]

    def example_inputs(self, dec, seq_len: int = 1, past_len: int = 0) -> tuple:
        return torch.zeros(1, 1, dtype=torch.long), torch.tensor([past_len], dtype=torch.long)

    def io_description(self) -> dict:
        sp = self.spec
        return {
            "inputs": {"tokens": {"shape": [1, 1], "dtype": "int64"},
                       "input_pos": {"shape": [1], "dtype": "int64", "meaning": "position of the token"}},
            "outputs": {"logits": {"shape": [1, 1, sp.vocab_size], "dtype": "float32"}},
            "kv_cache": {"kind": "delegate_state", "names": "cache.k_cache_{i}|cache.v_cache_{i}",
                         "layout": "[1, kv_heads, max_seq_len, head_dim]", "num_layers": sp.num_layers,
                         "num_kv_heads": sp.num_kv_heads, "head_dim": sp.head_dim},
        }


class SymbolicViewToInferred(ExportPass):
    """``view_copy(x, [1, s0, 9, 64])`` -> ``view_copy(x, [1, -1, 9, 64])`` when one dim is symbolic.

    Upstream limitation (executorch 1.5.1, backends/xnnpack/partition/config/generic_node_configs.py,
    ``ViewCopyConfig``): the XNNPACK partitioner rejects every reshape whose target shape holds a
    symbolic size ("Symbolic reshape is not supported"), although XNNPACK's static reshape takes one
    inferred dimension (the serializer maps -1 to 0). With a dynamic sequence length every head
    split, norm and merge is such a reshape, so each one cut the graph into another partition
    (7 partitions per layer on a tiny Llama; 1 with this pass). With a single symbolic dimension the
    -1 is exact, because the element count fixes it.
    """

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        changed = False
        for node in gm.graph.nodes:
            if node.op != "call_function" or "view_copy" not in str(node.target):
                continue
            shape = list(node.args[1])
            symbolic = [i for i, d in enumerate(shape) if not isinstance(d, int)]
            if len(symbolic) == 1 and -1 not in shape:
                shape[symbolic[0]] = -1
                node.args = (node.args[0], shape, *node.args[2:])
                changed = True
        if changed:
            gm.graph.eliminate_dead_code()
            gm.recompile()
        return PassResult(gm, changed)
