#!/usr/bin/env python
"""Many users through `cdcda pipeline`: users per hour per stage, the dominant stage, peak RSS per worker.

    python benchmarks/pipeline_scale.py --users 20                  # local x1, local x2, Ray on a local head
    python benchmarks/pipeline_scale.py --users 200 --modes ray --kill-at 0.5
                                        # Ray; SIGKILL the driver when half the (user, stage) jobs are done,
                                        # then the same command again; count lost and duplicated users

Each mode runs the real CLI (``cdcda pipeline --config ... --out ...``) as a child process on ``--users``
LaMP-3 users cloned from the shipped sample (new ids, the sample's texts), on the tiny random-weight base
(``--arch``; its answers mean nothing, its costs are the pipeline's fixed costs), with the cheapest stage
settings (``--max-steps`` LoRA steps, one recipe, one held-out prompt, one bench run). Before the measured
modes a one-user run builds the shared base package into the cache, so every mode finds it built.

Figures (from the ledger, ``OUT/ledger.sqlite``, whose ``seconds`` is what each job took inside its worker):
per stage the jobs, mean seconds, worker-seconds and users per hour per worker (3600 / mean), and which
stage takes most worker time; per mode the wall time and users per hour end to end. Peak RSS per process
is the kernel's high-water mark (``VmHWM`` in ``/proc/PID/status``), polled every 0.25 s for the driver
and all its descendants (pool workers; Ray's workers and its raylet/GCS). Writes
``benchmarks/results/pipeline_scale_<arch>_<users>u[_kill].{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
SAMPLE = ROOT / "cdcda_export" / "assets" / "lamp_sample" / "LaMP-3"
STAGES = ("augment", "train", "export", "check", "bench")
CDCDA = str(Path(sys.executable).parent / "cdcda")
MODES = {"local1": ["--executor", "local", "--workers", "1"], "local2": ["--executor", "local", "--workers", "2"],
         "ray": ["--executor", "ray", "--address", "local"]}


# ------------------------------------------------------------------------------------------ inputs
def make_users(n: int, dest: Path) -> tuple[Path, Path]:
    """``n`` LaMP-3 users cloned from the sample's four: ids u00000.., the same profiles, inputs and golds."""
    q = json.loads((SAMPLE / "questions.json").read_text())
    o = json.loads((SAMPLE / "outputs.json").read_text())
    gold = {g["id"]: g["output"] for g in o["golds"]}
    qs, gs = [], []
    for i in range(n):
        r, uid = q[i % len(q)], f"u{i:05d}"
        qs.append({**r, "id": uid, "profile": [{**p, "id": f"{uid}-{j}"} for j, p in enumerate(r["profile"])]})
        gs.append({"id": uid, "output": gold[r["id"]]})
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "questions.json").write_text(json.dumps(qs))
    (dest / "outputs.json").write_text(json.dumps({"task": o["task"], "golds": gs}))
    return dest / "questions.json", dest / "outputs.json"


def write_config(path: Path, base: Path, q: Path, o: Path, args) -> dict:
    import yaml

    cfg = {"tasks": [{"task": "LaMP-3", "questions": str(q), "outputs": str(o)}], "base": str(base),
           "augment": {"per_user": args.per_user}, "train": {"max_steps": args.max_steps},
           "export": {"recipes": [args.recipe]}, "check": {"max_heldout": 1, "max_new_tokens": 2},
           "bench": {"runs": 1, "warmup": 0, "prompt_len": 8, "gen_len": 2}}
    path.write_text(yaml.safe_dump(cfg))
    return cfg


# ------------------------------------------------------------------------------------------ measuring
def _vmhwm_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _role(cmd: list[str]) -> str:
    s = " ".join(cmd)
    if "resource_tracker" in s:
        return "other"
    if "bench_runner.py" in s:
        return "bench child (runs the artifact)"
    if s.startswith("ray::") or "default_worker.py" in s:
        return "ray worker"
    if any(k in s for k in ("raylet", "gcs_server", "ray/", "ray.", "log_monitor", "dashboard")):
        return "ray system"
    if "multiprocessing" in s or "spawn_main" in s:
        return "pool worker"
    return "other"


class Sampler(threading.Thread):
    """Peak RSS (VmHWM) of the driver and every descendant, and its role, polled while the run lasts."""

    def __init__(self, pid: int, every: float = 0.25):
        super().__init__(daemon=True)
        self.pid, self.every, self.stop = pid, every, threading.Event()
        self.peak: dict[int, dict] = {}

    def procs(self):
        import psutil

        try:
            root = psutil.Process(self.pid)
            return [root, *root.children(recursive=True)]
        except psutil.Error:
            return []

    def run(self) -> None:
        import psutil

        while not self.stop.is_set():
            for p in self.procs():
                try:
                    kb = _vmhwm_kb(p.pid)
                    e = self.peak.setdefault(p.pid, {"role": "driver" if p.pid == self.pid else _role(p.cmdline()),
                                                     "peak_rss_mb": 0.0})
                    if e["role"] == "other" and p.pid != self.pid:
                        e["role"] = _role(p.cmdline())
                    e["peak_rss_mb"] = max(e["peak_rss_mb"], round(kb / 1024, 1))
                except psutil.Error:
                    continue
            time.sleep(self.every)

    def by_role(self) -> dict:
        out: dict[str, dict] = {}
        for e in self.peak.values():
            r = out.setdefault(e["role"], {"processes": 0, "max_peak_rss_mb": 0.0, "peaks_mb": []})
            r["processes"] += 1
            r["max_peak_rss_mb"] = max(r["max_peak_rss_mb"], e["peak_rss_mb"])
            r["peaks_mb"].append(e["peak_rss_mb"])
        for r in out.values():
            r["peaks_mb"] = sorted(r["peaks_mb"], reverse=True)[:8]
        return out


def ledger_rows(out: Path) -> list[dict]:
    p = out / "ledger.sqlite"
    if not p.is_file():
        return []
    for _ in range(20):
        try:
            con = sqlite3.connect(f"file:{p}?mode=ro", uri=True, timeout=5)
            try:
                cols = ("task", "user", "stage", "status", "attempts", "worker", "started_at", "finished_at",
                        "seconds")
                rows = con.execute(f"SELECT {', '.join(cols)} FROM records").fetchall()
                return [dict(zip(cols, r)) for r in rows]
            finally:
                con.close()
        except sqlite3.Error:
            time.sleep(0.2)
    return []


def stage_figures(rows: list[dict], workers: int) -> dict:
    """Per stage from the ledger. A worker's first job of a stage pays that stage's imports and model loads
    (~9 s for the offline augmenter here): ``steady_s`` is the mean without those first jobs, and users per
    hour per worker are 3600 / ``steady_s``; ``mean_s`` keeps everything."""
    import statistics

    per = {}
    user_rows = sorted((r for r in rows if r["task"] != "*" and r["status"] == "done" and r["seconds"] is not None),
                       key=lambda r: r["started_at"] or 0)
    first = {}   # (worker, stage) -> its first job of that stage: the one that imported the stage's modules
    for r in user_rows:
        first.setdefault((r["worker"], r["stage"]), id(r))
    total = sum(r["seconds"] for r in user_rows) or 1.0
    for s in STAGES:
        rs = [r for r in user_rows if r["stage"] == s]
        if not rs:
            continue
        secs = [r["seconds"] for r in rs]
        steady = [r["seconds"] for r in rs if first[(r["worker"], s)] != id(r)] or secs
        mean, st = statistics.fmean(secs), statistics.fmean(steady)
        per[s] = {"jobs": len(secs), "mean_s": round(mean, 3), "median_s": round(statistics.median(secs), 3),
                  "steady_s": round(st, 3), "worker_s": round(sum(secs), 1), "share": round(sum(secs) / total, 3),
                  "users_per_hour_per_worker": round(3600 / st, 0),
                  f"users_per_hour_{workers}_workers": round(workers * 3600 / st, 0)}
    dominant = max(per, key=lambda s: per[s]["worker_s"]) if per else None
    return {"stages": per, "dominant": dominant,
            "dominant_steady": max(per, key=lambda s: per[s]["steady_s"]) if per else None,
            "worker_s_per_user": round(sum(v["mean_s"] for v in per.values()), 2),
            "steady_worker_s_per_user": round(sum(v["steady_s"] for v in per.values()), 2),
            "workers_seen": len({r["worker"] for r in user_rows})}


def run_driver(cmd: list[str], env: dict, log: Path, kill_when=None) -> dict:
    """Run ``cmd`` (the CLI) to the end, or SIGKILL it when ``kill_when()`` is true; returns timings + RSS."""
    t0 = time.perf_counter()
    with open(log, "ab") as lf:
        p = subprocess.Popen(cmd, stdout=lf, stderr=lf, env=env)
        sam = Sampler(p.pid)
        sam.start()
        killed = None
        try:
            while p.poll() is None:
                if kill_when is not None and kill_when():
                    kids = [c.pid for c in sam.procs()[1:]]
                    os.kill(p.pid, signal.SIGKILL)
                    p.wait()
                    killed = {"at_s": round(time.perf_counter() - t0, 1), "descendants": len(kids)}
                    killed.update(wait_gone(kids))
                    break
                time.sleep(0.5)
        finally:
            sam.stop.set()
            sam.join(2)
            if p.poll() is None:
                p.kill()
    # a killed run's wall time ends at the kill (not after waiting for its descendants to exit)
    wall = killed["at_s"] if killed else round(time.perf_counter() - t0, 1)
    return {"rc": p.returncode, "wall_s": wall, "rss": sam.by_role(), "killed": killed}


def wait_gone(pids: list[int], timeout: float = 60.0) -> dict:
    """After the driver's SIGKILL: how long its descendants (pool workers, Ray's processes) take to exit.
    Those still alive after ``timeout`` are SIGKILLed here (the benchmark started them) and counted."""
    import psutil

    def name(q: int) -> str:
        try:
            return psutil.Process(q).cmdline()[0][:60]
        except (psutil.Error, IndexError):
            return "?"

    t0 = time.perf_counter()
    names = {q: name(q) for q in pids}
    alive = pids
    at_1s = None
    while alive and time.perf_counter() - t0 < timeout:
        alive = [q for q in alive if psutil.pid_exists(q) and psutil.Process(q).status() != psutil.STATUS_ZOMBIE]
        if at_1s is None and time.perf_counter() - t0 >= 1.0:
            at_1s = len(alive)
        time.sleep(0.2)
    survivors = sorted(names[q] for q in alive)
    left = []
    for q in alive:
        try:
            os.kill(q, signal.SIGKILL)
            left.append(q)
        except ProcessLookupError:
            pass
    return {"alive_after_1s": at_1s if at_1s is not None else 0, "all_gone_after_s": round(time.perf_counter() - t0, 1),
            "killed_by_benchmark_after_timeout": len(left), "survivors": survivors}


# ------------------------------------------------------------------------------------------ checks
def delivery_check(out: Path, users: list[str], recipe: str, rows: list[dict], done_before: dict | None) -> dict:
    """Lost: users without a complete deliverable. Duplicated: a (user, stage) finished before the kill and
    run again after it, or more than one adapter / export per user, or a half-built directory left over."""
    from cdcda_export.pipeline.stages import safe_folder

    recs = {(r["user"], r["stage"]): r for r in rows if r["task"] == "LaMP-3"}
    lost, dup_dirs, partial = [], [], []
    for u in users:
        root = out / "LaMP-3" / "users" / safe_folder(u)
        ok = all(recs.get((u, s), {}).get("status") == "done" and (root / s / "stage.json").is_file() for s in STAGES)
        ok = ok and (root / "export" / safe_folder(recipe) / "manifest.json").is_file()
        if not ok:
            lost.append(u)
        adapters = [p for p in (root / "train").iterdir() if p.is_dir()] if (root / "train").is_dir() else []
        exports = [p for p in (root / "export").iterdir() if p.is_dir()] if (root / "export").is_dir() else []
        if len(adapters) > 1 or len(exports) > 1:
            dup_dirs.append(u)
        partial += [str(p) for p in root.rglob(".*") if ".partial-" in p.name or ".old-" in p.name]
    rerun = []
    if done_before is not None:
        rerun = [f"{u}/{s}" for (u, s), t in done_before.items() if recs.get((u, s), {}).get("started_at") != t]
    return {"users": len(users), "delivered": len(users) - len(lost), "lost": len(lost), "lost_users": lost[:20],
            "records": len(recs), "records_expected": len(users) * len(STAGES),
            "finished_stages_rerun_after_kill": len(rerun), "rerun": rerun[:20],
            "users_with_duplicate_outputs": len(dup_dirs), "partial_dirs_left": len(partial),
            "duplicated": len(rerun) + len(dup_dirs)}


# ------------------------------------------------------------------------------------------ report
def host_info() -> dict:
    cpu = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = next((ln.split(":", 1)[1].strip() for ln in cpu.splitlines() if ln.startswith("model name")), None)
    flags = next((ln.split(":", 1)[1].split() for ln in cpu.splitlines() if ln.startswith("flags")), [])
    simd = [f for f in flags if f.startswith(("avx", "sse4", "fma", "amx", "f16c", "vnni")) or f in ("avx512f",)]
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    import psutil

    return {"cpu": model, "cores": cores, "simd_flags": simd, "mem_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version(), "load_before": os.getloadavg()}


def write_md(path: Path, res: dict) -> None:
    a, h = res["args"], res["host"]
    lines = [f"# Pipeline at scale: {a['users']} users, {a['arch']} shape ({res['created_at']})", "",
             f"Host: {h['cpu']}, {h['cores']} cores (shared with another engineer's jobs: load average "
             f"{', '.join(f'{x:.2f}' for x in h['load_before'])} before, "
             f"{', '.join(f'{x:.2f}' for x in res['load_after'])} after), {h['mem_gib']} GiB. "
             f"SIMD flags: {' '.join(h['simd_flags'])}.", "",
             f"Config: LaMP-3 users cloned from the sample, augment per_user {a['per_user']} (offline), "
             f"train max_steps {a['max_steps']}, export {a['recipe']} (adapter package on a shared base package), "
             "check 1 held-out prompt x 2 tokens, bench 1 run (prompt 8, gen 2). Every job runs in a worker; "
             "figures come from the ledger. Steady s = mean without each worker process's first job of the stage "
             "(imports, model loads); users/h per worker = 3600 / steady s; end to end = delivered users / wall.",
             ""]
    for name, m in res["modes"].items():
        f = m["figures"]
        lines += [f"## {name}: {m['describe']}", "",
                  f"Wall {m['wall_s']} s for {m['users']} users = **{m['users_per_hour']:.0f} users/h end to end**; "
                  f"{f['worker_s_per_user']} worker-s per user ({f['steady_worker_s_per_user']} without each "
                  f"worker's first job of a stage); dominant stage **{f['dominant']}** by worker time, "
                  f"**{f['dominant_steady']}** once warm; {f['workers_seen']} worker process(es) ran jobs.", "",
                  "| stage | jobs | mean s | median s | steady s | worker-s | share | users/h per worker (steady) |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for s, v in f["stages"].items():
            lines.append(f"| {s} | {v['jobs']} | {v['mean_s']} | {v['median_s']} | {v['steady_s']} | {v['worker_s']} | "
                         f"{v['share']:.0%} | {v['users_per_hour_per_worker']:.0f} |")
        lines += ["", "| process | count | max peak RSS MiB | largest peaks MiB |", "|---|---:|---:|---|"]
        for role, r in sorted(m["rss"].items()):
            lines.append(f"| {role} | {r['processes']} | {r['max_peak_rss_mb']} | "
                         f"{', '.join(str(x) for x in r['peaks_mb'])} |")
        if m.get("kill"):
            k, c = m["kill"], m["check"]
            lines += ["", f"**Killed and resumed.** The driver was SIGKILLed {k['killed']['at_s']} s in, with "
                      f"{k['done_at_kill']} of {c['records_expected']} (user, stage) jobs done and {k['running_at_kill']} "
                      f"dispatched (running, or queued in the executor); its {k['killed']['descendants']} descendant "
                      f"processes had {k['killed']['alive_after_1s']} left alive 1 s later; "
                      f"{k['killed']['killed_by_benchmark_after_timeout']} were still alive after "
                      f"{k['killed']['all_gone_after_s']} s and killed by the benchmark "
                      f"({', '.join(k['killed'].get('survivors') or []) or 'none'}). The same command again ran {k['resume_wall_s']} s. Result: "
                      f"**{c['delivered']}/{c['users']} delivered, {c['lost']} lost, {c['duplicated']} duplicated** "
                      f"({c['records']} ledger records for {c['records_expected']} expected; "
                      f"{c['finished_stages_rerun_after_kill']} stages finished before the kill ran again; "
                      f"{c['users_with_duplicate_outputs']} users with more than one adapter/export; "
                      f"{c['partial_dirs_left']} half-built directories left)."]
        lines.append("")
    if res.get("note"):
        lines += [f"Note: {res['note']}", ""]
    path.write_text("\n".join(lines))


# ------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--users", type=int, default=20)
    ap.add_argument("--modes", default="local1,local2,ray", help=f"comma list of {', '.join(MODES)}")
    ap.add_argument("--arch", default="tiny", help="base built by `cdcda init-model --arch` (random weights)")
    ap.add_argument("--max-steps", type=int, default=1)
    ap.add_argument("--per-user", type=int, default=2, help="synthetic examples per user (offline augmenter)")
    ap.add_argument("--recipe", default="onnx-fp32")
    ap.add_argument("--kill-at", type=float, default=None,
                    help="SIGKILL the driver when this fraction of the (user, stage) jobs is done, then resume")
    ap.add_argument("--results", type=Path, default=BENCH / "results")
    ap.add_argument("--work", type=Path, default=BENCH / ".cache" / "pipeline_scale")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import shutil

    from cdcda_export.models import init_model
    from cdcda_export.utils import now_iso

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad:
        ap.error(f"unknown mode(s) {bad}; known: {list(MODES)}")
    work = args.work / f"{args.arch}_{args.users}u"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    env = {**os.environ, "CDCDA_CACHE": str(args.work / "cache"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    base = args.work / f"base-{args.arch}"
    if not (base / "config.json").is_file():
        init_model(args.arch, base)
    host = host_info()
    users = [f"u{i:05d}" for i in range(args.users)]
    q, o = make_users(args.users, work / "data")
    cfgp = work / "pipeline.yaml"
    write_config(cfgp, base, q, o, args)
    # warm-up: one user, builds the shared base package into $CDCDA_CACHE (not measured)
    q1, o1 = make_users(1, work / "data1")
    write_config(work / "warm.yaml", base, q1, o1, args)
    print(f"[{time.strftime('%H:%M:%S')}] warm-up (1 user, builds the base package)", flush=True)
    subprocess.run([CDCDA, "pipeline", "--config", str(work / "warm.yaml"), "--out", str(work / "warm")], env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    res = {"args": {**vars(args), "results": str(args.results), "work": str(args.work)}, "host": host,
           "created_at": now_iso(), "modes": {}}
    for m in modes:
        out = work / f"run-{m}"
        cmd = [CDCDA, "pipeline", "--config", str(cfgp), "--out", str(out), *MODES[m]]
        workers = 1 if m == "local1" else 2
        print(f"[{time.strftime('%H:%M:%S')}] {m}: {' '.join(cmd[1:])}", flush=True)
        entry: dict = {"users": args.users, "command": " ".join(["cdcda", *cmd[1:]])}
        if args.kill_at is not None:
            target = args.kill_at * args.users * len(STAGES)

            def kill_when(out=out, target=target):
                return sum(1 for r in ledger_rows(out) if r["task"] != "*" and r["status"] == "done") >= target

            first = run_driver(cmd, env, work / f"{m}.log", kill_when)
            rows = ledger_rows(out)
            done_before = {(r["user"], r["stage"]): r["started_at"] for r in rows
                           if r["task"] != "*" and r["status"] == "done"}
            running = sum(1 for r in rows if r["task"] != "*" and r["status"] == "running")
            print(f"[{time.strftime('%H:%M:%S')}] killed: {first['killed']}, {len(done_before)} done, {running} "
                  "running; resuming", flush=True)
            second = run_driver(cmd, env, work / f"{m}.log")
            rows = ledger_rows(out)
            entry.update(kill={"killed": first["killed"], "first_wall_s": first["wall_s"], "done_at_kill": len(done_before),
                               "running_at_kill": running, "resume_wall_s": second["wall_s"], "resume_rc": second["rc"]},
                         rc=second["rc"], wall_s=round(first["wall_s"] + second["wall_s"], 1), rss=second["rss"],
                         rss_first=first["rss"], check=delivery_check(out, users, args.recipe, rows, done_before))
        else:
            r = run_driver(cmd, env, work / f"{m}.log")
            rows = ledger_rows(out)
            entry.update(rc=r["rc"], wall_s=r["wall_s"], rss=r["rss"],
                         check=delivery_check(out, users, args.recipe, rows, None))
        summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").is_file() else {}
        entry["describe"] = summary.get("executor", m)
        entry["figures"] = stage_figures(rows, workers)
        entry["users_per_hour"] = round(3600 * entry["check"]["delivered"] / entry["wall_s"], 1)
        res["modes"][m] = entry
        print(f"[{time.strftime('%H:%M:%S')}] {m}: rc {entry['rc']}, wall {entry['wall_s']} s, "
              f"{entry['users_per_hour']} users/h, dominant {entry['figures']['dominant']}, "
              f"delivered {entry['check']['delivered']}, lost {entry['check']['lost']}, "
              f"duplicated {entry['check']['duplicated']}", flush=True)
    res["load_after"] = os.getloadavg()
    args.results.mkdir(parents=True, exist_ok=True)
    stem = args.results / f"pipeline_scale_{args.arch}_{args.users}u{'_kill' if args.kill_at is not None else ''}"
    stem.with_suffix(".json").write_text(json.dumps(res, indent=1, default=str))
    write_md(stem.with_suffix(".md"), res)
    print(f"wrote {stem}.json and .md")
    return 0 if all(m["rc"] == 0 and m["check"]["lost"] == 0 and m["check"]["duplicated"] == 0
                    for m in res["modes"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
