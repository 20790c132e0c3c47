"""Fidelity metrics over next-token logits (numpy only; float64 math, so the numbers are the data's).

All functions take the reference and artifact logits of the *same* positions, ``[T, vocab]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    m = x.max(axis=-1, keepdims=True)
    z = x - m
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def kl_per_position(ref: np.ndarray, art: np.ndarray) -> np.ndarray:
    """KL(ref || art) of the next-token distributions at each position, [T] (nats)."""
    lp, lq = log_softmax(ref), log_softmax(art)
    return np.maximum((np.exp(lp) * (lp - lq)).sum(axis=-1), 0.0)


def nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Negative log-likelihood of ``targets`` [T] under ``logits`` [T, vocab]."""
    lp = log_softmax(logits)
    return -lp[np.arange(len(targets)), np.asarray(targets)]


def prefix_match(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@dataclass
class PromptResult:
    """Per-prompt numbers, kept so the aggregate and the report's per-prompt rows agree."""

    prompt_id: str
    kind: str
    prompt_tokens: int
    new_tokens: int
    max_abs_err: float
    max_abs_err_prefill: float
    max_abs_err_decode: float
    worst_position: int
    kl_sum: float
    positions: int
    top1_same: int
    gen_same: int          # teacher-forced argmax agreement on generated positions
    free_prefix: int       # free-running: tokens equal to the reference's greedy continuation, from the start
    nll_ref: float
    nll_art: float
    nll_tokens: int
    first_divergent_position: int | None = None   # first position whose abs err exceeds the threshold

    def to_row(self) -> dict:
        return {"id": self.prompt_id, "kind": self.kind, "prompt_tokens": self.prompt_tokens,
                "new_tokens": self.new_tokens, "max_abs_logit_err": self.max_abs_err,
                "max_abs_logit_err_prefill": self.max_abs_err_prefill,
                "max_abs_logit_err_decode": self.max_abs_err_decode, "worst_position": self.worst_position,
                "mean_kl": self.kl_sum / max(self.positions, 1),
                "top1_agreement": self.top1_same / max(self.positions, 1),
                "greedy_match_rate": self.gen_same / max(self.new_tokens, 1),
                "greedy_match_rate_free": self.free_prefix / max(self.new_tokens, 1),
                "first_divergent_position": self.first_divergent_position}


def compare_prompt(prompt_id: str, kind: str, prompt_len: int, ref: np.ndarray, art: np.ndarray,
                   ref_tokens: list[int], free_tokens: list[int], seq: list[int],
                   err_threshold: float | None = None) -> PromptResult:
    """Compare teacher-forced logits of one prompt.

    ``ref``/``art``: [P + N - 1, vocab] logits at positions 0 .. P+N-2 of ``seq`` (= prompt + the
    reference's greedy continuation); rows >= P-1 predict the N generated tokens. ``free_tokens``: the
    artifact's own free-running greedy continuation.
    """
    ref = np.asarray(ref, dtype=np.float64)
    art = np.asarray(art, dtype=np.float64)
    if ref.shape != art.shape:
        raise ValueError(f"logit shapes differ: reference {ref.shape}, artifact {art.shape}")
    err = np.abs(ref - art).max(axis=-1)
    kl = kl_per_position(ref, art)
    same = ref.argmax(-1) == art.argmax(-1)
    n_new = len(ref_tokens)
    gen_rows = slice(prompt_len - 1, prompt_len - 1 + n_new)
    targets = np.asarray(seq[1:prompt_len])                # tokens predicted inside the prompt
    nll_r = nll(ref[: prompt_len - 1], targets) if prompt_len > 1 else np.zeros(0)
    nll_a = nll(art[: prompt_len - 1], targets) if prompt_len > 1 else np.zeros(0)
    first_div = None
    if err_threshold is not None:
        over = np.nonzero(err > err_threshold)[0]
        first_div = int(over[0]) if len(over) else None
    return PromptResult(
        prompt_id=prompt_id, kind=kind, prompt_tokens=prompt_len, new_tokens=n_new,
        max_abs_err=float(err.max()), max_abs_err_prefill=float(err[: prompt_len].max()),
        max_abs_err_decode=float(err[prompt_len:].max()) if len(err) > prompt_len else 0.0,
        worst_position=int(err.argmax()), kl_sum=float(kl.sum()), positions=int(len(err)),
        top1_same=int(same.sum()), gen_same=int(same[gen_rows].sum()),
        free_prefix=prefix_match(free_tokens, ref_tokens), nll_ref=float(nll_r.sum()), nll_art=float(nll_a.sum()),
        nll_tokens=int(len(targets)), first_divergent_position=first_div)


@dataclass
class Aggregate:
    results: list[PromptResult] = field(default_factory=list)

    def metrics(self) -> dict:
        rs = self.results
        pos = sum(r.positions for r in rs)
        gen = sum(r.new_tokens for r in rs)
        ntok = sum(r.nll_tokens for r in rs)
        ppl_ref = math.exp(sum(r.nll_ref for r in rs) / ntok) if ntok else float("nan")
        ppl_art = math.exp(sum(r.nll_art for r in rs) / ntok) if ntok else float("nan")
        return {
            "max_abs_logit_err": max((r.max_abs_err for r in rs), default=float("nan")),
            "max_abs_logit_err_prefill": max((r.max_abs_err_prefill for r in rs), default=float("nan")),
            "max_abs_logit_err_decode": max((r.max_abs_err_decode for r in rs), default=float("nan")),
            "mean_kl": sum(r.kl_sum for r in rs) / pos if pos else float("nan"),
            "top1_agreement": sum(r.top1_same for r in rs) / pos if pos else float("nan"),
            "greedy_match_rate": sum(r.gen_same for r in rs) / gen if gen else float("nan"),
            "greedy_match_rate_free": (sum(r.free_prefix / r.new_tokens for r in rs if r.new_tokens)
                                       / max(sum(1 for r in rs if r.new_tokens), 1)),
            "ppl_ref": ppl_ref,
            "ppl_artifact": ppl_art,
            "ppl_ratio": ppl_art / ppl_ref if ntok else float("nan"),
            "positions": pos,
            "generated_tokens": gen,
        }
