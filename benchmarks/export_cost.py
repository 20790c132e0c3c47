#!/usr/bin/env python
"""Export cost per recipe: wall seconds, peak RSS of the exporting process and artifact size.

    python benchmarks/export_cost.py                          # every shipped recipe, smollm2-135m shape
    python benchmarks/export_cost.py --only executorch/xnnpack-8da4w,onnx/int4

Each recipe runs as ``cdcda export --base B --recipe R --out A --force`` in its own child process;
the child's peak RSS is read from outside (``os.wait4`` ru_maxrss / VmHWM). The artifacts land where
``benchmarks/peers.py`` looks for them, so a peers run right after reuses them.
Writes ``benchmarks/results/export_cost_<arch>.{json,md}``; the target of issue 7 is <= 120 s and
peak RSS <= 2x the fp32 weight bytes per recipe.
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

from _peers import base_model, ours, roofline  # noqa: E402
from _peers.report import TARGET_EXPORT_RSS_X, TARGET_EXPORT_S, _f  # noqa: E402


def all_recipes() -> list[str]:
    from cdcda_export.export.registry import list_recipes

    return [e.key for e in list_recipes()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="smollm2-135m")
    ap.add_argument("--only", default="", help="comma list of recipe names (default: all shipped recipes)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--results", type=Path, default=BENCH / "results")
    ap.add_argument("--work", type=Path, default=BENCH / ".cache")
    ap.add_argument("--timeout", type=float, default=3600.0)
    ap.add_argument("--collect", action="store_true",
                    help="do not export: collect the costs recorded when the cached artifacts were made")
    args = ap.parse_args(argv)
    keys = [k.strip() for k in args.only.split(",") if k.strip()] or all_recipes()
    base = base_model.ensure_base_model(args.arch, args.work, seed=args.seed)
    fp32 = roofline.hf_weight_bytes_per_token(base)["total_weight_bytes"]
    limit_rss = TARGET_EXPORT_RSS_X * fp32 / (1 << 20)
    work = args.work / args.arch
    (work / "logs").mkdir(parents=True, exist_ok=True)
    rows = []
    load_before = os.getloadavg()
    for key in keys:
        art = work / "ours" / key.replace("/", "__")
        if not args.collect:
            print(f"[{time.strftime('%H:%M:%S')}] cdcda export --recipe {key}", flush=True)
        la = os.getloadavg()
        side = art.with_name(art.name + ".export.json")
        if args.collect:      # no exporting: the cost recorded when the artifact was made
            if not side.exists():
                continue
            r = json.loads(side.read_text())
            la = r.get("loadavg_before", [None])
        else:
            r = ours.export(base, key, art, work / "logs" / f"export_{key.replace('/', '__')}.log", force=True,
                            timeout=args.timeout)
            if r.get("ok"):
                side.write_text(json.dumps({**r, "loadavg_before": la}, indent=2))
        r["loadavg_before"] = la
        if not r.get("ok"):
            r["error"] = r.get("stdout") or f"exit {r.get('exit')} (log {work / 'logs'})"
        r["meets_time"] = r.get("ok") and r["seconds"] <= TARGET_EXPORT_S
        r["meets_rss"] = r.get("ok") and r["peak_rss_mb"] <= limit_rss
        print(f"    {'ok' if r.get('ok') else 'FAILED'} {_f(r['seconds'])} s, peak RSS {_f(r['peak_rss_mb'])} MiB, "
              f"{_f(r.get('artifact_mb'))} MB", flush=True)
        rows.append(r)
    # merge with an earlier file: re-measured recipes replace their rows, the others are kept
    name = f"export_cost_{args.arch.replace('.', '_')}"
    prev = args.results / f"{name}.json"
    if prev.exists():
        try:
            old_rows = [r for r in json.loads(prev.read_text()).get("recipes", []) if r["recipe"] not in keys]
            rows = old_rows + rows
        except (ValueError, KeyError):
            pass
    out = {"schema": "cdcda-export-cost/1", "arch": args.arch, "base_model": str(base),
           "fp32_weight_bytes": fp32, "limits": {"seconds": TARGET_EXPORT_S, "peak_rss_mb": limit_rss},
           "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "cpu_count": os.cpu_count(),
           "recipes": rows}
    from cdcda_export.utils import now_iso, write_json_atomic

    out["created_at"] = now_iso()
    args.results.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.results / f"{name}.json", out)
    L = [f"# Export cost: {args.arch} shape ({out['created_at']})", "",
         f"Limits (issue 7): <= {TARGET_EXPORT_S:.0f} s and peak RSS <= {TARGET_EXPORT_RSS_X:.0f}x fp32 weights "
         f"= {limit_rss:.0f} MiB. {os.cpu_count()} cores; load average before {', '.join(_f(x) for x in load_before)}, "
         f"after {', '.join(_f(x) for x in out['loadavg_after'])}.", "",
         "| recipe | seconds | peak RSS MiB | artifact MB | <= 120 s | RSS <= 2x fp32 | load avg at start |",
         "|---|---:|---:|---:|:---:|:---:|---:|"]
    for r in rows:
        yn = lambda b: "yes" if b else "**no**"  # noqa: E731
        L.append(f"| {r['recipe']} | {_f(r['seconds'])} | {_f(r['peak_rss_mb'])} | {_f(r.get('artifact_mb'))} | "
                 f"{yn(r['meets_time'])} | {yn(r['meets_rss'])} | {_f(r['loadavg_before'][0])} |"
                 + ("" if r.get("ok") else f" failed: {str(r.get('error'))[:200]}"))
    (args.results / f"{name}.md").write_text("\n".join(L) + "\n")
    print("\n".join(L))
    return 0 if all(r.get("ok") for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
