"""Damaged artifacts end in a UserError naming the file, never in a runtime traceback.

``runtime.load`` checks the files ``manifest.json`` lists (sizes, then sha256) before loading,
once per artifact per process (cached by the files' stat), and turns any load error left after
that into a UserError naming the model file. Each test damages a *copy* of a shared tiny artifact.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cdcda_export import runtime
from cdcda_export.errors import UserError
from cdcda_export.runtime import base

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def onnx_art(tiny_artifact) -> Path:
    return tiny_artifact("tiny", "onnx/fp32")


@pytest.fixture
def art(onnx_art, tmp_path) -> Path:
    """A private copy of the tiny ONNX artifact that a test may damage."""
    return Path(shutil.copytree(onnx_art, tmp_path / "art"))


def _manifest(a: Path) -> dict:
    return json.loads((a / "manifest.json").read_text())


def _weights(a: Path) -> str:
    """The largest listed file (the ONNX external weights)."""
    files = _manifest(a)["files"]
    return max(files, key=lambda n: files[n]["bytes"])


def test_sound_artifact_loads_and_an_extra_file_is_fine(art):
    (art / "notes.txt").write_text("a file the manifest does not list")
    (art / "sub").mkdir()
    (art / "sub" / "x.bin").write_bytes(b"\1" * 10)
    r = runtime.load(art, threads=1)
    assert r.prefill([1, 2, 3]).shape[0] == 3


def test_truncated_model_file_is_named(art):
    name = _weights(art)
    p = art / name
    size = p.stat().st_size
    with open(p, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(UserError) as e:
        runtime.load(art)
    msg = str(e.value)
    assert e.value.file == str(p) and name in msg
    assert f"is {size // 2} bytes (truncated)" in msg and f"{size} bytes" in msg
    assert "re-export the artifact: cdcda export --base" in msg and "--recipe onnx/fp32" in msg and str(art) in msg


def test_missing_file_is_named(art):
    (art / "tokenizer.json").unlink()
    with pytest.raises(UserError, match="missing") as e:
        runtime.load(art)
    assert e.value.file == str(art / "tokenizer.json")
    assert "sha256" in e.value.expected


def test_file_swapped_from_another_artifact_is_a_mismatch(art, tiny_artifact):
    other = tiny_artifact("tiny-qwen2", "onnx/fp32")
    shutil.copy2(other / "model.onnx", art / "model.onnx")
    with pytest.raises(UserError, match="does not match its manifest.json") as e:
        runtime.load(art)
    assert e.value.file == str(art / "model.onnx")


def test_same_size_damage_is_a_hash_mismatch(art):
    name = _weights(art)
    p = art / name
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(UserError) as e:
        runtime.load(art)
    msg = str(e.value)
    assert e.value.file == str(p) and "sha256" in msg and "differs from the manifest" in msg
    assert _manifest(art)["files"][name]["sha256"] in msg   # what was expected


def test_several_problems_name_the_first_and_count_the_rest(art):
    (art / "tokenizer.json").unlink()
    (art / "genai_config.json").write_text("{}")
    with pytest.raises(UserError, match=r"1 more: .*genai_config.json|1 more: .*tokenizer.json"):
        runtime.load(art)


def test_verification_is_cached_per_process_and_redone_when_a_file_changes(art, monkeypatch):
    calls = []
    real = base._sha256
    monkeypatch.setattr(base, "_sha256", lambda p, *a: calls.append(Path(p).name) or real(p, *a))
    n_files = len(_manifest(art)["files"])
    base.verify_artifact(art)
    assert len(calls) == n_files
    runtime.load(art)
    base.verify_artifact(art)
    assert len(calls) == n_files           # cached: no file hashed again
    # the file changes on disk (same size, new content): its stat differs, so everything is checked again
    p = art / _weights(art)
    data = bytearray(p.read_bytes())
    data[0] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(UserError, match="sha256"):
        runtime.load(art)
    assert len(calls) > n_files
    # a failure is never cached: restoring the file makes the artifact load again
    data[0] ^= 0xFF
    p.write_bytes(bytes(data))
    runtime.load(art)
    before = len(calls)
    runtime.load(art)
    assert len(calls) == before


def _truncate_with_matching_manifest(art: Path, name: str, n: int) -> Path:
    """Cut ``name`` to ``n`` bytes and rewrite its manifest entry to match: verification passes, loading cannot."""
    p = art / name
    p.write_bytes(p.read_bytes()[:n])
    m = _manifest(art)
    m["files"][name] = {"sha256": hashlib.sha256(p.read_bytes()).hexdigest(), "bytes": n}
    (art / "manifest.json").write_text(json.dumps(m))
    return p


def test_load_error_after_verification_names_the_model_file(art):
    """A model file that matches its (rewritten) manifest entry but is not a model: UserError, not a traceback."""
    p = _truncate_with_matching_manifest(art, "model.onnx", 100)
    with pytest.raises(UserError, match="the onnx runtime could not load it") as e:
        runtime.load(art)
    assert e.value.file == str(p) and "cdcda export" in str(e.value)


@pytest.mark.parametrize("files, needle", [
    ([1, 2], "field 'files'"),
    ({"model.onnx": {"sha256": "abc", "bytes": 5}}, "files.model.onnx"),
    ({"../escape.onnx": {"sha256": "0" * 64, "bytes": 5}}, "outside the artifact directory"),
])
def test_malformed_files_table_names_the_field(art, files, needle):
    m = _manifest(art)
    m["files"] = files
    (art / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(UserError, match="manifest.json") as e:
        runtime.load(art)
    assert needle in str(e.value)


def test_broken_or_missing_manifest_is_a_user_error(art, tmp_path):
    (art / "manifest.json").write_text('{"format": "onnx", ')
    with pytest.raises(UserError, match="not valid JSON"):
        runtime.load(art)
    (art / "manifest.json").unlink()
    with pytest.raises(UserError, match="no manifest.json"):
        runtime.load(art)
    with pytest.raises(UserError, match="artifact directory not found"):
        runtime.load(tmp_path / "nowhere")


def test_cli_generate_on_a_truncated_model_prints_the_file_not_a_traceback(art):
    p = art / _weights(art)
    with open(p, "r+b") as f:
        f.truncate(1000)
    out = subprocess.run([sys.executable, "-c", "from cdcda_export.cli import main; main()", "generate", str(art),
                          "--prompt", "hello", "--max-new-tokens", "2"],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "NO_COLOR": "1"})
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and str(p) in out.stderr and "truncated" in out.stderr


def test_bench_refuses_a_damaged_artifact_before_copying_it(art):
    from device_harness import BenchConfig, bench

    (art / "model.onnx").write_bytes(b"")
    with pytest.raises(UserError) as e:
        bench(art, "host", BenchConfig(prompt_len=8, gen_len=4, runs=1, warmup=0, threads=1))
    assert e.value.file == str(art / "model.onnx")


def test_executorch_load_error_after_verification_names_the_pte(tiny_artifact, tmp_path):
    """ExecuTorch rejects a truncated .pte (whose manifest entry was rewritten to match): a UserError naming it."""
    art = Path(shutil.copytree(tiny_artifact("tiny", "executorch/xnnpack-fp32"), tmp_path / "pte"))
    p = _truncate_with_matching_manifest(art, "model.pte", 4000)
    with pytest.raises(UserError, match="the executorch runtime could not load it") as e:
        runtime.load(art, threads=1)
    assert e.value.file == str(p) and "--recipe executorch/xnnpack-fp32" in str(e.value)
