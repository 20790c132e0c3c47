"""Standard-library helpers shared by the worker scripts (they run under several venvs).

A worker does exactly one measured run in its own process -- load, prefill the prompt, decode
``gen_len`` tokens greedily with no EOS stop -- and prints one ``PyTorchObserver {json}`` line with
ExecuTorch's llama-runner keys, the same line ``cdcda bench``'s runner prints, so
``device_harness.parsers.observer_to_run`` turns both into the same metrics:

  load_ms = model_load_end_ms - model_load_start_ms
  ttft_ms = first_token_ms - inference_start_ms           (prefill + first token)
  prefill_tok_s = prompt_tokens / (prompt_eval_end_ms - inference_start_ms)
  decode_tok_s = (generated_tokens - 1) / (inference_end_ms - first_token_ms)
"""

from __future__ import annotations

import argparse
import json
import sys
import time

OBSERVER = "PyTorchObserver"


def now_ms() -> float:
    return time.perf_counter() * 1000.0


def parser(doc: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=doc)
    ap.add_argument("--model", required=True, help="model file or directory")
    ap.add_argument("--prompt-file", required=True, help='JSON {"ids": [...]}')
    ap.add_argument("--gen-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=0, help="0: runtime default")
    return ap


def read_prompt(path: str) -> list[int]:
    with open(path, encoding="utf-8") as f:
        return [int(i) for i in json.load(f)["ids"]]


def emit(*, prompt_len: int, tokens: list[int], load0: float, load1: float, inf0: float, first: float,
         inf1: float, **extra) -> None:
    stats = {
        "prompt_tokens": prompt_len,
        "generated_tokens": len(tokens),
        "model_load_start_ms": load0,
        "model_load_end_ms": load1,
        "inference_start_ms": inf0,
        "inference_end_ms": inf1,
        "prompt_eval_end_ms": first,
        "first_token_ms": first,
        "aggregate_sampling_time_ms": 0,
        "SCALING_FACTOR_UNITS_PER_SECOND": 1000,
        "tokens": [int(t) for t in tokens],
    }
    stats.update(extra)
    sys.stdout.write(f"{OBSERVER} {json.dumps(stats, separators=(',', ':'))}\n")
    sys.stdout.flush()
