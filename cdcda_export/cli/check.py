"""``cdcda check``: the fidelity gate (thin wrapper over :func:`cdcda_export.check.run_check`)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from . import app


@app.command("check")
def check_cmd(
    artifacts: List[Path] = typer.Argument(..., help="Artifact directories (several of one user: one cross-format table)."),
    report: Path = typer.Option(..., "--report", help="Fidelity report JSON to write."),
    junit: Optional[Path] = typer.Option(None, "--junit", help="JUnit XML: one test case per artifact x metric."),
    markdown: Optional[Path] = typer.Option(None, "--markdown", help="Markdown summary (e.g. for a CI job summary)."),
    task: Optional[str] = typer.Option(None, help="LaMP task of the user's held-out queries (LaMP-1 ... LaMP-7)."),
    questions: Optional[Path] = typer.Option(None, help="LaMP *_questions.json holding the artifact's user."),
    outputs: Optional[Path] = typer.Option(None, help="LaMP *_outputs.json (golds: enables the task metric)."),
    prompts: Optional[Path] = typer.Option(None, help="Prompt file (.txt one per line, or .json/.jsonl) replacing the generic set."),
    generic: bool = typer.Option(True, "--generic/--no-generic", help="Include the shipped generic prompts."),
    baseline: Optional[Path] = typer.Option(None, help="Stored report to compare with; a worse metric beyond tolerance fails."),
    threshold: Optional[List[str]] = typer.Option(None, "--threshold", help="Override a gate: KEY=VALUE (VALUE null = off), repeatable."),
    tolerance: Optional[List[str]] = typer.Option(None, "--tolerance", help="Baseline tolerance: KEY=ABS[:REL], repeatable."),
    max_new_tokens: int = typer.Option(16, help="Generated tokens per prompt for the greedy match rates."),
    max_prompt_tokens: int = typer.Option(96, help="Prompts are cut from the left to this many tokens."),
    max_heldout: int = typer.Option(8, help="Held-out user pairs to use (0: only the LaMP query)."),
    base: Optional[Path] = typer.Option(None, help="The base model, when it moved since export (hash must match)."),
    adapter: Optional[Path] = typer.Option(None, help="The adapter, when it moved since export (hash must match)."),
    threads: int = typer.Option(1, help="Runtime threads (1 keeps numbers reproducible)."),
    seed: int = typer.Option(0, help="Seed of the held-out subset (when a user has more than --max-heldout)."),
    localise: str = typer.Option("on-fail", help="Divergence localisation: on-fail, always or never."),
):
    """Compare artifacts with the eager merged model they came from; exit 1 when a gate fails."""
    from rich.console import Console

    from ..check import CheckOptions, run_check
    from ..check.baseline import parse_tolerances
    from ..check.thresholds import parse_cli_thresholds
    from ..errors import UserError

    if localise not in ("on-fail", "always", "never"):
        raise UserError(f"--localise {localise!r} is not allowed", field="--localise", expected="on-fail, always or never")
    console = Console()
    if not console.is_terminal:  # CI logs: wide enough for the cross-format table
        console = Console(width=max(console.width, 160))
    opts = CheckOptions(task=task, questions=questions, outputs=outputs, prompts_file=prompts, generic=generic,
                        max_new_tokens=max_new_tokens, max_prompt_tokens=max_prompt_tokens, max_heldout=max_heldout,
                        thresholds=parse_cli_thresholds(threshold), base=base, adapter=adapter, threads=threads, seed=seed,
                        localise=localise, log=lambda m: console.print(f"[dim]{m}[/]"))
    code = run_check(artifacts, opts, report=report, junit=junit, markdown=markdown, baseline=baseline,
                     tolerances=parse_tolerances(tolerance), console=console)
    console.print(f"report: {report}" + (f", junit: {junit}" if junit else "") + (f", markdown: {markdown}" if markdown else ""))
    raise typer.Exit(code)
