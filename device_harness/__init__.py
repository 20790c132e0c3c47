"""Device harness: latency and memory of exported artifacts on host, ARM64 emulator, SSH boards,
Android (adb) and iOS, with one result schema (ARCHITECTURE.md "Bench result").

The library API::

    from device_harness import bench, BenchConfig
    res = bench("artifacts/u1-xnnpack", "host", BenchConfig(prompt_len=64, gen_len=128), json_out="b.json")

Reports (:mod:`device_harness.report`) and regression checks (:mod:`device_harness.compare`) read
the same JSON. ``bench_runner.py`` is the standalone script that travels to the device.
"""

from __future__ import annotations

from .schema import METRICS, SCHEMA, BenchConfig, load_results, summarize


def bench(*args, **kwargs):
    """See :func:`device_harness.protocol.bench`."""
    from .protocol import bench as _bench

    return _bench(*args, **kwargs)


__all__ = ["bench", "BenchConfig", "METRICS", "SCHEMA", "load_results", "summarize"]
