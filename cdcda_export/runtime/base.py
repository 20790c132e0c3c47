"""One runner interface over every artifact format.

A runner holds one loaded model and its KV cache. ``prefill`` feeds a real sequence (chunked by
the artifact's prefill length when longer) and returns the logits of every fed position;
``decode`` feeds one token and returns the next-token logits. A runner may also offer
``prefill_last`` (the last position's logits only, for artifacts whose lm_head runs on the last
position alone); ``generate`` uses it when present. ``generate`` is greedy decoding
on top of the two, shared by all formats, and reports its timings.

This package is what travels to a phone, board or emulator with the bench runner: it imports
neither the exporters nor training code, only numpy, the runtimes and ``tokenizers``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol, Sequence, runtime_checkable

import numpy as np


class RuntimeUnavailable(RuntimeError):
    """The artifact's runtime cannot run on this host (e.g. Core ML predictions need macOS)."""


@dataclass
class GenerationResult:
    prompt_ids: list[int]
    tokens: list[int]                      # generated token ids (without the prompt)
    ttft_s: float                          # prompt fed -> first new token's logits available
    decode_s: float                        # time spent in decode() calls
    prefill_tok_s: float
    decode_tok_s: float
    logits: list[np.ndarray] = field(default_factory=list)  # per generated step, when asked


@runtime_checkable
class Runner(Protocol):
    manifest: dict
    max_seq_len: int
    position: int            # number of tokens already in the KV cache

    def reset(self) -> None: ...
    def prefill(self, token_ids: Sequence[int]) -> np.ndarray: ...   # [T, vocab] float32
    def decode(self, token_id: int) -> np.ndarray: ...               # [vocab] float32


def chunked_prefill(run: Callable[[list[int]], np.ndarray], token_ids: Sequence[int], prefill_len: int,
                    *, last: bool = False) -> np.ndarray:
    """Feed ``token_ids`` in chunks of at most ``prefill_len`` through ``run`` (one model call each);
    return the float32 logits of every fed position, [T, vocab], or with ``last`` only the last
    position's [vocab] (no copy of the other positions: the TTFT path). Shared by every format's runner."""
    ids = [int(i) for i in token_ids]
    if not ids:
        raise ValueError("prefill needs at least one token")
    if last:
        for i in range(0, len(ids), prefill_len):
            logits = run(ids[i:i + prefill_len])
        return logits[-1].astype(np.float32, copy=False)
    chunks = [run(ids[i:i + prefill_len]) for i in range(0, len(ids), prefill_len)]
    return np.concatenate(chunks, axis=0).astype(np.float32, copy=False)


def read_manifest(artifact_dir: str | Path) -> dict:
    p = Path(artifact_dir) / "manifest.json"
    if not p.is_file():
        raise FileNotFoundError(
            f"{p}: no manifest.json; this is not a complete artifact directory "
            "(an interrupted export leaves none). Re-run `cdcda export ...` to build it."
        )
    return json.loads(p.read_text(encoding="utf-8"))


def greedy_generate(runner: Runner, prompt_ids: Sequence[int], max_new_tokens: int, *,
                    eos_ids: Sequence[int] = (), keep_logits: bool = False,
                    on_token: Callable[[int], None] | None = None) -> GenerationResult:
    """Greedy decoding through prefill + step-by-step decode (the KV-cache path)."""
    prompt_ids = list(prompt_ids)
    room = runner.max_seq_len - len(prompt_ids)
    if room <= 0:
        raise ValueError(f"prompt of {len(prompt_ids)} tokens does not fit max_seq_len={runner.max_seq_len}")
    max_new_tokens = min(max_new_tokens, room)
    runner.reset()
    t0 = time.perf_counter()
    prefill_last = getattr(runner, "prefill_last", None)   # runners with a last-position-only fast path
    logits = prefill_last(prompt_ids) if prefill_last else runner.prefill(prompt_ids)[-1]
    ttft = time.perf_counter() - t0
    out: list[int] = []
    kept: list[np.ndarray] = []
    decode_s = 0.0
    eos = set(eos_ids)
    for i in range(max_new_tokens):
        if keep_logits:
            kept.append(np.asarray(logits, dtype=np.float32).copy())
        tok = int(np.argmax(logits))
        out.append(tok)
        if on_token:
            on_token(tok)
        if tok in eos or i == max_new_tokens - 1:
            break
        t1 = time.perf_counter()
        logits = runner.decode(tok)
        decode_s += time.perf_counter() - t1
    n_dec = max(len(out) - 1, 0)
    return GenerationResult(
        prompt_ids=prompt_ids, tokens=out, ttft_s=ttft, decode_s=decode_s,
        prefill_tok_s=len(prompt_ids) / ttft if ttft > 0 else float("inf"),
        decode_tok_s=(n_dec / decode_s) if decode_s > 0 else float("nan"),
        logits=kept,
    )
