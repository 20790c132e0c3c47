"""Calibrated rounding of the lm_head (recipe ``quantization.head_calibration`` / ``hot_rows``).

A tied lm_head at 4 bit is where a 4-bit recipe loses most on a real small model: on SmolLM2-135M-Instruct
(Q4_1 layers re-quantized losslessly, Q8_0 head/embedding), the head alone at 4 bit, rounded to nearest,
costs mean KL 0.055-0.09 and top-1 0.77-0.82 (benchmarks/results/quality_*). Two calibrated steps recover
almost all of it while keeping 4-bit storage:

* **GPTQ** (Frantar et al. 2022) rounds the head's columns one at a time and spreads each column's rounding
  error over the columns not yet rounded, weighted by the inverse Hessian ``X^T X`` of the head's input
  (the final hidden states of calibration text). The grid (per-block scale and integer zero point) is fixed
  from the float weights, so the output is an ordinary asymmetric MatMulNBits / GatherBlockQuantized table.
  ONNX Runtime ships a GPTQ (``onnxruntime.quantization.neural_compressor.weight_only.gptq``), but in
  onnxruntime 1.32 it propagates no error: it reads the *column* ``Hinv[i:, i]`` of the upper Cholesky factor
  (all zeros below the diagonal) instead of the row ``Hinv[i, i:]``, so its output equals round-to-nearest
  (measured: KL 0.0904 vs 0.0906 on the SmolLM2 head), and its ``mse=True`` grid search is worse still
  (KL 1.33). This module is the one place that works around it; ``tests/test_calibrate.py`` checks that
  ours lowers the output error against round-to-nearest and that ORT's still does not (so we notice a fix).
* **Hot rows**: the vocabulary rows that carry the probability mass on calibration text (a few percent of a
  49k vocabulary) keep 8-bit blocks, in the head and in the embedding lookup.

Calibration text: the training examples ``cdcda train`` builds (prompt + answer, in the artifact's prompt
format) for every user of the shipped LaMP sample -- never a user's held-out pairs, which ``cdcda check``
measures on.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

TASKS = ("LaMP-1", "LaMP-2", "LaMP-3", "LaMP-4", "LaMP-5", "LaMP-7")


@dataclass
class Calibration:
    hidden: "object"          # torch.Tensor [positions, hidden]: the lm_head's input (after the final norm)
    facts: dict               # what goes to the manifest
    hessians: dict | None = None   # weight key (see weight_key) -> X^T X / n [in, in] of that linear's input
    absmax: dict | None = None     # weight key -> max |x| per input channel [in] (SmoothQuant's statistic)
    model: "object" = None         # the float HF model and the calibration token ids, for :meth:`fisher`
    seqs: list | None = None

    def hessian_for(self, w_kn) -> "object | None":
        """The input Hessian of the exported MatMul weight ``w_kn`` [K, N]: a fused projection (qkv, gate_up)
        starts with its first linear's columns, and shares that linear's input."""
        return (self.hessians or {}).get(weight_key(w_kn))

    def fisher(self, deltas: dict, every: int = 4) -> dict:
        """Fisher-weighted rounding error of linears (see :func:`fisher_scores`) on every ``every``-th calibration
        sequence; ``deltas``: weight key -> rounding error W_q - W [N, K] of that linear, or a callable building it."""
        if self.model is None or not self.seqs:
            raise RuntimeError("Calibration.fisher needs the float model and the calibration sequences")
        return fisher_scores(self.model, self.seqs[::every], deltas)

    def absmax_for(self, w_kn) -> "object | None":
        """Per-input-channel max |activation| of the linear whose MatMul weight is ``w_kn`` [K, N]."""
        return (self.absmax or {}).get(weight_key(w_kn))


def weight_key(w_kn) -> bytes:
    """Identity of a linear's weight in the exported graph: its first 4 x 8 entries as a MatMul weight [K, N]
    (a fused projection's first columns are its first linear's), with K."""
    import numpy as np

    a = np.ascontiguousarray(np.asarray(w_kn, dtype=np.float32)[:4, :8])
    return np.int64(np.asarray(w_kn).shape[0]).tobytes() + a.tobytes()


def calibration_ids(tokenizer, fmt, max_len: int = 192, per_user: int = 8, hp=None) -> list[list[int]]:
    """Token ids of the calibration sequences: up to ``per_user`` training examples (prompt + answer, in
    prompt format ``fmt``) of every user of each task of the shipped LaMP sample, held-out pairs excluded."""
    from importlib import resources

    from ..data import load_lamp
    from ..train.format import encode_example
    from ..train.train import Hyper, build_user_data

    hp = hp or Hyper()
    eos = fmt.end_of_turn_id if fmt.end_of_turn_id is not None else tokenizer.eos_token_id
    sample = Path(str(resources.files("cdcda_export") / "assets" / "lamp_sample"))
    seqs: list[list[int]] = []
    for task in TASKS:
        d = sample / task
        ds = load_lamp(task, d / "questions.json", d / "outputs.json")
        for user in ds.users:
            others = [item for o in ds.users if o.id != user.id for item in o.profile]
            data = build_user_data(ds.task, user, others, [], hp, fmt)
            if isinstance(data, str):
                continue
            for prompt, answer, _ in data.train[:per_user]:   # prompts already in format ``fmt``
                ids = encode_example(tokenizer, prompt, answer, eos, max_len).input_ids
                if len(ids) >= 2:
                    seqs.append(ids)
    return seqs


def head_inputs(model, seqs: list[list[int]], layers: bool = False, layer_positions: int = 8192,
                hessians: bool = True, head: bool = True):
    """The lm_head's input for every position of ``seqs`` (the decoder's last hidden state, after the final
    norm; float32 [positions, hidden]) and, with ``layers``, each decoder linear's input Hessian X^T X / n and
    per-channel max |x| on the float model (forward pre-hooks on every k-th sequence, about ``layer_positions`` positions in all).
    Linears called one after another on the same input (q/k/v, gate/up) share one accumulator, found under
    each one's :func:`weight_key`. ``hessians=False``: max |x| only (SmoothQuant needs no X^T X, the costly
    part: a 1536 x 1536 product per down_proj call). ``head=False``: only the sequences the layer statistics
    read are run, and no head input is kept (SmoothQuant alone: 5x less forward work on SmolLM2)."""
    import torch

    out = []
    body = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    sums: dict[bytes, list] = {}
    alias: dict[bytes, bytes] = {}
    last: dict = {"input": None, "key": None, "on": False}
    hooks = []
    if layers:
        for m in body.modules():
            if isinstance(m, torch.nn.Linear):
                key = weight_key(m.weight.detach().T.numpy())

                def hook(mod, args, key=key):
                    if not last["on"]:
                        return
                    # Same input as the linear just before (q/k/v, gate/up): the same tensor object, kept
                    # referenced here. Comparing data_ptr() and shape aliased unrelated linears whenever the
                    # allocator reused a freed block: gate_proj then took o_proj's statistics (its freed input
                    # has gate's shape), nondeterministically (SmoothQuant scales of SmolLM2 layers 13/16/20
                    # differed by up to 0.8 between two runs)
                    if args[0] is last["input"]:
                        alias[key] = last["key"]
                        return
                    last["input"], last["key"] = args[0], key
                    a = args[0].detach()
                    a = a.reshape(-1, a.shape[-1]).float()
                    acc = sums.setdefault(key, [torch.zeros(a.shape[1], a.shape[1]) if hessians else None, 0,
                                                torch.zeros(a.shape[1])])
                    if hessians:
                        acc[0] += a.T @ a
                    acc[1] += a.shape[0]
                    acc[2] = torch.maximum(acc[2], a.abs().amax(0))
                hooks.append(m.register_forward_pre_hook(hook))
    n_pos = sum(len(s) for s in seqs)
    stride = max(1, round(n_pos / layer_positions)) if layers else 0
    try:
        with torch.no_grad():
            for i, s in enumerate(seqs):
                last["on"], last["input"] = bool(layers) and i % stride == 0, None
                if not head and not last["on"]:
                    continue
                h = body(input_ids=torch.tensor([s])).last_hidden_state[0].float()
                if head:
                    out.append(h)
    finally:
        for h in hooks:
            h.remove()
    hess = {k: v[0] / max(1, v[1]) for k, v in sums.items() if v[0] is not None}
    hess.update({k: hess[v] for k, v in alias.items() if v in hess})
    absmax = {k: v[2] for k, v in sums.items()}
    absmax.update({k: absmax[v] for k, v in alias.items() if v in absmax})
    return (torch.cat(out) if out else torch.zeros(0, model.config.hidden_size)), hess, absmax


def calibrate(model, base_dir: Path, fmt, *, max_len: int = 192, per_user: int = 8, layers: bool = False,
              hessians: bool = True, head: bool = True) -> Calibration:
    """``layers``: per-linear statistics too (max |x|; with ``hessians``, X^T X for GPTQ); ``head``: the
    lm_head's inputs (``Calibration.hidden``; empty without)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base_dir))
    seqs = calibration_ids(tok, fmt, max_len=max_len, per_user=per_user)
    h, hessians, absmax = head_inputs(model, seqs, layers=layers, hessians=hessians, head=head)
    digest = hashlib.sha256(json.dumps(seqs).encode()).hexdigest()[:16]
    return Calibration(h, {"source": "shipped LaMP sample: cdcda train's training examples of every user "
                                     "(held-out pairs excluded)", "tasks": list(TASKS), "sequences": len(seqs),
                           "positions": sum(len(q) for q in seqs), "ids_sha256": digest, "prompt_format": fmt.kind},
                       hessians or None, absmax or None, model=model, seqs=seqs)


def fisher_scores(model, seqs: list[list[int]], deltas: dict) -> dict:
    """How much each linear's rounding error costs the model: the empirical Fisher quadratic form
    dW^T F dW = sum over sequences of (g . dW)^2, g the gradient of that sequence's next-token loss (the text's
    own tokens) with respect to the linear's weight, dW = W_q - W. ``deltas``: weight key (as :func:`weight_key`)
    -> dW [N, K], or a zero-argument callable that builds dW (built when needed and dropped after, so the
    export holds no linear's dW, and no gradient, beyond the one being scored: with tensors, every linear's
    fp32 dW is held for the whole pass, +0.4 GB on SmolLM2-135M). A key with no linear of that shape in
    ``model`` gets no score. Exact for the empirical Fisher (no diagonal approximation), one backward pass per
    sequence; it ranks where a quantized model's loss moves, which the per-layer output error (GPTQ's
    objective) cannot: on SmolLM2-135M's int8 layers it put layer 11's down_proj (0.18 of the total) and
    layer 14's v_proj (0.15) first, the rest below 0.07 each. Returns weight key -> score."""
    import torch

    def build(d):
        return d() if callable(d) else d

    lin = {weight_key(m.weight.detach().T.numpy()): m for m in model.modules() if isinstance(m, torch.nn.Linear)}
    # a split fused projection (Phi-3's qkv_proj / gate_up_proj) has its first part's key but not its shape
    deltas = {k: d for k, d in deltas.items() if k in lin and tuple(lin[k].weight.shape) == tuple(build(d).shape)}
    if not deltas:
        return {}
    flags = {p: p.requires_grad for p in model.parameters()}
    scores = {k: 0.0 for k in deltas}
    dots: dict = {}
    hooks = []

    def hook(k):
        def take(w):   # runs once the weight's gradient is complete; scores it and frees it at once
            dots[k] = dots.get(k, 0.0) + float((w.grad * build(deltas[k])).sum())
            w.grad = None
        return take

    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for k in deltas:
            lin[k].weight.requires_grad_(True)
            hooks.append(lin[k].weight.register_post_accumulate_grad_hook(hook(k)))
        with torch.enable_grad():
            for s in seqs:
                ids = torch.tensor([s])
                dots.clear()
                model(input_ids=ids, labels=ids).loss.backward()
                for k in deltas:
                    scores[k] += dots.get(k, 0.0) ** 2
    finally:
        for h in hooks:
            h.remove()
        for p, f in flags.items():
            p.requires_grad_(f)
            p.grad = None
    return scores


def smooth_scales(amax, w, alpha: float, group: int | None = None):
    """SmoothQuant's per-input-channel scales (Xiao et al. 2022) of a linear with weight ``w`` [N, K] whose input
    reaches ``amax`` [K] (max |x| on calibration text): s = max|x|^a / max|w|^(1-a), clamped to [1e-3, 1e3].
    The linear then computes ``(x / s) @ (w * s).T``: outlier input channels shrink before the activations are
    rounded to int8, and the weight columns grow by the same factor. ``group``: s constant over each group of
    ``group`` input channels (its max), so a weight grid with blocks of that size along K stays exact."""
    wmax = w.abs().amax(0).clamp(min=1e-5)
    sm = (amax.float().clamp(min=1e-5) ** alpha / wmax ** (1 - alpha)).clamp(1e-3, 1e3)
    if group:
        sm = sm.reshape(-1, group).amax(-1, keepdim=True).expand(-1, group).reshape(-1)
    return sm


def block_grid(w, block: int, bits: int = 4, scale_dtype: str = "float16", grid: str = "asymmetric"):
    """Per-block grid of ``w`` [N, K] (blocks along K), dequantized as (q - zero point) * scale:

    * ``asymmetric``: scale = (max - min) / (2^bits - 1) over a range that spans 0, integer zero point
      round(-min / scale) in [0, 2^bits - 1] (MatMulNBits' uint8 zero points, ORT's asymmetric quantizer);
    * ``min-scale``: scale = (max - min) / (2^bits - 1), float zero point -min / scale (llama.cpp Q4_1's
      w = d * q + m; what ``onnx._min_scale_quantizer`` writes);
    * ``symmetric``: scale = max|w| / (2^(bits-1) - 1), zero point 2^(bits-1) (stored q - 2^(bits-1) is a
      signed integer: XNNPACK's per-channel int8 weights with ``block`` = the input width).

    Scale (and a float zero point) rounded to ``scale_dtype`` as stored. Returns (scale, zero point), both
    float32 [N, K/block]."""
    import torch

    n, k = w.shape
    levels = 2 ** bits - 1
    x = w.float().reshape(n, k // block, block)
    lo, hi = x.amin(-1), x.amax(-1)
    if grid == "symmetric":
        scale = torch.maximum(hi.abs(), lo.abs()) / (2 ** (bits - 1) - 1)
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        if scale_dtype == "float16":
            scale = scale.half().float()
        return scale, torch.full_like(scale, 2.0 ** (bits - 1))
    if grid == "asymmetric":
        lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)   # the grid spans 0 (as ORT's asymmetric quantizer's does)
    scale = (hi - lo) / levels
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    if grid == "min-scale":
        zp = -lo / scale
        if scale_dtype == "float16":
            scale, zp = scale.half().float(), zp.half().float()
        return scale, zp
    if scale_dtype == "float16":
        scale = scale.half().float()
    zp = torch.clamp(torch.round(-lo / scale), 0, levels)
    return scale, zp


def rtn(w, scale, zp, block: int, bits: int = 4):
    """Round-to-nearest onto a fixed grid (integer or float zero points): q [N, K] uint8 in [0, 2^bits - 1]."""
    import torch

    n, k = w.shape
    s = scale.repeat_interleave(block, 1)
    z = zp.repeat_interleave(block, 1)
    return torch.clamp(torch.round(w.float() / s + z), 0, 2 ** bits - 1).to(torch.uint8)   # z may be a float


def dequant(q, scale, zp, block: int):
    """(q - zero point) * scale, blocks of ``block`` along K: q [N, K], scale and zp [N, K / block]. Broadcast over
    each block rather than ``repeat_interleave``-d to [N, K]: the same values bit for bit, 8x faster on a per-channel
    576 x 1536 weight (2.1 vs 17 ms), which matters where every linear is dequantized once per calibration
    sequence (:func:`fisher_scores`' deltas)."""
    n, k = q.shape
    return ((q.float().reshape(n, k // block, block) - zp[..., None]) * scale[..., None]).reshape(n, k)


def gptq(w, x, block: int, bits: int = 4, *, damp: float = 0.01, lazy: int = 128, scale_dtype: str = "float16",
         grid: str = "asymmetric", hessian=None):
    """GPTQ rounding of ``w`` [N, K] (N outputs, K inputs) for inputs ``x`` [positions, K] (or a precomputed
    ``hessian`` X^T X / n [K, K]), onto the fixed block grid of :func:`block_grid`. Returns (q [N, K] uint8,
    scale, zp), as :func:`rtn`. On a weight that already lies on the grid every rounding error is 0, so
    nothing moves: a base dequantized from Q4_1 stays exact under ``min-scale``.

    The standard algorithm with lazy batch updates: Hessian H = X^T X / n, dampened by ``damp`` x its mean
    diagonal; columns in order, each rounded, its error divided by the Cholesky factor's diagonal and
    subtracted from the later columns through the upper Cholesky factor of H^-1 (row i, not column i: see
    the module docstring for ONNX Runtime's mix-up)."""
    import torch

    n, k = w.shape
    levels = 2 ** bits - 1
    scale, zp = block_grid(w, block, bits, scale_dtype, grid)
    W = w.detach().float().clone()
    H = hessian.double().clone() if hessian is not None else x.double().T @ x.double() / max(1, x.shape[0])
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += damp * torch.diag(H).mean() * torch.eye(k, dtype=H.dtype)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).float()
    q = torch.zeros(n, k, dtype=torch.uint8)
    for i1 in range(0, k, lazy):
        i2 = min(i1 + lazy, k)
        w1 = W[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        h1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            c, g = i1 + i, (i1 + i) // block
            col = w1[:, i]
            qc = torch.clamp(torch.round(col / scale[:, g] + zp[:, g]), 0, levels)
            q[:, c] = qc.to(torch.uint8)
            e = (col - (qc - zp[:, g]) * scale[:, g]) / h1[i, i]
            w1[:, i:] -= e[:, None] * h1[i, i:][None, :]
            err1[:, i] = e
        W[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return q, scale, zp


def hot_rows(w, x, n_rows: int, chunk: int = 256):
    """The ``n_rows`` rows of the head ``w`` [V, K] with the most probability mass summed over calibration
    inputs ``x`` [positions, K] (softmax of x @ w^T), most first: int64 [min(n_rows, V)]."""
    import torch

    mass = torch.zeros(w.shape[0], dtype=torch.float64)
    wf = w.float()
    with torch.no_grad():
        for i in range(0, x.shape[0], chunk):
            mass += torch.softmax(x[i:i + chunk].float() @ wf.T, -1).sum(0).double()
    return torch.argsort(mass, descending=True)[: min(n_rows, w.shape[0])]


# A matrix whose rounding error is below this fraction of its own norm (Frobenius) is on its grid: the
# Q4_1-derived SmolLM2-135M measures 4.5e-4 - 5.3e-4 per layer matrix under min-scale (only the fp16 rounding
# of the block scales), user 3000's LoRA-merged model 2.1e-3 - 9.7e-3. No correction is stored for it.
ON_GRID_REL_ERR = 1e-3


def error_correction_facts(method: str, rank: int, corrected: int, skipped: int, nbytes: int,
                           rel_before: list[float], rel_after: list[float]) -> dict:
    """The manifest's ``error_correction`` block, the same keys for every exporter: how many layer
    matrices got factors, how many were on their grid, the bytes added and the mean relative weight
    error ||W - Q(W)|| / ||W|| before and after the correction (None when nothing was corrected)."""
    mean = (lambda v: round(sum(v) / len(v), 5) if v else None)
    return {"method": method, "rank": rank, "corrected": corrected, "on_grid_skipped": skipped,
            "on_grid_rel_err": ON_GRID_REL_ERR, "bytes": int(nbytes),
            "rel_err_mean": {"before": mean(rel_before), "after": mean(rel_after)}}


def error_factors(w, wq, rank: int, floor: float = ON_GRID_REL_ERR):
    """Low-rank error compensation (LoRC, ZeroQuant-V2, Yao et al. 2023; LQER; EoRA): the best rank-``rank``
    factorization of the rounding error E = w - wq (truncated SVD, torch.linalg.svd), as A = U sqrt(S) [rows, r]
    and B = sqrt(S) V^T [r, cols] (E ~ A @ B), float32. None when the matrix is on its grid (relative error
    below ``floor``, :data:`ON_GRID_REL_ERR` by default; 0 decides nothing here). Returns (A, B,
    rel_err_before, rel_err_after) or None."""
    import torch

    w, wq = torch.as_tensor(w).double(), torch.as_tensor(wq).double()
    e = w - wq
    norm_w = float(w.norm())
    rel = float(e.norm()) / max(norm_w, 1e-30)
    if rel < floor:
        return None
    u, sv, vh = torch.linalg.svd(e, full_matrices=False)
    r = min(rank, int(sv.shape[0]))
    root = sv[:r].sqrt()
    a, b = (u[:, :r] * root).float(), (root[:, None] * vh[:r]).float()
    return a, b, rel, float((e - a.double() @ b.double()).norm()) / norm_w
