"""One table from the per-task augmentation ablation runs on a real base (``benchmarks/augmentation_ablation.py``).

    python benchmarks/ablation_summary.py \\
        [--inputs 'benchmarks/results/augmentation_ablation_smollm2-135m-instruct*.json'] \\
        [--out benchmarks/results/augmentation_ablation_summary_smollm2-135m-instruct]

Per (task, seed) run, the four rows held-out / query, the users, the teacher, and two readings:

* LoRA vs base: does per-user LoRA on real data beat the base on held-out pairs?
* synthetic vs real: does real + offline or real + teacher data beat LoRA on real data alone?

Each run reports mean metrics only, so no test of significance is possible from them; the table gives the
held-out pairs per run so the reader can judge the resolution (with 4 users x 4 pairs, one pair moves an
accuracy by 1/16). Writes ``OUT.md`` and ``OUT.json``.
"""

from __future__ import annotations

import argparse
import glob
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ("base", "lora real", "lora real+offline", "lora real+teacher")


def load_runs(pattern: str) -> list[dict]:
    runs = []
    for f in sorted(glob.glob(pattern)):
        d = json.loads(Path(f).read_text(encoding="utf-8"))
        if "rows" not in d or "args" not in d:
            continue
        by_task: dict[str, dict] = {}
        for r in d["rows"]:
            by_task.setdefault(r["task"], {})[r["config"]] = r
        for task, rows in by_task.items():
            if "base" not in rows or "lora real" not in rows:
                continue
            runs.append({"file": Path(f).name, "task": task, "seed": int(d["args"].get("seed", 0)),
                         "sample": d["args"].get("sample") or "shipped (4 users)",
                         "teacher": d["args"].get("teacher_model") if d["args"].get("teacher_model") not in (None, "None")
                         else None, "created_at": d.get("created_at"),
                         "rows": rows})
    return sorted(runs, key=lambda r: (int(r["task"].split("-")[1]), r["seed"], r["file"]))


def better(a: float | None, b: float | None, higher: bool) -> bool | None:
    if a is None or b is None:
        return None
    return a > b if higher else a < b


def summarize(run: dict) -> dict:
    rows = run["rows"]
    base = rows["base"]
    hi = bool(base["higher_is_better"])
    real = rows["lora real"]["heldout"]
    syn = {c.split("+")[-1]: rows[c]["heldout"] for c in CONFIGS[2:] if c in rows}
    return {**{k: run[k] for k in ("task", "seed", "sample", "teacher", "created_at", "file")},
            "metric": base["metric"], "higher_is_better": hi, "users": base["users"],
            "heldout": {c: rows[c]["heldout"] for c in CONFIGS if c in rows},
            "query": {c: rows[c]["query"] for c in CONFIGS if c in rows},
            "synthetic_used": {c: rows[c]["synthetic_used"] for c in CONFIGS[2:] if c in rows},
            "lora_beats_base": better(real, base["heldout"], hi),
            "synthetic_beats_real": {k: better(v, real, hi) for k, v in syn.items()}}


def fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def write(out: Path, summaries: list[dict]) -> str:
    lines = ["# Augmentation ablation on the real SmolLM2-135M-Instruct: all runs", "",
             "One row per (task, seed) run of `benchmarks/augmentation_ablation.py` on the real base; metric on the "
             "users' held-out profile pairs / on their LaMP queries. Best held-out value of each row in bold. "
             "Runs with few users resolve coarse steps only (see each run's file). Teachers: `smollm2-135m-instruct-q4_1` = "
             "the GGUF behind llama-cpp-python's server (JSON grammar); `smollm2-int8` = the `onnx/int8-fast` export "
             "behind `cdcda serve-teacher` (reply schema).", "",
             "| task | metric | seed | users | base | LoRA real | + offline | + teacher | LoRA > base | + offline > real "
             "| + teacher > real | teacher | file |",
             "|---|---|---:|---:|---|---|---|---|---|---|---|---|---|"]
    for s in summaries:
        h, q = s["heldout"], s["query"]
        vals = [v for v in h.values() if v is not None]
        best = (max if s["higher_is_better"] else min)(vals) if vals else None

        def cell(c):
            if c not in h:
                return "-"
            txt = f"{fmt(h[c])} / {fmt(q.get(c))}"
            return f"**{txt}**" if h[c] is not None and h[c] == best else txt

        yn = {True: "yes", False: "no", None: "-"}
        arrow = "↑" if s["higher_is_better"] else "↓"
        lines.append(f"| {s['task']} | {s['metric']} {arrow} | {s['seed']} | {s['users']} | {cell('base')} | "
                     f"{cell('lora real')} | {cell('lora real+offline')} | {cell('lora real+teacher')} | "
                     f"{yn[s['lora_beats_base']]} | {yn[s['synthetic_beats_real'].get('offline')]} | "
                     f"{yn[s['synthetic_beats_real'].get('teacher')]} | {s['teacher'] or '-'} | `{s['file']}` |")
    n = len(summaries)
    lora = sum(1 for s in summaries if s["lora_beats_base"])
    any_syn = sum(1 for s in summaries if any(s["synthetic_beats_real"].values()))
    lines += ["", f"LoRA on real data beats the base in {lora} of {n} runs; real + synthetic data (offline or "
              f"teacher) beats real data alone in {any_syn} of {n}."]
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    Path(f"{out}.json").write_text(json.dumps({"runs": summaries}, indent=1), encoding="utf-8")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--inputs", default=str(ROOT / "benchmarks" / "results"
                                            / "augmentation_ablation_smollm2-135m-instruct*.json"))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results"
                    / "augmentation_ablation_summary_smollm2-135m-instruct")
    args = ap.parse_args()
    runs = load_runs(args.inputs)
    if not runs:
        raise SystemExit(f"error: no ablation results match {args.inputs}; run benchmarks/augmentation_ablation.py "
                         "--base DIR first")
    print(write(args.out, [summarize(r) for r in runs]))


if __name__ == "__main__":
    main()
