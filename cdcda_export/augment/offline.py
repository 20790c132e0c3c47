"""Offline augmenter: no LLM, only the user's own examples (EDA-style, deterministic with a seed).

Operations (Wei & Zou 2019, "EDA", without the WordNet synonym step, which needs a lexicon we do
not ship): random swap, random deletion, and random insertion of words drawn from the user's own
vocabulary; plus **recombination**: the first half of one example's clauses joined to the second
half of another example's clauses *with the same output label* (classification tasks only, so the
label stays true). Outputs are copied from the source example, so generation tasks get perturbed
inputs with the user's own outputs. The result is deliberately modest: it is the baseline the
teacher must beat in ``benchmarks/augmentation_ablation.py``.
"""

from __future__ import annotations

import random
import re
from collections import defaultdict
from typing import Callable, Sequence

_CLAUSE = re.compile(r"(?<=[.!?,;])\s+")


def _words(text: str) -> list[str]:
    return text.split()


def _swap(words: list[str], rng: random.Random, n: int) -> list[str]:
    w = list(words)
    for _ in range(n):
        if len(w) < 2:
            break
        a, b = rng.randrange(len(w)), rng.randrange(len(w))
        w[a], w[b] = w[b], w[a]
    return w


def _delete(words: list[str], rng: random.Random, p: float) -> list[str]:
    if len(words) <= 3:
        return list(words)
    kept = [x for x in words if rng.random() > p]
    return kept or [rng.choice(words)]


def _insert(words: list[str], vocab: Sequence[str], rng: random.Random, n: int) -> list[str]:
    w = list(words)
    for _ in range(n):
        if not vocab:
            break
        w.insert(rng.randrange(len(w) + 1), rng.choice(vocab))
    return w


def _recombine(a: str, b: str) -> str | None:
    """First half of ``a``'s clauses + second half of ``b``'s (None when that is just a or b)."""
    sa, sb = _CLAUSE.split(a.strip()), _CLAUSE.split(b.strip())
    if len(sa) < 2 or len(sb) < 2:
        return None
    out = " ".join(sa[: (len(sa) + 1) // 2] + sb[(len(sb) + 1) // 2:])
    return None if out in (a.strip(), b.strip()) else out


def offline_examples(pairs: Sequence[tuple[str, str]], k: int, *, seed: int, alpha: float = 0.2,
                     classification: bool = True,
                     editable: Callable[[str], tuple[str, Callable[[str], str]]] | None = None) -> list[dict]:
    """Up to ``k`` perturbed/recombined examples from the user's real ``pairs`` (deterministic).

    ``editable(input) -> (text, rebuild)`` limits the perturbation to one part of a structured
    input (LaMP-1 questions: the paper title slot); by default the whole input is edited.
    """
    rng = random.Random(seed)
    if not pairs:
        return []
    editable = editable or (lambda s: (s, lambda t: t))
    parts = [(editable(i), o) for i, o in pairs]
    vocab = sorted({w for (t, _), _ in parts for w in _words(t) if w.isalpha() and len(w) > 3})
    by_label: dict[str, list[str]] = defaultdict(list)
    for (t, _), o in parts:
        by_label[o].append(t)
    out: list[dict] = []
    tries = 0
    while len(out) < k and tries < 8 * k + 16:
        tries += 1
        (inp, rebuild), label = parts[rng.randrange(len(parts))]
        op = rng.choice(("swap", "delete", "insert", "recombine") if classification else ("swap", "delete", "insert"))
        words = _words(inp)
        n = max(1, int(alpha * len(words)))
        new: str | None
        if op == "recombine":
            partners = [x for x in by_label[label] if x != inp]
            new = _recombine(inp, rng.choice(partners)) if partners else None
        elif op == "swap":
            new = " ".join(_swap(words, rng, n))
        elif op == "delete":
            new = " ".join(_delete(words, rng, alpha))
        else:
            new = " ".join(_insert(words, vocab, rng, n))
        if new and new != inp:
            out.append({"input": rebuild(new), "output": label, "op": op})
    return out
