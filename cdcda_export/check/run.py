"""``run_check``: check artifacts, compare with a baseline, write JSON/JUnit/Markdown, return the exit code."""

from __future__ import annotations

from pathlib import Path

from .core import CheckOptions, check_artifacts

EXIT_OK, EXIT_GATE_FAILED = 0, 1


def run_check(artifacts: list[str | Path], opts: CheckOptions, *, report: str | Path | None = None,
              junit: str | Path | None = None, markdown: str | Path | None = None,
              baseline: str | Path | None = None, tolerances: dict | None = None,
              console=None) -> int:
    """0 when every gate passes (and nothing regressed against ``baseline``), 1 otherwise."""
    from . import baseline as bl
    from . import report as rp

    base_reports = bl.load_baseline(baseline) if baseline else None   # fail fast on a bad path
    reports = check_artifacts(artifacts, opts)
    diffs = None
    if base_reports is not None:
        diffs = bl.compare(reports, base_reports, tolerances)
        for i, r in enumerate(reports):
            mine = [d for d in diffs if d["index"] == i]
            r["baseline"] = {"source": str(baseline), "regressed": bl.regressed(mine),
                             "rows": [d for d in mine if d["metric"] != "*"] or mine}
            if bl.regressed(mine):
                r["passed"] = False
    if report:
        rp.write_json(report, reports)
    if junit:
        rp.write_junit(junit, reports)
    if markdown:
        rp.write_markdown(markdown, reports, diffs)
    if console is not None:
        console.print(rp.console_table(reports))
        if diffs is not None:
            console.print(bl.diff_table(diffs))
        for line in rp.iter_failures(reports):
            console.print(f"[red]FAIL[/] {line}")
        for r in reports:
            if r.get("skipped"):
                console.print(f"[yellow]skipped[/] {rp.label(r)}: {r['skipped']['reason']}")
    return EXIT_OK if all(r.get("passed") for r in reports) else EXIT_GATE_FAILED
