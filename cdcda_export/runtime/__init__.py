"""Run exported artifacts: ``load(ART)`` returns a :class:`~cdcda_export.runtime.base.Runner`.

Dispatches on ``manifest.json``'s ``format``; each format's runner lives in its own module and
imports its runtime lazily (``executorch`` / ``onnxruntime`` / ``coremltools``).
"""

from __future__ import annotations

import importlib
from pathlib import Path

from .base import GenerationResult, Runner, RuntimeUnavailable, greedy_generate, read_manifest

_RUNNERS = {
    "executorch": "cdcda_export.runtime.executorch",
    "onnx": "cdcda_export.runtime.onnx",
    "coreml": "cdcda_export.runtime.coreml",
}


def load(artifact_dir: str | Path, **options) -> Runner:
    """Load an artifact directory. ``options`` go to the format's runner (e.g. ``threads=1``)."""
    manifest = read_manifest(artifact_dir)
    fmt = manifest.get("format")
    if fmt not in _RUNNERS:
        raise ValueError(f"{artifact_dir}/manifest.json: format {fmt!r} is not known; known: {', '.join(_RUNNERS)}")
    module = importlib.import_module(_RUNNERS[fmt])
    return module.load(Path(artifact_dir), manifest, **options)


def load_tokenizer(artifact_dir: str | Path):
    """The artifact's ``tokenizer.json`` as a ``tokenizers.Tokenizer`` (no transformers import)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(Path(artifact_dir) / "tokenizer.json"))


__all__ = ["load", "load_tokenizer", "Runner", "GenerationResult", "RuntimeUnavailable", "greedy_generate", "read_manifest"]
