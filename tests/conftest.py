"""Shared fixtures: tiny real architectures built from config (never downloaded), cached per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_ARCHS = ("tiny", "tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-phi3")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Factory: ``tiny_model_dir("tiny-qwen2")`` -> a random-weight HF dir (built once per session)."""
    root = tmp_path_factory.mktemp("models")
    cache: dict[str, Path] = {}

    def make(arch: str = "tiny", seed: int = 0) -> Path:
        key = f"{arch}-{seed}"
        if key not in cache:
            from cdcda_export.models import init_model

            cache[key] = init_model(arch, root / key, seed=seed)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_base(tiny_model_dir) -> Path:
    return tiny_model_dir("tiny")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_artifact(tiny_model_dir, tmp_path_factory):
    """Factory: ``tiny_artifact("tiny-qwen2", "onnx-fp32", adapter=None)`` -> exported artifact dir.

    Built once per (arch, recipe, adapter) per test session, shared by every test module, so the
    export, check and bench tests do not export the same tiny model several times.
    """
    root = tmp_path_factory.mktemp("artifacts")
    cache: dict[tuple, Path] = {}

    def make(arch: str, recipe: str, adapter: Path | None = None, **overrides) -> Path:
        key = (arch, recipe, str(adapter), tuple(sorted(overrides.items())))
        if key not in cache:
            from cdcda_export.export.api import export

            name = f"{arch}-{recipe.replace('/', '_')}-{len(cache)}"
            cache[key] = export(tiny_model_dir(arch), adapter, recipe, root / name, progress=False,
                                overrides=[f"{k}={v}" for k, v in overrides.items()] or None)
        return cache[key]

    return make
