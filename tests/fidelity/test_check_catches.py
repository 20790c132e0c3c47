"""The fidelity gate on real tiny ONNX artifacts: a good one passes, and each fault of issue 4 is caught.

Faults are real artifacts (``fidelity_faults.py``): another user's adapter, no adapter, weights perturbed
after export with the manifest's hashes updated, a KV cache that is not updated between decode steps,
a quantized artifact beyond its recipe's threshold, and a manifest whose base hash does not match.
"""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from cdcda_export.check import CheckOptions, check_artifacts, run_check
from cdcda_export.check.thresholds import GATED
from cdcda_export.data import sample_paths
from cdcda_export.errors import UserError

from conftest import TASK, USER_A, USER_B
from fidelity_faults import break_kv_cache, perturb_onnx_layer, point_base_at, transplant_model

pytestmark = pytest.mark.integration

CONTRACT_KEYS = {"artifact", "reference", "prompts", "metrics", "thresholds", "passed", "skipped"}
CONTRACT_METRICS = {"max_abs_logit_err", "mean_kl", "top1_agreement", "greedy_match_rate", "ppl_ref",
                    "ppl_artifact", "ppl_ratio", "task_metric_ref", "task_metric_artifact"}


def user_opts(**kw) -> CheckOptions:
    q, o = sample_paths(TASK)
    return CheckOptions(task=TASK, questions=q, outputs=o, max_heldout=3, **kw)


@pytest.fixture(scope="module")
def good(user_artifact):
    return user_artifact("tiny", "onnx/fp32", USER_A)


@pytest.fixture(scope="module")
def good_report(good):
    return check_artifacts([good], user_opts())[0]


def failed(report) -> set[str]:
    return {g["metric"] for g in report["gates"] if not g["passed"]}


def test_good_fp32_artifact_passes_with_contract_report(good_report):
    r = good_report
    assert CONTRACT_KEYS <= set(r), f"missing report keys: {CONTRACT_KEYS - set(r)}"
    assert CONTRACT_METRICS <= set(r["metrics"]), f"missing metrics: {CONTRACT_METRICS - set(r['metrics'])}"
    assert r["passed"] and r["skipped"] is None, r["gates"]
    # fp32 ONNX vs eager: the decoder path reproduces HF to float32 rounding.
    assert r["metrics"]["max_abs_logit_err"] < 1e-4, r["metrics"]
    assert r["metrics"]["greedy_match_rate"] == 1.0 and r["metrics"]["greedy_match_rate_free"] == 1.0
    assert abs(r["metrics"]["ppl_ratio"] - 1.0) < 1e-4
    # personalized: the user's held-out pairs and LaMP query were used, with golds -> task metric for both
    assert r["prompts"]["user"] >= 2 and r["prompts"]["generic"] >= 5
    assert r["metrics"]["task_metric"] == "MAE"
    assert r["metrics"]["task_metric_ref"] == r["metrics"]["task_metric_artifact"]
    assert r["reference"]["adapter"]["verified"] and r["reference"]["merged"]
    # thresholds come from the recipe and are written into the report
    assert r["thresholds"]["max_abs_logit_err"] == 1e-3 and r["threshold_sources"]["max_abs_logit_err"] == "recipe"
    assert r["divergence"] is None


def test_report_is_deterministic(good, tmp_path, good_report):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    assert run_check([good], user_opts(), report=a) == 0
    assert run_check([good], user_opts(), report=b) == 0
    assert a.read_bytes() == b.read_bytes()


def test_other_users_adapter_is_caught(user_artifact, good, tmp_path):
    other = user_artifact("tiny", "onnx/fp32", USER_B)
    bad = transplant_model(other, good, tmp_path / "swapped")
    r = check_artifacts([bad], user_opts(localise="never"))[0]
    assert not r["passed"]
    assert r["checks"]["files_match_manifest"]["passed"]        # hashes were updated: only numbers catch it
    assert "max_abs_logit_err" in failed(r) and "mean_kl" in failed(r), r["gates"]
    assert r["metrics"]["max_abs_logit_err"] > 1e-2


def test_artifact_without_the_adapter_is_caught(tiny_artifact, good, tmp_path):
    base_only = tiny_artifact("tiny", "onnx/fp32", None)
    bad = transplant_model(base_only, good, tmp_path / "no-adapter")
    r = check_artifacts([bad], user_opts(localise="never"))[0]
    assert not r["passed"] and {"max_abs_logit_err", "mean_kl"} <= failed(r), r["gates"]


def test_perturbed_weights_are_caught_and_localised(good, tmp_path):
    bad, name = perturb_onnx_layer(good, tmp_path / "perturbed", layer=1, rel=0.05)
    r = check_artifacts([bad], user_opts())[0]
    assert r["checks"]["files_match_manifest"]["passed"]
    assert not r["passed"] and "max_abs_logit_err" in failed(r), r["gates"]
    d = r["divergence"]
    assert d["method"] == "onnx-extra-outputs"
    # layer 0 untouched (rel err ~1e-7), layer 1 carries the noise
    assert d["first_divergent_layer"] == "layer 1", d["summary"]
    assert d["layers"][1]["rel_err"] < 1e-4 < d["layers"][2]["rel_err"], d["layers"]


def test_kv_cache_not_updated_is_caught_in_decode(good, tmp_path):
    bad = break_kv_cache(good, tmp_path / "stale-kv")
    r = check_artifacts([bad], user_opts())[0]
    m = r["metrics"]
    assert not r["passed"]
    # the prefill path is exact; only the step-by-step decode path sees the stale cache
    assert m["max_abs_logit_err_prefill"] < 1e-4 < m["max_abs_logit_err_decode"], m
    d = r["divergence"]
    assert d["first_divergent_layer"] == "layer 0" and d["phase"] == "decode", d


def test_quantized_artifact_over_its_recipe_threshold_fails_the_cli(tiny_artifact, tmp_path):
    strict = tiny_artifact("tiny", "onnx/int4", **{"thresholds.max_abs_logit_err": 0.001})
    report, junit = tmp_path / "r.json", tmp_path / "r.xml"
    res = subprocess.run([sys.executable, "-c", "from cdcda_export.cli import main; main()", "check", str(strict),
                          "--report", str(report), "--junit", str(junit)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 1, res.stdout + res.stderr
    r = json.loads(report.read_text())
    assert r["passed"] is False and r["thresholds"]["max_abs_logit_err"] == 0.001
    assert r["threshold_sources"]["max_abs_logit_err"] == "recipe"
    # every layer stays within the int4 layer tolerance, so the report names where the error grows most
    d = r["divergence"]
    assert len(d["layers"]) == 3 and d["largest_increase_layer"] in ("embedding", "layer 0", "layer 1"), d
    assert d["largest_increase_layer"] in d["summary"]
    cases = ET.parse(junit).getroot().findall(".//testcase")
    names = [c.get("name") for c in cases]
    assert set(names) >= {g["metric"] for g in r["gates"]} and len(r["gates"]) >= 5
    failing = [c.get("name") for c in cases if c.find("failure") is not None]
    assert "max_abs_logit_err" in failing


def test_base_hash_mismatch_is_a_clear_error(good, tiny_model_dir, tmp_path):
    other_base = tiny_model_dir("tiny", seed=1)
    bad = point_base_at(good, tmp_path / "wrong-base", other_base)
    with pytest.raises(UserError, match="base_model.sha256"):
        check_artifacts([bad], CheckOptions())
    res = subprocess.run([sys.executable, "-c", "from cdcda_export.cli import main; main()", "check", str(bad),
                          "--report", str(tmp_path / "r.json")], capture_output=True, text=True, timeout=600)
    assert res.returncode == 2 and "does not match" in res.stderr and "Traceback" not in res.stderr, res.stderr


def test_several_artifacts_one_reference_and_baseline(user_artifact, good, tmp_path):
    from cdcda_export.check import reference

    int8 = user_artifact("tiny", "onnx/int8", USER_A)
    reference.clear_cache()
    base_json, md = tmp_path / "baseline.json", tmp_path / "r.md"
    code = run_check([good, int8], user_opts(), report=base_json, markdown=md)
    data = json.loads(base_json.read_text())
    assert len(data["reports"]) == 2 and len(reference._CACHE) == 1       # one reference for both
    assert [row["label"] for row in data["table"]] == [f"onnx/fp32 [{USER_A}]", f"onnx/int8 [{USER_A}]"]
    assert code == (0 if data["passed"] else 1)
    assert "| onnx/int8" in md.read_text()
    # against itself: nothing regressed; a perturbed fp32 against the fp32 baseline: regression, exit 1
    assert run_check([good, int8], user_opts(), report=tmp_path / "again.json", baseline=base_json) == code
    again = json.loads((tmp_path / "again.json").read_text())
    assert not any(r["baseline"]["regressed"] for r in again["reports"])
    single = tmp_path / "fp32.json"
    assert run_check([good], user_opts(), report=single) == 0
    worse, _ = perturb_onnx_layer(good, tmp_path / "worse", layer=0, rel=0.01)
    # every gate off: only the baseline comparison can fail it
    gates_off = {m: None for m in GATED}
    opts = user_opts(localise="never", thresholds=gates_off)
    code2 = run_check([worse], opts, report=tmp_path / "worse.json", baseline=single)
    w = json.loads((tmp_path / "worse.json").read_text())
    assert code2 == 1 and w["baseline"]["regressed"], w["baseline"]
    assert any(row["metric"] == "max_abs_logit_err" and row["status"] == "regressed" for row in w["baseline"]["rows"])


def test_coreml_on_linux_is_skipped_with_reason_and_structural_checks(tiny_artifact, tmp_path):
    # the same artifact the Core ML export tests build (shared session cache: no extra conversion)
    art = tiny_artifact("tiny", "coreml/fp16", max_seq_len=64, prefill_len=16)
    report, junit = tmp_path / "r.json", tmp_path / "r.xml"
    code = run_check([art], CheckOptions(), report=report, junit=junit)
    r = json.loads(report.read_text())
    if sys.platform == "darwin":          # Core ML runs here: a real comparison instead of a skip
        assert r["skipped"] is None and "max_abs_logit_err" in r["metrics"]
        return
    assert code == 0 and r["skipped"] and "macOS" in r["skipped"]["reason"]
    s = r["checks"]["coreml_structure"]
    assert s["passed"] and s["checks"]["inputs_match"] and s["checks"]["one_state_per_kv_tensor"], s
    root = ET.parse(junit).getroot()
    assert int(root.get("skipped")) >= 5 and root.get("failures") == "0"


def test_eager_mirror_reproduces_the_reference_layer_by_layer(tiny_model_dir):
    """The localisation mirror for formats without graph access (ExecuTorch): the fp32 ExportDecoder fed
    prefill + decode like a runner matches the eager HF residual stream in every layer."""
    from cdcda_export.check.localise import _compare_layers, _mirror_states
    from cdcda_export.check.reference import Reference, ReferenceKey

    ref = Reference(tiny_model_dir("tiny-qwen2"), None, ReferenceKey("x", None))
    ids, cont = [5, 17, 42, 99, 123, 7], [300, 64, 12, 1000]
    manifest = {"format": "executorch", "io": {"max_seq_len": 32},
                "recipe": {"resolved": {"quantization": {"scheme": "none"}}}}
    states, logits, info = _mirror_states(ref, manifest, ids, cont)
    cmp = _compare_layers(ref.layer_states(ids + cont[:-1]), states, 1e-5, len(ids))
    assert len(states) == ref.num_layers + 1 and cmp["first_divergent_layer"] is None, cmp["layers"]
    assert np.abs(logits - ref.logits(ids + cont[:-1])).max() < 1e-4


def test_eager_mirror_applies_the_executorch_quantization_without_touching_the_reference(tiny_model_dir):
    from cdcda_export.check.localise import _compare_layers, _mirror_states
    from cdcda_export.check.reference import Reference, ReferenceKey
    from cdcda_export.export.registry import resolve_recipe

    ref = Reference(tiny_model_dir("tiny"), None, ReferenceKey("x", None))
    ids, cont = [5, 17, 42, 99, 123, 7], [300, 64, 12, 1000]
    before = ref.logits(ids + cont[:-1]).copy()
    rec, _ = resolve_recipe("executorch/xnnpack-8da4w")
    manifest = {"format": "executorch", "io": {"max_seq_len": 32}, "recipe": {"resolved": rec.to_dict()}}
    states, logits, info = _mirror_states(ref, manifest, ids, cont)
    assert info["mirror_quantization"]["quantized_linears"] == info["mirror_quantization"]["linears"] > 0
    cmp = _compare_layers(ref.layer_states(ids + cont[:-1]), states, 1e-5, len(ids))
    assert cmp["first_divergent_layer"] is not None            # int4 weights: the mirror really differs
    ref._logits.clear()
    assert np.array_equal(ref.logits(ids + cont[:-1]), before)  # the reference model was not quantized
