"""Parsers of runner outputs (recorded files in tests/data/recorded) -> one run record shape."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from device_harness import parsers
from device_harness.devices import adb

REC = Path(__file__).parent / "data" / "recorded"


def test_llama_main_observer_line_metrics():
    out = (REC / "llama_main_android.txt").read_text()
    rec = adb.llama_main_run(out, run=3, warmup=False)
    # numbers from the PyTorchObserver JSON in the file (stats.h formulas), tolerance 1e-9
    assert rec["load_ms"] == pytest.approx(612.0, abs=1e-9)
    assert rec["ttft_ms"] == pytest.approx(60.0, abs=1e-9)
    assert rec["prefill_tok_s"] == pytest.approx(64 / 0.058, rel=1e-9)
    assert rec["decode_tok_s"] == pytest.approx(127 / 0.780, rel=1e-9)   # (generated-1) / (end - first token)
    assert rec["peak_rss_mb"] == pytest.approx(93412 / 1024, rel=1e-9)  # from the VmHWM marker, not the runner
    assert rec["rss_source"] == "VmHWM"
    assert (rec["run"], rec["warmup"], rec["prompt_tokens"], rec["generated_tokens"]) == (3, False, 64, 128)


def test_llama_main_failure_is_an_error_record():
    rec = adb.llama_main_run("E executorch: failed to load\nCDCDA_VMHWM_KB=1000\nCDCDA_EXIT=1\n", run=0, warmup=True)
    assert rec["error"] == "llama_main exit 1"
    assert rec["warmup"] is True


def test_our_runner_output_parses_like_llama_main():
    info, runs = parsers.parse_runner_output((REC / "cdcda_runner_host_onnx.txt").read_text())
    assert info["arch"] == "x86_64" and "cpu" in info
    assert [r["warmup"] for r in runs] == [True, False, False]
    for r in runs:
        assert r["load_ms"] > 0 and r["ttft_ms"] > 0 and r["decode_tok_s"] > 0 and r["prefill_tok_s"] > 0
        assert r["peak_rss_mb"] > 10          # a Python process with onnxruntime: tens of MiB at least
        assert r["rss_source"] in ("wait4", "VmHWM")
        assert len(r["tokens"]) == r["generated_tokens"] == 16
        assert r["heavy_imports"] == []       # the ONNX path imports no torch/transformers
    # decode tok/s from timestamps agrees with the runner's own decode time (same 15 decode steps), 5%
    raw = [json.loads(ln.split(" ", 1)[1]) for ln in (REC / "cdcda_runner_host_onnx.txt").read_text().splitlines()
           if ln.startswith("PyTorchObserver")]
    for r, s in zip(runs, raw):
        assert r["decode_tok_s"] == pytest.approx(15 / (s["decode_ms"] / 1000), rel=0.05)


def test_observer_scaling_factor_and_missing_keys():
    line = ('PyTorchObserver {"prompt_tokens":4,"generated_tokens":3,"model_load_start_ms":0,"model_load_end_ms":2000,'
            '"inference_start_ms":2000,"inference_end_ms":6000,"prompt_eval_end_ms":3000,"first_token_ms":4000,'
            '"SCALING_FACTOR_UNITS_PER_SECOND":1000000}')   # microseconds
    rec = parsers.observer_to_run(parsers.parse_observer_line(line))
    assert rec["load_ms"] == pytest.approx(2.0) and rec["ttft_ms"] == pytest.approx(2.0)
    assert rec["decode_tok_s"] == pytest.approx(2 / 0.002)
    with pytest.raises(parsers.ParseError, match="lacks key 'first_token_ms'"):
        parsers.observer_to_run({"prompt_tokens": 1, "generated_tokens": 1, "model_load_start_ms": 0,
                                 "model_load_end_ms": 1, "inference_start_ms": 1, "inference_end_ms": 2,
                                 "prompt_eval_end_ms": 1})
    with pytest.raises(parsers.ParseError, match="not JSON"):
        parsers.parse_observer_line("PyTorchObserver {oops")


def test_perf_test_pair_to_run():
    pre = (REC / "onnxruntime_perf_test_prefill.txt").read_text()
    dec = (REC / "onnxruntime_perf_test_decode.txt").read_text()
    p = parsers.parse_perf_test(pre)
    assert p["session_creation_s"] == pytest.approx(0.0893012)
    assert p["p50_latency_s"] == pytest.approx(0.0533657)
    assert p["peak_working_set_bytes"] == 131239936
    rec = adb.perf_test_run(pre, dec, 64, run=1, warmup=False)
    assert rec["ttft_ms"] == pytest.approx(53.3657, rel=1e-9)
    assert rec["prefill_tok_s"] == pytest.approx(64 / 0.0533657, rel=1e-9)
    assert rec["decode_tok_s"] == pytest.approx(1 / 0.00521875, rel=1e-9)
    assert rec["load_ms"] == pytest.approx(89.3012, rel=1e-9)
    assert rec["peak_rss_mb"] == pytest.approx(128164 / 1024, rel=1e-9)   # max VmHWM of the two calls
    # without the wrapper's VmHWM marker, perf_test's own peak working set is the fallback
    strip = lambda t: "\n".join(ln for ln in t.splitlines() if not ln.startswith("CDCDA_VMHWM"))  # noqa: E731
    rec2 = adb.perf_test_run(strip(pre), strip(dec), 64, run=1, warmup=False)
    assert rec2["rss_source"] == "perf_test"
    assert rec2["peak_rss_mb"] == pytest.approx(131239936 / 1024 / 1024, rel=1e-9)
    with pytest.raises(parsers.ParseError, match="did it fail"):
        parsers.parse_perf_test("Run failed: something")


def test_executor_runner_and_proc_status_and_cpufreq():
    out = (REC / "executor_runner.txt").read_text()
    r = parsers.parse_executor_runner(out)
    assert r == {"executions": 10, "total_ms": 612.877, "per_execution_ms": pytest.approx(61.2877)}
    rec = adb.executor_runner_run(out, run=0, warmup=False)
    assert rec["ttft_ms"] == pytest.approx(61.2877) and rec["peak_rss_mb"] == pytest.approx(45120 / 1024)
    for name in ("proc_status_x86_64.txt", "proc_status_aarch64_qemu.txt"):
        st = parsers.parse_proc_status((REC / name).read_text())
        assert st["VmHWM"] >= st["VmRSS"] > 0 and st["VmPeak"] >= st["VmHWM"], name
    f = parsers.parse_cpufreq((REC / "cpufreq.txt").read_text())
    assert len(f) == 8 and f["cpu7"] == 2910000


def test_getprop_device_block():
    d = adb.device_from_getprop((REC / "getprop_pixel.txt").read_text(), "ABC123")
    assert d == {"kind": "adb", "name": "Google Pixel 8", "cpu": "Tensor G3", "os": "Android 15", "arch": "aarch64",
                 "emulated": False, "serial": "ABC123"}
    emu = adb.device_from_getprop("ro.product.model=sdk_gphone64_arm64\nro.kernel.qemu=1\nro.product.cpu.abi=arm64-v8a")
    assert emu["emulated"] is True
