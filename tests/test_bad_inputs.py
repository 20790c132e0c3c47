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
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cdcda_export import runtime
from cdcda_export.errors import UserError, ValidationErrors
from cdcda_export.export.api import export
from cdcda_export.export.manifest import verify

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
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert verify(out) == []
    runtime.load(out)
