"""Parsers for what runners print, turned into one run record per run.

Every runner's output ends up as the same record (``RunRecord`` keys below), parsed by the same
functions on every device:

- ``PyTorchObserver {json}``: ExecuTorch's ``llama_main`` (``extension/llm/runner/stats.h``) and
  our own ``bench_runner.py`` (same keys, plus extras). :func:`observer_to_run` is the only place
  where times become metrics:

  ``load_ms       = model_load_end_ms - model_load_start_ms``
  ``ttft_ms       = first_token_ms - inference_start_ms``
  ``prefill_tok_s = prompt_tokens / (prompt_eval_end_ms - inference_start_ms)``
  ``decode_tok_s  = (generated_tokens - 1) / (inference_end_ms - first_token_ms)``
  (the first generated token comes from the prefill, so decoding produced ``generated - 1``).
- ``onnxruntime_perf_test`` text (``Session creation time cost``, ``P50 Latency``, ``Peak working
  set size``): :func:`parse_perf_test`.
- ``executor_runner``'s ``Model executed successfully N time(s) in X ms.``:
  :func:`parse_executor_runner`.
- ``/proc/<pid>/status`` (``VmHWM``/``VmRSS``) and cpufreq snapshots.
"""

from __future__ import annotations

import json
import re
from typing import Any, Iterable

OBSERVER = "PyTorchObserver"
DEVICE_TAG = "cdcda-device"
RUN_KEYS = ("load_ms", "ttft_ms", "prefill_tok_s", "decode_tok_s", "peak_rss_mb")


class ParseError(ValueError):
    """Runner output that does not contain what the protocol expects."""


def _f(x: Any) -> float:
    return float(x)


def parse_observer_line(line: str) -> dict:
    """``PyTorchObserver {json}`` -> the JSON dict (``ParseError`` when malformed)."""
    line = line.strip()
    idx = line.find(OBSERVER + " ")
    if idx < 0:
        raise ParseError(f"not a {OBSERVER} line: {line[:80]!r}")
    try:
        data = json.loads(line[idx + len(OBSERVER) + 1:])
    except json.JSONDecodeError as e:
        raise ParseError(f"{OBSERVER} line is not JSON ({e}): {line[:120]!r}") from e
    if not isinstance(data, dict):
        raise ParseError(f"{OBSERVER} payload is not an object: {line[:120]!r}")
    return data


def observer_to_run(stats: dict) -> dict:
    """One observer JSON -> a run record (metrics in ms, tok/s, MiB)."""
    if "error" in stats:
        return {"run": stats.get("run"), "warmup": bool(stats.get("warmup")), "error": stats["error"],
                "detail": stats.get("stdout_tail")}
    scale = _f(stats.get("SCALING_FACTOR_UNITS_PER_SECOND", 1000)) / 1000.0  # units per ms
    ms = lambda k: _f(stats[k]) / scale  # noqa: E731
    try:
        n_prompt = int(stats["prompt_tokens"])
        n_gen = int(stats["generated_tokens"])
        load_ms = ms("model_load_end_ms") - ms("model_load_start_ms")
        ttft_ms = ms("first_token_ms") - ms("inference_start_ms")
        prompt_ms = ms("prompt_eval_end_ms") - ms("inference_start_ms")
        decode_ms = ms("inference_end_ms") - ms("first_token_ms")
    except KeyError as e:
        raise ParseError(f"{OBSERVER} JSON lacks key {e.args[0]!r}; keys: {sorted(stats)}") from e
    rec = {
        "run": stats.get("run"),
        "warmup": bool(stats.get("warmup", False)),
        "load_ms": load_ms,
        "ttft_ms": ttft_ms,
        "prefill_tok_s": n_prompt / (prompt_ms / 1000.0) if prompt_ms > 0 else None,
        "decode_tok_s": (n_gen - 1) / (decode_ms / 1000.0) if n_gen > 1 and decode_ms > 0 else None,
        "peak_rss_mb": stats["peak_rss_kb"] / 1024.0 if stats.get("peak_rss_kb") else None,
        "prompt_tokens": n_prompt,
        "generated_tokens": n_gen,
        "rss_source": stats.get("rss_source"),
    }
    for extra in ("import_ms", "tokens", "runtime", "heavy_imports", "ru_maxrss_kb", "vmhwm_kb", "adapter_load_ms",
                  "adapter_switch_ms"):
        if extra in stats:
            rec[extra] = stats[extra]
    return rec


def parse_runner_output(text: str) -> tuple[dict | None, list[dict]]:
    """Our runner's stdout (or pulled ``results.jsonl``) -> (device description, run records)."""
    info = None
    runs: list[dict] = []
    for line in text.splitlines():
        s = line.strip()
        if s.startswith(DEVICE_TAG + " "):
            info = json.loads(s[len(DEVICE_TAG) + 1:])
        elif OBSERVER + " " in s:
            runs.append(observer_to_run(parse_observer_line(s)))
    return info, runs


# ---------------------------------------------------------------- onnxruntime_perf_test
_PERF_PATTERNS = {
    "session_creation_s": r"Session creation time cost:\s*([0-9.eE+-]+)\s*s",
    "first_inference_ms": r"First inference time cost:\s*([0-9.eE+-]+)\s*ms",
    "total_inference_s": r"Total inference time cost:\s*([0-9.eE+-]+)\s*s",
    "requests": r"Total inference requests:\s*([0-9]+)",
    "average_ms": r"Average inference time cost:\s*([0-9.eE+-]+)\s*ms",
    "inferences_per_s": r"Number of inferences per second:\s*([0-9.eE+-]+)",
    "avg_cpu_pct": r"Avg CPU usage:\s*([0-9.]+)",
    "peak_working_set_bytes": r"Peak working set size:\s*([0-9]+)",
    "runs": r"Runs:\s*([0-9]+)",
    "min_latency_s": r"Min Latency:\s*([0-9.eE+-]+)\s*s",
    "max_latency_s": r"Max Latency:\s*([0-9.eE+-]+)\s*s",
    "p50_latency_s": r"P50 Latency:\s*([0-9.eE+-]+)\s*s",
    "p90_latency_s": r"P90 Latency:\s*([0-9.eE+-]+)\s*s",
}


def parse_perf_test(text: str) -> dict:
    """``onnxruntime_perf_test`` stdout -> numbers (first occurrence of each line)."""
    out: dict[str, float] = {}
    for key, pat in _PERF_PATTERNS.items():
        m = re.search(pat, text)
        if m:
            out[key] = float(m.group(1))
    if "average_ms" not in out and "p50_latency_s" not in out:
        raise ParseError("onnxruntime_perf_test output has no 'Average inference time cost' / 'P50 Latency' "
                         f"line; did it fail? tail: {text[-300:]!r}")
    return out


def perf_test_to_run(prefill: dict, decode: dict, prompt_len: int, *, run: int, warmup: bool,
                     peak_rss_kb: int | None) -> dict:
    """One prefill-shaped and one decode-shaped perf_test invocation -> one run record.

    TTFT is the P50 latency of the prefill-shaped call (the whole prompt in one forward), decode
    tok/s is 1 / P50 latency of the decode-shaped call (one token on a cache of ``prompt_len``).
    Peak RSS: VmHWM polled from outside; perf_test's own 'Peak working set size' as fallback.
    """
    lat = lambda d: d.get("p50_latency_s") or d["average_ms"] / 1000.0  # noqa: E731
    ttft_s, dec_s = lat(prefill), lat(decode)
    peaks = [x for x in (peak_rss_kb,) if x]
    src = "VmHWM"
    if not peaks:
        ws = max(prefill.get("peak_working_set_bytes", 0), decode.get("peak_working_set_bytes", 0))
        peaks, src = ([ws / 1024] if ws else []), "perf_test"
    return {
        "run": run, "warmup": warmup,
        "load_ms": prefill.get("session_creation_s", float("nan")) * 1000.0,
        "ttft_ms": ttft_s * 1000.0,
        "prefill_tok_s": prompt_len / ttft_s if ttft_s > 0 else None,
        "decode_tok_s": 1.0 / dec_s if dec_s > 0 else None,
        "peak_rss_mb": peaks[0] / 1024.0 if peaks else None,
        "prompt_tokens": prompt_len, "generated_tokens": None, "rss_source": src if peaks else None,
    }


# ---------------------------------------------------------------- executor_runner
def parse_executor_runner(text: str) -> dict:
    """``executor_runner`` -> ``{executions, total_ms, per_execution_ms}``."""
    m = re.search(r"Model executed successfully\s+(\d+)\s+time\(s\)\s+in\s+([0-9.]+)\s*ms", text)
    if not m:
        raise ParseError(f"executor_runner output has no 'Model executed successfully' line; tail: {text[-300:]!r}")
    n, total = int(m.group(1)), float(m.group(2))
    return {"executions": n, "total_ms": total, "per_execution_ms": total / max(n, 1)}


# ---------------------------------------------------------------- /proc and cpufreq
def parse_proc_status(text: str) -> dict:
    """``/proc/<pid>/status`` -> ``{"VmHWM": kB, "VmRSS": kB, ...}`` for the Vm* lines."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        m = re.match(r"^(Vm\w+|RssAnon|RssFile):\s+(\d+)\s*kB", line.strip())
        if m:
            out[m.group(1)] = int(m.group(2))
    return out


def parse_marked_value(text: str, marker: str) -> int | None:
    """Largest integer printed as ``MARKER=<int>`` (the adb wrapper prints ``CDCDA_VMHWM_KB=``)."""
    vals = [int(v) for v in re.findall(rf"{re.escape(marker)}=(\d+)", text)]
    return max(vals) if vals else None


def parse_cpufreq(text: str) -> dict[str, int]:
    """Lines ``cpu<N> <kHz>`` (the snapshot command's output) -> ``{"cpu0": kHz, ...}``."""
    out = {}
    for line in text.splitlines():
        m = re.match(r"^\s*(cpu\d+)\s+(\d+)\s*$", line)
        if m:
            out[m.group(1)] = int(m.group(2))
    return out


def observer_lines(lines: Iterable[str]) -> list[dict]:
    return [parse_observer_line(s) for s in lines if OBSERVER + " " in s]
