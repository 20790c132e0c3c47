"""Keyword-argument entry points for other parts of the product (pipeline, demo).

``bench_artifact(path, device="host", prompt_len=64, gen_len=128, runs=5, warmup=1, threads=0)``
returns the bench-result dict (ARCHITECTURE.md "Bench result"); ``table(results)`` renders the
markdown table the CLI prints.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from .schema import BenchConfig


def bench_artifact(artifact: str | Path, *, device: str = "host", prompt_len: int = 64, gen_len: int = 128,
                   runs: int = 5, warmup: int = 1, threads: int = 0, seed: int = 0, compare_host: bool = True,
                   json_out: str | Path | None = None, timeout: float = 3600.0,
                   progress: Callable[[str], None] = lambda m: None, **device_options) -> dict:
    from .devices import get_device
    from .protocol import bench

    cfg = BenchConfig(prompt_len=prompt_len, gen_len=gen_len, runs=runs, warmup=warmup, threads=threads, seed=seed,
                      compare_host=compare_host)
    return bench(artifact, get_device(device, **device_options), cfg, json_out=json_out, timeout=timeout,
                 progress=progress)


def table(results: list[dict]) -> str:
    from .report import markdown_table

    return markdown_table(results)
