"""Fidelity-test fixtures: per-user adapters, and artifacts from the shared session cache of tests/conftest.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from fidelity_faults import make_adapter

# The user whose held-out queries the personalized checks use (synthetic LaMP-3 sample that ships).
USER_A, USER_B = "3000", "3001"
TASK = "LaMP-3"


@pytest.fixture(scope="session")
def fidelity_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fidelity")


@pytest.fixture(scope="session")
def adapter_dir(tiny_model_dir, fidelity_root):
    """Factory: ``adapter_dir(arch, user)`` -> a real LoRA adapter dir for that user (cached)."""

    def make(arch: str = "tiny", user: str = USER_A) -> Path:
        seed = {USER_A: 1, USER_B: 2}.get(user, 3)
        return make_adapter(tiny_model_dir(arch), fidelity_root / "adapters" / arch / user, user, TASK, seed=seed)

    return make


@pytest.fixture(scope="session")
def user_artifact(tiny_artifact, adapter_dir):
    """Factory: ``user_artifact(arch, recipe, user, **overrides)`` -> the shared ``tiny_artifact`` of
    tests/conftest.py exported with that user's adapter (``user=None``: no adapter)."""

    def make(arch: str, recipe: str, user: str | None = None, **overrides) -> Path:
        return tiny_artifact(arch, recipe, adapter_dir(arch, user) if user else None, **overrides)

    return make
