"""Renderings of fidelity reports: JSON (the contract), JUnit XML (CI), Markdown and the console table.

JSON is deterministic for the same inputs: floats are rounded to 7 significant digits (so a last-ulp
wobble does not change the file), keys keep a fixed order and nothing time-dependent is written.
One artifact -> the report object itself; several -> ``{"schema", "passed", "reports": [...],
"table": [...]}``. :func:`iter_reports` reads either shape.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable
from xml.sax.saxutils import quoteattr

from ..utils import write_json_atomic, write_text_atomic

TABLE_METRICS = ("max_abs_logit_err", "mean_kl", "top1_agreement", "greedy_match_rate", "greedy_match_rate_free",
                 "ppl_ratio", "task_metric_ref", "task_metric_artifact")


def _round(x: Any) -> Any:
    if isinstance(x, float):
        if math.isnan(x) or math.isinf(x):
            return None if math.isnan(x) else x
        if x == 0.0:
            return 0.0
        return float(f"{x:.7g}")
    if isinstance(x, dict):
        return {k: _round(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_round(v) for v in x]
    if hasattr(x, "item") and callable(x.item):   # numpy scalars
        return _round(x.item())
    return x


def label(report: dict) -> str:
    a = report.get("artifact", {})
    return f"{a.get('format')}/{a.get('recipe')}" + (f" [{a.get('user_id')}]" if a.get("user_id") else "")


def table_rows(reports: list[dict]) -> list[dict]:
    rows = []
    for r in reports:
        m = r.get("metrics") or {}
        row = {"artifact": r["artifact"]["path"], "label": label(r),
               "status": "skipped" if r.get("skipped") else ("pass" if r.get("passed") else "FAIL")}
        row.update({k: m.get(k) for k in TABLE_METRICS})
        row["failed"] = [g["metric"] for g in r.get("gates", []) if not g["passed"]] + \
            [k for k, c in (r.get("checks") or {}).items() if not c.get("passed")]
        rows.append(row)
    return rows


def bundle(reports: list[dict]) -> dict:
    if len(reports) == 1:
        return _round(reports[0])
    return _round({"schema": reports[0].get("schema"), "passed": all(r.get("passed") for r in reports),
                   "reports": reports, "table": table_rows(reports)})


def iter_reports(data: dict) -> list[dict]:
    """The per-artifact reports of a report file (single or bundled)."""
    if "reports" in data:
        return list(data["reports"])
    return [data]


def write_json(path: str | Path, reports: list[dict]) -> None:
    write_json_atomic(path, bundle(reports))


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def write_junit(path: str | Path, reports: list[dict]) -> None:
    """One <testsuite> per artifact, one <testcase> per artifact x metric gate (and per structural check)."""
    suites = []
    total = fails = skips = 0
    labels = [label(r) for r in reports]
    for r in reports:
        name = label(r)
        if labels.count(name) > 1:            # two artifacts of one recipe: tell them apart by folder
            name += f" ({Path(r['artifact']['path']).name})"
        cases = []
        for g in r.get("gates", []):
            body = ""
            if not g["passed"]:
                msg = f"{g['metric']} = {_fmt(g['value'])}, expected {g['op']} {_fmt(g['threshold'])}"
                body = (f'<failure message={quoteattr(msg)} type="FidelityGate">'
                        f'{_xml_text(_divergence_text(r))}</failure>')
            cases.append((g["metric"], body))
        for k, c in (r.get("checks") or {}).items():
            body = "" if c.get("passed") else (
                f'<failure message={quoteattr("; ".join(c.get("problems") or [k])[:500])} type="StructuralCheck"/>')
            cases.append((k, body))
        if r.get("skipped"):
            from .thresholds import GATED

            reason = r["skipped"].get("reason", "skipped")
            for m in GATED:
                if r.get("thresholds", {}).get(m) is not None:
                    cases.append((m, f"<skipped message={quoteattr(reason)}/>"))
        lines = []
        for case, body in cases:
            total += 1
            fails += "<failure" in body
            skips += "<skipped" in body
            lines.append(f'    <testcase classname={quoteattr("cdcda.fidelity." + name)} name={quoteattr(case)}>'
                         f"{body}</testcase>")
        nf = sum("<failure" in b for _, b in cases)
        ns = sum("<skipped" in b for _, b in cases)
        suites.append(f'  <testsuite name={quoteattr(name)} tests="{len(cases)}" failures="{nf}" errors="0" '
                      f'skipped="{ns}">\n' + "\n".join(lines) + "\n  </testsuite>")
    xml = (f'<?xml version="1.0" encoding="UTF-8"?>\n<testsuites name="cdcda check" tests="{total}" '
           f'failures="{fails}" errors="0" skipped="{skips}">\n' + "\n".join(suites) + "\n</testsuites>\n")
    write_text_atomic(path, xml)


def _xml_text(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _divergence_text(r: dict) -> str:
    d = r.get("divergence") or {}
    return d.get("summary", "") if d else ""


def markdown(reports: list[dict], baseline_diffs: list[dict] | None = None) -> str:
    out = ["# Fidelity check", ""]
    refs = {json.dumps(r.get("reference", {}).get("base_model"), sort_keys=True) +
            json.dumps(r.get("reference", {}).get("adapter"), sort_keys=True): r for r in reports}
    for r in refs.values():
        ref = r.get("reference", {})
        ad = ref.get("adapter")
        out.append(f"Reference: base `{(ref.get('base_model') or {}).get('sha256', '')[:12]}`"
                   + (f" + adapter `{ad['sha256'][:12]}`" if ad else " (no adapter)")
                   + ", eager PyTorch float32, hashes verified.")
    out += ["", "| artifact | status | " + " | ".join(TABLE_METRICS) + " | failed |",
            "|---|---|" + "---|" * len(TABLE_METRICS) + "---|"]
    for row in table_rows(reports):
        out.append(f"| {row['label']} | {row['status']} | " + " | ".join(_fmt(row[k]) for k in TABLE_METRICS)
                   + f" | {', '.join(row['failed']) or '-'} |")
    for r in reports:
        if r.get("skipped"):
            out += ["", f"**{label(r)}** skipped: {r['skipped']['reason']}"]
        d = r.get("divergence")
        if d:
            out += ["", f"**{label(r)}** divergence ({d.get('method')}): {d.get('summary')}"]
    if baseline_diffs:
        out += ["", "## Against the baseline", "", "| artifact | metric | baseline | current | allowed | status |",
                "|---|---|---|---|---|---|"]
        for d in baseline_diffs:
            out.append(f"| {d['label']} | {d['metric']} | {_fmt(d['baseline'])} | {_fmt(d['current'])} | "
                       f"{_fmt(d['allowed'])} | {d['status']} |")
    return "\n".join(out) + "\n"


def write_markdown(path: str | Path, reports: list[dict], baseline_diffs: list[dict] | None = None) -> None:
    write_text_atomic(path, markdown(reports, baseline_diffs))


def console_table(reports: list[dict]):
    """A rich Table: one row per artifact against its reference (the cross-format view)."""
    from rich.table import Table

    t = Table(title="fidelity vs eager merged model", show_lines=False)
    for col in ("artifact", "status", "max|dlogit|", "mean KL", "top-1", "greedy TF", "greedy free", "ppl ratio",
                "task ref/art", "failed"):
        t.add_column(col, justify="right" if col not in ("artifact", "failed") else "left")
    for row in table_rows(reports):
        status = {"pass": "[green]pass[/]", "FAIL": "[red]FAIL[/]", "skipped": "[yellow]skipped[/]"}[row["status"]]
        task = (f"{_fmt(row['task_metric_ref'])}/{_fmt(row['task_metric_artifact'])}"
                if row["task_metric_ref"] is not None else "-")
        t.add_row(f"{Path(row['artifact']).name} ({row['label']})", status, _fmt(row["max_abs_logit_err"]), _fmt(row["mean_kl"]),
                  _fmt(row["top1_agreement"]), _fmt(row["greedy_match_rate"]), _fmt(row["greedy_match_rate_free"]),
                  _fmt(row["ppl_ratio"]), task, ", ".join(row["failed"]) or "-")
    return t


def iter_failures(reports: Iterable[dict]) -> list[str]:
    out = []
    for r in reports:
        for g in r.get("gates", []):
            if not g["passed"]:
                out.append(f"{label(r)}: {g['metric']} = {_fmt(g['value'])} (expected {g['op']} {_fmt(g['threshold'])}, "
                           f"threshold from {g['source']})")
        for k, c in (r.get("checks") or {}).items():
            if not c.get("passed"):
                out.append(f"{label(r)}: {k}: {'; '.join(c.get('problems') or [])}")
        d = r.get("divergence")
        if d and d.get("summary"):
            out.append(f"{label(r)}: divergence: {d['summary']}")
    return out
