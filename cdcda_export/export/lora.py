"""LoRA as model inputs: the shared **base package** graph and the per-user **adapter tensors**.

A base package is exported once per (base, recipe, LoRA layout). Its graph computes every targeted
linear as ``base(x) + (x @ A) @ B`` where ``A`` [in, r] and ``B`` [r, out] are *inputs* of the model,
never constants: the quantizers leave them alone (the base weights get the recipe's grid, the personal
delta keeps its own precision) and a user switch is a new set of inputs, not a new model.

Names (the contract between the graph, the adapter files and the runners): ``lora.{layer}.{target}.A`` and
``lora.{layer}.{target}.B``, ``target`` being the peft/HF module leaf name (``q_proj`` ... ``down_proj``).
The LoRA scale (``lora_alpha / r``, or ``/ sqrt(r)`` with rsLoRA) is folded into ``B`` when an adapter is
converted (:func:`adapter_tensors`), so the graph has no scale input; the adapter manifest records it.

A :class:`LoraLayout` fixes the rank and the targets. An adapter of a smaller rank fits a layout of a larger
one (its A/B are zero-padded: the product is the same); targets the adapter lacks get zeros (no delta).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DTYPES = {"float16": np.float16, "float32": np.float32}
_PEFT_KEY = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")


@dataclass(frozen=True)
class LoraLayout:
    """The LoRA inputs a base package accepts: rank, targeted modules (leaf names), dtype of the inputs."""

    rank: int
    targets: tuple[str, ...]
    dtype: str = "float16"

    def __post_init__(self):
        if self.rank < 1:
            raise UserError(f"LoRA rank {self.rank}", field="--lora-rank", expected="an integer >= 1")
        bad = [t for t in self.targets if t not in ALL_TARGETS]
        if bad or not self.targets:
            raise UserError(f"LoRA targets {list(self.targets)}", field="--lora-targets",
                            expected=f"a non-empty subset of {', '.join(ALL_TARGETS)}")
        if self.dtype not in DTYPES:
            raise UserError(f"LoRA dtype {self.dtype!r}", field="--lora-dtype", expected=" | ".join(DTYPES))
        object.__setattr__(self, "targets", tuple(t for t in ALL_TARGETS if t in self.targets))

    def to_dict(self) -> dict:
        return {**asdict(self), "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, d: dict) -> "LoraLayout":
        return cls(rank=int(d["rank"]), targets=tuple(d["targets"]), dtype=str(d.get("dtype", "float16")))

    @classmethod
    def of_adapter(cls, adapter: Path, dtype: str = "float16") -> "LoraLayout":
        """The layout an adapter needs: its rank and targets (from ``adapter_config.json``)."""
        cfg = _adapter_config(adapter)
        targets = cfg.get("target_modules")
        if isinstance(targets, str):   # a regex or "all-linear": read the weights' modules instead
            targets = sorted({m for _, m, _ in _peft_entries(adapter)})
        return cls(rank=int(cfg["r"]), targets=tuple(targets), dtype=dtype)

    def shapes(self, spec) -> dict[str, tuple[int, int]]:
        """``{input name: shape}`` for a decoder spec, in graph input order (the runtime's own copy of the
        rule, :func:`cdcda_export.runtime.adapters.lora_input_shapes`, is the one definition)."""
        from ..runtime.adapters import lora_input_shapes

        io = {"num_heads": spec.num_heads, "head_dim": spec.head_dim, "num_kv_heads": spec.num_kv_heads,
              "hidden_size": spec.hidden_size, "intermediate_size": spec.intermediate_size,
              "num_layers": spec.num_layers}
        return lora_input_shapes(io, self.to_dict())

    def payload_bytes(self, spec) -> int:
        itemsize = np.dtype(DTYPES[self.dtype]).itemsize
        return int(sum(a * b for a, b in self.shapes(spec).values()) * itemsize)


def input_name(layer: int, target: str, which: str) -> str:
    return f"lora.{layer}.{target}.{which}"


# ----------------------------------------------------------------------------- the graph side (torch)


def attach(dec, layout: LoraLayout):
    """Wrap ``dec``'s targeted linears (in place) so that they add ``(x @ A) @ B`` read from the decoder's
    LoRA inputs (``ExportDecoder.forward`` takes them after the cache strategy's inputs, in
    ``layout.shapes(spec)`` order). Fused projections (one qkv / gate_up matmul) add each part's delta to
    its slice of the fused output."""
    import torch
    from torch import nn

    if dec.spec.family == "phi3":
        raise UserError("adapter packages are not supported for Phi-3 yet (its fused qkv_proj / gate_up_proj "
                        "LoRA spans several of the decoder's projections)", field="model_type",
                        expected="llama, qwen2 or qwen3", hint="export merged artifacts (without --adapter-only)")
    feed = LoraFeed()

    class LoraLinear(nn.Module):
        """``base(x)`` plus, per (key, width) part of its output, ``(x @ A_key) @ B_key`` (key None: no LoRA)."""

        def __init__(self, base: nn.Linear, parts: list[tuple[str | None, int]]):
            super().__init__()
            self.base, self.parts = base, parts

        @property
        def weight(self):
            return self.base.weight

        def forward(self, x):
            y = self.base(x)

            def delta(key):
                a, b = feed[f"{key}.A"].to(x.dtype), feed[f"{key}.B"].to(x.dtype)
                if not feed.bmm:   # ONNX / Core ML: MatMul broadcasts a 2-D operand (two nodes per target)
                    return torch.matmul(torch.matmul(x, a), b)
                # ExecuTorch: bmm of [1, T, in] by [1, in, r] then [1, r, out] (the decoders run batch 1). XNNPACK
                # delegates a bmm with two dynamic operands and a static view; matmul with a 2-D non-constant
                # operand became a portable aten.mm, and [None] / broadcasting an unsqueeze_copy / expand_copy,
                # each between two partitions (executorch 1.5.1).
                return torch.bmm(torch.bmm(x, a.reshape(1, a.shape[0], a.shape[1])), b.reshape(1, b.shape[0], b.shape[1]))

            if len(self.parts) == 1:
                return y + delta(self.parts[0][0])
            if all(k is not None for k, _ in self.parts):   # every part adapted: one Concat, one Add (no Split)
                return y + torch.cat([delta(k) for k, _ in self.parts], -1)
            chunks = y.split([w for _, w in self.parts], dim=-1)
            return torch.cat([c + delta(k) if k is not None else c for c, (k, _) in zip(chunks, self.parts)], -1)

    sp = dec.spec
    q_out, kv_out = sp.num_heads * sp.head_dim, sp.num_kv_heads * sp.head_dim
    for i, layer in enumerate(dec.layers):
        a, m = layer.self_attn, layer.mlp

        def key(t):
            return f"lora.{i}.{t}" if t in layout.targets else None

        if a.qkv_proj is not None:
            parts = [(key("q_proj"), q_out), (key("k_proj"), kv_out), (key("v_proj"), kv_out)]
            if any(k for k, _ in parts):
                a.qkv_proj = LoraLinear(a.qkv_proj, parts)
        else:
            for t in ("q_proj", "k_proj", "v_proj"):
                if key(t):
                    setattr(a, t, LoraLinear(getattr(a, t), [(key(t), 0)]))
        if key("o_proj"):
            a.o_proj = LoraLinear(a.o_proj, [(key("o_proj"), 0)])
        if m.gate_up_proj is not None:
            parts = [(key("gate_proj"), sp.intermediate_size), (key("up_proj"), sp.intermediate_size)]
            if any(k for k, _ in parts):
                m.gate_up_proj = LoraLinear(m.gate_up_proj, parts)
        else:
            for t in ("gate_proj", "up_proj"):
                if key(t):
                    setattr(m, t, LoraLinear(getattr(m, t), [(key(t), 0)]))
        if key("down_proj"):
            m.down_proj = LoraLinear(m.down_proj, [(key("down_proj"), 0)])
    dec.lora_layout = layout
    dec.lora_names = list(layout.shapes(sp))
    dec.lora_feed = feed
    return dec


class LoraFeed:
    """The LoRA inputs of the current forward, read by the wrapped linears. Not a dict attribute of the module:
    torch.export warns about (and may one day refuse) tensors assigned into a module's containers during
    export; an opaque holder is plain Python state it does not track."""

    def __init__(self):
        self._t: dict = {}
        self.bmm = False    # ExecuTorch sets it: batched matmuls XNNPACK delegates (see LoraLinear.delta)

    def set(self, names, tensors) -> None:
        self._t = dict(zip(names, tensors))

    def __getitem__(self, name):
        return self._t[name]


def example_tensors(layout: LoraLayout, spec, seed: int = 0, dtype: str | None = None) -> list:
    """Small random LoRA inputs (export tracing wants non-trivial values) in graph input order; ``dtype``
    overrides the layout's (the graph's input dtype)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    dt = getattr(torch, dtype or layout.dtype)
    return [(torch.randn(*shape, generator=g) * 0.01).to(dt) for shape in layout.shapes(spec).values()]


# ----------------------------------------------------------------------------- the adapter side (numpy)


def _adapter_config(adapter: Path) -> dict:
    p = Path(adapter) / "adapter_config.json"
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot be read ({e})", file=str(p), expected="a peft adapter_config.json",
                        hint="train one with `cdcda train ...`") from None


def _peft_entries(adapter: Path):
    """(layer, module leaf, "A"|"B") of every LoRA tensor in ``adapter_model.safetensors``."""
    from safetensors import safe_open

    with safe_open(str(Path(adapter) / "adapter_model.safetensors"), framework="np") as f:
        for k in f.keys():
            m = _PEFT_KEY.search(k)
            if m:
                yield int(m.group(1)), m.group(2), m.group(3)


def lora_scale(cfg: dict) -> float:
    r, alpha = int(cfg["r"]), float(cfg.get("lora_alpha", cfg["r"]))
    return alpha / (r ** 0.5) if cfg.get("use_rslora") else alpha / r


def adapter_tensors(adapter: Path, layout: LoraLayout, shapes: dict[str, tuple[int, int]]
                    ) -> tuple[dict[str, np.ndarray], dict]:
    """A peft adapter as the base package's LoRA inputs: ``{name: array}`` (A^T [in, r], scale * B^T [r, out],
    zero-padded to the layout's rank, in ``layout.dtype``) plus facts for the adapter manifest. ``shapes``: the
    base package's LoRA inputs (:func:`cdcda_export.runtime.adapters.lora_input_shapes`). Refuses an
    adapter that does not fit the layout (larger rank, targets the base package does not take, other shapes,
    a DoRA / bias / rank-pattern adapter whose delta is not A @ B)."""
    from safetensors import safe_open

    adapter = Path(adapter)
    cfg = _adapter_config(adapter)
    cfg_file = str(adapter / "adapter_config.json")
    for k, bad in (("use_dora", True), ("lora_bias", True)):
        if cfg.get(k) == bad:
            raise UserError(f"{k} adapters are not supported by adapter packages", file=cfg_file, field=k,
                            expected="a plain LoRA adapter", hint="export a merged artifact instead")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise UserError("per-module ranks/alphas are not supported by adapter packages", file=cfg_file,
                        field="rank_pattern", expected="{}", hint="export a merged artifact instead")
    rank = int(cfg["r"])
    if rank > layout.rank:
        raise UserError(f"adapter rank {rank} exceeds the base package's LoRA rank {layout.rank}", file=cfg_file,
                        field="r", expected=f"<= {layout.rank}",
                        hint=f"build a base package with --lora-rank {rank} (or larger)")
    scale = lora_scale(cfg)
    dt = DTYPES[layout.dtype]
    out = {n: np.zeros(s, dtype=np.float32) for n, s in shapes.items()}
    seen: set[str] = set()
    weights = adapter / "adapter_model.safetensors"
    with safe_open(str(weights), framework="np") as f:
        for k in f.keys():
            m = _PEFT_KEY.search(k)
            if not m:
                raise UserError(f"tensor {k!r} is not a LoRA A/B weight of a decoder layer", file=str(weights),
                                expected="lora_A / lora_B weights of q/k/v/o/gate/up/down projections",
                                hint="export a merged artifact instead (modules_to_save, embeddings)")
            layer, target, which = int(m.group(1)), m.group(2), m.group(3)
            if target not in layout.targets:
                raise UserError(f"the adapter targets {target}, which the base package does not take "
                                f"(its LoRA targets: {', '.join(layout.targets)})", file=str(weights),
                                field="target_modules", hint=f"build a base package with --lora-targets including "
                                f"{target}")
            name = input_name(layer, target, which)
            if name not in out:
                raise UserError(f"tensor {k!r}: layer {layer} is not in the base package", file=str(weights))
            w = f.get_tensor(k).astype(np.float32)
            want = out[name].shape
            t = w.T if which == "A" else (w.T * scale)          # A [r, in] -> [in, r]; B [out, r] -> [r, out]
            if (which == "A" and t.shape[0] != want[0]) or (which == "B" and t.shape[1] != want[1]):
                raise UserError(f"tensor {k!r} has shape {list(w.shape)}, which does not fit the base package's "
                                f"{name} {list(want)}", file=str(weights), field=k,
                                hint="the adapter was trained on another base shape; use its own base")
            if which == "A":
                out[name][:, :t.shape[1]] = t
            else:
                out[name][:t.shape[0], :] = t
            seen.add(name)
    facts = {"rank": rank, "layout_rank": layout.rank, "targets": sorted({n.split(".")[2] for n in seen}),
             "scale": scale, "scale_folded_into": "B", "dtype": layout.dtype,
             "tensors": len(seen), "zero_filled": len(shapes) - len(seen)}
    return {n: v.astype(dt) for n, v in out.items()}, facts


__all__ = ["LoraLayout", "ALL_TARGETS", "attach", "adapter_tensors", "example_tensors",
           "input_name", "lora_scale"]
