"""The driver: plan every (task, user, stage), skip what the ledger says is current, run the rest.

Layout of ``OUT``::

    ledger.sqlite                         one record per (task, user, stage) + the shared base packages
    pipeline.json                         the resolved config of the last run (``status`` reads it)
    base-<arch>/                          the random-weight base when no ``base`` is configured
    summary.json                          counts, per-user deliverables, figures of the last run
    <task>/users/<user>/augment/          <user>/synthetic.jsonl (+ the augmenter's cache, report)
    <task>/users/<user>/train/<user>/     the peft adapter + training.json
    <task>/users/<user>/export/<recipe>/  the adapter package (or merged artifact) per recipe
    <task>/users/<user>/check/            fidelity.json, fidelity.md
    <task>/users/<user>/bench/            <recipe>.json (bench result schema)

Base packages live in the content-addressed cache of ``export.packages.base_package``
(``$CDCDA_CACHE/base-packages``), built once per (base, recipe, LoRA layout) and shared by every user.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from ..errors import UserError
from .code import code_hash
from .config import PipelineConfig
from .ledger import Ledger, Record, fingerprint
from .stages import FAULTS_ENV, SHARED, STAGES, Job, read_stage_json, safe_folder

LEDGER = "ledger.sqlite"
CONFIG_JSON = "pipeline.json"
SHARED_TASK = "*"
STATES = ("done", "skipped", "failed", "pending", "stale")


def _log(msg: str) -> None:
    from rich.console import Console

    Console(stderr=True).print(f"[bold cyan]>>[/] {msg}", highlight=False)


@dataclass
class UserPlan:
    task: str
    user: str
    root: Path                 # OUT/<task>/users/<user>
    questions: str
    outputs: str | None
    data_sha: str              # this user's record (input, profile, gold)
    others_sha: str | None     # the other users' profiles, for tasks whose training reads them (LaMP-1)

    @property
    def key(self) -> tuple[str, str]:
        return self.task, self.user

    def out(self, stage: str) -> Path:
        return self.root / stage


class Skip(Exception):
    """This stage does not apply to this user (recorded as ``skipped`` with the reason)."""


class Fail(Exception):
    """This stage cannot run for this user (a shared input failed): recorded as ``failed`` with the reason."""


class Blocked(Exception):
    """An input of this stage is not current yet (an upstream stage or a base package)."""


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def plan_users(cfg: PipelineConfig, out: Path) -> list[UserPlan]:
    from ..data import load_lamp, sample_paths

    plans: list[UserPlan] = []
    for tr in cfg.tasks:
        q, o = (tr.questions, tr.outputs) if tr.questions else tuple(map(str, sample_paths(tr.task)))
        ds = load_lamp(tr.task, q, o, require_all_golds=False)
        users = ds.select(tr.users)
        if tr.max_users:
            users = users[: tr.max_users]
        others = _sha([[u.id, u.profile] for u in ds.users]) if ds.task.name == "LaMP-1" else None
        for u in users:
            plans.append(UserPlan(ds.task.name, u.id, Path(out) / ds.task.name / "users" / safe_folder(u.id),
                                  str(Path(q).resolve()), str(Path(o).resolve()) if o else None,
                                  _sha({"id": u.id, "input": u.input, "profile": u.profile, "gold": u.gold}), others))
    return plans


def _recipes_sha(recipes: list[str]) -> str:
    """Content of the shipped recipe files and of any recipe given as a path (a changed recipe file makes
    the exports that used it stale)."""
    root = Path(__file__).resolve().parents[1] / "recipes"
    files = sorted(root.rglob("*.yaml")) + [Path(r) for r in recipes if Path(r).is_file()]
    return _sha([[str(f.name), hashlib.sha256(f.read_bytes()).hexdigest()] for f in files])


class Planner:
    """Fingerprints and currency of every (user, stage), shared by the driver and ``status``."""

    def __init__(self, cfg: PipelineConfig, out: Path, ledger: Ledger, base: Path, base_sha: str):
        from ..utils import versions

        self.cfg, self.out, self.ledger, self.base, self.base_sha = cfg, out, ledger, base, base_sha
        self.versions = versions()
        self.recipes_sha = _recipes_sha(cfg.export.recipes)

    def common(self, stage: str) -> dict:
        """What every fingerprint of ``stage`` holds: the library versions and the hash of the stage's code
        (its function and every module of ours it imports, :mod:`.code`)."""
        return {"stage": stage, "code": code_hash(stage), "versions": self.versions}

    # ------------------------------------------------------------------ base packages
    def uses_packages(self) -> bool:
        return self.cfg.export.delivery != "merged" and bool(self.cfg.export.recipes)

    def package_job(self, recipe: str) -> tuple[Job, dict]:
        params = {"base": str(self.base), "recipe": recipe, "rank": self.cfg.train.rank}
        inputs = {**self.common(SHARED), "base": self.base_sha, "recipe": recipe, "rank": self.cfg.train.rank,
                  "recipes_sha": self.recipes_sha}
        return Job(SHARED_TASK, recipe, SHARED, str(self.out / "base-packages" / safe_folder(recipe)),
                   fingerprint(inputs), params, os.environ.get(FAULTS_ENV, "")), inputs

    def package_state(self, recipe: str) -> tuple[str, Record | None]:
        """``current`` (result usable), ``failed`` or ``pending``."""
        job, _ = self.package_job(recipe)
        rec = self.ledger.get(SHARED_TASK, recipe, SHARED)
        if rec is None or rec.fingerprint != job.fingerprint:
            return "pending", rec
        if rec.status == "done" and (Path(rec.result["path"]) / "manifest.json").is_file():
            return "current", rec
        return ("failed", rec) if rec.status == "failed" else ("pending", rec)

    def deliveries(self) -> list[dict]:
        """Per recipe: delivery (package | merged), the base package and why a recipe fell back to merged.
        Raises Blocked while a base package is not settled."""
        out = []
        for r in self.cfg.export.recipes:
            if not self.uses_packages():
                out.append({"name": r, "delivery": "merged", "why_merged": "export.delivery: merged"})
                continue
            state, rec = self.package_state(r)
            if state == "current":
                out.append({"name": r, "delivery": "package", "base_package": rec.result["path"],
                            "package_sha256": rec.result["package_sha256"]})
            elif state == "failed" and self.cfg.export.delivery == "auto" and (rec.result or {}).get("user_error"):
                why = (rec.error or "").split("\n")[0]
                out.append({"name": r, "delivery": "merged", "why_merged": f"no base package: {why}"})
            elif state == "failed":
                raise Fail(f"base package for {r} failed: {(rec.error or '').splitlines()[0] if rec.error else ''}")
            else:
                raise Blocked(f"base package {r}")
        return out

    # ------------------------------------------------------------------ user stages
    def current(self, u: UserPlan, stage: str, fp: str) -> Record | None:
        """The ledger record when it is finished with this fingerprint and its output is in place."""
        rec = self.ledger.get(u.task, u.user, stage)
        if rec is None or rec.fingerprint != fp or rec.status not in ("done", "skipped"):
            return None
        if rec.status == "done":
            sj = read_stage_json(u.out(stage))
            if sj is None or sj.get("fingerprint") != fp:
                return None   # output missing or replaced since: run it again
        return rec

    def upstream(self, u: UserPlan, stage: str, results: dict) -> dict:
        r = results.get((u.task, u.user, stage))
        if r is None:
            raise Blocked(stage)
        if "skipped" in r:
            raise Skip(f"{stage} skipped: {r['skipped']}")
        return r

    def job(self, u: UserPlan, stage: str, results: dict) -> tuple[Job, dict]:
        """The job (and its fingerprint inputs) of ``stage`` for ``u``; raises Skip or Blocked."""
        c, t = self.cfg, self.cfg.train
        data = {"questions": u.questions, "outputs": u.outputs}
        if stage == "augment":
            if not c.augment.enabled:
                raise Skip("augment.enabled: false")
            inputs = {"data": u.data_sha, "augment": asdict(c.augment), "seed": t.seed}
            params = {**data, **asdict(c.augment), "seed": t.seed}
        elif stage == "train":
            syn = None
            if c.augment.enabled:
                a = self.upstream(u, "augment", results)
                syn = a["synthetic_sha256"]
            trained_by = {k: v for k, v in asdict(t).items() if k != "gpus_per_task"}   # scheduling only
            inputs = {"data": u.data_sha, "others": u.others_sha, "base": self.base_sha, "train": trained_by,
                      "synthetic": syn}
            params = {**data, "base": str(self.base), "train": asdict(t),
                      "synthetic": str(u.out("augment")) if syn else None}
        elif stage == "export":
            tr = self.upstream(u, "train", results)
            if not c.export.recipes:
                raise Skip("export.recipes is empty")
            recs = self.deliveries()
            inputs = {"adapter": tr["adapter_sha256"], "base": self.base_sha, "recipes": recs,
                      "recipes_sha": self.recipes_sha}
            params = {"base": str(self.base), "adapter": tr["adapter"], "recipes": recs}
        elif stage == "check":
            ex = self.upstream(u, "export", results)
            if not c.check.enabled:
                raise Skip("check.enabled: false")
            arts = ex["artifacts"]
            inputs = {"data": u.data_sha, "artifacts": {k: a["manifest_sha256"] for k, a in arts.items()},
                      "check": asdict(c.check)}
            params = {**data, "artifacts": arts, **asdict(c.check)}
        elif stage == "bench":
            ex = self.upstream(u, "export", results)
            if not c.bench.enabled:
                raise Skip("bench.enabled: false")
            arts = ex["artifacts"]
            inputs = {"artifacts": {k: [a["manifest_sha256"], a.get("base_package")] for k, a in arts.items()},
                      "bench": asdict(c.bench)}
            params = {"artifacts": arts, **asdict(c.bench)}
        else:  # pragma: no cover
            raise ValueError(stage)
        inputs = {**self.common(stage), "task": u.task, "user": u.user, **inputs}
        return Job(u.task, u.user, stage, str(u.out(stage)), fingerprint(inputs), params,
                   os.environ.get(FAULTS_ENV, "")), inputs


# ---------------------------------------------------------------------------------------------- base
def resolve_pipeline_base(cfg: PipelineConfig, out: Path, log: Callable[[str], None] = _log) -> Path:
    if cfg.base:
        base = Path(cfg.base)
        if base.suffix == ".gguf":
            from ..models.gguf import resolve_base

            return Path(resolve_base(base))
        if not (base / "config.json").is_file():
            raise UserError("not a Hugging Face model directory (no config.json) nor a .gguf file", file=str(base),
                            field="base")
        return base.resolve()
    from ..models import init_model

    base = out / f"base-{cfg.base_arch}"
    if not (base / "config.json").is_file():
        from ..models.gguf import PACKAGED

        kind = "real pretrained weights, installed package" if cfg.base_arch in PACKAGED else "random weights, real config"
        log(f"base model: {cfg.base_arch} ({kind}) -> {base}")
    return Path(init_model(cfg.base_arch, base)).resolve()


@contextlib.contextmanager
def _run_lock(out: Path):
    import fcntl

    out.mkdir(parents=True, exist_ok=True)
    f = open(out / ".pipeline.lock", "w")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise UserError("another `cdcda pipeline` is running on this directory", file=str(out),
                        hint="wait for it (`cdcda pipeline status --out ...` shows its progress) or use another --out")
    try:
        yield
    finally:
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()


# ---------------------------------------------------------------------------------------------- driver
class Driver:
    def __init__(self, planner: Planner, plans: list[UserPlan], executor, *, max_retries: int,
                 log: Callable[[str], None]):
        self.p, self.plans, self.ex, self.max_retries, self.log = planner, plans, executor, max_retries, log
        self.ledger = planner.ledger
        self.results: dict[tuple, dict] = {}
        self.inflight: dict[cf.Future, tuple[Job, dict, int, int]] = {}
        self.generation = 0
        self.waiting: list[UserPlan] = []
        self.by_key = {u.key: u for u in plans}
        self.dispatched = 0

    def submit(self, job: Job, inputs: dict) -> None:
        attempt = self.ledger.start(job.task, job.user, job.stage, job.fingerprint, inputs)
        self.inflight[self.ex.submit(job)] = (job, inputs, attempt, self.generation)
        self.dispatched += 1

    def run(self) -> None:
        if self.p.uses_packages():
            for r in self.p.cfg.export.recipes:
                state, _ = self.p.package_state(r)
                if state != "current":
                    job, inputs = self.p.package_job(r)
                    self.log(f"base package {r}: building (once, shared by every user)")
                    self.submit(job, inputs)
        for u in self.plans:
            self.advance(u)
        while self.inflight:
            done, _ = cf.wait(list(self.inflight), return_when=cf.FIRST_COMPLETED)
            for fut in done:
                self.complete(fut)

    def advance(self, u: UserPlan) -> None:
        """Walk ``u``'s stages: take current ones from the ledger, record skips, dispatch the first to run."""
        for stage in STAGES:
            key = (u.task, u.user, stage)
            if key in self.results:
                continue
            try:
                job, inputs = self.p.job(u, stage, self.results)
            except Skip as s:
                fp = fingerprint({**self.p.common(stage), "task": u.task, "user": u.user, "skip": str(s)})
                rec = self.ledger.get(*key)
                if not (rec and rec.status == "skipped" and rec.fingerprint == fp):
                    self.ledger.start(*key, fp, {"skip": str(s)})
                    self.ledger.finish(*key, fp, "skipped", result={"skipped": str(s)})
                self.results[key] = {"skipped": str(s)}
                continue
            except Fail as f:
                fp = fingerprint({**self.p.common(stage), "task": u.task, "user": u.user, "fail": str(f)})
                self.ledger.start(*key, fp, {"fail": str(f)})
                self.ledger.finish(*key, fp, "failed", error=str(f))
                self.log(f"[red]{u.task}/{u.user} {stage} failed[/]: {f}")
                return
            except Blocked:
                if stage == "export" and u not in self.waiting:
                    self.waiting.append(u)   # a base package is being built
                return
            rec = self.p.current(u, stage, job.fingerprint)
            if rec is not None:
                self.results[key] = rec.result or {}
                continue
            self.submit(job, inputs)
            return

    def complete(self, fut: cf.Future) -> None:
        from concurrent.futures.process import BrokenProcessPool

        job, inputs, attempt, gen = self.inflight.pop(fut)
        try:
            res = fut.result()
        except BrokenProcessPool:
            if gen == self.generation:
                self.generation += 1
                self.ex.restart()
            res = {"ok": False, "transient": True, "error": "the worker process died (killed, or out of memory)"}
        except Exception as e:  # noqa: BLE001 - Ray: retries exhausted, or the worker/node died
            res = {"ok": False, "transient": False, "error": f"{type(e).__name__}: {e}"[:4000]}
        who = f"{job.task}/{job.user}" if job.task != SHARED_TASK else f"{job.user}:"
        if not res["ok"]:
            if res.get("transient") and self.ex.driver_retries and attempt <= self.max_retries:
                self.log(f"{who} {job.stage}: attempt {attempt} failed ({res['error'].splitlines()[0]}); retrying")
                self.submit(job, inputs)
                return
            self.ledger.finish(job.task, job.user, job.stage, job.fingerprint, "failed", error=res["error"],
                               result={"user_error": res.get("user_error", False)}, worker=res.get("worker"),
                               seconds=res.get("seconds"))
            self.log(f"[red]{who} {job.stage} failed[/]: {res['error'].splitlines()[0]}")
        else:
            result = res["result"]
            status = "skipped" if "skipped" in result else "done"
            self.ledger.finish(job.task, job.user, job.stage, job.fingerprint, status, result=result,
                               worker=res.get("worker"), seconds=res.get("seconds"))
            self.log(f"{who} {job.stage}: {status} in {res.get('seconds', 0):.1f} s ({res.get('worker')})")
        if job.stage == SHARED:
            waiting, self.waiting = self.waiting, []
            for u in waiting:
                self.advance(u)
        elif res["ok"]:
            self.results[job.key] = res["result"]
            self.advance(self.by_key[(job.task, job.user)])


def run_pipeline(cfg: PipelineConfig, out: Path, *, executor: str = "local", address: str | None = None,
                 workers: int | None = None, max_retries: int = 2, log: Callable[[str], None] = _log,
                 show: bool = True) -> dict:
    """Run every (task, user, stage) whose inputs changed since its ledger record; returns the summary."""
    from ..config import to_dict
    from ..utils import sha256_dir, write_json_atomic
    from .executors import make_executor

    out = Path(out).resolve()
    t0 = time.perf_counter()
    with _run_lock(out):
        base = resolve_pipeline_base(cfg, out, log)
        write_json_atomic(out / CONFIG_JSON, to_dict(cfg))
        with Ledger(out / LEDGER) as ledger:
            planner = Planner(cfg, out, ledger, base, sha256_dir(base))
            plans = plan_users(cfg, out)
            log(f"{len(plans)} users in {len(cfg.tasks)} task(s); ledger {out / LEDGER}")
            ex = None
            driver = Driver(planner, plans, None, max_retries=max_retries, log=log)
            try:
                # the executor starts lazily: a rerun with nothing to do starts no worker
                driver.ex = _LazyExecutor(lambda: make_executor(executor, base=base, address=address, workers=workers,
                                                                max_retries=max_retries, train=cfg.train), log)
                driver.run()
            finally:
                ex = driver.ex
                if ex is not None:
                    ex.shutdown()
            summary = summarize(cfg, out, planner, plans)
            summary.update(base=str(base), executor=getattr(ex, "description", None) or "nothing to run",
                           dispatched=driver.dispatched, wall_s=round(time.perf_counter() - t0, 1))
            write_json_atomic(out / "summary.json", summary)
    if show:
        from .report import print_summary

        print_summary(summary)
    return summary


class _LazyExecutor:
    def __init__(self, factory, log):
        self.factory, self.log, self.ex, self.description = factory, log, None, None

    def _get(self):
        if self.ex is None:
            self.ex = self.factory()
            self.description = self.ex.describe()
            self.log(self.description)
        return self.ex

    @property
    def driver_retries(self) -> bool:
        return self._get().driver_retries

    def submit(self, job):
        return self._get().submit(job)

    def restart(self):
        if self.ex is not None:
            self.ex.restart()

    def shutdown(self):
        if self.ex is not None:
            self.ex.shutdown()


# ---------------------------------------------------------------------------------------------- status
def user_states(planner: Planner, plans: list[UserPlan]) -> dict[tuple, str]:
    """``{(task, user, stage): done|skipped|failed|pending|stale}`` for the current config and data."""
    states: dict[tuple, str] = {}
    results: dict[tuple, dict] = {}
    for u in plans:
        # a stage whose upstream is not current is Blocked by planner.job (its input is not in ``results``);
        # a stage that does not read that upstream (bench reads export, not check) is judged on its own
        for stage in STAGES:
            key = (u.task, u.user, stage)
            rec = planner.ledger.get(*key)
            try:
                job, _ = planner.job(u, stage, results)
            except Skip as s:
                states[key] = "skipped"
                results[key] = {"skipped": str(s)}
                continue
            except Fail:
                states[key] = "failed"
                continue
            except Blocked:
                states[key] = ("stale" if rec and rec.status in ("done", "skipped") else
                               "failed" if rec and rec.status == "failed" else "pending")
                continue
            cur = planner.current(u, stage, job.fingerprint)
            if cur is not None:
                states[key] = cur.status
                results[key] = cur.result or {}
                continue
            if rec is None or rec.status == "running":
                states[key] = "pending"
            elif rec.fingerprint != job.fingerprint and rec.status in ("done", "skipped", "failed"):
                states[key] = "stale" if rec.status != "failed" else "pending"
            elif rec.status == "failed":
                states[key] = "failed"
            else:
                states[key] = "stale"   # done, same inputs, but its output is gone
    return states


def counts(states: dict[tuple, str]) -> dict[str, dict[str, int]]:
    table = {s: {k: 0 for k in STATES} for s in STAGES}
    for (_, _, stage), st in states.items():
        table[stage][st] += 1
    return table


def pipeline_status(out: Path, cfg: PipelineConfig | None = None) -> dict:
    """Per stage: how many users are done, skipped, failed, pending or stale, for ``cfg`` (default: the
    config of the last run, ``OUT/pipeline.json``) and the data as it is now."""
    from ..config import build
    from ..utils import sha256_dir

    out = Path(out).resolve()
    if not (out / LEDGER).is_file():
        raise UserError("no pipeline ledger here", file=str(out / LEDGER),
                        hint="run `cdcda pipeline --out DIR` first (or pass the --out of that run)")
    if cfg is None:
        cfgp = out / CONFIG_JSON
        cfg = build(PipelineConfig, json.loads(cfgp.read_text(encoding="utf-8")), source=str(cfgp))
    base = resolve_pipeline_base(cfg, out, lambda m: None) if cfg.base else out / f"base-{cfg.base_arch}"
    base_sha = sha256_dir(base) if base.exists() else "missing"
    with Ledger(out / LEDGER) as ledger:
        planner = Planner(cfg, out, ledger, base, base_sha)
        plans = plan_users(cfg, out)
        states = user_states(planner, plans)
        failures = [{"task": r.task, "user": r.user, "stage": r.stage, "attempts": r.attempts,
                     "error": (r.error or "").splitlines()[0] if r.error else ""}
                    for r in ledger.all() if r.status == "failed"
                    and (r.task == SHARED_TASK or states.get((r.task, r.user, r.stage)) == "failed")]
        packages = {r: planner.package_state(r)[0] for r in cfg.export.recipes} if planner.uses_packages() else {}
    return {"out": str(out), "users": len(plans), "stages": counts(states), "base_packages": packages,
            "failures": failures, "states": {"/".join(k): v for k, v in states.items()}}


def summarize(cfg: PipelineConfig, out: Path, planner: Planner, plans: list[UserPlan]) -> dict:
    states = user_states(planner, plans)
    ledger = planner.ledger
    tasks: dict[str, dict] = {}
    users = []
    timings: dict[str, list[float]] = {}
    fidelity_rows, bench_rows, failures = [], [], []
    for u in plans:
        st = {s: states[(u.task, u.user, s)] for s in STAGES}
        recs = {s: ledger.get(u.task, u.user, s) for s in STAGES}
        entry = {"task": u.task, "user": u.user, "stages": st, "deliverables": {}}
        tr = recs["train"].result if recs["train"] and st["train"] == "done" else None
        t = tasks.setdefault(u.task, {"users": 0, "metric": None, "before": [], "after": []})
        t["users"] += 1
        if tr and tr.get("before") is not None and tr.get("after") is not None:
            t["metric"] = tr.get("metric")
            t["before"].append(tr["before"])
            t["after"].append(tr["after"])
        if recs["export"] and st["export"] == "done":
            entry["deliverables"] = {k: {"path": a["path"], "delivery": a["delivery"]}
                                     for k, a in recs["export"].result["artifacts"].items()}
        if recs["check"] and st["check"] == "done":
            entry["fidelity"] = recs["check"].result["report"]
            for name, row in recs["check"].result["by_recipe"].items():
                fidelity_rows.append({"task": u.task, "user": u.user, "recipe": name, **row})
        if recs["bench"] and st["bench"] == "done":
            for name, row in recs["bench"].result["bench"].items():
                bench_rows.append({"task": u.task, "user": u.user, "recipe": name, **row})
        for s, r in recs.items():
            if r and r.status == "done" and r.seconds is not None and st[s] == "done":
                timings.setdefault(s, []).append(r.seconds)
            if r and r.status == "failed" and st[s] == "failed":
                failures.append({"task": u.task, "user": u.user, "stage": s,
                                 "error": (r.error or "").splitlines()[0] if r.error else ""})
        users.append(entry)
    for t in tasks.values():
        n = len(t["before"])
        t["before"] = sum(t.pop("before")) / n if n else None
        t["after"] = sum(t.pop("after")) / n if n else None
        t["n_metric"] = n
    figures = {s: {"n": len(v), "total_s": round(sum(v), 2), "mean_s": round(sum(v) / len(v), 3),
                   "users_per_hour_per_worker": round(3600 * len(v) / sum(v), 1) if sum(v) else None}
               for s, v in timings.items()}
    delivered = sum(1 for e in users if all(v in ("done", "skipped") for v in e["stages"].values())
                    and e["deliverables"])
    return {"out": str(out), "users": len(plans), "delivered": delivered, "stages": counts(states), "tasks": tasks,
            "fidelity": fidelity_rows, "bench": bench_rows, "stage_seconds": figures, "failures": failures,
            "per_user": users}
