"""`cdcda pipeline`: ledger, fingerprints, executors, failures and kills, on a tiny base and the shipped sample.

Every run here is real: worker processes (or Ray tasks) augment, train (2 steps), build one shared ONNX
base package, write adapter packages, check them against the eager merged model and bench them on the
host. The base package cache ($CDCDA_CACHE) is shared by the tests of this module.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cdcda_export.check.report import iter_reports
from cdcda_export.config import build
from cdcda_export.pipeline import PipelineConfig, pipeline_status, run_pipeline
from cdcda_export.pipeline import run as run_mod
from cdcda_export.pipeline.ledger import Ledger
from cdcda_export.pipeline.stages import STAGES

pytestmark = pytest.mark.integration

SAMPLE = Path(__file__).resolve().parents[1] / "cdcda_export" / "assets" / "lamp_sample" / "LaMP-3"
RECIPE = "onnx-fp32"


@pytest.fixture(scope="module", autouse=True)
def package_cache(tmp_path_factory):
    old = os.environ.get("CDCDA_CACHE")
    os.environ["CDCDA_CACHE"] = str(tmp_path_factory.mktemp("cdcda-cache"))
    yield
    if old is None:
        os.environ.pop("CDCDA_CACHE", None)
    else:
        os.environ["CDCDA_CACHE"] = old


def _data(tmp: Path) -> tuple[Path, Path]:
    d = tmp / "data"
    shutil.copytree(SAMPLE, d)
    return d / "questions.json", d / "outputs.json"


def _cfg_dict(base: Path, q: Path, o: Path, users=("3000", "3001")) -> dict:
    return {"tasks": [{"task": "LaMP-3", "questions": str(q), "outputs": str(o), "users": list(users)}],
            "base": str(base), "augment": {"per_user": 2}, "train": {"max_steps": 2},
            "export": {"recipes": [RECIPE]}, "check": {"max_heldout": 2, "max_new_tokens": 4},
            "bench": {"runs": 1, "warmup": 0, "prompt_len": 8, "gen_len": 4}}


def _cfg(*a, **k) -> PipelineConfig:
    return build(PipelineConfig, _cfg_dict(*a, **k))


def _records(out: Path) -> dict:
    with Ledger(out / "ledger.sqlite") as led:
        return {(r.task, r.user, r.stage): r for r in led.all()}


def _assert_delivered(out: Path, users) -> None:
    for u in users:
        root = out / "LaMP-3" / "users" / u
        m = json.loads((root / "export" / RECIPE / "manifest.json").read_text())
        assert m["delivery"] == "adapter-package" and m["user_id"] == u
        rep = json.loads((root / "check" / "fidelity.json").read_text())
        reports = iter_reports(rep)
        assert [r["passed"] for r in reports] == [True]
        b = json.loads((root / "bench" / f"{RECIPE}.json").read_text())
        assert b["metrics"]["decode_tok_s"]["median"] > 0 and "adapter_load_ms" in b["metrics"]
        for s in STAGES:   # every stage output is complete, nothing half-written is left beside it
            assert json.loads((root / s / "stage.json").read_text())["stage"] == s
        assert not [p for p in root.iterdir() if ".partial-" in p.name]


def test_run_rerun_noop_status_and_changed_user(tmp_path, tiny_model_dir, monkeypatch):
    base = tiny_model_dir("tiny")
    q, o = _data(tmp_path)
    out = tmp_path / "run"
    s1 = run_pipeline(_cfg(base, q, o), out, workers=2, show=False)
    assert s1["delivered"] == 2 and not s1["failures"]
    assert s1["dispatched"] == 1 + 2 * len(STAGES)      # one shared base package + 5 stages per user
    _assert_delivered(out, ["3000", "3001"])
    recs1 = _records(out)
    assert len(recs1) == 1 + 2 * len(STAGES)

    # same inputs: nothing runs, no record is touched, no worker starts
    s2 = run_pipeline(_cfg(base, q, o), out, workers=2, show=False)
    assert s2["dispatched"] == 0 and s2["executor"] == "nothing to run"
    assert {k: r.started_at for k, r in _records(out).items()} == {k: r.started_at for k, r in recs1.items()}
    st = pipeline_status(out)
    assert all(st["stages"][s] == {"done": 2, "skipped": 0, "failed": 0, "pending": 0, "stale": 0} for s in STAGES)

    # one user's data changes: status calls that user's stages stale; a rerun runs exactly those
    questions = json.loads(q.read_text())
    rec = next(r for r in questions if r["id"] == "3001")
    rec["profile"][0]["text"] = rec["profile"][0]["text"] + " (edited)"
    q.write_text(json.dumps(questions))
    st = pipeline_status(out)
    assert st["stages"]["augment"] == {"done": 1, "skipped": 0, "failed": 0, "pending": 0, "stale": 1}
    assert all(st["stages"][s]["stale"] == 1 and st["stages"][s]["done"] == 1 for s in STAGES)
    assert st["states"]["LaMP-3/3000/train"] == "done" and st["states"]["LaMP-3/3001/train"] == "stale"
    s3 = run_pipeline(_cfg(base, q, o), out, workers=2, show=False)
    recs3 = _records(out)
    rerun = sorted(k for k in recs3 if recs3[k].started_at != recs1[k].started_at)
    assert rerun == sorted(("LaMP-3", "3001", s) for s in STAGES)
    assert s3["dispatched"] == len(STAGES) and s3["delivered"] == 2
    _assert_delivered(out, ["3000", "3001"])

    # a changed training setting makes train and everything after it stale, for every user, not augment
    cfg_lr = build(PipelineConfig, {**_cfg_dict(base, q, o), "train": {"max_steps": 2, "lr": 5e-4}})
    st = pipeline_status(out, cfg_lr)
    assert st["stages"]["augment"]["done"] == 2
    assert all(st["stages"][s]["stale"] == 2 for s in ("train", "export", "check", "bench"))

    # a changed code hash (a module the stage imports was edited, pipeline.code) makes that stage and the
    # stages fed by its output stale, nothing else: train -> train, export, check, bench; check -> check only
    real = run_mod.code_hash
    for edited, stale in (("train", {"train", "export", "check", "bench"}), ("check", {"check"}),
                          ("bench", {"bench"})):
        monkeypatch.setattr(run_mod, "code_hash", lambda s, e=edited: real(s) + ("-edited" if s == e else ""))
        st = pipeline_status(out)
        assert {s for s in STAGES if st["stages"][s]["stale"] == 2} == stale, edited
        assert all(st["stages"][s]["done"] == 2 for s in STAGES if s not in stale), edited
    monkeypatch.setattr(run_mod, "code_hash", real)
    assert all(pipeline_status(out)["stages"][s]["done"] == 2 for s in STAGES)


def test_failing_user_is_isolated_and_transient_errors_retried(tmp_path, tiny_model_dir, monkeypatch):
    base = tiny_model_dir("tiny")
    q, o = _data(tmp_path)
    out = tmp_path / "run"
    # 3001's training fails for good; 3000's augment fails once with a transient error, then succeeds
    monkeypatch.setenv("CDCDA_PIPELINE_FAULTS", "train:LaMP-3/3001,augment:LaMP-3/3000:once")
    s = run_pipeline(_cfg(base, q, o), out, workers=2, max_retries=1, show=False)
    recs = _records(out)
    assert s["delivered"] == 1
    assert [(f["user"], f["stage"]) for f in s["failures"]] == [("3001", "train")]
    assert recs[("LaMP-3", "3001", "train")].status == "failed"
    assert "injected failure" in recs[("LaMP-3", "3001", "train")].error
    assert recs[("LaMP-3", "3000", "augment")].attempts == 2 and recs[("LaMP-3", "3000", "augment")].status == "done"
    assert all(recs[("LaMP-3", "3000", st)].status == "done" for st in STAGES)
    assert not any(("LaMP-3", "3001", st) in recs for st in ("export", "check", "bench"))
    assert not (out / "LaMP-3" / "users" / "3001" / "train").exists()
    st = pipeline_status(out)
    assert st["stages"]["train"] == {"done": 1, "skipped": 0, "failed": 1, "pending": 0, "stale": 0}
    assert st["stages"]["bench"]["pending"] == 1
    assert [f["user"] for f in st["failures"]] == ["3001"]

    # the CLI exits 1 naming the failure; after the cause is gone, the same command finishes the user
    monkeypatch.delenv("CDCDA_PIPELINE_FAULTS")
    s2 = run_pipeline(_cfg(base, q, o), out, workers=2, show=False)
    assert s2["delivered"] == 2 and not s2["failures"] and s2["dispatched"] == 4
    _assert_delivered(out, ["3000", "3001"])


def _poll(pred, timeout: float, what: str):
    t0 = time.time()
    while time.time() - t0 < timeout:
        v = pred()
        if v:
            return v
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _ledger_rows(out: Path) -> list[tuple]:
    try:
        con = sqlite3.connect(f"file:{out / 'ledger.sqlite'}?mode=ro", uri=True, timeout=5)
        try:
            return con.execute("SELECT user, stage, status FROM records").fetchall()
        finally:
            con.close()
    except sqlite3.Error:
        return []


def test_sigkill_mid_run_then_rerun_completes(tmp_path, tiny_model_dir):
    import psutil

    base = tiny_model_dir("tiny")
    q, o = _data(tmp_path)
    users = ("3000", "3001", "3002")
    cfgp = tmp_path / "pipeline.yaml"
    cfgp.write_text(yaml.safe_dump(_cfg_dict(base, q, o, users)))
    out = tmp_path / "run"
    cdcda = Path(sys.executable).parent / "cdcda"
    proc = subprocess.Popen([str(cdcda), "pipeline", "--config", str(cfgp), "--out", str(out), "--workers", "2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    try:
        # kill the driver once some users have trained while other stages are running
        _poll(lambda: any(s == "train" and st == "done" for _, s, st in _ledger_rows(out))
              and any(st == "running" and s != "augment" for _, s, st in _ledger_rows(out)), 150,
              "a finished train and a running stage")
        workers = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    # the pool's workers die with the driver (PR_SET_PDEATHSIG): nothing keeps writing behind our back
    _poll(lambda: not [w for w in workers if w.is_running() and w.status() != psutil.STATUS_ZOMBIE], 15,
          "the workers to exit")
    rows = _ledger_rows(out)
    assert any(st == "running" for _, _, st in rows)                 # killed mid-stage
    for u in users:                                                  # nothing that looks complete is incomplete
        for s in STAGES:
            d = out / "LaMP-3" / "users" / u / s
            if d.exists():
                assert (d / "stage.json").is_file(), d

    s = run_pipeline(_cfg(base, q, o, users), out, workers=2, show=False)
    assert s["delivered"] == 3 and not s["failures"]
    rows = _ledger_rows(out)
    assert sorted((u, st) for u, st, _ in rows if u in users) == sorted((u, st) for u in users for st in STAGES)
    assert all(status == "done" for _, _, status in rows)
    _assert_delivered(out, users)
    for u in users:
        assert [p.name for p in (out / "LaMP-3" / "users" / u / "train").iterdir()
                if p.is_dir()] == [u]                                # one adapter, no duplicate
        assert sorted(p.name for p in (out / "LaMP-3" / "users" / u / "export").iterdir()) == \
            sorted(["stage.json", RECIPE])


def test_ray_executor_on_a_local_head(tmp_path, tiny_model_dir):
    import ray   # the [ray] extra (pip install 'cdcda-export[ray]')

    base = tiny_model_dir("tiny")
    q, o = _data(tmp_path)
    out = tmp_path / "run"
    # started locally: augment done by the process pool; Ray finishes the run on the same ledger
    local = build(PipelineConfig, {**_cfg_dict(base, q, o), "export": {"recipes": []}})
    run_pipeline(local, out, workers=2, show=False)
    before = _records(out)
    env = {k: os.environ[k] for k in ("CDCDA_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE") if k in os.environ}
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             runtime_env={"env_vars": env}, log_to_driver=False)
    try:
        os.environ["CDCDA_PIPELINE_FAULTS"] = "export:LaMP-3/3000:once"   # a transient error: Ray retries it
        s = run_pipeline(_cfg(base, q, o), out, executor="ray", show=False)
    finally:
        os.environ.pop("CDCDA_PIPELINE_FAULTS", None)
        ray.shutdown()
    assert s["executor"].startswith("Ray: 2 CPUs") and s["delivered"] == 2 and not s["failures"]
    recs = _records(out)
    for u in ("3000", "3001"):   # what the local run finished is kept
        for st in ("augment", "train"):
            assert recs[("LaMP-3", u, st)].started_at == before[("LaMP-3", u, st)].started_at
    assert recs[("LaMP-3", "3000", "export")].attempts == 1   # Ray retried inside one dispatch
    assert (out / "LaMP-3" / "users" / "3000" / ".export.fault-once").is_file()   # the fault did fire
    assert s["dispatched"] == 1 + 2 * 3          # base package + export/check/bench per user; augment/train kept
    _assert_delivered(out, ["3000", "3001"])


def _many_users(tmp: Path, n: int) -> tuple[Path, Path, list[str]]:
    """``n`` LaMP-3 users cloned from the shipped sample's four (new ids, same texts and golds)."""
    q = json.loads((SAMPLE / "questions.json").read_text())
    o = json.loads((SAMPLE / "outputs.json").read_text())
    gold = {g["id"]: g["output"] for g in o["golds"]}
    users = [f"u{i:03d}" for i in range(n)]
    qs = [{**q[i % len(q)], "id": u, "profile": [{**p, "id": f"{u}-{j}"} for j, p in enumerate(q[i % len(q)]["profile"])]}
          for i, u in enumerate(users)]
    golds = [{"id": u, "output": gold[q[i % len(q)]["id"]]} for i, u in enumerate(users)]
    d = tmp / "data"
    d.mkdir()
    (d / "questions.json").write_text(json.dumps(qs))
    (d / "outputs.json").write_text(json.dumps({"task": o["task"], "golds": golds}))
    return d / "questions.json", d / "outputs.json", users


def _ray_worker_killed(tmp_path, tiny_model_dir, n: int) -> None:
    """``n`` users through Ray on a local loopback head (2 CPUs); the Ray worker running one user's training
    SIGKILLs itself (``CDCDA_PIPELINE_FAULTS=train:...:kill``) while the other worker is busy. Ray replaces the
    worker and retries the task: every user is delivered once, the ledger has one record per (user, stage),
    each dispatched once."""
    import psutil
    import ray

    base = tiny_model_dir("tiny")
    q, o, users = _many_users(tmp_path, n)
    victim = users[n // 2]
    cfg = build(PipelineConfig, {**_cfg_dict(base, q, o, users), "train": {"max_steps": 1},
                                 "check": {"max_heldout": 1, "max_new_tokens": 2},
                                 "bench": {"runs": 1, "warmup": 0, "prompt_len": 8, "gen_len": 2}})
    out = tmp_path / "run"
    env = {k: os.environ[k] for k in ("CDCDA_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE") if k in os.environ}
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             runtime_env={"env_vars": {**env, "OMP_NUM_THREADS": "1"}}, log_to_driver=False)
    try:
        os.environ["CDCDA_PIPELINE_FAULTS"] = f"train:LaMP-3/{victim}:kill"
        s = run_pipeline(cfg, out, executor="ray", show=False)
    finally:
        os.environ.pop("CDCDA_PIPELINE_FAULTS", None)
        ray.shutdown()
    marker = out / "LaMP-3" / "users" / victim / ".train.fault-kill"
    killed = int(marker.read_text())                      # the worker did die, by SIGKILL, mid-run
    assert not psutil.pid_exists(killed) or psutil.Process(killed).status() == psutil.STATUS_ZOMBIE
    assert s["delivered"] == n and not s["failures"]
    assert s["dispatched"] == 1 + n * len(STAGES)         # Ray retried inside the one dispatch: none duplicated
    recs = _records(out)
    assert sorted(k for k in recs if k[0] == "LaMP-3") == sorted(("LaMP-3", u, st) for u in users for st in STAGES)
    assert all(r.status == "done" and r.attempts == 1 for r in recs.values())
    redone = recs[("LaMP-3", victim, "train")]
    assert not redone.worker.endswith(f":{killed}")       # finished by another (new) worker process
    _assert_delivered(out, users)
    for u in users:                                       # one adapter, one package per user
        assert [p.name for p in (out / "LaMP-3" / "users" / u / "train").iterdir() if p.is_dir()] == [u]


def test_ray_worker_killed_mid_run_20_users(tmp_path, tiny_model_dir):
    # ~40 s on 2 shared cores (Ray start included), so it stays in `make test`
    _ray_worker_killed(tmp_path, tiny_model_dir, 20)
