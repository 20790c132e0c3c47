#!/usr/bin/env python3
"""The small bench runner that travels to a device (host, emulator, SSH board) with the artifact.

It depends on the standard library and ``cdcda_export.runtime`` only (which needs numpy, the
format's runtime and nothing else): no torch import of its own, no transformers, no psutil. It
is copied next to a small copy of ``cdcda_export/runtime`` (see ``device_harness.bundle``).

Two modes:

``bench``  the supervisor. Prints one ``cdcda-device {json}`` line describing the machine, then
           starts one *child* process per run (warm-up runs first), measures the child's peak
           RSS from outside (``os.wait4`` rusage ``ru_maxrss`` plus ``/proc/<pid>/status``
           ``VmHWM`` polled while it runs) and prints one ``PyTorchObserver {json}`` line per run
           (the child's line plus ``peak_rss_kb``, ``rss_source``, ``run``, ``warmup``). The same
           lines go to ``--out`` (JSON lines) for the harness to pull.
``child``  one measured run: load the artifact, prefill the prompt, decode ``gen_len`` tokens
           greedily, print ``PyTorchObserver {json}``. The JSON has ExecuTorch's llama runner keys
           (``prompt_tokens``, ``generated_tokens``, ``model_load_start_ms`` ... ``first_token_ms``,
           ``SCALING_FACTOR_UNITS_PER_SECOND``), so one parser reads ExecuTorch's ``llama_main``
           and this runner alike; extra keys (``tokens``, ``runtime``) ride along.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time

OBSERVER = "PyTorchObserver"
DEVICE_TAG = "cdcda-device"
# Python modules of each format's runtime, imported (and timed as import_ms) before the model load.
PRELOAD = {
    "onnx": ("numpy", "onnxruntime"),
    "executorch": ("numpy", "torch", "executorch.extension.pybindings.portable_lib"),
    "coreml": ("numpy", "coremltools"),
}
# ``--engine`` choices that replace the format's default runtime (and what they preload)
ENGINE_PRELOAD = {"onnxruntime-genai": ("numpy", "onnxruntime_genai")}
HEAVY = ("torch", "transformers", "peft", "torchao", "coremltools", "onnx")
# Environment of every measured child. ExecuTorch's Python kernel library for llama::custom_sdpa
# links libtorch, whose MKL runs each attention GEMM in an OpenMP team sized by OMP_NUM_THREADS
# (default: all cores). The runner's torch.set_num_threads(1) sets that for the main thread only
# (OpenMP and MKL thread settings are per thread), so custom_sdpa called on a worker thread of
# ExecuTorch's own threadpool opened a second team on top of it: 2 threads x 2 OpenMP threads on
# 2 cores. Measured on the 135M 8da8w .pte at 2 threads: TTFT 251-275 ms without, 102-108 ms with
# OMP_NUM_THREADS=1 (the C++ llama_main links no libtorch, so it never has this second pool).
# libgomp reads it once at load, so it must be in the environment before torch is imported.
# ONNX Runtime and Core ML use no OpenMP; torch in a child carries only I/O.
CHILD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _now_ms() -> float:
    return time.perf_counter() * 1000.0


# ---------------------------------------------------------------- child: one measured run
def child(args: argparse.Namespace) -> int:
    from cdcda_export import runtime  # the copy that travelled with this script

    with open(args.prompt_file, encoding="utf-8") as f:
        prompt = json.load(f)
    ids = [int(i) for i in prompt["ids"]]
    options = {"threads": args.threads} if args.threads else {}
    if args.engine:
        options["engine"] = args.engine

    # Import the format's runtime libraries first and time that apart (``import_ms``): ``load_ms``
    # is then the model load itself, as in ExecuTorch's llama_main where the runtime is linked in.
    imp0 = _now_ms()
    fmt = runtime.read_manifest(args.artifact).get("format")
    for mod in ENGINE_PRELOAD.get(args.engine) or PRELOAD.get(fmt, ()):
        try:
            __import__(mod)
        except ImportError:
            break  # runtime.load below raises the runtime's own, clearer error
    imp1 = _now_ms()
    load0 = _now_ms()
    # verify=False: the harness checked the artifact's sizes and hashes on the host before copying
    # it here, and hashing must not count as load time
    runner = runtime.load(args.artifact, verify=False, **options)
    load1 = _now_ms()
    adapter = {}
    if getattr(args, "adapter", ""):
        # a user's adapter package on the loaded base package, then a user switch (plain base -> this user)
        adapter["adapter_load_ms"] = runner.set_adapter(args.adapter) * 1000.0
        runner.set_adapter(None)
        adapter["adapter_switch_ms"] = runner.set_adapter(args.adapter) * 1000.0
    inf0 = _now_ms()
    res = runtime.greedy_generate(runner, ids, args.gen_len, eos_ids=())
    inf1 = _now_ms()
    ttft_ms = res.ttft_s * 1000.0
    stats = {
        "prompt_tokens": len(ids),
        "generated_tokens": len(res.tokens),
        "model_load_start_ms": load0,
        "model_load_end_ms": load1,
        "inference_start_ms": inf0,
        "inference_end_ms": inf1,
        "prompt_eval_end_ms": inf0 + ttft_ms,
        "first_token_ms": inf0 + ttft_ms,
        "aggregate_sampling_time_ms": 0,
        "SCALING_FACTOR_UNITS_PER_SECOND": 1000,
        # extras (ignored by ExecuTorch-compatible parsers)
        "import_ms": imp1 - imp0,
        "decode_ms": res.decode_s * 1000.0,
        "tokens": [int(t) for t in res.tokens],
        "runtime": _runtime_versions(runner),
        "heavy_imports": sorted(m for m in HEAVY if m in sys.modules),
        **adapter,
    }
    sys.stdout.write(f"{OBSERVER} {json.dumps(stats, separators=(',', ':'))}\n")
    sys.stdout.flush()
    return 0


def _runtime_versions(runner) -> dict:
    out = {"python": platform.python_version(), "format": runner.manifest.get("format"),
           **{k.lower(): os.environ.get(k) for k in CHILD_ENV}}
    for mod in ("numpy", "onnxruntime", "onnxruntime_genai", "executorch", "torch", "coremltools"):
        m = sys.modules.get(mod)
        if m is not None:
            out[mod] = getattr(m, "__version__", None)
    if "executorch" in sys.modules and out.get("executorch") is None:
        try:
            from importlib import metadata

            out["executorch"] = metadata.version("executorch")
        except Exception:  # noqa: BLE001 - version is informative only
            pass
    return out


# ---------------------------------------------------------------- supervisor
def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            text = f.read()
        for key in ("model name", "Hardware", "Processor", "cpu model", "CPU part"):
            for line in text.splitlines():
                if line.lower().startswith(key.lower()) and ":" in line:
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        try:
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True,
                                  text=True, timeout=5).stdout.strip()
        except Exception:  # noqa: BLE001
            pass
    return platform.processor() or "unknown"


def describe() -> dict:
    return {
        "name": platform.node(),
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "os": f"{platform.system()} {platform.release()}",
        "arch": platform.machine(),
        "python": platform.python_version(),
    }


def cpu_flags(keep) -> list[str]:
    """The CPU feature flags of ``keep`` (names as /proc/cpuinfo writes them) that this host has, in ``keep``'s
    order; [] where /proc/cpuinfo cannot be read (not Linux)."""
    try:
        text = open("/proc/cpuinfo", encoding="ascii", errors="replace").read()
    except OSError:
        return []
    have = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            have = set(line.split(":", 1)[1].split())
            break
    return [f for f in keep if f in have]


def _poll_vmhwm(pid: int, box: list, stop: threading.Event) -> None:
    """Largest VmHWM (kB) seen in /proc/<pid>/status while the child runs (Linux only)."""
    path = f"/proc/{pid}/status"
    while not stop.is_set():
        try:
            with open(path, encoding="ascii", errors="replace") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        box[0] = max(box[0], int(line.split()[1]))
                        break
        except (OSError, ValueError, IndexError):
            return
        stop.wait(0.02)


def run_child(cmd: list[str], env: dict) -> tuple[int, str, int, int]:
    """Run one child; returns (exit status, stdout, ru_maxrss kB, max polled VmHWM kB)."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env)
    box = [0]
    stop = threading.Event()
    poller = threading.Thread(target=_poll_vmhwm, args=(p.pid, box, stop), daemon=True)
    poller.start()
    out = p.stdout.read().decode("utf-8", errors="replace")
    p.stdout.close()
    _, status, ru = os.wait4(p.pid, 0)   # reap it ourselves: rusage of exactly this child
    p.returncode = os.waitstatus_to_exitcode(status)
    stop.set()
    poller.join(timeout=1)
    maxrss_kb = ru.ru_maxrss // 1024 if sys.platform == "darwin" else ru.ru_maxrss  # macOS: bytes
    return p.returncode, out, int(maxrss_kb), box[0]


def supervise(args: argparse.Namespace) -> int:
    info = describe()
    info_line = f"{DEVICE_TAG} {json.dumps(info, separators=(',', ':'))}"
    out_f = open(args.out, "w", encoding="utf-8") if args.out else None

    def emit(line: str) -> None:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
        if out_f:
            out_f.write(line + "\n")
            out_f.flush()

    emit(info_line)
    here = os.path.abspath(__file__)
    env = {**os.environ, **CHILD_ENV}
    env["PYTHONPATH"] = os.path.dirname(here) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, here, "child", "--artifact", args.artifact, "--prompt-file", args.prompt_file,
           "--gen-len", str(args.gen_len)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.engine:
        cmd += ["--engine", args.engine]
    if args.adapter:
        cmd += ["--adapter", args.adapter]
    failed = 0
    for i in range(args.warmup + args.runs):
        warm = i < args.warmup
        rc, out, maxrss_kb, hwm_kb = run_child(cmd, env)
        line = next((ln for ln in out.splitlines() if ln.startswith(OBSERVER + " ")), None)
        if rc != 0 or line is None:
            failed += 1
            err = {"run": i, "warmup": warm, "error": f"child exited {rc}", "stdout_tail": out[-2000:]}
            emit(f"{OBSERVER} {json.dumps(err, separators=(',', ':'))}")
            continue
        stats = json.loads(line[len(OBSERVER) + 1:])
        stats.update(run=i, warmup=warm, peak_rss_kb=max(maxrss_kb, hwm_kb), ru_maxrss_kb=maxrss_kb,
                     vmhwm_kb=hwm_kb or None, rss_source="wait4" if maxrss_kb >= hwm_kb else "VmHWM")
        emit(f"{OBSERVER} {json.dumps(stats, separators=(',', ':'))}")
    if out_f:
        out_f.close()
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="mode", required=True)
    for name in ("bench", "child"):
        p = sub.add_parser(name)
        p.add_argument("--artifact", required=True)
        p.add_argument("--prompt-file", required=True)
        p.add_argument("--gen-len", type=int, default=128)
        p.add_argument("--threads", type=int, default=0)
        p.add_argument("--engine", default="", help="runtime engine instead of the format's default "
                       "(onnx: onnxruntime-genai)")
        p.add_argument("--adapter", default="", help="adapter package to apply to the (base package) artifact")
        if name == "bench":
            p.add_argument("--runs", type=int, default=5)
            p.add_argument("--warmup", type=int, default=1)
            p.add_argument("--out", default="")
    sub.add_parser("describe")
    args = ap.parse_args(argv)
    if args.mode == "describe":
        print(f"{DEVICE_TAG} {json.dumps(describe(), separators=(',', ':'))}")
        return 0
    return child(args) if args.mode == "child" else supervise(args)


if __name__ == "__main__":
    sys.exit(main())
