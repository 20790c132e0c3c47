"""ExecuTorch recipes on one architecture: export cost, .pte size, delegation, decode speed and TTFT.

    python benchmarks/executorch_probe.py --base DIR [--recipes xnnpack-fp32 xnnpack-8da4w ...]
        [--threads 1 2] [--runs 3] [--out benchmarks/results/executorch_probe.json]

Every export and every (artifact, threads) measurement runs in its own process: export peak RSS
is that process's own, and ExecuTorch's threadpool is sized once per process. Decode/TTFT follow
the bench protocol of issue 7: prompt 64 tokens, 128 new tokens, greedy, one warm-up, medians.
The machine may be shared: the JSON keeps every sample, the load average at each step, and CPU-time
figures (``ttft_cpu_ms``, ``decode_tok_per_cpu_s``: tokens per second of this process's own CPU
time), which other tenants' load distorts far less than wall-clock rates.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_EXPORT = """
import json, os, resource, sys, time
from cdcda_export.export.api import export
t = time.perf_counter(); c0 = os.times()
export(sys.argv[1], None, sys.argv[2], sys.argv[3], overwrite=True, progress=False)
c1 = os.times()
print(json.dumps({"wall_s": time.perf_counter() - t, "cpu_s": (c1.user - c0.user) + (c1.system - c0.system),
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

_BENCH = """
import json, sys, time
import numpy as np
from cdcda_export import runtime
art, threads, runs, prompt_len, gen = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
t = time.perf_counter(); r = runtime.load(art, threads=threads); load_ms = (time.perf_counter() - t) * 1e3
rng = np.random.default_rng(0)
prompt = rng.integers(10, r.manifest["io"]["vocab_size"] - 1, prompt_len).tolist()
out = []
for i in range(runs + 1):
    r.reset()
    w0, c0 = time.perf_counter(), time.process_time()
    tok = int(np.argmax(r.prefill(prompt)[-1]))
    w1, c1 = time.perf_counter(), time.process_time()
    for _ in range(gen - 1):
        tok = int(np.argmax(r.decode(tok)))
    w2, c2 = time.perf_counter(), time.process_time()
    if i:
        out.append({"ttft_ms": (w1 - w0) * 1e3, "prefill_tok_s": prompt_len / (w1 - w0),
                    "decode_tok_s": (gen - 1) / (w2 - w1),
                    # CPU time of this process: what the run costs without the other tenants' load
                    "ttft_cpu_ms": (c1 - c0) * 1e3, "decode_tok_per_cpu_s": (gen - 1) / (c2 - c1)})
print(json.dumps({"load_ms": load_ms, "runs": out}))
"""


def _child(code: str, *args: str) -> dict:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    p = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, cwd=ROOT)
    if p.returncode != 0:
        raise RuntimeError(f"child failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def _stats(xs: list[float]) -> dict:
    return {"min": min(xs), "median": statistics.median(xs), "max": max(xs), "samples": xs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, type=Path)
    ap.add_argument("--recipes", nargs="+", default=["xnnpack-fp32", "xnnpack-8da4w", "xnnpack-8da8w"])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--work", type=Path, default=Path("/tmp/cdcda-et-probe"))
    ap.add_argument("--skip-export", action="store_true", help="reuse artifacts already in --work")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/executorch_probe.json")
    a = ap.parse_args()

    base_cfg = json.loads((a.base / "config.json").read_text())
    fp32_weight_bytes = sum(f.stat().st_size for f in a.base.glob("*.safetensors"))
    results = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                           "python": platform.python_version()},
               "base": {"path": str(a.base), "model_type": base_cfg.get("model_type"),
                        "hidden_size": base_cfg.get("hidden_size"), "layers": base_cfg.get("num_hidden_layers"),
                        "fp32_weight_bytes": fp32_weight_bytes},
               "protocol": {"prompt_len": a.prompt_len, "gen_len": a.gen, "runs": a.runs, "warmup": 1,
                            "threads": a.threads},
               "recipes": {}}
    for name in a.recipes:
        art = a.work / name
        rec: dict = {}
        if not a.skip_export:
            rec["export"] = _child(_EXPORT, str(a.base), f"executorch/{name}", str(art))
            rec["export"]["load_avg_1m"] = os.getloadavg()[0]
            print(name, "export", rec["export"], flush=True)
        m = json.loads((art / "manifest.json").read_text())
        pte = sum(v["bytes"] for k, v in m["files"].items() if k.endswith(".pte"))
        rec.update({"pte_bytes": pte, "pte_mb": round(pte / 2**20, 1), "delegation": m["export"].get("delegation"),
                    "quantization_applied": m.get("quantization_applied"),
                    "manifest_export": {k: m["export"][k] for k in ("seconds", "peak_rss_mb", "timings") if k in m["export"]},
                    "bench": {}})
        for th in a.threads:
            b = _child(_BENCH, str(art), str(th), str(a.runs), str(a.prompt_len), str(a.gen))
            rec["bench"][f"threads_{th}"] = {
                "load_ms": b["load_ms"], "load_avg_1m": os.getloadavg()[0],
                **{k: _stats([r[k] for r in b["runs"]]) for k in ("ttft_ms", "prefill_tok_s", "decode_tok_s", "ttft_cpu_ms",
                                                               "decode_tok_per_cpu_s")}}
            print(name, f"threads={th}", {k: round(v["median"], 1) for k, v in rec["bench"][f"threads_{th}"].items()
                                          if isinstance(v, dict)}, flush=True)
        results["recipes"][name] = rec
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(results, indent=2))
    fp32 = results["recipes"].get("xnnpack-fp32", {}).get("pte_bytes")
    for name, rec in results["recipes"].items():
        if fp32:
            rec["size_vs_fp32_pte"] = round(rec["pte_bytes"] / fp32, 3)
        if "export" in rec:
            rec["peak_rss_vs_fp32_weights"] = round(rec["export"]["peak_rss_mb"] * 2**20 / fp32_weight_bytes, 2)
    results["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    a.out.write_text(json.dumps(results, indent=2))
    print("wrote", a.out)


if __name__ == "__main__":
    main()
