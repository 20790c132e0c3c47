"""The qemu-arm64 emulator: the committed result of a real run (default) and a real run (slow)."""

from __future__ import annotations

from pathlib import Path

import pytest

from device_harness.schema import load_results

RESULTS = sorted((Path(__file__).resolve().parents[1] / "benchmarks" / "results").glob("emulator_*.json"))


def test_committed_emulator_results_follow_the_contract():
    assert RESULTS, "benchmarks/results/emulator_*.json: a result of a real emulator run is committed"
    for path in RESULTS:
        for res in load_results(path):             # validates the bench-result schema
            assert res["device"]["kind"] == "qemu-arm64" and res["device"]["emulated"] is True, path
            assert res["device"]["arch"] == "aarch64", path
            assert res["greedy"]["matches_host"] is True, path     # ARM kernels gave the host's tokens
            assert len(res["metrics"]["decode_tok_s"]["samples"]) == res["config"]["runs"], path
            assert any("emulated" in n for n in res["notes"]), path


@pytest.mark.slow
def test_emulator_bench_onnx_matches_host(tiny_artifact, repo_root):
    """Builds the emulator when missing (Debian qemu-user-static + debootstrap: ~10 min, root), then
    benches a tiny ONNX artifact under it and compares greedy tokens with the host."""
    from device_harness import BenchConfig, bench
    from device_harness.devices.qemu import QemuArm64Device
    from device_harness.emulator import setup_emulator

    root = repo_root / "build" / "emulator-arm64"
    rec = setup_emulator(root, executorch=False)
    assert rec["machine"] == "aarch64" and rec["onnxruntime"]
    art = tiny_artifact("tiny", "onnx/fp32")
    res = bench(art, QemuArm64Device(root), BenchConfig(prompt_len=16, gen_len=8, runs=1, warmup=0, threads=1))
    assert res["device"]["emulated"] is True and res["device"]["arch"] == "aarch64"
    assert res["greedy"]["matches_host"] is True
    assert res["metrics"]["peak_rss_mb"]["min"] > 20
