#!/usr/bin/env python
"""Side-by-side decode benchmark: our artifacts against eager PyTorch, llama.cpp, ONNX Runtime GenAI's
model builder and optimum-executorch -- same model, same machine, same run.

    python benchmarks/peers.py                       # smollm2-135m shape, 5 runs, threads 1 and 2
    python benchmarks/peers.py --quick               # 1 run, 2 threads: checks that every variant works
    python benchmarks/peers.py --arch qwen2.5-0.5b --only eager,llamacpp-Q4_0,ours-onnx/int4

Every variant is measured with the protocol of ``cdcda bench --device host``: one fresh process per
run (a discarded warm-up run first), prompt of ``--prompt-len`` fixed token ids, ``--gen-len`` greedy
tokens with no EOS stop, batch 1, peak RSS of the process that ran the model read from outside. Our
recipes go through ``cdcda export`` and ``cdcda bench``; the peers through small worker scripts in
``benchmarks/_peers`` (each in its own venv where the peer needs one).

Outputs ``benchmarks/results/<name>.{json,md,png}``: one bench-schema record per (variant, threads),
the machine description (CPU, load average before/after, measured memory bandwidth), decode
roofline per variant, and the issue's targets with met / missed-by.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
GENAI = "+genai"   # variant id suffix: our ONNX artifact run by `cdcda bench --engine onnxruntime-genai`
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(BENCH))

from _peers import base_model, et_llm, llamacpp, optimum_et, ortgenai, ours, report, roofline  # noqa: E402
from _peers.measure import PY, measure, python_env, run_json  # noqa: E402
from device_harness.bench_runner import CHILD_ENV  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------------------- machine


def machine(bandwidth: dict) -> dict:
    from device_harness.bench_runner import cpu_flags, describe

    d = describe()
    # whole flag names (a substring test took "avx512f" from "avx512fp16")
    isa = cpu_flags(("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "avxvnni"))
    mem = None
    try:
        mem = int(next(ln for ln in Path("/proc/meminfo").read_text().splitlines()
                       if ln.startswith("MemTotal")).split()[1]) / 1024 / 1024
    except (OSError, StopIteration):
        pass
    return {**d, "kind": "host", "emulated": False, "isa": isa, "mem_gib": mem, "bandwidth": bandwidth}


def device_block(m: dict) -> dict:
    return {"kind": "host", "name": m["name"], "cpu": m["cpu"], "os": m["os"], "arch": m["arch"],
            "emulated": False, "cores": m["cores"]}


# ------------------------------------------------------------------------------------------- variants


def prepare_variants(args, base: Path, work: Path, logs: Path) -> list[dict]:
    """Build (or reuse) every artifact. A variant that cannot be built carries ``error`` instead."""
    cfg = json.loads((base / "config.json").read_text())
    variants: list[dict] = []

    def want(vid: str) -> bool:
        return not args.only or any(vid == o or vid.startswith(o) for o in args.only)

    # eager PyTorch fp32 (baseline)
    if want("eager"):
        wb = roofline.hf_weight_bytes_per_token(base)
        variants.append(dict(id="eager-fp32", toolchain="eager PyTorch", quant="fp32", format="pytorch",
                             path=base, bytes=sum(p.stat().st_size for p in base.glob("*.safetensors")),
                             weights=wb, cmd=lambda t, pf: [PY, str(BENCH / "_peers" / "eager_worker.py"),
                                                            "--model", str(base), "--prompt-file", str(pf),
                                                            "--gen-len", str(args.gen_len), "--threads", str(t)]))

    # llama.cpp (F16, Q8_0, Q4_0)
    if any(want(f"llamacpp-{q}") for q in ("F16", "Q8_0", "Q4_0")):
        try:
            log("llama.cpp: venv / GGUF conversion / quantization")
            ggufs = llamacpp.prepare(base, work / "gguf", logs / "llamacpp.log")
            gguf_py = llamacpp.llama_dir() / "gguf-py"
            ver = llamacpp.version()
            for q in ("F16", "Q8_0", "Q4_0"):
                # "+repack": llama.cpp's default extra buffer types (CPU weight repacking, AMX where
                # present) -- they segfaulted on multi-token prompts on an AMX machine, so they are a
                # separate variant and the plain one never depends on them.
                for repack in ((False, True) if (args.llama_repack and q != "F16") else (False,)):
                    vid = f"llamacpp-{q}" + ("+repack" if repack else "")
                    if not want(vid):
                        continue
                    g = ggufs[q]
                    variants.append(dict(
                        id=vid, toolchain="llama.cpp", quant=q + (" repacked" if repack else ""), format="gguf", path=g,
                        bytes=g.stat().st_size, weights=roofline.gguf_weight_bytes_per_token(g, gguf_py),
                        cmd=(lambda gg, rp: lambda t, pf: llamacpp.worker_cmd(gg, pf, args.gen_len, t, rp))(g, repack),
                        notes=[f"llama-cpp-python {ver} built from the PyPI source package (GGML_NATIVE); "
                               f"use_extra_bufts={repack}"]))
        except Exception as e:  # noqa: BLE001 - recorded in the results
            variants.append(dict(id="llamacpp", toolchain="llama.cpp", quant="-", format="gguf",
                                 error=f"{type(e).__name__}: {e}"))

    # ONNX Runtime GenAI's own builder
    for prec in ("int4", "fp32"):
        vid = f"ortgenai-{prec}"
        if not want(vid):
            continue
        out = work / "ortgenai" / prec
        log(f"ORT GenAI builder: {prec}")
        b = ortgenai.build(base, prec, out, logs / f"ortgenai_{prec}.log")
        if not b.get("ok"):
            variants.append(dict(id=vid, toolchain="ORT GenAI builder", quant=prec, format="onnx", error=b.get("error")))
            continue
        variants.append(dict(id=vid, toolchain="ORT GenAI builder", quant=prec + (" b32 acc4" if prec == "int4" else ""),
                             format="onnx", path=out, bytes=ortgenai.model_bytes(out),
                             weights=roofline.onnx_weight_bytes_per_token(out / "model.onnx"),
                             cmd=(lambda o: lambda t, pf: ortgenai.worker_cmd(o, pf, args.gen_len, t))(out)))

    # optimum-executorch
    if want("optimum-et"):
        out = work / "optimum-et" / "8da4w"
        try:
            log("optimum-executorch: venv / export")
            if args.no_export and not (out / "model.pte").exists():
                raise RuntimeError("its export had not finished before the measured run (--no-export); "
                                   f"see {logs / 'optimum_et_export.log'}")
            optimum_et.ensure_venv(logs / "optimum_et_install.log")
            e = optimum_et.export(base, out, logs / "optimum_et_export.log")
            if not e.get("ok"):
                raise RuntimeError(e.get("error"))
            pte = out / "model.pte"
            variants.append(dict(
                id="optimum-et-8da4w", toolchain="optimum-executorch", quant="8da4w g32, emb 4w g32", format="executorch",
                path=out, bytes=pte.stat().st_size,
                weights=roofline.pte_weight_bytes_per_token(pte, vocab=cfg["vocab_size"], hidden=cfg["hidden_size"],
                                                            embedding_bits=4 + 32 / 32),
                cmd=(lambda o: lambda t, pf: optimum_et.worker_cmd(o, pf, args.gen_len, t))(out),
                env=CHILD_ENV,   # as our ExecuTorch runs: one OpenMP thread for libtorch's MKL in custom_sdpa
                notes=["optimum-executorch 1.1.0 in its own venv (transformers==5.0.0rc1)",
                       "run with OMP_NUM_THREADS=1 MKL_NUM_THREADS=1, as cdcda bench runs ExecuTorch"]))
        except Exception as e:  # noqa: BLE001
            variants.append(dict(id="optimum-et-8da4w", toolchain="optimum-executorch", quant="8da4w",
                                 format="executorch", error=f"{type(e).__name__}: {str(e)[-800:]}"))

    # ExecuTorch's own LLM export (extension/llm/export): the reference for what the runtime can do
    if want("et-llm"):
        out = work / "et-llm" / "xnnpack"   # no "8da4w" / "int8" in the path: see et_llm.export
        try:
            if args.no_export and not (out / "model.pte").exists():
                raise RuntimeError("its export had not finished before the measured run (--no-export)")
            log("ExecuTorch export_llm: conversion check / export")
            e = et_llm.export(base, out, logs / "et_llm_export.log")
            if not e.get("ok"):
                raise RuntimeError(e.get("error"))
            pte = out / "model.pte"
            variants.append(dict(
                id="et-llm-8da4w", toolchain="ExecuTorch export_llm", quant="8da4w g32 HQQ, emb 4w g32",
                format="executorch", path=out, bytes=pte.stat().st_size, export=e,
                weights=roofline.pte_weight_bytes_per_token(pte, vocab=cfg["vocab_size"], hidden=cfg["hidden_size"],
                                                            embedding_bits=4 + 32 / 32),
                cmd=(lambda o: lambda t, pf: et_llm.worker_cmd(o, pf, args.gen_len, t))(out),
                env=CHILD_ENV,
                notes=["executorch 1.5.1 extension.llm.export.export_llm, " + " ".join(et_llm.OPTIONS),
                       f"HF -> Meta checkpoint conversion checked: max |dlogit| "
                       f"{e.get('conversion', {}).get('max_abs_logit_diff_vs_hf', float('nan')):.2g} on 24 positions",
                       "run with OMP_NUM_THREADS=1 MKL_NUM_THREADS=1, as cdcda bench runs ExecuTorch"]))
        except Exception as e:  # noqa: BLE001
            variants.append(dict(id="et-llm-8da4w", toolchain="ExecuTorch export_llm", quant="8da4w",
                                 format="executorch", error=f"{type(e).__name__}: {str(e)[-800:]}"))

    # ours: every ExecuTorch and ONNX recipe that runs here, through the CLI
    try:
        keys = ours.bench_recipes()
    except Exception as e:  # noqa: BLE001
        keys = []
        variants.append(dict(id="ours", toolchain="cdcda", quant="-", format="-", error=f"recipe registry: {e}"))
    for key in keys:
        vid = f"ours-{key}"
        genai = key.startswith("onnx/") and want(vid + GENAI)
        if not want(vid) and not genai:
            continue
        art = work / "ours" / key.replace("/", "__")
        if args.no_export and not (art / "manifest.json").exists():
            # checked again when its turn to be measured comes (an export running beside may finish)
            variants.append(dict(id=vid, toolchain="cdcda", quant=key, format=key.split("/")[0],
                                 pending=(key, art, logs), error="not exported before its turn to be measured "
                                 "(--no-export; benchmarks/export_cost.py makes it)"))
            continue
        log(f"cdcda export --recipe {key}")
        try:
            x = ours.export(base, key, art, logs / f"export_{key.replace('/', '__')}.log")
        except Exception as e:  # noqa: BLE001
            x = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        if not x.get("ok"):
            variants.append(dict(id=vid, toolchain="cdcda", quant=key, format=key.split("/")[0],
                                 error=x.get("error") or f"cdcda export exited {x.get('exit')}: {x.get('stdout', '')}",
                                 export=x))
            continue
        v = our_variant(key, art, cfg, x)
        if want(vid):
            variants.append(v)
        if genai:
            # the same artifact through ONNX Runtime GenAI's generator (it ships genai_config.json): what
            # apps run on Android/iOS, and the loop ORT GenAI's own build is measured with
            variants.append({**v, "id": vid + GENAI, "engine": "onnxruntime-genai"})
    # pending ones last: they get the most time to appear
    return sorted(variants, key=lambda v: bool(v.get("pending")))


def our_variant(key: str, art: Path, cfg: dict, x: dict) -> dict:
    m = json.loads((art / "manifest.json").read_text())
    rec = ours.recipe_info(key)
    return dict(id=f"ours-{key}", toolchain="cdcda", quant=_recipe_quant(rec), format=m["format"], path=art,
                bytes=sum(v["bytes"] for k, v in m["files"].items() if not k.endswith((".json", ".jinja"))),
                weights=_our_weights(art, m, cfg, rec), export=x, recipe=key)


def _recipe_quant(rec: dict) -> str:
    q = rec.get("quantization") or {}
    s = q.get("scheme", "?")
    g = q.get("group_size") or q.get("block_size")
    emb = q.get("embeddings")
    return s + (f" g{g}" if g else "") + (f", emb {emb}" if emb and emb != "none" else "")


def _our_weights(art: Path, m: dict, cfg: dict, rec: dict) -> dict:
    if m["format"] == "onnx":
        onnx_files = sorted(art.glob("*.onnx"))
        best = None
        for f in onnx_files:       # the decode graph (largest) carries the weights
            w = roofline.onnx_weight_bytes_per_token(f)
            if best is None or w["total_weight_bytes"] > best["total_weight_bytes"]:
                best = w
        return best or {}
    if m["format"] == "executorch":
        pte = sorted(art.glob("*.pte"))[0]
        emb = (rec.get("quantization") or {}).get("embeddings", "none")
        g = (rec.get("quantization") or {}).get("embedding_group_size") or 32
        bits = {"int4": 4 + 32 / g, "int8": 8 + 32 / g}.get(emb, 32.0)
        # unquantized export keeps a tied LM head as one shared tensor (read whole every step);
        # quantized ones untie it (cdcda_export/export/executorch.py: untie_lm_head=quantized)
        scheme = (rec.get("quantization") or {}).get("scheme", "none")
        shared = bool(cfg.get("tie_word_embeddings")) and scheme in ("none", "fp32", "fp16")
        return roofline.pte_weight_bytes_per_token(pte, vocab=cfg["vocab_size"], hidden=cfg["hidden_size"],
                                                   embedding_bits=bits, tied_embedding_shared=shared)
    return {}


# ------------------------------------------------------------------------------------------- measure


def artifact_block(v: dict) -> dict:
    return {"name": v["id"], "path": str(v.get("path")), "format": v["format"], "recipe": v.get("recipe") or v["quant"],
            "toolchain": v["toolchain"], "bytes": int(v["bytes"]), "user_id": None, "task": None}


def run_variant(v: dict, threads: int, args, dev: dict, prompt: dict, prompt_file: Path, logs: Path) -> dict:
    from device_harness.schema import build_result

    config = {"prompt_len": args.prompt_len, "gen_len": args.gen_len, "runs": args.runs, "warmup": args.warmup,
              "threads": threads, "seed": args.seed, "prompt_sha256": prompt["sha256"], "batch": 1}
    if v["toolchain"] == "cdcda":
        res = ours.bench(v["path"], logs / f"bench_{v['id'].replace('/', '__')}_t{threads}.json", logs / "cdcda_bench.log",
                         prompt_len=args.prompt_len, gen_len=args.gen_len, runs=args.runs, warmup=args.warmup,
                         threads=threads, engine=v.get("engine", ""))
        res["artifact"]["toolchain"] = "cdcda"
        res["artifact"]["name"] = v["id"]
        return res
    env = {**python_env(), **v.get("env", {})}
    recs = measure(v["cmd"](threads, prompt_file), runs=args.runs, warmup=args.warmup, env=env,
                   log=logs / f"{v['id']}.log", timeout=args.timeout)
    measured = [r for r in recs if not r.get("warmup") and not r.get("error")]
    notes = list(v.get("notes", []))
    failed = [r for r in recs if r.get("error")]
    if failed:
        notes.append(f"{len(failed)} run(s) failed: {failed[0]['error']}")
    if not measured:
        raise RuntimeError(f"no measured run: {failed[0]['error'] if failed else '?'}; "
                           f"{(failed[0].get('detail') or '')[-400:] if failed else ''} (log {logs / (v['id'] + '.log')})")
    runtime = next((r.get("runtime") for r in measured if r.get("runtime")), None)
    if runtime:
        config["runtime"] = runtime
    return build_result(device=dev, artifact=artifact_block(v), config=config, runs=recs, notes=notes,
                        created_at=_now())


def _now() -> str:
    from cdcda_export.utils import now_iso

    return now_iso()


# ------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="smollm2-135m", help="model shape from `cdcda init-model` (default smollm2-135m)")
    ap.add_argument("--base", type=Path, default=None,
                    help="a real HF model directory to measure instead of the random-weight --arch shape (e.g. the "
                    "one `cdcda init-model --arch smollm2-135m-instruct` writes); speed does not depend on the weights, fidelity does, so this "
                    "is how the recipe that passes its gate on real weights gets its speed")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--gen-len", type=int, default=128)
    ap.add_argument("--runs", type=int, default=5, help="measured runs per variant and thread count")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", default="1,2", help="thread counts to try (comma list)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the prompt ids and of the random weights")
    ap.add_argument("--only", default="", help="comma list of variant ids or prefixes (eager, llamacpp-Q4_0, "
                    "ortgenai-int4, optimum-et, ours-executorch/...)")
    ap.add_argument("--llama-repack", type=int, default=1,
                    help="1: also measure llama.cpp Q8_0/Q4_0 with its extra buffer types (weight repacking) on "
                    "(they crashed on multi-token prompts on an AMX machine; a crash is recorded, not fatal)")
    ap.add_argument("--no-export", action="store_true", help="export no missing artifact: measure those already built (ours and optimum-executorch); "
                    "a cached one of ours that is stale (exporter code, recipe or library versions changed) is "
                    "still rebuilt, so no table mixes exporter versions")
    ap.add_argument("--name", default=None, help="results base name (default peers_<arch>)")
    ap.add_argument("--results", type=Path, default=BENCH / "results")
    ap.add_argument("--work", type=Path, default=BENCH / ".cache")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per worker run")
    ap.add_argument("--quick", action="store_true", help="1 run, no warm-up, 2 threads: a smoke run")
    args = ap.parse_args(argv)
    if args.quick:
        args.runs, args.warmup = 1, 0
        args.threads = args.threads if args.threads != ap.get_default("threads") else "2"
    args.only = [o.strip() for o in args.only.split(",") if o.strip()]
    thread_list = [int(t) for t in args.threads.split(",") if t.strip()]
    label = args.base.resolve().name if args.base else args.arch
    name = args.name or f"peers_{label.replace('.', '_')}"
    work = args.work / label
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    if args.base:
        base = args.base.resolve()
        if not (base / "config.json").is_file() or not list(base.glob("*.safetensors")):
            raise SystemExit(f"--base {base}: expected a HF model directory (config.json + *.safetensors); "
                             "write the real SmolLM2 with `cdcda init-model --arch smollm2-135m-instruct --out DIR`")
        log(f"base model {base}")
    else:
        log(f"base model {args.arch}")
        base = base_model.ensure_base_model(args.arch, args.work, seed=args.seed)
    variants = prepare_variants(args, base, work, logs)

    from device_harness.schema import make_prompt

    prompt = make_prompt(base / "tokenizer.json", args.prompt_len, args.seed)
    prompt_file = work / "prompt.json"
    prompt_file.write_text(json.dumps(prompt))

    load_before = os.getloadavg()
    log(f"load average before measuring: {load_before}")
    # in a child process: this one stays small (its RSS would leak into the workers' ru_maxrss)
    bw = {f"{t}t": run_json([PY, str(BENCH / "_peers" / "roofline.py"), str(t)])
          for t in sorted({1, 2} | set(thread_list))}
    log("memory bandwidth: " + ", ".join(f"{k} {v['gb_s_best']:.1f} GB/s" for k, v in bw.items()))
    mach = machine(bw)
    dev = device_block(mach)

    records, failures = [], []
    cfg = json.loads((base / "config.json").read_text())
    for v in variants:
        if v.get("pending"):
            key, art, _ = v["pending"]
            if (art / "manifest.json").exists():
                log(f"{v['id']}: its export has finished")
                v = our_variant(key, art, cfg, ours.export(base, key, art, logs / "unused.log"))
        if v.get("error"):
            failures.append({"variant": v["id"], "toolchain": v["toolchain"], "stage": "prepare", "error": v["error"]})
            log(f"{v['id']}: unavailable: {v['error'][:300]}")
            continue
        for t in thread_list:
            log(f"{v['id']} threads={t}")
            try:
                res = run_variant(v, t, args, dev, prompt, prompt_file, logs)
            except Exception as e:  # noqa: BLE001 - one failing variant must not lose the others
                failures.append({"variant": v["id"], "toolchain": v["toolchain"], "stage": f"run threads={t}",
                                 "error": f"{type(e).__name__}: {str(e)[-800:]}"})
                log(f"  failed: {str(e)[:300]}")
                traceback.print_exc(limit=2)
                continue
            res["peer"] = {"variant": v["id"], "toolchain": v["toolchain"], "quant": v["quant"], "format": v["format"],
                           "threads": t, "weights": v.get("weights"), "export": v.get("export")}
            med = res["metrics"]["decode_tok_s"]["median"]
            log(f"  decode {med and round(med, 1)} tok/s, TTFT {round(res['metrics']['ttft_ms']['median'] or 0)} ms")
            records.append(res)
    load_after = os.getloadavg()
    log(f"load average after: {load_after}")

    export_cost = None
    ec = args.results / f"export_cost_{label.replace('.', '_')}.json"   # of this base (shape or real dir) only
    if ec.exists():
        export_cost = json.loads(ec.read_text())
    summary = report.summarize(records, bw[f"{max(2, min(thread_list))}t"]["gb_s_best"] if "2t" in bw else
                               max(b["gb_s_best"] for b in bw.values()), export_cost=export_cost,
                               fp32_weight_bytes=roofline.hf_weight_bytes_per_token(base)["total_weight_bytes"])
    out = {
        "schema": "cdcda-peers/1",
        "name": name,
        "created_at": _now(),
        "arch": label,
        "weights": f"real ({base})" if args.base else f"random, the {args.arch} shape",
        "base_model": {"path": str(base), **json.loads((base / "config.json").read_text())},
        "config": {"prompt_len": args.prompt_len, "gen_len": args.gen_len, "runs": args.runs, "warmup": args.warmup,
                   "threads_tried": thread_list, "seed": args.seed, "batch": 1, "quick": args.quick,
                   "protocol": "one fresh process per run (load + prefill + decode), warm-up discarded; "
                               "medians with min/max over measured runs"},
        "machine": {**mach, "loadavg_before": load_before, "loadavg_after": load_after,
                    "wall_s": time.time() - t_start, "python": platform.python_version()},
        "summary": summary,
        "failures": failures,
        "records": records,
    }
    args.results.mkdir(parents=True, exist_ok=True)
    from cdcda_export.utils import write_json_atomic

    write_json_atomic(args.results / f"{name}.json", out)
    md = report.markdown(out)
    (args.results / f"{name}.md").write_text(md)
    report.plot(out, args.results / f"{name}.png")
    print(md)
    log(f"wrote {args.results / name}.{{json,md,png}}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
