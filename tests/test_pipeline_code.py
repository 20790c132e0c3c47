"""The code hash in each pipeline stage's fingerprint (:mod:`cdcda_export.pipeline.code`): which files a
stage depends on, and that editing one changes exactly the stages that import it. Edits are made on a
copy of the sources, never on the tree."""

from __future__ import annotations

import shutil

import pytest

from cdcda_export.pipeline import code
from cdcda_export.pipeline.stages import SHARED, STAGE_FNS


@pytest.fixture
def copied_tree(tmp_path, monkeypatch):
    """A copy of the two packages' sources, with ``code.ROOT`` pointing at it and the hash cache cleared."""
    for pkg in code.PACKAGES:
        shutil.copytree(code.ROOT / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    monkeypatch.setattr(code, "ROOT", tmp_path)
    code.code_hash.cache_clear()
    yield tmp_path
    code.code_hash.cache_clear()


def _hashes() -> dict[str, str]:
    code.code_hash.cache_clear()
    return {s: code.code_hash(s) for s in STAGE_FNS}


def test_stage_files_follow_imports_including_run_time_ones():
    files = {s: {str(p) for p in code.stage_files(s)} for s in STAGE_FNS}
    assert "cdcda_export/train/train.py" in files["train"]
    assert "cdcda_export/augment/augmenter.py" in files["augment"]
    # the exporters are found by the registry at run time (pkgutil): they count for export, not for train
    assert "cdcda_export/export/onnx.py" in files["export"] and "cdcda_export/export/onnx.py" in files["base_package"]
    assert not any(f.startswith("cdcda_export/export/") for f in files["train"] | files["augment"])
    # bench runs device_harness and the runtime (runners imported by name, bench_runner.py run as a file)
    assert {"device_harness/protocol.py", "device_harness/bench_runner.py",
            "cdcda_export/runtime/onnx.py"} <= files["bench"]
    assert not any(f.startswith(("cdcda_export/train/", "cdcda_export/export/")) for f in files["bench"])
    # the driver's own modules are not stage code: editing them leaves every record current
    assert not any(f.startswith("cdcda_export/pipeline/") for fs in files.values() for f in fs)


def test_hash_is_stable_and_cached():
    a = _hashes()
    assert a == _hashes() and len(set(a.values())) == len(a)
    assert code.code_hash.cache_info().currsize == len(STAGE_FNS)


def test_editing_a_module_changes_exactly_the_stages_that_import_it(copied_tree):
    before = _hashes()
    with open(copied_tree / "device_harness" / "protocol.py", "a") as f:
        f.write("\n# edited\n")
    after = _hashes()
    assert {s for s in STAGE_FNS if after[s] != before[s]} == {"bench"}

    with open(copied_tree / "cdcda_export" / "train" / "train.py", "a") as f:
        f.write("\n# edited\n")
    again = _hashes()
    # merge (train/) is what export and check rebuild the reference with; augment and bench do not use it
    assert {s for s in STAGE_FNS if again[s] != after[s]} == {"train", "export", "check", SHARED}

    with open(copied_tree / "cdcda_export" / "augment" / "filters.py", "a") as f:
        f.write("\n# edited\n")
    third = _hashes()
    assert {s for s in STAGE_FNS if third[s] != again[s]} == {"augment"}

