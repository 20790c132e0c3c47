"""Issue 19's ExecuTorch targets in the peers report: computed at every thread count measured, against
ExecuTorch's own export, optimum-executorch and llama.cpp Q4_0 (plain and repacked); a peer that was not
measured is reported as such, never as met."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from _peers import report  # noqa: E402


def _rec(variant: str, toolchain: str, fmt: str, threads: int, decode: float, ttft: float, export=None) -> dict:
    m = {"decode_tok_s": {"median": decode, "min": decode, "max": decode, "samples": [decode]},
         "ttft_ms": {"median": ttft, "min": ttft, "max": ttft}}
    return {"peer": {"variant": variant, "toolchain": toolchain, "quant": "q", "format": fmt, "threads": threads,
                     "weights": None, "export": export}, "metrics": m}


def _targets(records):
    s = report.summarize(records, 40.0, export_cost=None, fp32_weight_bytes=538_000_000)
    return {t["target"]: t for t in s["executorch_targets"]}


def test_targets_per_thread_count_and_scaling():
    recs = [
        _rec("ours-executorch/a", "cdcda", "executorch", 1, 150.0, 40.0, {"seconds": 100.0, "peak_rss_mb": 900.0}),
        _rec("ours-executorch/a", "cdcda", "executorch", 2, 210.0, 30.0, {"seconds": 100.0, "peak_rss_mb": 900.0}),
        _rec("et-llm-8da4w", "ExecuTorch export_llm", "executorch", 1, 160.0, 50.0, {"seconds": 250.0}),
        _rec("et-llm-8da4w", "ExecuTorch export_llm", "executorch", 2, 200.0, 45.0, {"seconds": 250.0}),
        _rec("llamacpp-Q4_0", "llama.cpp", "gguf", 1, 100.0, 80.0),
        _rec("llamacpp-Q4_0", "llama.cpp", "gguf", 2, 160.0, 60.0),
    ]
    t = _targets(recs)
    assert t["best .pte decode > et-llm-8da4w (1 thread)"]["met"] is False
    assert abs(t["best .pte decode > et-llm-8da4w (1 thread)"]["measured"] - 150 / 160) < 1e-9
    assert t["best .pte decode > et-llm-8da4w (2 threads)"]["met"] is True
    assert t["best .pte decode >= 1.25x llamacpp-Q4_0 (1 thread)"]["met"] is True          # 1.5x
    assert t["best .pte decode >= 1.25x llamacpp-Q4_0 (2 threads)"]["met"] is True         # 1.3125x
    assert t["best .pte decode >= 1.25x llamacpp-Q4_0+repack (2 threads)"]["met"] is None  # not measured
    assert t["best .pte decode > optimum-et-8da4w (1 thread)"]["met"] is None
    assert abs(t["ours-executorch/a: 2 threads >= 1.3x 1 thread"]["measured"] - 1.4) < 1e-9
    assert t["best .pte TTFT <= 0.8x llama.cpp Q4_0's best (2 threads)"]["met"] is True    # 30 / 60
    assert abs(t["ours-executorch/a: export <= 0.5x ExecuTorch export_llm's time"]["measured"] - 0.4) < 1e-9
    assert t["ours-executorch/a: export <= 120 s"]["met"] is True
    assert t["ours-executorch/a: export peak RSS <= 2x fp32 weights (1026 MiB)"]["met"] is True
