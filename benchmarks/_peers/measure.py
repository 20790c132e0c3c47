"""Run one worker per measured run in a child process and turn its output into bench-schema runs.

Same protocol as ``cdcda bench --device host`` (device_harness.bench_runner): one fresh process per
run (warm-up runs first, discarded), peak RSS of exactly that child read from outside
(``os.wait4`` rusage ``ru_maxrss`` and ``/proc/<pid>/status`` VmHWM polled while it runs), and the
``PyTorchObserver`` line parsed by ``device_harness.parsers.observer_to_run``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

from device_harness.parsers import OBSERVER, observer_to_run, parse_observer_line


def _poll_vmhwm(pid: int, box: list, stop: threading.Event) -> None:
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


def run_child(cmd: list[str], *, env: dict | None = None, log: Path | None = None,
              timeout: float = 900.0, cwd: Path | None = None) -> tuple[int, str, int, int]:
    """(exit status, stdout, ru_maxrss kB, max VmHWM kB) of one child; stderr goes to ``log``."""
    err = open(log, "ab") if log else subprocess.DEVNULL
    try:
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=env, cwd=cwd)
        box = [0]
        stop = threading.Event()
        th = threading.Thread(target=_poll_vmhwm, args=(p.pid, box, stop), daemon=True)
        th.start()
        timer = threading.Timer(timeout, p.kill)
        timer.start()
        out = p.stdout.read().decode("utf-8", errors="replace")
        p.stdout.close()
        _, status, ru = os.wait4(p.pid, 0)
        timer.cancel()
        p.returncode = os.waitstatus_to_exitcode(status)
        stop.set()
        th.join(timeout=1)
    finally:
        if log:
            err.close()
    return p.returncode, out, int(ru.ru_maxrss), box[0]


def timed_export(cmd: list[str], tmp: Path, log: Path, what: str, *, timeout: float = 3600) -> dict:
    """Run a peer's exporter writing ``tmp/model.pte`` (working directory ``tmp``: whatever else it writes
    there, e.g. hydra's outputs/, goes away with it): wall seconds and the exporter's peak RSS, or the
    error with the tail of its log."""
    import time

    tmp.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    rc, _, maxrss_kb, hwm_kb = run_child(cmd, log=log, timeout=timeout, cwd=tmp)
    secs = time.perf_counter() - t
    if rc != 0 or not (tmp / "model.pte").exists():
        tail = log.read_text(errors="replace")[-800:] if log.exists() else ""
        return {"ok": False, "exit": rc, "error": f"{what} exited {rc}: {tail}"}
    return {"ok": True, "seconds": secs, "peak_rss_mb": (hwm_kb or maxrss_kb) / 1024}


def measure(cmd: list[str], *, runs: int, warmup: int, env: dict | None = None, log: Path | None = None,
            timeout: float = 900.0) -> list[dict]:
    """Warm-up + measured runs of ``cmd`` (a worker printing one observer line); run records."""
    records = []
    for i in range(warmup + runs):
        warm = i < warmup
        rc, out, maxrss_kb, hwm_kb = run_child(cmd, env=env, log=log, timeout=timeout)
        line = next((ln for ln in out.splitlines() if ln.startswith(OBSERVER + " ")), None)
        if rc != 0 or line is None:
            sig = f" (signal {-rc})" if rc < 0 else ""
            records.append({"run": i, "warmup": warm, "error": f"worker exited {rc}{sig}",
                            "detail": out[-1500:]})
            if i == 0:      # a worker that crashes once crashes every time: do not burn the budget
                break
            continue
        stats = parse_observer_line(line)
        # VmHWM belongs to the worker's own address space. ru_maxrss of a child also carries the
        # high-water mark of the address space it replaced at exec -- with vfork/posix_spawn that is
        # the parent's -- so it is only the fallback where /proc is not there.
        stats.update(run=i, warmup=warm, peak_rss_kb=hwm_kb or maxrss_kb, ru_maxrss_kb=maxrss_kb,
                     vmhwm_kb=hwm_kb or None, rss_source="VmHWM" if hwm_kb else "wait4")
        records.append(observer_to_run(stats))
    return records


def python_env(extra_path: str | None = None) -> dict:
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env["TOKENIZERS_PARALLELISM"] = "false"
    if extra_path:
        env["PYTHONPATH"] = extra_path + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def run_json(cmd: list[str], **kw) -> dict:
    """Run a helper that prints one JSON object on its last stdout line."""
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd[:3]))} ... exited {r.returncode}: {r.stderr[-1500:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


PY = sys.executable
