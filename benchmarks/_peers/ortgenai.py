"""ONNX Runtime GenAI peer: its own model builder on the local HF directory, int4 (block 32,
accuracy level 4) and fp32, run with ``onnxruntime_genai`` (same venv as the product).

The builder's ``--help`` crashes with an argparse error (onnxruntime-genai 0.18.0), so the options
are passed directly.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

from .measure import run_child

PRECISIONS = {
    "int4": ["-p", "int4", "-e", "cpu", "--extra_options", "block_size=32", "accuracy_level=4"],
    "fp32": ["-p", "fp32", "-e", "cpu"],
}


def build(hf_dir: Path, precision: str, out: Path, log: Path, *, force: bool = False) -> dict:
    done = out / "genai_config.json"
    if done.exists() and not force:
        return {"cached": True, "ok": True}
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(tmp),
           "-c", str(out.parent / "hf-cache"), *PRECISIONS[precision]]
    t = time.perf_counter()
    rc, _, maxrss_kb, hwm_kb = run_child(cmd, log=log, timeout=3600)
    secs = time.perf_counter() - t
    if rc != 0 or not (tmp / "genai_config.json").exists():
        return {"ok": False, "exit": rc, "error": f"builder exited {rc} (see {log})"}
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return {"ok": True, "seconds": secs, "peak_rss_mb": (hwm_kb or maxrss_kb) / 1024}


def worker_cmd(model_dir: Path, prompt_file: Path, gen_len: int, threads: int) -> list[str]:
    return [sys.executable, str(Path(__file__).with_name("ortgenai_worker.py")), "--model", str(model_dir),
            "--prompt-file", str(prompt_file), "--gen-len", str(gen_len), "--threads", str(threads)]


def model_bytes(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in model_dir.iterdir() if p.name.startswith("model.onnx"))
