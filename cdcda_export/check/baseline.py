"""Compare fidelity reports with a stored baseline report; a metric worse by more than its tolerance fails.

Artifacts are matched by ``format/recipe`` + ``user_id`` + model type (a one-artifact report is
matched with a one-artifact baseline directly). Allowed worsening of a metric =
``abs + rel * |baseline|`` (:data:`TOLERANCES`, overridable per metric). Improvements never fail.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..errors import UserError
from .report import iter_reports, label
from .thresholds import DIRECTION

# metric -> (abs, rel). Noise between runs on one host is ~0; across hosts/BLAS a few ulps.
TOLERANCES: dict[str, tuple[float, float]] = {
    "max_abs_logit_err": (1e-4, 0.5),
    "mean_kl": (1e-6, 0.5),
    "top1_agreement": (0.02, 0.0),
    "greedy_match_rate": (0.05, 0.0),
    "greedy_match_rate_free": (0.1, 0.0),
    "ppl_ratio": (0.01, 0.0),
    "task_metric_drop": (0.05, 0.0),
}


def load_baseline(path: str | Path) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        raise UserError("baseline report not found", file=str(p), field="--baseline",
                        hint="write one with `cdcda check ART --report BASELINE.json` on a known-good build")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"invalid JSON: {e.msg} at line {e.lineno}", file=str(p), field="--baseline") from None
    reports = iter_reports(data)
    if not all(isinstance(r, dict) and "metrics" in r and "artifact" in r for r in reports):
        raise UserError("not a `cdcda check` report (no artifact/metrics keys)", file=str(p), field="--baseline",
                        expected="a report written by `cdcda check --report`")
    return reports


def parse_tolerances(items: list[str] | None) -> dict[str, tuple[float, float]]:
    """``["mean_kl=1e-5", "max_abs_logit_err=1e-4:0.5"]`` (abs[:rel]) -> overrides."""
    out = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or key not in TOLERANCES:
            raise UserError(f"--tolerance {item!r}: unknown metric {key!r}", field="--tolerance",
                            expected=f"KEY=ABS[:REL] with KEY one of {', '.join(TOLERANCES)}")
        try:
            parts = [float(x) for x in raw.split(":")]
        except ValueError:
            raise UserError(f"--tolerance {item!r}: not numbers", field="--tolerance", expected="ABS or ABS:REL") from None
        out[key] = (parts[0], parts[1] if len(parts) > 1 else 0.0)
    return out


def _key(r: dict) -> tuple:
    a = r.get("artifact", {})
    return (a.get("format"), a.get("recipe"), a.get("user_id"), a.get("model_type"))


def compare(reports: list[dict], baseline: list[dict], tolerances: dict | None = None) -> list[dict]:
    """Rows ``{index, label, metric, baseline, current, allowed, delta, status}`` (``index``: position in
    ``reports``); status ``regressed`` fails, ``improved`` means better by more than the tolerance."""
    tol = {**TOLERANCES, **(tolerances or {})}
    by_key = {_key(b): b for b in baseline}
    rows = []
    for idx, r in enumerate(reports):
        b = baseline[0] if len(reports) == 1 and len(baseline) == 1 else by_key.get(_key(r))
        if b is None:
            rows.append({"index": idx, "label": label(r), "metric": "*", "baseline": None, "current": None,
                         "allowed": None, "delta": None, "status": "new (no baseline)"})
            continue
        if r.get("skipped") or b.get("skipped"):
            rows.append({"index": idx, "label": label(r), "metric": "*", "baseline": None, "current": None,
                         "allowed": None, "delta": None, "status": "skipped"})
            continue
        for m, (a_tol, r_tol) in tol.items():
            cur, base = (r.get("metrics") or {}).get(m), (b.get("metrics") or {}).get(m)
            if cur is None or base is None:
                continue
            allowed = a_tol + r_tol * abs(base)
            worse = (cur - base) if DIRECTION[m] == "max" else (base - cur)
            bad = math.isnan(cur) or worse > allowed
            status = "regressed" if bad else ("improved" if worse < -allowed else "ok")
            rows.append({"index": idx, "label": label(r), "metric": m, "baseline": base, "current": cur,
                         "allowed": allowed, "delta": cur - base, "status": status})
    return rows


def regressed(rows: list[dict]) -> bool:
    return any(r["status"] == "regressed" for r in rows)


def diff_table(rows: list[dict]):
    from rich.table import Table

    t = Table(title="against the baseline")
    for c in ("artifact", "metric", "baseline", "current", "delta", "allowed worse by", "status"):
        t.add_column(c)
    for r in rows:
        st = {"regressed": "[red]regressed[/]", "improved": "[green]improved[/]"}.get(r["status"], r["status"])
        f = (lambda v: "-" if v is None else f"{v:.4g}")
        t.add_row(r["label"], r["metric"], f(r["baseline"]), f(r["current"]), f(r["delta"]), f(r["allowed"]), st)
    return t


def baseline_view(report: dict) -> dict:
    """A report without host- or run-specific fields (paths, dates), for baselines kept in a repository."""
    from .report import _round

    a = {k: v for k, v in report.get("artifact", {}).items() if k not in ("path", "created_at", "files_bytes")}
    keep = ("schema", "metrics", "thresholds", "gates", "passed", "skipped")
    out = {"artifact": a, **{k: report.get(k) for k in keep}}
    out["prompts"] = {k: v for k, v in (report.get("prompts") or {}).items() if k != "items"}
    d = report.get("divergence")
    out["divergence"] = None if not d else {k: d.get(k) for k in ("method", "first_divergent_layer", "summary")}
    return _round(out)
