#!/usr/bin/env python
"""Per-user pipeline cost: LoRA train + merge + export seconds (and peak RSS) per user.

    python benchmarks/pipeline_cost.py                         # 2 users of LaMP-3, smollm2-135m shape
    python benchmarks/pipeline_cost.py --users 3000,3001,3002 --max-steps 50 --recipe onnx/int4

Each stage runs through the CLI in its own child process (``cdcda train --users U``, ``cdcda merge``,
``cdcda export --base MERGED``), timed from outside with the child's peak RSS. Training is capped at
``--max-steps`` optimizer steps so the figure is comparable across runs; steps/s is reported so a
full schedule can be extrapolated. Writes ``benchmarks/results/pipeline_cost_<arch>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(BENCH))

from _peers import base_model  # noqa: E402
from _peers.measure import run_child  # noqa: E402
from _peers.ours import CDCDA  # noqa: E402
from _peers.report import _f  # noqa: E402


def stage(cmd: list[str], log: Path, timeout: float) -> dict:
    t = time.perf_counter()
    rc, out, maxrss_kb, hwm_kb = run_child(cmd, log=log, timeout=timeout)
    return {"seconds": time.perf_counter() - t, "peak_rss_mb": (hwm_kb or maxrss_kb) / 1024, "exit": rc,
            "ok": rc == 0, "stdout_tail": out.strip()[-400:]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="smollm2-135m")
    ap.add_argument("--task", default="LaMP-3")
    ap.add_argument("--users", default="", help="comma list of user ids (default: the first 2 of the sample)")
    ap.add_argument("--max-steps", type=int, default=20)
    ap.add_argument("--recipe", default="executorch/xnnpack-8da4w")
    ap.add_argument("--results", type=Path, default=BENCH / "results")
    ap.add_argument("--work", type=Path, default=BENCH / ".cache")
    ap.add_argument("--timeout", type=float, default=3600.0)
    args = ap.parse_args(argv)
    try:
        import cdcda_export.train  # noqa: F401 - the training API must exist
    except ImportError as e:
        print(f"training API not importable: {e}")
        return 2
    from importlib import resources

    sample = Path(str(resources.files("cdcda_export") / "assets" / "lamp_sample" / args.task))
    questions, outputs = sample / "questions.json", sample / "outputs.json"
    users = [u.strip() for u in args.users.split(",") if u.strip()] or \
        [str(q["id"]) for q in json.loads(questions.read_text())][:2]
    base = base_model.ensure_base_model(args.arch, args.work)
    work = args.work / args.arch / "pipeline_cost"
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    rows = []
    load_before = os.getloadavg()
    for u in users:
        print(f"[{time.strftime('%H:%M:%S')}] user {u}", flush=True)
        row = {"user": u}
        row["train"] = stage([CDCDA, "train", "--base", str(base), "--task", args.task, "--questions", str(questions),
                              "--outputs", str(outputs), "--out", str(work / "adapters"), "--users", u,
                              "--max-steps", str(args.max_steps), "--force"], logs / f"train_{u}.log", args.timeout)
        row["merge"] = stage([CDCDA, "merge", "--base", str(base), "--adapter", str(work / "adapters" / u),
                              "--out", str(work / "merged" / u)], logs / f"merge_{u}.log", args.timeout) \
            if row["train"]["ok"] else {"ok": False, "seconds": None, "skipped": "train failed"}
        row["export"] = stage([CDCDA, "export", "--base", str(work / "merged" / u), "--recipe", args.recipe,
                               "--out", str(work / "artifacts" / u), "--force", "--quiet"], logs / f"export_{u}.log",
                              args.timeout) if row["merge"].get("ok") else {"ok": False, "seconds": None,
                                                                             "skipped": "merge failed"}
        row["total_seconds"] = sum(row[s]["seconds"] or 0 for s in ("train", "merge", "export"))
        row["ok"] = all(row[s].get("ok") for s in ("train", "merge", "export"))
        row["train_steps_per_s"] = args.max_steps / row["train"]["seconds"] if row["train"]["ok"] else None
        print(f"    train {_f(row['train']['seconds'])} s, merge {_f(row['merge']['seconds'])} s, "
              f"export {_f(row['export']['seconds'])} s", flush=True)
        rows.append(row)
    from cdcda_export.utils import now_iso, write_json_atomic

    out = {"schema": "cdcda-pipeline-cost/1", "created_at": now_iso(), "arch": args.arch, "task": args.task,
           "max_steps": args.max_steps, "recipe": args.recipe, "loadavg_before": load_before,
           "loadavg_after": os.getloadavg(), "cpu_count": os.cpu_count(), "users": rows}
    name = f"pipeline_cost_{args.arch.replace('.', '_')}"
    args.results.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.results / f"{name}.json", out)
    L = [f"# Per-user pipeline cost: {args.arch} shape, {args.task}, {args.max_steps} LoRA steps, recipe "
         f"{args.recipe} ({out['created_at']})", "",
         f"{os.cpu_count()} cores; load average before {', '.join(_f(x) for x in load_before)}, after "
         f"{', '.join(_f(x) for x in out['loadavg_after'])}.", "",
         "| user | train s | steps/s | merge s | export s | total s | peak RSS MiB (train/merge/export) |",
         "|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        L.append(f"| {r['user']} | {_f(r['train']['seconds'])} | {_f(r['train_steps_per_s'])} | "
                 f"{_f(r['merge']['seconds'])} | {_f(r['export']['seconds'])} | {_f(r['total_seconds'])} | "
                 + "/".join(_f(r[s].get("peak_rss_mb")) for s in ("train", "merge", "export")) + " |"
                 + ("" if r["ok"] else " FAILED: see logs"))
    (args.results / f"{name}.md").write_text("\n".join(L) + "\n")
    print("\n".join(L))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
