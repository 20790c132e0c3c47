"""The worker side: one function per stage, run for one (task, user) in a worker process or Ray task.

Each stage builds its whole output directory under a temporary name (``utils.atomic_dir``) and renames
it into place when done, with a ``stage.json`` inside (fingerprint, result). A stage killed at any
point leaves only a hidden ``.<stage>.partial-<pid>-*`` folder, removed by the next build of the same
output. The stages call the same library functions as the verbs:

- ``augment``: ``augment.run_augment`` for this user (``cdcda augment``)
- ``train``: ``train.train_users`` for this user (``cdcda train``)
- ``export``: ``export.packages.adapter_package`` on the shared base package, or ``export.api.export``
  of a merged artifact where packages do not apply (``cdcda export [--adapter-only]``)
- ``check``: ``check.check_artifacts`` (``cdcda check``): ``fidelity.json`` + ``fidelity.md``
- ``bench``: ``device_harness.protocol.bench`` on the host (``cdcda bench``), one JSON per recipe

``base_package`` is the shared job: one base package per (base, recipe, LoRA layout), in the
content-addressed cache of :func:`cdcda_export.export.packages.base_package`.

Workers return a plain dict; they never write the ledger (the driver does).
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

STAGES = ("augment", "train", "export", "check", "bench")
SHARED = "base_package"
STAGE_JSON = "stage.json"
FAULTS_ENV = "CDCDA_PIPELINE_FAULTS"


@dataclass
class Job:
    """One unit of work: (task, user, stage) with everything it needs (picklable, paths as str)."""

    task: str
    user: str
    stage: str
    out: str                    # the stage's output directory
    fingerprint: str
    params: dict = field(default_factory=dict)
    faults: str = ""            # the driver's $CDCDA_PIPELINE_FAULTS (fault injection for resilience tests)

    @property
    def key(self) -> tuple[str, str, str]:
        return self.task, self.user, self.stage


class TransientError(Exception):
    """An error worth retrying (network, I/O hiccup, memory pressure, a crashed worker)."""


_TRANSIENT_ERRNOS = {errno.EIO, errno.EAGAIN, errno.EBUSY, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNREFUSED,
                     errno.ECONNABORTED, errno.ENETUNREACH, errno.EHOSTUNREACH, getattr(errno, "ESTALE", errno.EIO)}


def is_transient(e: BaseException) -> bool:
    from ..errors import UserError

    if isinstance(e, UserError):
        return False
    if isinstance(e, (TransientError, ConnectionError, TimeoutError, MemoryError)):
        return True
    if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS:
        return True
    return type(e).__module__.split(".")[0] in ("httpx", "httpcore")   # transport errors of the teacher client


# ------------------------------------------------------------------------------------------- helpers
def _write_stage_json(tmp: Path, job: Job, result: dict) -> None:
    from ..utils import now_iso, write_json_atomic

    write_json_atomic(tmp / STAGE_JSON, {"task": job.task, "user": job.user, "stage": job.stage,
                                         "fingerprint": job.fingerprint, "result": result, "created_at": now_iso()})


def read_stage_json(out: str | Path) -> dict | None:
    p = Path(out) / STAGE_JSON
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def safe_folder(name: str) -> str:
    import hashlib

    from ..utils import is_safe_name

    return name if is_safe_name(name) else f"h-{hashlib.sha256(name.encode()).hexdigest()[:16]}"


def _inject_fault(job: Job) -> None:
    """``$CDCDA_PIPELINE_FAULTS``: comma-separated ``STAGE:TASK/USER`` (a permanent error),
    ``STAGE:TASK/USER:once`` (a transient error on the first attempt only) or ``STAGE:TASK/USER:kill``
    (the worker process SIGKILLs itself on the first attempt, as the OOM killer would: the executor sees a
    dead worker, not an error). For ``once`` and ``kill`` a marker file beside the output remembers the first
    attempt (``kill`` writes the killed pid into it), so it holds for Ray retries too. ``*`` matches any
    task or user."""
    for spec in filter(None, (s.strip() for s in job.faults.split(","))):
        stage, _, rest = spec.partition(":")
        who, _, mode = rest.partition(":")
        task, _, user = who.partition("/")
        if stage != job.stage or task not in ("*", job.task) or user not in ("*", job.user):
            continue
        if mode in ("once", "kill"):
            marker = Path(job.out).parent / f".{job.stage}.fault-{mode}"
            if not marker.exists():
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.write_text(str(os.getpid()))
                if mode == "kill":
                    import signal

                    os.kill(os.getpid(), signal.SIGKILL)
                raise ConnectionError(f"injected transient fault ({FAULTS_ENV}={spec})")
            continue
        raise RuntimeError(f"injected failure ({FAULTS_ENV}={spec})")


# ------------------------------------------------------------------------------------------- stages
def stage_augment(job: Job) -> dict:
    from ..augment import SYNTHETIC_NAME, AugmentConfig, run_augment
    from ..utils import atomic_dir, sha256_file

    p = job.params
    with atomic_dir(job.out, overwrite=True) as tmp:
        report = run_augment(AugmentConfig(
            task=job.task, questions=Path(p["questions"]), outputs=Path(p["outputs"]) if p.get("outputs") else None,
            out=tmp, teacher=p["teacher"], base_url=p.get("base_url"), model=p.get("model"),
            per_user=p["per_user"], users=[job.user], seed=p["seed"]))
        syn = [f for f in tmp.glob(f"*/{SYNTHETIC_NAME}")]
        if not syn:
            raise TransientError(f"the teacher produced no {SYNTHETIC_NAME} for user {job.user} "
                                 f"(augment report: {json.dumps(report.get('totals') or report)[:300]})")
        rows = sum(1 for line in syn[0].read_text(encoding="utf-8").splitlines() if line.strip())
        result = {"synthetic_sha256": sha256_file(syn[0]), "rows": rows}
        _write_stage_json(tmp, job, result)
    return result


def stage_train(job: Job) -> dict:
    from ..train import train_users
    from ..utils import atomic_dir, sha256_dir

    p = job.params
    t = p["train"]
    final = Path(job.out)
    with atomic_dir(final, overwrite=True) as tmp:
        res = train_users(base=Path(p["base"]), task=job.task, questions=Path(p["questions"]),
                          outputs=Path(p["outputs"]) if p.get("outputs") else None, out=tmp, users=[job.user],
                          synthetic=Path(p["synthetic"]) if p.get("synthetic") else None,
                          synthetic_ratio=t["synthetic_ratio"], rank=t["rank"], alpha=t["alpha"], epochs=t["epochs"],
                          max_steps=t["max_steps"], lr=t["lr"], seed=t["seed"], holdout=t["holdout"],
                          batch_size=t["batch_size"], prompt_format=t["prompt_format"], progress=False,
                          threads=p.get("threads"), device=t.get("device", "auto"),
                          precision=t.get("precision", "auto"))[0]
        if res.status == "skipped":
            result = {"skipped": res.reason}
        else:
            name = next(d.name for d in tmp.iterdir() if d.is_dir() and not d.name.startswith("."))
            result = {"adapter": str(final / name), "adapter_sha256": sha256_dir(tmp / name),
                      "metric": res.metric_name, "before": res.metric_before, "after": res.metric_after,
                      "loss_first": res.loss_first, "loss_last": res.loss_last, "counts": res.counts}
        _write_stage_json(tmp, job, result)
    return result


def stage_base_package(job: Job) -> dict:
    from ..export.lora import ALL_TARGETS, LoraLayout
    from ..export.packages import base_package, package_sha256, read_base_package
    from ..export.registry import resolve_recipe

    p = job.params
    rec = resolve_recipe(p["recipe"])[0]
    dtype = "float32" if rec.quantization.scheme == "none" else "float16"   # as `cdcda export --base-package`
    layout = LoraLayout(rank=int(p["rank"]), targets=ALL_TARGETS, dtype=dtype)
    path = base_package(p["base"], rec, layout, progress=False)
    return {"path": str(path), "package_sha256": package_sha256(read_base_package(path)),
            "format": rec.format, "runs_here": rec.runs_on_this_host()}


def stage_export(job: Job) -> dict:
    from ..export.api import export
    from ..export.packages import adapter_package
    from ..export.registry import resolve_recipe
    from ..utils import atomic_dir, sha256_file

    p = job.params
    final = Path(job.out)
    arts = {}
    with atomic_dir(final, overwrite=True) as tmp:
        for r in p["recipes"]:
            name = safe_folder(r["name"])
            if r["delivery"] == "package":
                adapter_package(r["base_package"], p["adapter"], tmp / name)
            else:
                export(Path(p["base"]), Path(p["adapter"]), r["name"], tmp / name, progress=False)
            rec = resolve_recipe(r["name"])[0]
            arts[r["name"]] = {"path": str(final / name), "delivery": r["delivery"],
                               "base_package": r.get("base_package"), "why_merged": r.get("why_merged"),
                               "format": rec.format, "runs_here": rec.runs_on_this_host(),
                               "manifest_sha256": sha256_file(tmp / name / "manifest.json")}
        result = {"artifacts": arts}
        _write_stage_json(tmp, job, result)
    return result


def stage_check(job: Job) -> dict:
    from ..check import CheckOptions, check_artifacts
    from ..check import report as check_report
    from ..utils import atomic_dir

    p = job.params
    arts = p["artifacts"]
    with atomic_dir(job.out, overwrite=True) as tmp:
        reps = check_artifacts([Path(a["path"]) for a in arts.values()],
                               CheckOptions(task=job.task, questions=Path(p["questions"]),
                                            outputs=Path(p["outputs"]) if p.get("outputs") else None,
                                            max_heldout=p["max_heldout"], max_new_tokens=p["max_new_tokens"],
                                            threads=1))
        check_report.write_json(tmp / "fidelity.json", reps)
        check_report.write_markdown(tmp / "fidelity.md", reps, None)
        by_recipe = {}
        names = {str(Path(a["path"])): name for name, a in arts.items()}
        for rep in reps:
            m = rep.get("metrics") or {}
            art = rep.get("artifact") or {}
            by_recipe[names.get(str(art.get("path")), art.get("recipe"))] = {
                "gate": "skipped" if rep.get("skipped") else ("pass" if rep.get("passed") else "fail"),
                **{k: m.get(k) for k in ("max_abs_logit_err", "mean_kl", "top1_agreement", "greedy_match_rate",
                                         "ppl_ratio")}}
        gates = [v["gate"] for v in by_recipe.values()]
        result = {"report": str(Path(job.out) / "fidelity.json"), "gates_passed": gates.count("pass"),
                  "gates_failed": gates.count("fail"), "gates_skipped": gates.count("skipped"), "by_recipe": by_recipe}
        _write_stage_json(tmp, job, result)
    return result


def stage_bench(job: Job) -> dict:
    from device_harness.protocol import BenchConfig, bench

    from ..utils import atomic_dir, write_json_atomic

    p = job.params
    out = {}
    with atomic_dir(job.out, overwrite=True) as tmp:
        for name, a in p["artifacts"].items():
            dest = tmp / f"{safe_folder(name)}.json"
            if not a.get("runs_here"):
                res = {"skipped": f"format {a.get('format')} does not run on this host", "artifact": {"recipe": name}}
                write_json_atomic(dest, res)
                out[name] = {"skipped": res["skipped"]}
                continue
            cfg = BenchConfig(prompt_len=p["prompt_len"], gen_len=p["gen_len"], runs=p["runs"], warmup=p["warmup"],
                              threads=1, adapter=a["path"] if a["delivery"] == "package" else "")
            target = a["base_package"] if a["delivery"] == "package" else a["path"]
            res = bench(target, "host", cfg, json_out=dest)
            med = {k: (v or {}).get("median") for k, v in (res.get("metrics") or {}).items() if isinstance(v, dict)}
            out[name] = {"json": str(Path(job.out) / dest.name), **med}
        result = {"bench": out}
        _write_stage_json(tmp, job, result)
    return result


STAGE_FNS: dict[str, Callable[[Job], dict]] = {
    "augment": stage_augment, "train": stage_train, "export": stage_export, "check": stage_check,
    "bench": stage_bench, SHARED: stage_base_package,
}


def run_job(job: Job, raise_transient: bool = False) -> dict:
    """Run one job; returns ``{"ok", "result" | "error", "transient", "seconds", "worker", "peak_rss_mb"}``.

    With ``raise_transient`` (Ray) a transient error is raised as :class:`TransientError` so that Ray's
    ``retry_exceptions`` retries the task; every other error comes back as a value (no retry)."""
    from ..utils import peak_rss_mb

    t0 = time.perf_counter()
    worker = f"{socket.gethostname()}:{os.getpid()}"
    try:
        _inject_fault(job)
        result = STAGE_FNS[job.stage](job)
        return {"ok": True, "result": result, "seconds": round(time.perf_counter() - t0, 3), "worker": worker,
                "peak_rss_mb": round(peak_rss_mb(), 1)}
    except Exception as e:  # noqa: BLE001 - one user's failure is recorded, not raised through the pool
        transient = is_transient(e)
        if transient and raise_transient:
            raise TransientError(f"{type(e).__name__}: {e}") from e
        from ..errors import UserError

        text = f"{type(e).__name__}: {e}"
        if not isinstance(e, UserError):
            text += "\n" + "".join(traceback.format_exception(e)[-6:])
        return {"ok": False, "error": text, "transient": transient, "user_error": isinstance(e, UserError),
                "seconds": round(time.perf_counter() - t0, 3), "worker": worker, "peak_rss_mb": round(peak_rss_mb(), 1)}
