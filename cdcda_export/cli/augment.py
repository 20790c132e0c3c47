"""``cdcda augment`` and ``cdcda serve-teacher``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from . import app


def _off_or_float(value: str, flag: str) -> float | None:
    if value.strip().lower() in ("off", "none", "no"):
        return None
    try:
        return float(value)
    except ValueError:
        from ..errors import UserError

        raise UserError(f"{flag} {value!r}", field=flag, expected="a number or 'off'") from None


@app.command("augment")
def augment_cmd(
    task: str = typer.Option(..., "--task", help="LaMP task, e.g. LaMP-3."),
    questions: Path = typer.Option(..., "--questions", help="LaMP questions JSON (users with profiles)."),
    out: Path = typer.Option(..., "--out", help="Output folder: <user>/synthetic.jsonl, augment_report.json, cache/."),
    outputs: Optional[Path] = typer.Option(None, "--outputs", help="LaMP outputs JSON (optional)."),
    teacher: str = typer.Option("offline", "--teacher", help="openai (any OpenAI-compatible endpoint) or offline."),
    base_url: Optional[str] = typer.Option(None, "--base-url", help="e.g. https://api.openai.com/v1 or http://127.0.0.1:8000/v1"),
    model: Optional[str] = typer.Option(None, "--model", help="Teacher model name as the server lists it."),
    api_key_env: Optional[str] = typer.Option(None, "--api-key-env",
                                              help="Environment variable holding the API key [default: OPENAI_API_KEY]."),
    per_user: int = typer.Option(8, "--per-user", help="Synthetic examples to keep per user (at most)."),
    per_request: int = typer.Option(4, "--per-request", help="Examples asked for in one request."),
    oversample: float = typer.Option(2.0, "--oversample", help="Ask for per-user x this many candidates."),
    shots: int = typer.Option(4, "--shots", help="Few-shot examples sampled from the profile per request."),
    concurrency: int = typer.Option(4, "--concurrency", help="Requests in flight at most."),
    max_requests: Optional[int] = typer.Option(None, "--max-requests", help="New teacher requests this run, at most."),
    max_reasks: int = typer.Option(2, "--max-reasks", help="Re-asks of a request after malformed replies."),
    temperature: float = typer.Option(0.8, "--temperature"),
    top_p: Optional[float] = typer.Option(None, "--top-p"),
    max_tokens: int = typer.Option(1024, "--max-tokens"),
    timeout: float = typer.Option(60.0, "--timeout", help="Seconds per HTTP attempt."),
    max_retries: int = typer.Option(5, "--max-retries", help="Retries on 429 / 5xx / timeouts."),
    json_mode: str = typer.Option("auto", "--json-mode", help="auto: the reply's JSON schema (response_format json_schema), falling back to json_object, "
                                   "then none, when the server refuses; on: json_object; schema: json_schema only; off."),
    redact: bool = typer.Option(True, "--redact/--no-redact", help="Redact identifiers before sending."),
    redact_names: bool = typer.Option(True, "--redact-names/--no-redact-names", help="Capitalized-name heuristic."),
    max_profile_items: int = typer.Option(32, "--max-profile-items", help="Profile items shared per user, at most."),
    min_relevance: str = typer.Option("0.15", "--min-relevance", help="MiniLM cosine to the user's centroid, or 'off'."),
    max_similarity: float = typer.Option(0.97, "--max-similarity", help="Reject near-copies of one real example."),
    near_dup: float = typer.Option(90.0, "--near-dup", help="rapidfuzz token_set_ratio threshold (0-100)."),
    balance_tolerance: str = typer.Option("0.10", "--balance-tolerance",
                                          help="Allowed rise of a label's share over the user's real share, or 'off'."),
    seed: int = typer.Option(0, "--seed"),
    user: Optional[list[str]] = typer.Option(None, "--user", help="Only these user ids (repeatable)."),
    max_users: Optional[int] = typer.Option(None, "--max-users"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Redo users already complete (cache is reused)."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Write synthetic examples in each user's style (resumable; see augment_report.json)."""
    from ..augment import AugmentConfig, FilterSettings, resolve_api_key, run_augment
    from ..augment.augmenter import Interrupted

    filters = FilterSettings(min_relevance=_off_or_float(min_relevance, "--min-relevance"),
                             max_similarity=max_similarity, near_dup_threshold=near_dup,
                             balance_tolerance=_off_or_float(balance_tolerance, "--balance-tolerance"))
    cfg = AugmentConfig(task=task, questions=questions, out=out, outputs=outputs, teacher=teacher, base_url=base_url,
                        model=model, api_key_env=api_key_env or "OPENAI_API_KEY", per_user=per_user,
                        per_request=per_request, oversample=oversample, shots=shots, concurrency=concurrency,
                        max_requests=max_requests, max_reasks=max_reasks, temperature=temperature, top_p=top_p,
                        max_tokens=max_tokens, timeout=timeout, max_retries=max_retries, json_mode=json_mode,
                        redact=redact, redact_names=redact_names, max_profile_items=max_profile_items, seed=seed,
                        users=user or None, max_users=max_users, overwrite=overwrite, filters=filters)
    cfg.check()
    key = resolve_api_key(cfg.api_key_env, explicit=api_key_env is not None) if teacher == "openai" else None

    def progress(uid: str, rep: dict) -> None:
        if not quiet:
            typer.echo(f"  user {uid}: {rep.get('status')}, kept {rep.get('kept', 0)}/{rep.get('candidates', 0)}")

    try:
        report = run_augment(cfg, api_key=key, progress=progress)
    except Interrupted as e:
        typer.secho(str(e) + "; re-run the same command to resume", err=True)
        raise typer.Exit(130) from None
    _print_summary(report)
    if report["status"] != "complete":
        typer.secho(f"status: {report['status']} (users incomplete: {len(report['users']['incomplete'])}); "
                    "re-run the same command to resume", fg=typer.colors.YELLOW, err=True)
        raise typer.Exit(1)


def _print_summary(r: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"augment {r['task']} ({r['teacher']}{' ' + r['model'] if r.get('model') else ''}): {r['status']}")
    t.add_column("item")
    t.add_column("value", justify="right")
    tr = r["this_run"]
    rows = [("users complete", f"{r['users']['complete']}/{r['users']['total']}"),
            ("requests (this run)", tr["requests"]), ("cache hits", tr["cache_hits"]), ("retries", tr["retries"]),
            ("failures", tr["failures"]), ("malformed replies", tr["malformed"]),
            ("tokens (prompt/completion)", f"{r['tokens']['prompt_tokens']}/{r['tokens']['completion_tokens']}"),
            ("candidates", r["candidates"]), ("kept", r["kept_total"])]
    rows += [(f"rejected: {k}", v) for k, v in r["filters"].items()]
    for k, v in rows:
        t.add_row(k, str(v))
    Console(stderr=False).print(t)
    typer.echo(f"report: {Path(r['out']) / 'augment_report.json'}")


@app.command("serve-teacher")
def serve_teacher_cmd(
    model: Path = typer.Option(..., "--model", help="Local Hugging Face causal-LM directory, or an artifact "
                               "directory from `cdcda export` (served on its own runtime: an int8 ONNX export "
                               "decodes several times faster than transformers fp32 on a CPU)."),
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(8000, "--port"),
    name: Optional[str] = typer.Option(None, "--name", help="Model id to serve as (default: the folder name)."),
    max_context: Optional[int] = typer.Option(None, "--max-context", help="Prompt + completion tokens, at most."),
    device: str = typer.Option("cpu", "--device", help="torch device: cpu, cuda, cuda:1, mps ... (HF directories)"),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads (default: the runtime's own)."),
    log_level: str = typer.Option("info", "--log-level"),
) -> None:
    """Serve a local HF causal LM as an OpenAI-compatible endpoint (/v1/models, /v1/chat/completions)."""
    from ..augment.serve import serve

    serve(model, host=host, port=port, model_name=name, max_context=max_context, device=device, threads=threads,
          log_level=log_level)
