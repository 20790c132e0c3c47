"""Adversarial inputs (issue 18): each bad input ends in a clear error naming the file or field, leaves
nothing that looks complete, and loses no finished work. The table in tests/README.md lists every class
tried and the test that holds it; this file holds the ones without a home elsewhere.

All on the tiny fixtures and tiny ONNX fp32 exports (a few seconds each).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import queue
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from cdcda_export import runtime
from cdcda_export.errors import UserError, ValidationErrors
from cdcda_export.export.api import export
from cdcda_export.export.manifest import verify
from cdcda_export.utils import atomic_dir, clean_stale_partials

CLI = [sys.executable, "-c", "from cdcda_export.cli import main; main()"]


def _manifest(art: Path) -> dict:
    return json.loads((art / "manifest.json").read_text(encoding="utf-8"))


@pytest.fixture
def art(tiny_artifact, tmp_path) -> Path:
    """A private copy of the tiny ONNX fp32 artifact (tests damage it)."""
    return Path(shutil.copytree(tiny_artifact("tiny", "onnx/fp32"), tmp_path / "art"))


# ------------------------------------------------------------------ manifests edited to claim another recipe


@pytest.mark.parametrize("edit, field", [
    (lambda m: m["recipe"].update(name="int4"), "recipe.name"),
    (lambda m: m["recipe"]["resolved"]["quantization"].update(scheme="int4", block_size=32),
     "recipe.resolved.quantization"),
    (lambda m: m.update(quantization_applied={"scheme": "int4", "applied": True}), "quantization_applied"),
    (lambda m: m["io"].update(max_seq_len=4096), "io.max_seq_len"),
    (lambda m: m.update(user_id="someone-else"), "user_id"),
    (lambda m: m["base_model"].update(sha256="0" * 64), "base_model.sha256"),
])
def test_manifest_edited_to_claim_another_recipe_is_named(art, edit, field):
    """export records a sha256 per claimed field (claims_sha256); a hand edit is refused on load naming the
    field, and `check`'s file verification lists it; the untouched artifact loads."""
    runtime.load(art)
    m = _manifest(art)
    edit(m)
    (art / "manifest.json").write_text(json.dumps(m, indent=2))
    with pytest.raises(UserError, match="edited after export") as e:
        runtime.load(art)
    assert e.value.field == field and e.value.file == str(art / "manifest.json")
    assert "cdcda export" in str(e.value)          # the re-export command
    assert any(repr(field) in p for p in verify(art))


def test_manifest_claims_cover_every_claimed_field(tiny_artifact):
    from cdcda_export.runtime.base import manifest_claims

    m = _manifest(tiny_artifact("tiny", "onnx/fp32"))
    assert m["claims_sha256"] == manifest_claims(m)
    assert {"format", "recipe.name", "recipe.resolved.quantization", "quantization_applied", "io.max_seq_len",
            "base_model.sha256", "user_id", "task"} <= set(m["claims_sha256"])
    # sources move between machines and files are checked against the files themselves: not claims
    assert not any(k.endswith(".source") or k == "files" for k in m["claims_sha256"])


def test_manifest_with_claims_removed_or_garbled(art):
    m = _manifest(art)
    m["claims_sha256"] = "tampered"
    (art / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(UserError, match="edited after export") as e:
        runtime.load(art)
    assert e.value.field == "claims_sha256"
    del m["claims_sha256"]          # a manifest from before claims existed: loads (files still verified)
    (art / "manifest.json").write_text(json.dumps(m))
    runtime.load(art)


# ------------------------------------------------------------------ adapters whose config disagrees with weights


@pytest.fixture(scope="module")
def lora(tiny_model_dir, tmp_path_factory) -> Path:
    """A real peft LoRA adapter on the tiny base: r=4, targets q_proj, v_proj, down_proj (non-zero B)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("bad-adapters") / "good"
    torch.manual_seed(5)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("tiny"), dtype=torch.float32)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    get_peft_model(model, cfg).save_pretrained(out, safe_serialization=True)
    return out


def _edit_config(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    p = dst / "adapter_config.json"
    cfg = json.loads(p.read_text())
    cfg.update(changes)
    p.write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("changes, field, needle", [
    ({"r": 8}, "r", "says rank 8, but adapter_model.safetensors holds rank-4"),
    ({"target_modules": ["q_proj", "v_proj"]}, "target_modules", "does not include ['down_proj']"),
    ({"target_modules": ["q_proj", "v_proj", "down_proj", "k_proj"]}, "target_modules",
     "lists ['k_proj'], but adapter_model.safetensors has no LoRA weights"),
    ({"target_modules": r".*\.q_proj"}, "target_modules", "regex"),
])
def test_adapter_config_disagreeing_with_weights_is_named(tiny_model_dir, lora, tmp_path, changes, field, needle):
    """peft would crash deep in load_state_dict (rank) or silently drop / zero-init modules (targets)."""
    from cdcda_export.train.modeling import check_adapter_dir

    ad = _edit_config(lora, tmp_path / "ad", **changes)
    with pytest.raises(UserError) as e:
        export(tiny_model_dir("tiny"), ad, "onnx/fp32", tmp_path / "out", progress=False)
    assert e.value.field == field and e.value.file == str(ad / "adapter_config.json"), str(e.value)
    assert needle in str(e.value)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    with pytest.raises(UserError, match="adapter_config.json"):     # merge and eval check the same way
        check_adapter_dir(ad)


def test_consistent_adapter_passes_the_check(lora):
    from cdcda_export.train.modeling import check_adapter_weights

    check_adapter_weights(lora)


# ------------------------------------------------------------------ LaMP files of the wrong task


@pytest.mark.parametrize("given, claimed", [("LaMP-2", "LaMP-3"), ("LaMP-1", "LaMP-5"), ("LaMP-5", "LaMP-1"),
                                            ("LaMP-3", "LaMP-7"), ("LaMP-4", "LaMP-7")])
def test_lamp_questions_of_another_task_are_refused(given, claimed):
    """LaMP-1/5 share profile fields, as do LaMP-3/4 and 7: the question template tells them apart."""
    from cdcda_export.data import load_lamp, sample_paths

    q = sample_paths(given)[0]
    with pytest.raises(ValidationErrors) as e:
        load_lamp(claimed, q)
    first = e.value.problems[0]
    assert f"reads like a {given} question" in first and f"--task is {claimed}" in first
    assert e.value.file == str(q)


def test_cli_data_validate_wrong_task_exits_2():
    from cdcda_export.data import sample_paths

    q = sample_paths("LaMP-1")[0]
    r = subprocess.run([*CLI, "data", "validate", "--task", "LaMP-5", "--questions", str(q)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "reads like a LaMP-1 question" in r.stderr


# ------------------------------------------------------------------ --out that cannot be written


def test_out_under_a_regular_file_is_a_user_error(tiny_model_dir, tmp_path):
    blocker = tmp_path / "plain-file"
    blocker.write_text("not a directory")
    out = blocker / "sub" / "art"
    with pytest.raises(UserError, match="cannot be written") as e:
        export(tiny_model_dir("tiny"), None, "onnx/fp32", out, progress=False)
    assert e.value.field == "--out" and e.value.file == str(out)
    assert blocker.read_text() == "not a directory" and sorted(tmp_path.iterdir()) == [blocker]


# ------------------------------------------------------------------ the disk fills mid-export


def test_disk_full_mid_export_is_a_clear_error_and_leaves_nothing(tiny_model_dir, tmp_path):
    """RLIMIT_FSIZE (SIGXFSZ ignored) makes the first write past 200 kB fail with EFBIG, as a full disk fails
    with ENOSPC: `cdcda export` exits 2 naming --out, no traceback, and leaves no artifact or partial dir."""
    out = tmp_path / "art"
    wrapper = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
               "resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000)); "
               "from cdcda_export.cli import main; sys.argv[0] = 'cdcda'; main()")
    r = subprocess.run([sys.executable, "-c", wrapper, "export", "--base", str(tiny_model_dir("tiny")),
                        "--recipe", "onnx/fp32", "--out", str(out), "--quiet"],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "NO_COLOR": "1"})
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "ran out of space" in r.stderr and str(out) in r.stderr
    assert not out.exists() and not (out / "manifest.json").exists()
    assert list(tmp_path.iterdir()) == [], "partial or work directories were left behind"


def test_disk_full_error_names_out_from_argv():
    import errno

    from cdcda_export.cli import _disk_full, disk_full_error

    inner = OSError(errno.ENOSPC, "No space left on device")
    try:
        try:
            raise inner
        except OSError as x:
            raise RuntimeError("exporter wrapped it") from x
    except RuntimeError as wrapped:
        assert _disk_full(wrapped) is inner
    e = disk_full_error(inner, ["export", "--out=/data/art", "--quiet"])
    assert e.file == "/data/art" and "no space left" in str(e) and "re-run" in str(e)
    assert _disk_full(ValueError("x")) is None


# ------------------------------------------------------------------ SIGKILL during an export


def test_sigkill_mid_export_leaves_nothing_complete_and_rerun_succeeds(tiny_model_dir, tmp_path):
    out = tmp_path / "art"
    cmd = [*CLI, "export", "--base", str(tiny_model_dir("tiny")), "--recipe", "onnx/fp32", "--out", str(out),
           "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        # kill once the export is under way (its partial directory exists), or after 2 s at the latest
        t_start = time.monotonic()
        while time.monotonic() < deadline and proc.poll() is None:
            if list(tmp_path.glob(".art.partial-*")) and time.monotonic() - t_start >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the export finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists(), "a killed export left a final --out directory"
    killed = list(tmp_path.glob(f".art.partial-{proc.pid}-*"))
    assert killed, "the killed export's partial directory (named with its pid) is where it should be"
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert verify(out) == []
    runtime.load(out)
    # the rerun removed the killed run's partial directory (its pid is gone)
    assert not any(p.exists() for p in killed) and not list(tmp_path.glob(".art.partial-*"))


# ------------------------------------------------------------------ stale partial directories of killed runs


def _dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _wait_zombie(pid: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return
        time.sleep(0.02)
    raise AssertionError(f"process {pid} did not become a zombie")


def test_stale_partial_dirs_of_gone_processes_are_removed_and_live_ones_kept(tmp_path):
    """A killed build leaves `.NAME.partial-<pid>-*`; the next build of NAME removes those whose process is
    gone (exited, or killed and not yet reaped), and never one of a live process (a concurrent build), of
    another NAME, or one without a pid in its name (an older version's: its owner cannot be told)."""
    final = tmp_path / "art"
    dead = _dead_pid()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        stale = tmp_path / f".art.partial-{dead}-x1"
        stale.mkdir()
        (stale / "model.onnx").write_bytes(b"half a model")
        running = tmp_path / f".art.partial-{live.pid}-x2"
        running.mkdir()
        other = tmp_path / f".art2.partial-{dead}-x3"
        other.mkdir()
        legacy = tmp_path / ".art.partial-k3j2h1"
        legacy.mkdir()
        with atomic_dir(final) as tmp:
            assert tmp.name.startswith(f".art.partial-{os.getpid()}-"), tmp.name
            assert not stale.exists(), "cleaned before the new build starts"
            (tmp / "manifest.json").write_text("{}")
        assert (final / "manifest.json").is_file()
        assert running.is_dir() and other.is_dir() and legacy.is_dir()
        # the concurrent build's process is killed and not reaped yet (a zombie): its folder is stale now
        live.kill()
        _wait_zombie(live.pid)
        assert clean_stale_partials(final) == [running]
        assert other.is_dir() and legacy.is_dir()
    finally:
        live.kill()
        live.wait()


# ------------------------------------------------------------------ SIGKILL at the other stages


def _spawn(cmd: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, **kw)


def _sigkill_when(proc: subprocess.Popen, ready, timeout: float = 240) -> str:
    """Read the child's output until ``ready(output so far)`` is true, then SIGKILL the child (only it: its
    own children are left to fend for themselves, as after a real kill). Returns the output."""
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in iter(proc.stdout.readline, "")], daemon=True).start()
    out = ""
    deadline = time.monotonic() + timeout
    try:
        while not ready(out):
            try:
                out += lines.get(timeout=0.02)
            except queue.Empty:
                pass
            assert proc.poll() is None, f"finished (exit {proc.returncode}) before it could be killed:\n{out[-3000:]}"
            assert time.monotonic() < deadline, f"not ready after {timeout} s:\n{out[-3000:]}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    return out


def test_sigkill_mid_train_keeps_finished_users_and_rerun_trains_the_rest(tiny_model_dir, tmp_path):
    """`cdcda train` of two users killed while the second trains: the first user's adapter stays complete
    and untouched, the second has no folder, and the same command trains only the second."""
    from cdcda_export.data import sample_paths
    from cdcda_export.train.train import is_complete

    q, o = sample_paths("LaMP-3")
    out = tmp_path / "adapters"
    cmd = [*CLI, "train", "--base", str(tiny_model_dir("tiny")), "--task", "LaMP-3", "--questions", str(q),
           "--outputs", str(o), "--out", str(out), "--users", "3000,3001", "--max-steps", "300"]
    _sigkill_when(_spawn(cmd), lambda _: is_complete(out / "3000"))
    assert is_complete(out / "3000")
    first = (out / "3000" / "training.json").read_bytes()
    assert not (out / "3001").exists(), "a killed train left a user folder"
    r = subprocess.run([*cmd[:-1], "40"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "3000" / "training.json").read_bytes() == first, "finished work was redone"
    assert is_complete(out / "3001")
    report = json.loads((out / "train_report.json").read_text())
    assert report["users"]["3000"]["status"] == "exists" and report["users"]["3001"]["status"] == "trained"
    assert not list(out.glob(".*.partial-*"))


# The merge, paused at its last write: the merged weights are saved in the partial folder, merge.json and the
# rename into place are not done. Only the timing changes (a real kill cannot be aimed at a 20 ms window).
_PAUSED_MERGE = textwrap.dedent("""
    import os, pathlib, time
    import cdcda_export.train.merge as M

    def paused(path, data, **kw):
        pathlib.Path(os.environ["PAUSE_MARK"]).write_text(str(path))
        time.sleep(600)

    M.write_json_atomic = paused
    from cdcda_export.cli import main
    main()
""")


def test_sigkill_mid_merge_leaves_nothing_complete_and_rerun_succeeds(tiny_model_dir, lora, tmp_path):
    base, out, mark = tiny_model_dir("tiny"), tmp_path / "merged", tmp_path / "paused"
    args = ["merge", "--base", str(base), "--adapter", str(lora), "--out", str(out)]
    proc = _spawn([sys.executable, "-c", _PAUSED_MERGE, *args], env={**os.environ, "PAUSE_MARK": str(mark)})
    _sigkill_when(proc, lambda _: mark.exists())
    partial = list(tmp_path.glob(f".merged.partial-{proc.pid}-*"))
    assert len(partial) == 1 and (partial[0] / "model.safetensors").is_file(), "killed mid-write, as meant"
    assert not out.exists(), "a killed merge left a final --out directory"
    r = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    from cdcda_export.train.merge import merge_is_current
    from cdcda_export.utils import sha256_dir

    assert merge_is_current(out, sha256_dir(base), sha256_dir(lora))
    assert not partial[0].exists() and not list(tmp_path.glob(".merged.partial-*"))


def test_sigkill_mid_check_leaves_no_report_and_rerun_succeeds(tiny_artifact, tmp_path):
    """`cdcda check --report --junit --markdown` killed while it compares: no report file of any kind (they are
    written by rename, after the work); the same command then writes all three."""
    import xml.etree.ElementTree as ET

    art = tiny_artifact("tiny", "onnx/fp32")
    report, junit, md = tmp_path / "r" / "report.json", tmp_path / "r" / "junit.xml", tmp_path / "r" / "check.md"
    cmd = [*CLI, "check", str(art), "--report", str(report), "--junit", str(junit), "--markdown", str(md),
           "--max-new-tokens", "48"]
    _sigkill_when(_spawn(cmd, env={**os.environ, "COLUMNS": "200"}), lambda out: f"checking {art}" in out)
    assert not report.exists() and not junit.exists() and not md.exists()
    left = [p.name for p in report.parent.iterdir()] if report.parent.exists() else []
    assert not [n for n in left if not n.startswith(".")], left
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert json.loads(report.read_text())["passed"] is True
    assert ET.parse(junit).getroot().get("failures") == "0"
    assert md.read_text().startswith("# Fidelity check")


def _bench_processes(art: Path) -> list[int]:
    """Pids of live bench runner processes (supervisor or measured child) working on ``art``."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            argv = (d / "cmdline").read_bytes().split(b"\0")
            state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z" and any(a.endswith(b"bench_runner.py") for a in argv) and str(art.resolve()).encode() in argv:
            pids.append(int(d.name))
    return pids


def test_sigkill_mid_bench_leaves_no_result_and_no_runner_and_rerun_succeeds(tiny_artifact, tmp_path):
    """`cdcda bench --json` killed during its measured runs: no result file, and its runner processes on the
    host do not outlive it by more than the run under way (they write to the killed process's pipe, so the
    next line ends them; otherwise they would keep measuring into a folder nobody reads: 60 runs of this
    artifact take about 20 s); the same command then writes the result."""
    art = Path(shutil.copytree(tiny_artifact("tiny", "onnx/fp32"), tmp_path / "art"))
    res = tmp_path / "bench" / "result.json"
    cmd = [*CLI, "bench", str(art), "--device", "host", "--prompt-len", "16", "--gen-len", "32", "--runs", "60",
           "--warmup", "1", "--json", str(res)]
    _sigkill_when(_spawn(cmd), lambda out: "warm-up" in out and _bench_processes(art))
    assert not res.exists()
    assert not [p for p in res.parent.iterdir() if not p.name.startswith(".")] if res.parent.exists() else True
    deadline = time.monotonic() + 3
    while _bench_processes(art) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _bench_processes(art) == [], "bench runner processes outlived the killed `cdcda bench`"
    r = subprocess.run([*cmd[:cmd.index("--runs") + 1], "2", *cmd[cmd.index("--runs") + 2:]], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    result = json.loads(res.read_text())
    assert len([x for x in result["runs"] if not x.get("warmup")]) == 2


# ------------------------------------------------------------------ block / group sizes that do not divide


@pytest.mark.parametrize("recipe, overrides, field, needle", [
    # MatMulNBits blocks along each weight's input width: the tiny model's are 64 (hidden) and 128 (mlp)
    ("onnx/int4", ["quantization.block_size=128"], "quantization.block_size", "(input width 64)"),
    ("onnx/int8", ["quantization.block_size=256"], "quantization.block_size", "(input width 128)"),
    # Core ML per_block quantization runs along the input channels, too
    ("coreml/int4-block32", ["quantization.block_size=128"], "quantization.block_size", "(input channels 64)"),
    # Core ML palettization groups run along the output channels (q_proj / o_proj: 64, above weight_threshold)
    ("coreml/palettize-4bit", ["quantization.group_size=128"], "quantization.group_size", "(output channels 64)"),
])
def test_block_or_group_size_that_does_not_divide_is_refused_before_conversion(tiny_model_dir, tmp_path, recipe,
                                                                               overrides, field, needle):
    """ONNX Runtime would make ragged blocks (and our Q8_0 re-rounding fail with a traceback); coremltools skips
    such weights with a log warning and leaves them fp16 under a manifest that says compressed. Both end in a
    UserError naming the recipe field, a layer and its dimension, and the sizes that fit; no --out is left."""
    out = tmp_path / "art"
    t0 = time.monotonic()
    with pytest.raises(UserError, match="does not divide") as e:
        export(tiny_model_dir("tiny"), None, recipe, out, progress=False, overrides=overrides)
    assert e.value.field == field, str(e.value)
    assert needle in str(e.value) and "one of [16, 32, 64]" in str(e.value), str(e.value)
    assert f"--set {field}=64" in str(e.value)
    assert not out.exists() and not list(tmp_path.glob(".art.partial-*"))
    # refused on the torch decoder, before the ONNX export / Core ML conversion (seconds each on this model)
    assert time.monotonic() - t0 < 60


@pytest.mark.parametrize("recipe", ["onnx/int4", "onnx/int8", "coreml/int4-block32", "coreml/int8-linear",
                                    "coreml/palettize-4bit"])
def test_shipped_block_and_group_sizes_fit_every_tiny_architecture(tiny_model_dir, recipe):
    """The checks pass the shipped recipes on every tiny architecture (untied Phi-3, Qwen3's wider heads)."""
    from cdcda_export.export.api import load_merged_model
    from cdcda_export.export.coreml import check_compression_sizes
    from cdcda_export.export.decoder import ExportDecoder
    from cdcda_export.export.onnx import check_block_size
    from cdcda_export.export.registry import resolve_recipe

    rec, _ = resolve_recipe(recipe)
    for arch in ("tiny", "tiny-qwen2", "tiny-qwen3", "tiny-phi3"):
        dec = ExportDecoder.from_hf(load_merged_model(tiny_model_dir(arch)), max_seq_len=64, untie_lm_head=True)
        if recipe.startswith("onnx/"):
            check_block_size(dec, rec.quantization)
        else:
            check_compression_sizes(dec, rec)
