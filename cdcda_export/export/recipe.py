"""Typed export recipes: one YAML file per (format, quantization, target).

A recipe loads into :class:`Recipe` with :func:`cdcda_export.config.build`, which collects every
problem and names the key, the bad value and the allowed values. Example (``recipes/onnx/int4.yaml``)::

    format: onnx
    name: int4
    description: ONNX Runtime, int4 weights (MatMulNBits, block 32), explicit KV I/O
    target: cpu
    max_seq_len: 512
    prefill_len: 128
    quantization: {scheme: int4, bits: 4, block_size: 32, layers: linear, embeddings: none}
    onnx: {execution_provider: cpu, opset: 18, accuracy_level: 4}
    thresholds: {max_abs_logit_err: 3.0, mean_kl: 0.05, top1_agreement: 0.9, greedy_match_rate: 0.7, ppl_ratio: 1.1}

Per-format backend sections (``xnnpack``, ``coreml``, ``onnx``) are optional; only the one that
matches ``format`` is used.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import apply_overrides, build, load_yaml, to_dict

FORMATS = ("executorch", "onnx", "coreml")
SCHEMES = ("none", "fp16", "8da4w", "8da8w", "int8wo", "int4wo", "int8-dynamic", "int8", "int4",
           "int8-linear", "int4-block", "palettize-4bit")
# Which schemes make sense for which format (checked after the tree is built).
SCHEMES_BY_FORMAT = {
    "executorch": ("none", "fp16", "8da4w", "8da8w", "int8wo", "int4wo"),
    "onnx": ("none", "int8-dynamic", "int8", "int4"),
    "coreml": ("none", "fp16", "int8-linear", "int4-block", "palettize-4bit"),
}
TARGETS = ("cpu", "android", "ios", "macos", "any", "arm64", "x86_64", "apple-ane", "apple-gpu")


@dataclass
class Quantization:
    scheme: str = field(default="none", metadata={"choices": SCHEMES})
    bits: int | None = None
    group_size: int | None = None          # per-group (ExecuTorch/torchao)
    block_size: int | None = None          # per-block (ONNX MatMulNBits, Core ML per_block)
    layers: str = field(default="linear", metadata={"choices": ("linear", "all", "none")})
    embeddings: str = field(default="none", metadata={"choices": ("none", "int8", "int4", "same")})
    embedding_group_size: int | None = None
    # Weight grid of ONNX MatMulNBits (int8/int4): "symmetric" (scale only), "asymmetric" (integer zero
    # point), "min-scale" (scale and float minimum per block, llama.cpp Q4_1's grid: a base dequantized from
    # Q4_1 with the same block is reproduced exactly). None: symmetric.
    grid: str | None = field(default=None, metadata={"choices": (None, "symmetric", "asymmetric", "min-scale")})
    head_bits: int | None = None           # lm_head (and a tied embedding reading it); None: same as bits
    # grid of the lm_head: None = symmetric at 8 bit, the layers' grid at 4 bit; "symmetric" lets a tied
    # embedding read a 4-bit head (GatherBlockQuantized takes no float zero points)
    head_grid: str | None = field(default=None, metadata={"choices": (None, "symmetric", "asymmetric", "min-scale")})
    eight_bit: list[str] = field(default_factory=list)   # linear kinds kept at int8 (mixed precision): down_proj
    # Precision of ONNX MatMulNBits block scales / float minimums: float32, or float16 (what llama.cpp's Q4_1 /
    # Q8_0 blocks store: lossless for a base dequantized from them, 1.5 bits per weight less at block 32;
    # those matmuls then take fp16 activations, with a Cast on each side)
    scale_dtype: str = field(default="float32", metadata={"choices": ("float32", "float16")})
    # ONNX 8-bit symmetric blocks: search each block's scale (Q8_0's max|w|/127 or a step of the block's own
    # Q4_1-like grid, least squared error) instead of Q8_0's rule alone. Helps float compute (onnx/int8); with
    # int8 compute (accuracy_level 4) the activations' rounding dominates and it measured worse
    scale_search: bool = False
    # ONNX lm_head rounding calibrated on text (export/calibrate.py): "gptq" rounds a 4-bit asymmetric head
    # with GPTQ on the head's inputs; hot_rows keeps that many vocabulary rows (most probability mass on the
    # calibration text) at 8 bit in the head and the tied embedding. Calibration: the shipped LaMP sample's
    # training examples, in the artifact's prompt format
    head_calibration: str | None = field(default=None, metadata={"choices": (None, "gptq")})
    # the same for the 4-bit layers (min-scale or asymmetric grid), with each linear's input Hessian taken on the
    # float model: a base already on the grid (Q4_1-derived) stays exact, an off-grid (LoRA-merged) one gains
    layers_calibration: str | None = field(default=None, metadata={"choices": (None, "gptq")})
    hot_rows: int = 0
    # Precision of the hot rows: 8 (Q8_0 blocks, for a 4-bit head: the rows' weights are what costs there) or 32
    # (float weights read by a plain MatMul on the unrounded head input: for an int8 head at accuracy_level 4,
    # whose error is the int8 rounding of its input; the tied embedding keeps reading the int8 table)
    hot_rows_bits: int = field(default=8, metadata={"choices": (8, 32)})
    # ExecuTorch 8da4w / 8da8w: SmoothQuant (Xiao et al. 2022) migration strength. Each linear's input is divided
    # by s = max|x|^a / max|w|^(1-a) per input channel (calibration text as above) and its weight columns
    # multiplied by s, so outlier channels survive per-token int8 activations; with a 4-bit grid s is constant
    # over each group (the grid stays exact). None: off
    smooth_alpha: float | None = None
    # ONNX weight-only layers: low-rank error compensation (LoRC, ZeroQuant-V2, Yao et al. 2023; LQER, EoRA):
    # after rounding, each layer matrix's error W - Q(W) gets its best rank-``error_rank`` approximation (SVD),
    # stored as two factors beside the matmul (y = x Q(W) + (x A) B; ONNX fp16, ExecuTorch 8da4w min-scale fp32). A LoRA-merged model's personal delta
    # is coherent (low rank) and smaller than the 4-bit step, so rounding removes most of it and this puts it
    # back; a matrix already on its grid (relative error < 1e-3: a Q4_1-derived base) is left as is. 0: off
    error_rank: int = 0
    # ExecuTorch int8wo: the ``float_linears`` decoder linears whose rounding costs the model most stay fp32
    # (XNNPACK's f32 kernels): each linear's rounding error dW weighted by the empirical Fisher on the calibration
    # text, sum over sequences of (grad . dW)^2 (``calibrate.fisher_scores``). 0: every linear int8
    float_linears: int = 0
    # ONNX int4: follow the base's own precision tensor by tensor (``export/source_grid.py``). A layer matrix whose
    # tensors the base's GGUF stored above ``bits`` (Q5_0, Q6_K, Q8_0: cdcda_base.json ``type_by_tensor``) stays at
    # 8 bit (symmetric, scale searched per block, float compute); the rest keep the 4-bit grid. A base with no
    # GGUF provenance keeps every layer at ``bits``
    follow_source: bool = False

    def __post_init__(self):
        if not 0 <= self.float_linears <= 64:
            raise ValueError(f"quantization.float_linears: {self.float_linears!r} is not allowed; allowed: 0..64")
        if not 0 <= self.error_rank <= 64:
            raise ValueError(f"quantization.error_rank: {self.error_rank!r} is not allowed; allowed: 0..64")
        if self.head_bits is not None and self.head_bits not in (4, 8):
            raise ValueError(f"quantization.head_bits: {self.head_bits!r} is not allowed; allowed: 4, 8")
        if self.smooth_alpha is not None and not 0.0 < self.smooth_alpha < 1.0:
            raise ValueError(f"quantization.smooth_alpha: {self.smooth_alpha!r} is not allowed; allowed: 0 < a < 1")
        if self.hot_rows < 0:
            raise ValueError(f"quantization.hot_rows: {self.hot_rows!r} is not allowed; allowed: 0 or more rows")
        bad = [k for k in self.eight_bit if k not in ("down_proj",)]
        if bad:
            raise ValueError(f"quantization.eight_bit: {bad!r} is not allowed; allowed: down_proj")
        if self.bits is not None and self.bits not in (2, 3, 4, 6, 8, 16, 32):
            raise ValueError(f"quantization.bits: {self.bits!r} is not allowed; allowed: 2, 3, 4, 6, 8, 16, 32")
        for name in ("group_size", "block_size", "embedding_group_size"):
            v = getattr(self, name)
            if v is not None and (v <= 0 or v & (v - 1)):
                raise ValueError(f"quantization.{name}: {v!r} is not allowed; allowed: a power of two (16, 32, 64, 128)")


@dataclass
class XnnpackOptions:
    enabled: bool = True
    extended_ops: bool = True
    threads: int = 1
    # "last": the forward returns only the last fed position's logits ([1, 1, vocab]), so a prefill
    # chunk skips the lm_head on every other position (~20% of a 64-token prefill's MACs on
    # SmolLM2-135M: the 49152 x 576 head). "all": logits of every fed position ([1, T, vocab]).
    # Runners still give every position's logits to the fidelity check (feeding one token at a time).
    prefill_logits: str = field(default="last", metadata={"choices": ("all", "last")})


@dataclass
class CoremlOptions:
    compute_units: str = field(default="cpu_and_ne", metadata={"choices": ("all", "cpu_only", "cpu_and_gpu", "cpu_and_ne")})
    precision: str = field(default="fp16", metadata={"choices": ("fp16", "fp32")})
    minimum_deployment_target: str = field(default="iOS18", metadata={
        "choices": ("iOS17", "iOS18", "macOS14", "macOS15")})
    delegate: bool = False   # ExecuTorch Core ML delegate (.pte) instead of .mlpackage


@dataclass
class OnnxOptions:
    execution_provider: str = field(default="cpu", metadata={"choices": ("cpu", "cuda", "dml", "coreml", "nnapi", "qnn", "xnnpack")})
    opset: int = 18
    accuracy_level: int = 4           # MatMulNBits: 0 (default), 1 fp32, 2 fp16, 3 bf16, 4 int8 compute
    engine: str = field(default="decoder", metadata={"choices": ("decoder", "genai-builder")})
    # decoder engine: "gqa" = com.microsoft.GroupQueryAttention (fused, ONNX Runtime), "portable" = plain ONNX ops
    attention: str = field(default="gqa", metadata={"choices": ("gqa", "portable")})
    fuse_projections: bool = True     # one qkv and one gate_up MatMul per layer; norms fused for ORT
    share_kv_buffer: bool = True      # gqa: past/present are one max_seq_len buffer updated in place (IOBinding)

    def __post_init__(self):
        if not 14 <= self.opset <= 23:
            raise ValueError(f"onnx.opset: {self.opset!r} is not allowed; allowed: 14..23")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise ValueError(f"onnx.accuracy_level: {self.accuracy_level!r} is not allowed; allowed: 0, 1, 2, 3, 4")


@dataclass
class Thresholds:
    """Fidelity gate against the eager merged model (``cdcda check``).

    A key left out (None) takes ``cdcda check``'s default for the recipe's quantization scheme
    (``cdcda_export/check/thresholds.py``: fp32 strict, 4-bit looser), so a quantized recipe without
    a ``thresholds`` block is not held to fp32 gates.
    """

    max_abs_logit_err: float | None = None
    mean_kl: float | None = None
    top1_agreement: float | None = None
    greedy_match_rate: float | None = None
    ppl_ratio: float | None = None


@dataclass
class Recipe:
    format: str = field(metadata={"choices": FORMATS})
    name: str
    description: str = ""
    target: str = field(default="cpu", metadata={"choices": TARGETS})
    max_seq_len: int = 512
    prefill_len: int = 128
    quantization: Quantization = field(default_factory=Quantization)
    xnnpack: XnnpackOptions | None = None
    coreml: CoremlOptions | None = None
    onnx: OnnxOptions | None = None
    thresholds: Thresholds = field(default_factory=Thresholds)
    options: dict[str, Any] = field(default_factory=dict)   # free-form extras for a format

    def __post_init__(self):
        if self.max_seq_len < 8 or self.max_seq_len > 32768:
            raise ValueError(f"max_seq_len: {self.max_seq_len!r} is not allowed; allowed: 8..32768")
        if not 1 <= self.prefill_len <= self.max_seq_len:
            raise ValueError(f"prefill_len: {self.prefill_len!r} is not allowed; allowed: 1..max_seq_len ({self.max_seq_len})")
        allowed = SCHEMES_BY_FORMAT.get(self.format, SCHEMES)
        if self.quantization.scheme not in allowed:
            raise ValueError(f"quantization.scheme: {self.quantization.scheme!r} is not allowed for format "
                             f"{self.format!r}; allowed: {', '.join(allowed)}")
        q = self.quantization
        if q.error_rank and not ((self.format == "onnx" and q.scheme in ("int4", "int8"))
                                 or (self.format == "executorch" and q.scheme == "8da4w" and q.grid == "min-scale")):
            raise ValueError("quantization.error_rank needs ONNX weight-only layers (format onnx, scheme int4 or "
                             "int8) or ExecuTorch 8da4w on grid: min-scale, got format "
                             f"{self.format!r} scheme {q.scheme!r} grid {q.grid!r}")
        if q.follow_source and not (self.format == "onnx" and q.scheme == "int4"):
            raise ValueError("quantization.follow_source needs ONNX int4 layers (format onnx, scheme int4), got "
                             f"format {self.format!r} scheme {q.scheme!r}")
        if self.format == "executorch":
            if q.head_calibration and not (q.scheme == "int8wo" or q.head_bits == 8):
                raise ValueError("quantization.head_calibration: gptq needs scheme int8wo or head_bits: 8 (an int8 "
                                 f"weight-only lm_head) for format executorch (got {q.scheme!r}, head_bits "
                                 f"{q.head_bits!r})")
            if q.layers_calibration and q.scheme != "int8wo":
                raise ValueError("quantization.layers_calibration: gptq needs scheme int8wo for format executorch "
                                 f"(got {q.scheme!r})")
            if q.hot_rows:
                raise ValueError("quantization.hot_rows is an ONNX option (format executorch has no hot-row head)")
            if q.grid not in (None, "symmetric") and not (q.scheme == "8da4w" and q.grid == "min-scale"):
                raise ValueError(f"quantization.grid: {q.grid!r} is not allowed for format executorch scheme "
                                 f"{q.scheme!r}; allowed: symmetric, or min-scale with 8da4w")
            if q.smooth_alpha is not None and q.scheme not in ("8da4w", "8da8w"):
                raise ValueError("quantization.smooth_alpha needs dynamic int8 activations (scheme 8da4w or 8da8w), "
                                 f"got {q.scheme!r}")
        elif q.smooth_alpha is not None and not (self.format == "onnx" and q.scheme in ("int8", "int4")
                                                 and (self.onnx is None or self.onnx.accuracy_level == 4)):
            raise ValueError("quantization.smooth_alpha needs int8 activations: ExecuTorch 8da4w / 8da8w, or ONNX "
                             "int8 / int4 with onnx.accuracy_level: 4 (int8 compute); got format "
                             f"{self.format!r} scheme {q.scheme!r}"
                             + (f" accuracy_level {self.onnx.accuracy_level}" if self.onnx is not None else ""))
        elif q.smooth_alpha is not None and q.layers_calibration:
            raise ValueError("quantization.smooth_alpha and layers_calibration cannot be combined for format onnx "
                             "(GPTQ's Hessians are taken on the unsmoothed inputs)")
        elif q.head_calibration and (q.head_bits != 4 or q.head_grid != "asymmetric"):
            raise ValueError("quantization.head_calibration: gptq needs head_bits: 4 and head_grid: asymmetric "
                             f"(got head_bits {q.head_bits!r}, head_grid {q.head_grid!r})")
        # The format's backend section always exists after loading, with its defaults.
        if self.format == "onnx" and self.onnx is None:
            self.onnx = OnnxOptions()
        if self.format == "coreml" and self.coreml is None:
            self.coreml = CoremlOptions()
        if self.format == "executorch" and self.xnnpack is None:
            self.xnnpack = XnnpackOptions()

    @property
    def backend(self):
        return {"onnx": self.onnx, "coreml": self.coreml, "executorch": self.xnnpack}[self.format]

    def to_dict(self) -> dict:
        return to_dict(self)

    def runs_on_this_host(self) -> bool:
        """Whether artifacts of this recipe can be *run* here (Core ML predictions need macOS)."""
        import sys

        if self.format == "coreml" and not (self.coreml and self.coreml.delegate):
            return sys.platform == "darwin"
        if self.format == "executorch" and self.coreml is not None and self.coreml.delegate:
            return sys.platform == "darwin"
        return True


def recipe_from_dict(data: dict, *, source: str | None = None, overrides: list[str] | None = None) -> Recipe:
    if overrides:
        data = apply_overrides(data, overrides)
    return build(Recipe, data, source=source,
                 hint="fix the recipe (see recipes/README.md), or list shipped ones with `cdcda recipes`")


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Load one recipe YAML file (``overrides``: dotted ``key=value`` strings, e.g. ``max_seq_len=256``)."""
    return recipe_from_dict(load_yaml(path), source=str(path), overrides=overrides)


def check_size_divides(widths: dict[str, int], size: int | None, *, field: str, axis: str, why: str) -> None:
    """A recipe's block / group ``size`` must divide the dimension its blocks run along in every layer it
    compresses (``widths``: layer name -> that dimension). Otherwise a UserError naming the recipe field, the
    first layers and their dimension, and the sizes that would fit; ``why``: what the converter would do."""
    from ..errors import UserError

    if not size:
        return
    bad = {n: d for n, d in widths.items() if d % size}
    if not bad:
        return
    dims = sorted(set(widths.values()))
    fits = [g for g in (16, 32, 64, 128, 256) if all(d % g == 0 for d in dims)]
    first = ", ".join(f"{n} ({axis} {d})" for n, d in list(bad.items())[:3]) + (" ..." if len(bad) > 3 else "")
    raise UserError(f"{size} does not divide the {axis} of {len(bad)} layer(s): {first}; {why}", field=field,
                    expected=f"a size dividing every {axis} {dims}: one of {fits or 'none of 16-256'}",
                    hint=(f"--set {field}={fits[-1]}" if fits else "choose a recipe without blocks (per channel)"))
