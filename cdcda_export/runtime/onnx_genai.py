"""ONNX Runtime GenAI runner for ``format: onnx`` artifacts (``engine="onnxruntime-genai"``).

Our ONNX artifacts ship a ``genai_config.json``, so ONNX Runtime GenAI -- the C++ generation loop
apps ship on Android (Java/Kotlin API), iOS (Objective-C) and desktop -- runs them as they are:
``og.Model(artifact_dir)``, one ``og.Generator`` per sequence, the KV cache kept (and, with
``past_present_share_buffer``, updated in place) by ORT GenAI itself. This runner drives it through
the same interface as :class:`~cdcda_export.runtime.onnx.OnnxRunner`: ``append_tokens`` feeds the
prompt or one token, ``get_logits`` returns the last fed position's logits, and greedy decoding stays
in :func:`~cdcda_export.runtime.base.greedy_generate`, so both engines produce comparable numbers.

ORT GenAI returns the last position's logits only: ``prefill_last`` (what generation uses) feeds the
whole prompt in one call; ``prefill`` (every position, for the fidelity check) feeds one token per
call. Imports only numpy and onnxruntime_genai (this module travels to devices).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from .base import RuntimeUnavailable, chunked_prefill

ENGINE = "onnxruntime-genai"


class GenaiRunner:
    def __init__(self, artifact_dir: Path, manifest: dict, threads: int | None = None):
        try:
            import onnxruntime_genai as og
        except ImportError as e:  # pragma: no cover - depends on the host
            raise RuntimeUnavailable("onnxruntime-genai is not installed (pip install onnxruntime-genai)") from e
        if not (artifact_dir / "genai_config.json").is_file():
            raise RuntimeUnavailable(f"{artifact_dir}: no genai_config.json; ONNX Runtime GenAI needs it "
                                     "(re-export with `cdcda export ... --recipe onnx/...`)")
        self._og = og
        self._loaded: set[str] = set()
        self.manifest = manifest
        self.max_seq_len = int(manifest["io"]["max_seq_len"])
        cfg = og.Config(str(artifact_dir))
        if threads:
            # the decoder session's threads (genai_config.json model.decoder.session_options)
            cfg.overlay(json.dumps({"model": {"decoder": {"session_options": {
                "intra_op_num_threads": int(threads), "inter_op_num_threads": 1}}}}))
        self.model = og.Model(cfg)
        self.generator = None
        self.adapters = None       # og.Adapters of a base package: every loaded user's .onnx_adapter, by name
        self.adapter = None
        self.reset()

    def set_adapter(self, package) -> float:
        """ORT GenAI's own multi-LoRA: ``og.Adapters(model).load(file, name)`` once per package, then
        ``generator.set_active_adapter`` on every new sequence (``None``: the plain base, the graph's empty
        defaults). Checks the package's files and base package hash. Returns the seconds it took."""
        import time

        from .adapters import read_adapter_package

        t0 = time.perf_counter()
        if package is None:
            self.adapter = None
        else:
            m = read_adapter_package(package, self.manifest)
            name = str(Path(package).resolve())
            if self.adapters is None:
                self.adapters = self._og.Adapters(self.model)
            if name not in self._loaded:
                self.adapters.load(str(Path(package) / m["adapter_file"]), name)
                self._loaded.add(name)
            self.adapter = {"package": str(package), "user_id": m.get("user_id"), "name": name}
        self.reset()
        return time.perf_counter() - t0

    def reset(self) -> None:
        params = self._og.GeneratorParams(self.model)
        params.set_search_options(do_sample=False, max_length=self.max_seq_len, batch_size=1)
        self.generator = None   # free the old KV buffers before the new generator allocates its own
        self.generator = self._og.Generator(self.model, params)
        if self.adapter is not None:
            self.generator.set_active_adapter(self.adapters, self.adapter["name"])
        self.position = 0

    def _append(self, ids: Sequence[int]) -> np.ndarray:
        """Feed ``ids``; the last fed position's logits as [1, vocab]."""
        t = len(ids)
        if self.position + t > self.max_seq_len:
            raise ValueError(f"{self.position + t} tokens exceed max_seq_len={self.max_seq_len}; call reset()")
        self.generator.append_tokens(np.asarray([ids], dtype=np.int32))
        self.position += t
        return np.asarray(self.generator.get_logits(), dtype=np.float32).reshape(1, -1)

    def prefill_last(self, token_ids: Sequence[int]) -> np.ndarray:
        return chunked_prefill(self._append, token_ids, max(len(token_ids), 1), last=True)   # the whole prompt in one call

    def prefill(self, token_ids: Sequence[int]) -> np.ndarray:
        return chunked_prefill(self._append, token_ids, 1)   # every position: one token per call

    def decode(self, token_id: int) -> np.ndarray:
        return self._append([int(token_id)])[-1]


def load(artifact_dir: Path, manifest: dict, threads: int | None = None) -> GenaiRunner:
    return GenaiRunner(Path(artifact_dir), manifest, threads=threads)
