"""Run exported artifacts: ``load(ART)`` returns a :class:`~cdcda_export.runtime.base.Runner`.

Dispatches on ``manifest.json``'s ``format``; each format's runner lives in its own module and
imports its runtime lazily (``executorch`` / ``onnxruntime`` / ``coremltools``). Before loading,
the files the manifest lists are checked (sizes, sha256; once per artifact per process), and a
load that still fails is a :class:`~cdcda_export.errors.UserError` naming the model file.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from ..errors import UserError
from .base import (GenerationResult, Runner, RuntimeUnavailable, greedy_generate, model_file, read_manifest,
                   reexport_hint, teacher_forced_logits, verify_artifact)

_RUNNERS = {
    "executorch": "cdcda_export.runtime.executorch",
    "onnx": "cdcda_export.runtime.onnx",
    "coreml": "cdcda_export.runtime.coreml",
}


def load(artifact_dir: str | Path, *, verify: bool = True, adapter: str | Path | None = None, **options) -> Runner:
    """Load an artifact directory. ``options`` go to the format's runner (e.g. ``threads=1``).

    ``verify`` (default): check the manifest's file sizes and sha256 first (:func:`verify_artifact`,
    cached per process). The bench runner's measured children pass ``verify=False``: the harness
    verified the artifact on the host before copying it, and hashing must not count as load time.
    Raises :class:`UserError` for a damaged artifact or a model the runtime cannot load, and
    :class:`RuntimeUnavailable` when this host cannot run the format at all.

    ``adapter``: an adapter package for a base package (``cdcda export --adapter-only``); the runner's
    ``set_adapter(package | None)`` switches users later without reloading the base.
    """
    art = Path(artifact_dir)
    manifest = read_manifest(art)
    fmt = manifest.get("format")
    if fmt not in _RUNNERS:
        raise UserError(f"format {fmt!r} is not known", file=str(art / "manifest.json"), field="format",
                        expected=" | ".join(_RUNNERS), hint=reexport_hint(art, manifest))
    module = importlib.import_module(_RUNNERS[fmt])
    engine = options.get("engine")
    if engine not in (None, "") and hasattr(module, "ENGINES") and engine not in module.ENGINES:
        raise ValueError(f"{fmt} engine {engine!r} is not known; known: {', '.join(module.ENGINES)}")
    if verify:
        verify_artifact(art, manifest)
    if adapter is not None and manifest.get("delivery") != "base-package":
        raise UserError("an adapter package needs a base package; this artifact is a merged artifact (no LoRA "
                        "inputs)", file=str(art / "manifest.json"), field="delivery", expected="base-package",
                        hint="load the base package the adapter was written for (its manifest's base_package.source)")
    try:
        runner = module.load(art, manifest, **options)
        if adapter is not None:
            if not hasattr(runner, "set_adapter"):
                raise UserError(f"the {fmt} runner ({options.get('engine') or 'default engine'}) cannot apply "
                                "adapter packages", field="engine", hint="use the default engine")
            runner.set_adapter(Path(adapter))
        return runner
    except (UserError, RuntimeUnavailable):
        raise
    except KeyError as e:   # the runner read a key the manifest lacks
        raise UserError(f"key {e} missing: the runner for format {fmt!r} needs it", file=str(art / "manifest.json"),
                        hint=reexport_hint(art, manifest)) from e
    except Exception as e:  # noqa: BLE001 - whatever the runtime raises on a file it cannot load
        model = model_file(art, manifest)
        detail = " ".join(str(e).split())[:600] or type(e).__name__
        raise UserError(f"the {fmt} runtime could not load it: {type(e).__name__}: {detail}", file=str(model),
                        hint=reexport_hint(art, manifest)) from e


def load_tokenizer(artifact_dir: str | Path):
    """The artifact's ``tokenizer.json`` as a ``tokenizers.Tokenizer`` (no transformers import)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(Path(artifact_dir) / "tokenizer.json"))


__all__ = ["load", "load_tokenizer", "Runner", "GenerationResult", "RuntimeUnavailable", "greedy_generate", "read_manifest",
           "teacher_forced_logits",
           "verify_artifact"]
