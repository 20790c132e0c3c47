#!/usr/bin/env python
"""Adapter delivery against merged artifacts, on the real SmolLM2-135M-Instruct, measured in one run.

    python benchmarks/adapter_packages.py --adapters ADAPTERS_ROOT [--recipes onnx/int4,onnx/int8-fast]
    make adapter-bench

For each recipe: the base package is built once (timed), then for every user adapter under
``ADAPTERS_ROOT/<user>/``:

* the merged artifact (``cdcda export --adapter``: merge, quantize, lower; timed) and the adapter package
  (``cdcda export --adapter-only``; timed), with their bytes;
* fidelity of both against the eager merged float model (``cdcda check``: same prompts, metrics and
  gates; with ``--task/--questions/--outputs`` the user's held-out LaMP pairs and the task metric);
* decode tok/s of both (greedy, prompt 64 tokens, 64 new, median of ``--runs``, ``--threads``);
* user switching on one loaded base package (``set_adapter`` between users; median of 20).

Also the per-user payload against rank and targets (bytes of the fp16 LoRA inputs for the model's shape).
Writes ``benchmarks/results/adapter_packages_<name>.{json,md}``; the CPU flags go with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def cpu_facts() -> dict:
    from device_harness.bench_runner import _cpu_name, cpu_flags

    keep = ["avx2", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "amx_tile", "fma"]
    return {"name": _cpu_name(), "cores": os.cpu_count(), "flags": cpu_flags(keep)}


def decode_speed(runner, ids: list[int], new: int, runs: int) -> dict:
    from cdcda_export.runtime import greedy_generate

    greedy_generate(runner, ids, 4)   # warm-up
    samples = []
    for _ in range(runs):
        res = greedy_generate(runner, ids, new)
        samples.append(res.decode_tok_s)
    return {"median": statistics.median(samples), "samples": samples}


def check(arts: list[Path], args) -> list[dict]:
    from cdcda_export.check.core import CheckOptions, check_artifacts

    opts = CheckOptions(task=args.task, questions=args.questions, outputs=args.outputs, threads=1,
                        max_heldout=args.max_heldout, localise="never")
    return check_artifacts(arts, opts)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", default=None, help="HF dir or .gguf (default: the packaged SmolLM2-135M-Instruct)")
    ap.add_argument("--adapters", type=Path, required=True, help="ADAPTERS root with <user>/ peft adapters")
    ap.add_argument("--recipes", default="onnx/int4,onnx/int8-fast")
    ap.add_argument("--task", default="LaMP-3")
    ap.add_argument("--questions", type=Path, default=ROOT / "cdcda_export/assets/lamp_sample/LaMP-3/questions.json")
    ap.add_argument("--outputs", type=Path, default=ROOT / "cdcda_export/assets/lamp_sample/LaMP-3/outputs.json")
    ap.add_argument("--max-heldout", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks" / ".cache" / "adapter_packages")
    ap.add_argument("--name", default="smollm2-135m-instruct")
    args = ap.parse_args()

    from cdcda_export import runtime
    from cdcda_export.export.api import export
    from cdcda_export.export.decoder import DecoderSpec
    from cdcda_export.export.lora import ALL_TARGETS, LoraLayout
    from cdcda_export.export.packages import adapter_package, base_package
    from cdcda_export.models.gguf import resolve_base

    if args.base is None:
        from cdcda_export.models.gguf import init_real

        base = init_real("smollm2-135m-instruct", args.work / "base")
    else:
        base = resolve_base(args.base)
    users = sorted(p for p in args.adapters.iterdir() if (p / "adapter_config.json").is_file())
    if not users:
        raise SystemExit(f"no adapters under {args.adapters}")
    os.environ.setdefault("CDCDA_CACHE", str(args.work / "cache"))
    results: dict = {"schema": "cdcda.adapter_packages/1", "model": args.name, "base": str(base),
                     "cpu": cpu_facts(), "threads": args.threads, "created_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                     "users": [u.name for u in users], "recipes": {}}
    tok = None
    for recipe in [r for r in args.recipes.split(",") if r]:
        layout = LoraLayout.of_adapter(users[0])
        layout = LoraLayout(rank=layout.rank, targets=layout.targets, dtype="float16")
        slug = recipe.replace("/", "_")
        bp_dir = args.work / f"base-{slug}"
        log(f"{recipe}: base package")
        t0 = time.perf_counter()
        bp = base_package(base, recipe, layout, bp_dir, progress=False)
        bp_s = time.perf_counter() - t0
        bm = json.loads((bp / "manifest.json").read_text())
        rec = {"base_package": {"path": str(bp), "bytes": sum(v["bytes"] for v in bm["files"].values()),
                                "export_s": bm["export"]["seconds"], "built_now_s": round(bp_s, 1)},
               "layout": layout.to_dict(), "users": {}}
        io = bm["io"]
        spec = DecoderSpec(family=io["family"], vocab_size=io["vocab_size"], hidden_size=io["hidden_size"],
                           num_layers=io["num_layers"], num_heads=io["num_heads"], num_kv_heads=io["num_kv_heads"],
                           head_dim=io["head_dim"], rotary_dim=io["head_dim"], intermediate_size=io["intermediate_size"],
                           rms_norm_eps=0.0, tie_word_embeddings=True, rope_type="", max_seq_len=io["max_seq_len"])
        curve = {}
        for targets_name, targets in (("all", ALL_TARGETS), ("q,v", ("q_proj", "v_proj")),
                                      ("attention", ("q_proj", "k_proj", "v_proj", "o_proj"))):
            curve[targets_name] = {r: LoraLayout(rank=r, targets=targets).payload_bytes(spec) for r in (1, 2, 4, 8, 16, 32)}
        rec["payload_bytes_by_rank"] = curve
        pkgs = []
        for user in users:
            log(f"{recipe}: user {user.name}: merged export")
            merged_dir = args.work / f"merged-{slug}-{user.name}"
            t0 = time.perf_counter()
            merged = export(base, user, recipe, merged_dir, progress=False, overwrite=True)
            merged_s = time.perf_counter() - t0
            log(f"{recipe}: user {user.name}: adapter package")
            t0 = time.perf_counter()
            pkg = adapter_package(bp, user, args.work / f"adapter-{slug}-{user.name}", overwrite=True)
            pkg_s = time.perf_counter() - t0
            pm = json.loads((pkg / "manifest.json").read_text())
            mm = json.loads((merged / "manifest.json").read_text())
            pkgs.append(pkg)
            u = {"merged": {"bytes": sum(v["bytes"] for v in mm["files"].values()), "export_s": round(merged_s, 2)},
                 "adapter_package": {"bytes": sum(v["bytes"] for v in pm["files"].values()),
                                     "adapter_file_bytes": pm["files"][pm["adapter_file"]]["bytes"],
                                     "export_s": round(pkg_s, 3), "rank": pm["adapter"]["rank"],
                                     "targets": pm["adapter"]["targets"]}}
            log(f"{recipe}: user {user.name}: fidelity (cdcda check of both)")
            reps = check([pkg, merged], args)
            for key, rep in zip(("adapter_package", "merged"), reps):
                u[key]["fidelity"] = {k: rep["metrics"].get(k) for k in (
                    "mean_kl", "top1_agreement", "max_abs_logit_err", "ppl_ratio", "greedy_match_rate",
                    "task_metric", "task_metric_ref", "task_metric_artifact")}
                u[key]["fidelity"]["passed"] = rep["passed"]
            log(f"{recipe}: user {user.name}: decode speed")
            if tok is None:
                tok = runtime.load_tokenizer(merged)
            text = (ROOT / "benchmarks" / "data" / "prose.txt").read_text().split("\n")
            ids = tok.encode(" ".join(x for x in text if x and not x.startswith("#"))).ids[:64]
            r_m = runtime.load(merged, threads=args.threads)
            u["merged"]["decode_tok_s"] = decode_speed(r_m, ids, args.new_tokens, args.runs)
            del r_m
            r_a = runtime.load(bp, adapter=pkg, threads=args.threads)
            u["adapter_package"]["decode_tok_s"] = decode_speed(r_a, ids, args.new_tokens, args.runs)
            del r_a
            rec["users"][user.name] = u
        log(f"{recipe}: user switching")
        t0 = time.perf_counter()
        r = runtime.load(bp, threads=args.threads)
        base_load_s = time.perf_counter() - t0
        switch = [r.set_adapter(pkgs[i % len(pkgs)]) for i in range(20)]
        rec["switch_ms"] = {"median": statistics.median(switch) * 1e3, "max": max(switch) * 1e3,
                            "samples": len(switch), "base_load_ms": base_load_s * 1e3,
                            "includes": "reading the adapter package manifest, sha256 of its adapter file, "
                                        "reading the .onnx_adapter, binding the tensors"}
        del r
        results["recipes"][recipe] = rec
    out = ROOT / "benchmarks" / "results" / f"adapter_packages_{args.name}"
    out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    out.with_suffix(".md").write_text(render(results))
    log(f"wrote {out}.json / .md")
    return 0


def render(res: dict) -> str:
    cpu = res["cpu"]
    lines = [f"# Adapter packages vs merged artifacts: {res['model']}", "",
             f"{res['created_at']}, {cpu['name']} ({cpu['cores']} cores; {', '.join(cpu['flags'])}), "
             f"decode with {res['threads']} threads. Fidelity: `cdcda check` against the eager merged float model "
             "(user's held-out LaMP pairs + generic prompts).", ""]
    for recipe, rec in res["recipes"].items():
        bp = rec["base_package"]
        lay = rec["layout"]
        lines += [f"## {recipe}", "",
                  f"Base package: {bp['bytes'] / 1e6:.1f} MB, exported in {bp['export_s']:.0f} s (once). LoRA rank "
                  f"{lay['rank']}, targets {', '.join(lay['targets'])}, {lay['dtype']}.", "",
                  "| user | delivery | bytes per user | export s per user | mean KL | top-1 | max abs err | ppl ratio "
                  "| task (ref / art) | decode tok/s | gate |", "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---|"]
        for user, u in rec["users"].items():
            for key, label in (("merged", "merged, quantized"), ("adapter_package", "base package + fp16 adapter")):
                d = u[key]
                f = d["fidelity"]
                task = (f"{f['task_metric_ref']:.3g} / {f['task_metric_artifact']:.3g}"
                        if f.get("task_metric_ref") is not None else "-")
                lines.append(f"| {user} | {label} | {d['bytes'] / 1e6:.2f} MB | {d['export_s']:.2f} | "
                             f"{f['mean_kl']:.4f} | {f['top1_agreement']:.3f} | {f['max_abs_logit_err']:.2f} | "
                             f"{f['ppl_ratio']:.4f} | {task} | {d['decode_tok_s']['median']:.1f} | "
                             f"{'pass' if f['passed'] else 'FAIL'} |")
        sw = rec["switch_ms"]
        lines += ["", f"User switch on a loaded base package: median {sw['median']:.2f} ms, max {sw['max']:.2f} ms "
                      f"({sw['samples']} switches; base package load {sw['base_load_ms']:.0f} ms).", "",
                  "Per-user payload (fp16 LoRA inputs) by rank and targets, as % of the base package:", "",
                  "| targets | " + " | ".join(f"r={r}" for r in rec["payload_bytes_by_rank"]["all"]) + " |",
                  "|---|" + "---:|" * len(rec["payload_bytes_by_rank"]["all"])]
        for name, row in rec["payload_bytes_by_rank"].items():
            lines.append(f"| {name} | " + " | ".join(
                f"{b / 1e6:.2f} MB ({100 * b / bp['bytes']:.1f}%)" for b in row.values()) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
