"""Console renderings of a pipeline summary and of ``cdcda pipeline status``."""

from __future__ import annotations

from .stages import STAGES

MAX_ROWS = 20


def _f(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e-2 or abs(v) >= 1e4 else f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def stage_table(title: str, stages: dict):
    from rich.table import Table

    t = Table(title=title)
    for c in ("stage", "done", "skipped", "failed", "pending", "stale"):
        t.add_column(c, justify="left" if c == "stage" else "right")
    for s in STAGES:
        row = stages.get(s, {})
        t.add_row(s, *[str(row.get(k, 0)) for k in ("done", "skipped", "failed", "pending", "stale")])
    return t


def print_status(st: dict) -> None:
    from rich.console import Console

    con = Console()
    con.print(stage_table(f"{st['users']} users in {st['out']}", st["stages"]))
    if st.get("base_packages"):
        con.print("base packages: " + ", ".join(f"{r} {s}" for r, s in st["base_packages"].items()))
    for f in st["failures"][:MAX_ROWS]:
        con.print(f"[red]failed[/] {f['task']}/{f['user']} {f['stage']} (attempts {f['attempts']}): {f['error']}",
                  highlight=False)
    if len(st["failures"]) > MAX_ROWS:
        con.print(f"... and {len(st['failures']) - MAX_ROWS} more failures")


def print_summary(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console()
    con.print(stage_table(f"{summary['users']} users, {summary['delivered']} delivered", summary["stages"]))
    t = Table(title="Personalization: held-out metric before vs after each user's LoRA (mean over users)")
    for c in ("task", "users", "metric", "base", "LoRA"):
        t.add_column(c)
    for task, r in summary["tasks"].items():
        t.add_row(task, str(r["n_metric"]), str(r["metric"] or "-"), _f(r["before"]), _f(r["after"]))
    con.print(t)
    if summary.get("fidelity"):
        ft = Table(title="Fidelity vs the eager merged model (cdcda check)")
        for c in ("user", "recipe", "gate", "max|dlogit|", "KL", "top1", "greedy", "ppl x"):
            ft.add_column(c)
        for r in summary["fidelity"][:MAX_ROWS]:
            ft.add_row(f"{r['task']}/{r['user']}", str(r["recipe"]), r["gate"],
                       *[_f(r.get(k)) for k in ("max_abs_logit_err", "mean_kl", "top1_agreement",
                                                "greedy_match_rate", "ppl_ratio")])
        con.print(ft)
    if summary.get("bench"):
        bt = Table(title="Host bench (medians)")
        for c in ("user", "recipe", "MB", "load ms", "TTFT ms", "decode tok/s", "RSS MB"):
            bt.add_column(c)
        for b in summary["bench"][:MAX_ROWS]:
            bt.add_row(f"{b['task']}/{b['user']}", str(b["recipe"]),
                       *([b["skipped"], "", "", "", ""] if "skipped" in b else
                         [_f(b.get(k)) for k in ("artifact_mb", "load_ms", "ttft_ms", "decode_tok_s", "peak_rss_mb")]))
        con.print(bt)
    for f in summary.get("failures", [])[:MAX_ROWS]:
        con.print(f"[red]failed[/] {f['task']}/{f['user']} {f['stage']}: {f['error']}", highlight=False)
    figs = ", ".join(f"{s} {v['mean_s']:.1f} s/user" for s, v in summary.get("stage_seconds", {}).items())
    con.print(f"{summary.get('executor')}; dispatched {summary.get('dispatched')} jobs; {figs}; "
              f"wall {summary.get('wall_s')} s", highlight=False)
