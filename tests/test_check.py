"""Unit tests of the fidelity gate's parts: metrics, thresholds, gates, reports, baselines, prompts,
ONNX residual-stream discovery. No exports here (see tests/fidelity/ for the real artifacts)."""

from __future__ import annotations

import json
import math
from pathlib import Path
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from cdcda_export.check import baseline as bl
from cdcda_export.check import report as rp
from cdcda_export.check.metrics import Aggregate, compare_prompt, kl_per_position, nll, prefix_match
from cdcda_export.check.prompts import generic_prompts, load_prompts_file
from cdcda_export.check.thresholds import (GATED, evaluate_gates, parse_cli_thresholds, resolve_thresholds,
                                           scheme_of)
from cdcda_export.errors import UserError


# ----------------------------------------------------------------------------- metrics


def test_kl_matches_closed_form():
    p = np.log(np.array([[0.5, 0.25, 0.25]]))
    q = np.log(np.array([[0.25, 0.5, 0.25]]))
    want = 0.5 * math.log(2) + 0.25 * math.log(0.5)          # sum p log p/q
    assert abs(kl_per_position(p, q)[0] - want) < 1e-12
    assert abs(kl_per_position(p + 7.0, q)[0] - want) < 1e-12   # shift-invariant (logits, not probs)
    assert kl_per_position(p, p)[0] == 0.0


def test_nll_and_prefix_match():
    logits = np.log(np.array([[0.5, 0.5], [0.9, 0.1]]))
    assert np.allclose(nll(logits, np.array([1, 0])), [math.log(2), -math.log(0.9)], atol=1e-12)
    assert prefix_match([1, 2, 3, 4], [1, 2, 9, 4]) == 2
    assert prefix_match([], [1]) == 0


def test_compare_prompt_separates_prefill_and_decode_and_counts_agreement():
    rng = np.random.default_rng(0)
    P, N, V = 5, 4, 11
    ref = rng.standard_normal((P + N - 1, V))
    art = ref.copy()
    art[P + 1] += 30.0 * (np.arange(V) == ref[P + 1].argmin())    # decode row: flip the argmax
    seq = list(rng.integers(0, V, P)) + list(ref[P - 1:].argmax(-1))
    cont = seq[P:]
    r = compare_prompt("p", "generic", P, ref, art, cont, free_tokens=cont[:2] + [0, 0], seq=seq, err_threshold=1e-6)
    assert r.max_abs_err_prefill == 0.0 and abs(r.max_abs_err_decode - 30.0) < 1e-12
    assert r.first_divergent_position == P + 1
    assert r.positions == P + N - 1 and r.new_tokens == N
    assert r.top1_same == P + N - 2 and r.gen_same == N - 1      # the flipped decode row disagrees
    assert r.free_prefix == 2 and r.nll_ref == r.nll_art
    m = Aggregate([r]).metrics()
    assert m["greedy_match_rate"] == (N - 1) / N and m["greedy_match_rate_free"] == 0.5 and m["ppl_ratio"] == 1.0


# ----------------------------------------------------------------------------- thresholds and gates


def _manifest(scheme="none", fmt="onnx", thresholds=None):
    return {"format": fmt, "recipe": {"name": "x", "resolved": {"quantization": {"scheme": scheme},
                                                                 "thresholds": thresholds or {}}}}


def test_thresholds_resolve_defaults_then_recipe_then_cli():
    t, src = resolve_thresholds(_manifest("8da4w"), None)
    assert t["max_abs_logit_err"] == 6.0 and src["max_abs_logit_err"] == "default:8da4w"
    # weight-only int8 holds the near-lossless targets; dynamic-activation 8da8w its measured fidelity
    t8, _ = resolve_thresholds(_manifest("int8"), None)
    assert (t8["mean_kl"], t8["top1_agreement"], t8["ppl_ratio"]) == (0.01, 0.97, 1.01)
    td, _ = resolve_thresholds(_manifest("8da8w"), None)
    assert td["top1_agreement"] < t8["top1_agreement"] and td["mean_kl"] > t8["mean_kl"]
    t, src = resolve_thresholds(_manifest("none"), None)
    assert t["max_abs_logit_err"] == 1e-3 and t["greedy_match_rate_free"] == 0.9
    t, src = resolve_thresholds(_manifest("int4", thresholds={"mean_kl": 0.3}),
                                parse_cli_thresholds(["mean_kl=0.01", "ppl_ratio=null"]))
    assert t["mean_kl"] == 0.01 and src["mean_kl"] == "cli" and t["ppl_ratio"] is None
    # A recipe key left out (null) keeps the scheme default; a recipe value overrides it.
    t, src = resolve_thresholds(_manifest("8da4w", thresholds={"max_abs_logit_err": None, "mean_kl": 0.2}), None)
    assert t["max_abs_logit_err"] == 6.0 and src["max_abs_logit_err"] == "default:8da4w"
    assert t["mean_kl"] == 0.2 and src["mean_kl"] == "recipe"
    assert scheme_of(_manifest("none", fmt="coreml")) == "fp16"   # Core ML computes in fp16 by default


@pytest.mark.parametrize("bad", ["nonsense=1", "mean_kl", "mean_kl=abc"])
def test_cli_threshold_errors_name_the_flag(bad):
    with pytest.raises(UserError, match="--threshold"):
        parse_cli_thresholds([bad])


def test_gates_follow_metric_direction_and_nan_fails():
    t, src = resolve_thresholds(_manifest("none"), None)
    metrics = {"max_abs_logit_err": 2e-3, "mean_kl": 0.0, "top1_agreement": 0.995, "greedy_match_rate": 0.5,
               "greedy_match_rate_free": float("nan"), "ppl_ratio": 1.0}
    gates = {g.metric: g for g in evaluate_gates(metrics, t, src)}
    assert not gates["max_abs_logit_err"].passed and gates["max_abs_logit_err"].op == "<="
    assert gates["top1_agreement"].passed and gates["top1_agreement"].op == ">="
    assert not gates["greedy_match_rate"].passed and not gates["greedy_match_rate_free"].passed
    assert "task_metric_drop" not in gates          # no task metric measured -> no gate


# ----------------------------------------------------------------------------- reports


def _report(path="a", recipe="fp32", passed=True, metrics=None, skipped=None):
    metrics = metrics or {"max_abs_logit_err": 1e-6, "mean_kl": 1e-12, "top1_agreement": 1.0,
                          "greedy_match_rate": 1.0, "ppl_ratio": 1.0}
    t, src = resolve_thresholds(_manifest("none"), None)
    gates = [g.to_dict() for g in evaluate_gates(metrics, t, src)] if not skipped else []
    return {"schema": "cdcda.fidelity/1",
            "artifact": {"path": path, "format": "onnx", "recipe": recipe, "user_id": "u1", "model_type": "llama"},
            "reference": {"base_model": {"sha256": "ab" * 32}, "adapter": None}, "prompts": {}, "metrics": metrics,
            "thresholds": t, "gates": gates, "checks": {"files_match_manifest": {"passed": True, "problems": []}},
            "skipped": skipped, "passed": passed}


def test_json_is_rounded_and_single_or_bundled(tmp_path):
    r = _report(metrics={"max_abs_logit_err": 0.1 + 0.2, "mean_kl": float("nan")})
    rp.write_json(tmp_path / "one.json", [r])
    one = json.loads((tmp_path / "one.json").read_text())
    assert one["metrics"]["max_abs_logit_err"] == 0.3 and one["metrics"]["mean_kl"] is None
    rp.write_json(tmp_path / "two.json", [r, _report("b", "int8")])
    two = json.loads((tmp_path / "two.json").read_text())
    assert len(rp.iter_reports(two)) == 2 and len(rp.iter_reports(one)) == 1 and len(two["table"]) == 2


def test_junit_has_one_testcase_per_artifact_and_metric(tmp_path):
    bad = _report("b", "int8", passed=False, metrics={"max_abs_logit_err": 5.0, "mean_kl": 1e-12,
                                                      "top1_agreement": 1.0, "greedy_match_rate": 1.0, "ppl_ratio": 1.0})
    bad["divergence"] = {"summary": "layer 3 is the first to exceed rel err 0.1"}
    skipped = _report("c", "coreml-fp16", skipped={"reason": "Core ML predictions need macOS"})
    rp.write_junit(tmp_path / "r.xml", [_report(), bad, skipped])
    root = ET.parse(tmp_path / "r.xml").getroot()
    suites = root.findall("testsuite")
    assert [s.get("name") for s in suites] == ["onnx/fp32 [u1]", "onnx/int8 [u1]", "onnx/coreml-fp16 [u1]"]
    cases = suites[1].findall("testcase")
    assert {c.get("name") for c in cases} >= {"max_abs_logit_err", "mean_kl", "files_match_manifest"}
    fail = [c for c in cases if c.find("failure") is not None]
    assert [c.get("name") for c in fail] == ["max_abs_logit_err"] and "layer 3" in fail[0].find("failure").text
    assert root.get("failures") == "1" and int(root.get("skipped")) >= 5
    assert all(c.find("skipped") is not None for c in suites[2].findall("testcase") if c.get("name") in GATED)


def test_markdown_has_a_row_per_artifact():
    md = rp.markdown([_report(), _report("b", "int8", passed=False)])
    assert "| onnx/fp32 [u1] | pass |" in md and "| onnx/int8 [u1] | FAIL |" in md


# ----------------------------------------------------------------------------- baseline


def test_baseline_flags_only_worsening_beyond_tolerance():
    base = _report(metrics={"max_abs_logit_err": 0.1, "top1_agreement": 0.95})
    same = bl.compare([_report(metrics={"max_abs_logit_err": 0.12, "top1_agreement": 0.94})], [base])
    assert not bl.regressed(same)                                  # within 1e-4 + 50% / 0.02
    better = bl.compare([_report(metrics={"max_abs_logit_err": 0.01, "top1_agreement": 1.0})], [base])
    assert {r["status"] for r in better} == {"improved"}
    noise = bl.compare([_report(metrics={"max_abs_logit_err": 0.1 - 1e-9, "top1_agreement": 0.95})], [base])
    assert {r["status"] for r in noise} == {"ok"}
    worse = bl.compare([_report(metrics={"max_abs_logit_err": 0.2, "top1_agreement": 0.9})], [base])
    assert {r["metric"] for r in worse if r["status"] == "regressed"} == {"max_abs_logit_err", "top1_agreement"}
    tight = bl.compare([_report(metrics={"max_abs_logit_err": 0.12, "top1_agreement": 0.95})], [base],
                       bl.parse_tolerances(["max_abs_logit_err=0.001"]))
    assert bl.regressed(tight)


def test_baseline_matches_by_recipe_and_reports_new_artifacts():
    base = [_report("x", "fp32"), _report("y", "int8", metrics={"max_abs_logit_err": 1.0})]
    rows = bl.compare([_report("a", "int8", metrics={"max_abs_logit_err": 1.2}), _report("b", "int4")], base)
    assert any(r["label"].startswith("onnx/int8") and r["status"] == "ok" for r in rows)
    assert any(r["label"].startswith("onnx/int4") and r["status"] == "new (no baseline)" for r in rows)


def test_baseline_file_errors(tmp_path):
    with pytest.raises(UserError, match="baseline report not found"):
        bl.load_baseline(tmp_path / "missing.json")
    (tmp_path / "x.json").write_text('{"hello": 1}')
    with pytest.raises(UserError, match="not a `cdcda check` report"):
        bl.load_baseline(tmp_path / "x.json")
    with pytest.raises(UserError, match="--tolerance"):
        bl.parse_tolerances(["nope=1"])


def test_baseline_view_drops_paths_and_dates():
    r = _report()
    r["artifact"]["created_at"] = "2026-01-01"
    v = bl.baseline_view(r)
    assert "path" not in v["artifact"] and "created_at" not in v["artifact"] and v["metrics"] == r["metrics"]


# ----------------------------------------------------------------------------- prompts


def test_generic_prompts_ship_and_unescape_newlines():
    ps = generic_prompts()
    assert len(ps) >= 6 and all(p.kind == "generic" and p.text.strip() for p in ps)
    assert any("\n" in p.text for p in ps)


def test_prompt_files(tmp_path):
    (tmp_path / "p.txt").write_text("# comment\nfirst\n\nsecond\n")
    assert [p.text for p in load_prompts_file(tmp_path / "p.txt")] == ["first", "second"]
    (tmp_path / "p.json").write_text(json.dumps(["a", {"id": "q1", "text": "b", "gold": "4"}]))
    ps = load_prompts_file(tmp_path / "p.json")
    assert ps[1].id == "q1" and ps[1].gold == "4"
    (tmp_path / "bad.json").write_text(json.dumps([{"txt": "x"}]))
    with pytest.raises(UserError, match=r"\[0\]\.text"):
        load_prompts_file(tmp_path / "bad.json")
    with pytest.raises(UserError, match="not found"):
        load_prompts_file(tmp_path / "nope.txt")


# ----------------------------------------------------------------------------- ONNX residual stream


def test_onnx_residual_chain_found_structurally():
    """Embedding Gather -> (norm, branch, Add) x 4: the Adds are the residual stream; eps Adds are not."""
    from onnx import TensorProto, helper

    from cdcda_export.check.localise import onnx_residual_tensors

    nodes = [helper.make_node("Gather", ["emb_w", "input_ids"], ["h0"])]
    h = "h0"
    for i in range(4):
        nodes += [helper.make_node("Add", [f"var{i}", "eps"], [f"var_eps{i}"]),   # eps add off the stream
                  helper.make_node("Mul", [h, "scale"], [f"b{i}"]),
                  helper.make_node("Add", [h, f"b{i}"], [f"h{i + 1}"])]
        h = f"h{i + 1}"
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, None])],
                          [helper.make_tensor_value_info(h, TensorProto.FLOAT, None)],
                          initializer=[helper.make_tensor("emb_w", TensorProto.FLOAT, [2, 2], [0.0] * 4),
                                       helper.make_tensor("eps", TensorProto.FLOAT, [], [1e-5]),
                                       helper.make_tensor("scale", TensorProto.FLOAT, [], [2.0])])
    assert onnx_residual_tensors(g) == ["h0", "h1", "h2", "h3", "h4"]


# ----------------------------------------------------------------------------- skipped formats


def test_unrunnable_format_is_skipped_with_reason_and_structural_checks(tmp_path, monkeypatch):
    """A format whose runtime cannot run here (Core ML on Linux) -> skipped + structural checks gate."""
    from cdcda_export import runtime
    from cdcda_export.check import CheckOptions, check_artifacts
    from cdcda_export.runtime import RuntimeUnavailable

    art = tmp_path / "art"
    art.mkdir()
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    from cdcda_export.utils import sha256_dir

    manifest = {"format": "coreml", "recipe": {"name": "fp16", "resolved": {"quantization": {"scheme": "fp16"}}},
                "files": {}, "base_model": {"source": str(base), "sha256": sha256_dir(base)}, "adapter": None,
                "user_id": None, "task": None, "io": {"max_seq_len": 64}, "versions": {}, "created_at": "x"}
    (art / "manifest.json").write_text(json.dumps(manifest))

    def unavailable(path, **kw):
        raise RuntimeUnavailable("Core ML predictions need macOS (coremltools runs models only on macOS)")

    monkeypatch.setattr(runtime, "load", unavailable)
    r = check_artifacts([art], CheckOptions())[0]
    assert r["skipped"]["reason"].startswith("Core ML predictions need macOS")
    assert "coreml_structure" in r["checks"] and r["checks"]["coreml_structure"]["passed"] is False
    assert r["passed"] is False and r["metrics"] == {}


def test_missing_artifact_and_manifest_are_user_errors(tmp_path):
    from cdcda_export.check import CheckOptions, check_artifacts

    with pytest.raises(UserError, match="artifact directory not found"):
        check_artifacts([tmp_path / "nope"], CheckOptions())
    (tmp_path / "half").mkdir()
    with pytest.raises(UserError, match="no manifest.json"):
        check_artifacts([tmp_path / "half"], CheckOptions())


def test_base_artifact_is_checked_on_every_users_query(tmp_path):
    """An artifact exported without an adapter (no user_id) serves every user: --task/--questions give it
    each user's LaMP query with its gold (so the task metric covers the file), instead of an error."""
    from cdcda_export.check.prompts import user_prompts

    sample = Path(__file__).parents[1] / "cdcda_export" / "assets" / "lamp_sample" / "LaMP-3"
    ps, task = user_prompts({"format": "onnx", "user_id": None, "task": None}, "LaMP-3", sample / "questions.json",
                            sample / "outputs.json", None, tmp_path)
    ids = [u["id"] for u in json.loads((sample / "questions.json").read_text())]
    assert task == "LaMP-3" and [p.id for p in ps] == [f"query-{i}" for i in ids]
    assert all(p.kind == "user-query" and p.gold is not None and p.text for p in ps)
