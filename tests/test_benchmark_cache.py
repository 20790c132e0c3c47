"""The peers benchmark re-exports a cached artifact when it no longer matches what ``cdcda export``
makes today (recipe, library versions, exporter code), so a table never measures a stale build."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from _peers import ours  # noqa: E402
from cdcda_export.utils import versions  # noqa: E402

KEY = "onnx/int4"


def _cached(tmp_path: Path, resolved: dict, vers: dict, sha: str | None) -> Path:
    art = tmp_path / KEY.replace("/", "__")
    art.mkdir()
    (art / "manifest.json").write_text(json.dumps({"recipe": {"resolved": resolved}, "versions": vers}))
    if sha is not None:
        side = art.with_name(art.name + ".export.json")
        side.write_text(json.dumps({"recipe": KEY, "ok": True, "exporter_sha": sha}))
    return art


def test_matching_artifact_is_reused(tmp_path):
    art = _cached(tmp_path, ours.recipe_info(KEY), versions(), ours.exporter_fingerprint())
    assert ours._stale_reason(art, KEY) is None


def test_recipe_change_is_stale_and_named(tmp_path):
    old = ours.recipe_info(KEY)
    old["onnx"] = {k: v for k, v in old["onnx"].items() if k != "share_kv_buffer"}   # made before the option
    reason = ours._stale_reason(_cached(tmp_path, old, versions(), None), KEY)
    assert reason == "recipe differs in onnx"


def test_library_version_change_is_stale(tmp_path):
    vers = {**versions(), "onnxruntime": "0.0.1"}
    reason = ours._stale_reason(_cached(tmp_path, ours.recipe_info(KEY), vers, None), KEY)
    assert reason == "library versions differ: onnxruntime"


def test_exporter_code_change_is_stale(tmp_path):
    art = _cached(tmp_path, ours.recipe_info(KEY), versions(), "0" * 16)
    assert "exporter code changed" in ours._stale_reason(art, KEY)


def test_missing_artifact_is_not_stale(tmp_path):
    assert ours._stale_reason(tmp_path / "absent", KEY) is None
