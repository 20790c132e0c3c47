"""``cdcda bench-compare BASE NEW --max-regression 10%``: regression gate that noise alone cannot trip.

Rule, per metric (speed: higher is better; latency, memory, size: lower is better):

    a metric REGRESSED when even the best sample of NEW is worse than BASE's median
    by more than the bound:
        lower-is-better:   min(NEW.samples) > median(BASE) * (1 + bound)
        higher-is-better:  max(NEW.samples) < median(BASE) * (1 - bound)

So one slow run in NEW (a noisy neighbour, a page-cache miss) cannot fail the gate: the whole
NEW sample range must sit beyond the bound. With a single sample per side it reduces to a plain
relative comparison. Results are paired by ``artifact@device`` (files may hold lists); results
on an emulated device are compared but never fail the gate unless ``--include-emulated``
(emulated timings measure the emulator). Memory (``peak_rss_mb``) and size use the same rule.

``--github-json F`` writes github-action-benchmark's custom formats for NEW: ``F`` with the
smaller-is-better metrics (``tool: customSmallerIsBetter``) and ``F`` with ``.bigger`` before the
suffix for tokens/s (``tool: customBiggerIsBetter``); entries are ``{name, unit, value, range, extra}``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from cdcda_export.errors import UserError

from .schema import HIGHER_IS_BETTER, METRICS, UNITS, result_key


def parse_bound(text: str | float) -> float:
    """``"10%"`` / ``"0.1"`` / ``10`` -> 0.10."""
    if isinstance(text, (int, float)):
        v = float(text)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(%?)\s*", str(text))
        if not m:
            raise UserError(f"bad bound {text!r}", field="--max-regression", expected="a percentage like 10%")
        v = float(m.group(1)) / 100 if m.group(2) else float(m.group(1))
    if v > 1 and not (isinstance(text, str) and "%" in text):
        v = v / 100  # "10" means 10%
    if not 0 <= v < 1:
        raise UserError(f"bound {text!r} out of range", field="--max-regression", expected="0% <= bound < 100%")
    return v


@dataclass
class Verdict:
    key: str
    metric: str
    base_median: float | None
    new_median: float | None
    new_best: float | None
    change: float | None      # relative change of medians, signed (+ = bigger)
    regressed: bool
    gated: bool               # counts toward the exit code
    note: str = ""

    def line(self) -> str:
        if self.base_median is None or self.new_median is None:
            return f"{self.key:40s} {self.metric:14s} n/a ({self.note})"
        arrow = "REGRESSED" if self.regressed else "ok"
        if self.regressed and not self.gated:
            arrow = "regressed (not gated)"
        return (f"{self.key:40s} {self.metric:14s} {self.base_median:10.3f} -> {self.new_median:10.3f} "
                f"{UNITS[self.metric]:6s} ({self.change:+.1%}) best {self.new_best:.3f}  {arrow}")


def compare_one(base: dict, new: dict, bound: float, *, include_emulated: bool = False,
                metrics: tuple[str, ...] = METRICS) -> list[Verdict]:
    key = result_key(new)
    emulated = bool(new["device"].get("emulated"))
    out = []
    for m in metrics:
        b, n = base["metrics"].get(m) or {}, new["metrics"].get(m) or {}
        bm, ns = b.get("median"), [s for s in (n.get("samples") or []) if s is not None]
        if bm is None or not ns:
            out.append(Verdict(key, m, bm, n.get("median"), None, None, False, False, "missing samples"))
            continue
        hib = HIGHER_IS_BETTER[m]
        best = max(ns) if hib else min(ns)
        regressed = best < bm * (1 - bound) if hib else best > bm * (1 + bound)
        change = (n["median"] - bm) / bm if bm else 0.0
        out.append(Verdict(key, m, bm, n["median"], best, change, regressed, regressed and (include_emulated or not emulated)))
    return out


def compare(base: list[dict], new: list[dict], bound: float, *, include_emulated: bool = False) -> tuple[list[Verdict], list[str]]:
    """Pair results by ``artifact@device``; returns (verdicts, unmatched keys)."""
    bmap = {result_key(r): r for r in base}
    verdicts: list[Verdict] = []
    unmatched = []
    for r in new:
        k = result_key(r)
        if k not in bmap:
            if len(base) == 1 and len(new) == 1:  # one vs one: compare even if names differ
                verdicts += compare_one(base[0], r, bound, include_emulated=include_emulated)
            else:
                unmatched.append(k)
            continue
        verdicts += compare_one(bmap[k], r, bound, include_emulated=include_emulated)
    return verdicts, unmatched


def github_entries(results: list[dict]) -> tuple[list[dict], list[dict]]:
    """(smaller-is-better entries, bigger-is-better entries) for github-action-benchmark."""
    smaller, bigger = [], []
    for r in results:
        k = result_key(r)
        extra = f"device={r['device'].get('kind')} arch={r['device'].get('arch')} emulated={r['device'].get('emulated')}"
        for m in METRICS:
            s = r["metrics"].get(m) or {}
            if s.get("median") is None:
                continue
            e = {"name": f"{k} {m}", "unit": UNITS[m], "value": round(float(s["median"]), 4),
                 "range": f"{s['min']:.4g}..{s['max']:.4g}", "extra": f"{extra} samples={len(s.get('samples') or [])}"}
            (bigger if HIGHER_IS_BETTER[m] else smaller).append(e)
    return smaller, bigger


def bigger_path(path: str | Path) -> Path:
    p = Path(path)
    return p.with_name(p.stem + ".bigger" + (p.suffix or ".json"))


def write_github_json(results: list[dict], path: str | Path) -> tuple[Path, Path]:
    from cdcda_export.utils import write_json_atomic

    smaller, bigger = github_entries(results)
    write_json_atomic(path, smaller)
    bp = bigger_path(path)
    write_json_atomic(bp, bigger)
    return Path(path), bp


def load_pair(base_path: str | Path, new_path: str | Path) -> tuple[list[dict], list[dict]]:
    from .schema import load_results

    return load_results(base_path), load_results(new_path)


def dumps(verdicts: list[Verdict]) -> str:
    return json.dumps([v.__dict__ for v in verdicts], indent=1)
