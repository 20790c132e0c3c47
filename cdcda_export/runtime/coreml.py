"""Core ML runner: ``model.mlpackage`` through coremltools' ``MLModel`` with its KV cache as state.

Predictions need macOS (Core ML framework). On other hosts :func:`load` raises
:class:`~cdcda_export.runtime.base.RuntimeUnavailable`; the fidelity gate reports the artifact as
``skipped`` with that reason and runs the structural checks instead.

The package has one function for prefill and decode: inputs ``input_ids`` [1, T] int32 and an additive
``causal_mask`` [1, 1, T, end] (0 = attend, ``io.causal_mask.mask_value`` = masked); the fed tokens take
positions ``end - T .. end - 1`` and are written into the state. T is at most ``io.prefill_len``, so longer
prompts are fed in chunks.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from .base import RuntimeUnavailable, chunked_prefill

_COMPUTE_UNITS = {"all": "ALL", "cpu_only": "CPU_ONLY", "cpu_and_gpu": "CPU_AND_GPU", "cpu_and_ne": "CPU_AND_NE"}


def causal_mask(position: int, t: int, dtype=np.float16, mask_value: float | None = None) -> np.ndarray:
    """Additive mask [1, 1, t, position + t] for t new tokens after ``position`` cached ones."""
    if mask_value is None:
        mask_value = float(np.finfo(dtype).min)
    end = position + t
    q = np.arange(position, end)[:, None]
    k = np.arange(end)[None, :]
    return np.where(k <= q, 0.0, mask_value).astype(dtype)[None, None]


def _unavailable_reason() -> str | None:
    if sys.platform != "darwin":
        return (f"Core ML predictions need macOS (this host is {sys.platform}); the .mlpackage was converted and "
                "can be checked structurally here (`cdcda check` does), run it on a Mac or an iOS device")
    try:
        from coremltools.libcoremlpython import _MLModelProxy  # noqa: F401
    except ImportError as e:  # pragma: no cover - macOS only
        return f"coremltools has no native Core ML runtime in this install ({e}); pip install coremltools on macOS"
    return None


class CoreMLRunner:
    """Runner over a stateful ``.mlpackage`` (see :class:`cdcda_export.runtime.base.Runner`)."""

    def __init__(self, artifact_dir: Path, manifest: dict, *, compute_units: str | None = None, **_ignored):
        import coremltools as ct  # pragma: no cover - macOS only from here on

        self.manifest = manifest
        io = manifest["io"]
        self.max_seq_len = int(io["max_seq_len"])
        self.prefill_len = int(io.get("prefill_len") or self.max_seq_len)
        mask = io["inputs"]["causal_mask"]
        self.mask_dtype = np.float16 if mask["dtype"] == "float16" else np.float32
        self.mask_value = float((io.get("causal_mask") or {}).get("mask_value", np.finfo(self.mask_dtype).min))
        units = compute_units or io.get("compute_units", "all")
        self.model = ct.models.MLModel(str(Path(artifact_dir) / io.get("model_file", "model.mlpackage")),
                                       compute_units=getattr(ct.ComputeUnit, _COMPUTE_UNITS[units]))
        self.position = 0
        self.lora: dict = {}      # base packages: LoRA inputs fed on every predict (Core ML names, see export)
        self.adapter = None
        if manifest.get("delivery") == "base-package":
            from .adapters import lora_input_shapes

            dt = np.float16 if (io.get("lora") or {}).get("input_dtype") == "float16" else np.float32
            self.lora_shapes = {n: (s, dt) for n, s in lora_input_shapes(io["decoder"], manifest["lora"]).items()}
            self._set_lora({})
        self.reset()

    def _set_lora(self, tensors: dict) -> None:
        self.lora = {n.replace(".", "_"): (tensors[n].astype(dt) if n in tensors else np.zeros(shape, dtype=dt))
                     for n, (shape, dt) in self.lora_shapes.items()}

    def set_adapter(self, package) -> float:
        """One user's adapter package as the model's LoRA inputs (``None``: zeros, the plain base); the model
        stays loaded. Checks the package's files and base package hash. Returns the seconds it took."""
        import time

        from .adapters import load_adapter_tensors, read_adapter_package

        t0 = time.perf_counter()
        if package is None:
            self._set_lora({})
            self.adapter = None
        else:
            m = read_adapter_package(package, self.manifest)
            self._set_lora(load_adapter_tensors(package, m))
            self.adapter = {"package": str(package), "user_id": m.get("user_id")}
        return time.perf_counter() - t0

    def reset(self) -> None:
        self.state = self.model.make_state()
        self.position = 0

    def _run(self, ids: Sequence[int]) -> np.ndarray:
        t = len(ids)
        if self.position + t > self.max_seq_len:
            raise ValueError(f"{self.position} cached + {t} new tokens exceed max_seq_len={self.max_seq_len}")
        feed = {"input_ids": np.asarray(ids, dtype=np.int32)[None],
                "causal_mask": causal_mask(self.position, t, self.mask_dtype, self.mask_value), **self.lora}
        out = self.model.predict(feed, state=self.state)
        self.position += t
        return np.asarray(out["logits"], dtype=np.float32).reshape(t, -1)

    def prefill(self, token_ids: Sequence[int]) -> np.ndarray:
        return chunked_prefill(self._run, token_ids, self.prefill_len)

    def decode(self, token_id: int) -> np.ndarray:
        return self._run([int(token_id)])[-1]


def load(artifact_dir: Path, manifest: dict, **options) -> CoreMLRunner:
    """Load a Core ML artifact; raises RuntimeUnavailable where Core ML cannot predict (Linux, Windows)."""
    reason = _unavailable_reason()
    if reason:
        raise RuntimeUnavailable(reason)
    return CoreMLRunner(Path(artifact_dir), manifest, **options)  # pragma: no cover - macOS only
