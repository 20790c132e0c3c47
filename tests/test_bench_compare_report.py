"""Result schema, regression gate (noise must not fail it), github-action-benchmark JSON, reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cdcda_export.errors import UserError
from device_harness import compare, report
from device_harness.schema import (METRICS, build_result, load_results, make_prompt, summarize,
                                   validate_result)

REC = Path(__file__).parent / "data" / "recorded"


def _result(name="u1-onnx", fmt="onnx", kind="host", emulated=False, decode=(100, 102, 98), ttft=(20, 21, 19),
            rss=(300, 301, 302), size=50_000_000, arch="x86_64"):
    runs = [{"run": 0, "warmup": True, "load_ms": 900, "ttft_ms": 90, "prefill_tok_s": 10, "decode_tok_s": 5,
             "peak_rss_mb": 999, "tokens": [1, 2]}]
    for i, (d, t, r) in enumerate(zip(decode, ttft, rss), start=1):
        runs.append({"run": i, "warmup": False, "load_ms": 200 + i, "ttft_ms": t, "prefill_tok_s": 64 / (t / 1000),
                     "decode_tok_s": d, "peak_rss_mb": r, "tokens": [1, 2]})
    return build_result(device={"kind": kind, "name": kind, "cpu": "cpu", "os": "Linux", "arch": arch,
                                "emulated": emulated},
                        artifact={"name": name, "format": fmt, "bytes": size},
                        config={"prompt_len": 64, "gen_len": 128, "runs": 3, "warmup": 1, "threads": 1},
                        runs=runs, created_at="2026-11-21T00:00:00+00:00")


def test_summarize_and_build_result_drop_warmup():
    assert summarize([3.0, 1.0, 2.0]) == {"min": 1.0, "median": 2.0, "max": 3.0, "samples": [3.0, 1.0, 2.0]}
    assert summarize([None]) == {"min": None, "median": None, "max": None, "samples": []}
    r = _result()
    assert set(r["metrics"]) == set(METRICS)
    assert r["metrics"]["decode_tok_s"]["samples"] == [100, 102, 98]      # the warm-up's 5 tok/s is not there
    assert r["metrics"]["artifact_mb"]["median"] == pytest.approx(50.0)
    assert r["greedy"]["consistent_across_runs"] is True


def test_validate_result_lists_every_problem():
    bad = {"device": {"kind": "host", "emulated": "no"}, "artifact": {}, "config": {}, "metrics": {}}
    with pytest.raises(UserError) as e:
        validate_result(bad, "b.json")
    msg = str(e.value)
    for needle in ("device.cpu missing", "device.emulated must be true/false", "config.prompt_len missing",
                   "metrics.decode_tok_s must be", "b.json"):
        assert needle in msg


def test_prompt_fixed_by_seed():
    tok = REC.parent / "tokenizer_tiny.json"
    tok.write_text(json.dumps({"model": {"vocab": {f"t{i}": i for i in range(3, 100)}},
                               "added_tokens": [{"id": 0, "special": True}, {"id": 1, "special": True},
                                                {"id": 2, "special": True}]}))
    try:
        a, b, c = make_prompt(tok, 32, 0), make_prompt(tok, 32, 0), make_prompt(tok, 32, 1)
    finally:
        tok.unlink()
    assert a == b and a["ids"] != c["ids"]
    assert len(a["ids"]) == 32 and min(a["ids"]) >= 3 and max(a["ids"]) < 100   # no special tokens


def test_noise_does_not_fail_but_a_real_regression_does():
    base = _result(decode=(100, 110, 90), ttft=(20, 24, 18))
    noisy = _result(decode=(85, 101, 95), ttft=(26, 19, 22))      # one slow run each: overlaps base
    slow = _result(decode=(80, 84, 82), ttft=(25, 26, 27))         # every sample > 10% worse
    v, _ = compare.compare([base], [noisy], 0.10)
    assert not [x for x in v if x.gated], [x.line() for x in v]
    v, _ = compare.compare([base], [slow], 0.10)
    bad = {x.metric for x in v if x.gated}
    assert bad == {"decode_tok_s", "ttft_ms", "prefill_tok_s"}
    # faster is never a regression
    v, _ = compare.compare([slow], [base], 0.10)
    assert not [x for x in v if x.gated]
    # memory growth counts too
    v, _ = compare.compare([base], [_result(rss=(400, 401, 402))], 0.10)
    assert {x.metric for x in v if x.gated} == {"peak_rss_mb"}


def test_emulated_results_do_not_gate_unless_asked():
    base = _result(kind="qemu-arm64", emulated=True, arch="aarch64")
    slow = _result(kind="qemu-arm64", emulated=True, arch="aarch64", decode=(50, 51, 52))
    v, _ = compare.compare([base], [slow], 0.1)
    assert [x for x in v if x.regressed] and not [x for x in v if x.gated]
    v, _ = compare.compare([base], [slow], 0.1, include_emulated=True)
    assert [x for x in v if x.gated]


def test_parse_bound():
    assert compare.parse_bound("10%") == pytest.approx(0.10)
    assert compare.parse_bound("0.05") == pytest.approx(0.05)
    assert compare.parse_bound("7") == pytest.approx(0.07)
    with pytest.raises(UserError, match="percentage"):
        compare.parse_bound("ten")


def test_cli_compare_exit_codes_and_github_json(tmp_path):
    from cdcda_export.cli import app

    b, n, s = tmp_path / "base.json", tmp_path / "new.json", tmp_path / "slow.json"
    b.write_text(json.dumps(_result(decode=(100, 110, 90))))
    n.write_text(json.dumps(_result(decode=(95, 99, 104))))
    s.write_text(json.dumps(_result(decode=(70, 72, 71))))
    runner = CliRunner()
    ok = runner.invoke(app, ["bench-compare", str(b), str(n), "--max-regression", "10%",
                             "--github-json", str(tmp_path / "gh.json")])
    assert ok.exit_code == 0, ok.output
    assert "passed" in ok.output
    bad = runner.invoke(app, ["bench-compare", str(b), str(s), "--max-regression", "10%"])
    assert bad.exit_code == 1 and "REGRESSED" in bad.output
    smaller = json.loads((tmp_path / "gh.json").read_text())
    bigger = json.loads((tmp_path / "gh.bigger.json").read_text())
    assert {e["name"].split()[-1] for e in smaller} == {"load_ms", "ttft_ms", "peak_rss_mb", "artifact_mb"}
    assert {e["name"].split()[-1] for e in bigger} == {"prefill_tok_s", "decode_tok_s"}
    dec = next(e for e in bigger if e["name"].endswith("decode_tok_s"))
    assert set(dec) == {"name", "unit", "value", "range", "extra"} and dec["value"] == 99 and dec["unit"] == "tok/s"


def test_report_markdown_csv_png(tmp_path):
    results = [_result(), _result(name="u1-xnnpack", fmt="executorch", decode=(180, 175, 185), rss=(150, 151, 149)),
               _result(kind="qemu-arm64", emulated=True, arch="aarch64", decode=(9, 10, 11), ttft=(400, 410, 390))]
    results[2]["greedy"]["matches_host"] = True
    md = report.render(results, markdown=tmp_path / "t.md", csv_path=tmp_path / "t.csv", plot_path=tmp_path / "p.png")
    assert "| u1-xnnpack | executorch | host (x86_64) |" in md
    assert "qemu-arm64 (aarch64, emulated)" in md and "| yes |" in md
    assert "100 (98.0-102)" in md                         # median (min-max)
    rows = (tmp_path / "t.csv").read_text().splitlines()
    assert len(rows) == 4 and "decode_tok_s_median" in rows[0]
    png = (tmp_path / "p.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    # the CLI reads the same files
    from typer.testing import CliRunner

    from cdcda_export.cli import app

    for i, r in enumerate(results):
        (tmp_path / f"r{i}.json").write_text(json.dumps(r))
    out = CliRunner().invoke(app, ["bench-report", *[str(tmp_path / f"r{i}.json") for i in range(3)],
                                   "--csv", str(tmp_path / "c.csv")])
    assert out.exit_code == 0, out.output
    assert "u1-xnnpack" in out.output and (tmp_path / "c.csv").exists()
    assert load_results(tmp_path / "r0.json")[0]["artifact"]["name"] == "u1-onnx"
