"""Typed config tree (every problem named once) and atomic writes."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from cdcda_export.config import apply_overrides, build, load_yaml
from cdcda_export.errors import UserError, ValidationErrors
from cdcda_export.utils import atomic_dir, is_safe_name, sha256_dir


@dataclass
class Quant:
    scheme: str = field(default="none", metadata={"choices": ("none", "8da4w")})
    group_size: int = 32

    def __post_init__(self):
        if self.group_size <= 0:
            raise ValueError(f"group_size must be > 0, got {self.group_size}")


@dataclass
class Recipe:
    name: str
    quantization: Quant = field(default_factory=Quant)
    max_seq_len: int = 256
    ratio: float = 1.0


def test_build_nested_and_overrides():
    data = apply_overrides({"name": "r", "quantization": {"scheme": "8da4w"}}, ["quantization.group_size=64", "ratio=2"])
    r = build(Recipe, data)
    assert r.quantization.group_size == 64 and r.quantization.scheme == "8da4w" and r.ratio == 2.0


def test_build_collects_every_problem_with_key_value_and_allowed():
    with pytest.raises(ValidationErrors) as e:
        build(Recipe, {"quantization": {"scheme": "int3", "group_size": "big"}, "max_seq_len": 1.5, "colour": 1},
              source="recipes/x.yaml")
    msg = str(e.value)
    assert "recipes/x.yaml" in msg
    assert "quantization.scheme: 'int3' is not allowed; allowed: none, 8da4w" in msg
    assert "quantization.group_size: expected an integer, got 'big'" in msg
    assert "max_seq_len: expected an integer, got 1.5" in msg
    assert "colour: unknown key" in msg and "name: required key is missing" in msg


def test_post_init_errors_name_the_node():
    with pytest.raises(ValidationErrors, match=r"quantization: group_size must be > 0, got 0"):
        build(Recipe, {"name": "r", "quantization": {"group_size": 0}})


def test_load_yaml_errors(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("a: [1, 2\n")
    with pytest.raises(UserError, match="invalid YAML"):
        load_yaml(p)
    p.write_text("- 1\n- 2\n")
    with pytest.raises(UserError, match="expected a mapping"):
        load_yaml(p)
    with pytest.raises(UserError, match="file not found"):
        load_yaml(tmp_path / "missing.yaml")


def test_atomic_dir_leaves_nothing_complete_on_failure(tmp_path):
    final = tmp_path / "art"
    with pytest.raises(RuntimeError):
        with atomic_dir(final) as tmp:
            (tmp / "model.bin").write_bytes(b"x")
            raise RuntimeError("killed mid-export")
    assert not final.exists()
    assert list(tmp_path.iterdir()) == []
    with atomic_dir(final) as tmp:
        (tmp / "model.bin").write_bytes(b"x")
    assert (final / "model.bin").read_bytes() == b"x"


def test_sha256_dir_ignores_provenance_files(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"w")
    h1 = sha256_dir(tmp_path)
    (tmp_path / "training.json").write_text("{}")
    assert sha256_dir(tmp_path) == h1
    (tmp_path / "model.safetensors").write_bytes(b"w2")
    assert sha256_dir(tmp_path) != h1


@pytest.mark.parametrize("name,ok", [("u1", True), ("310", True), ("a.b-c_d", True), ("../x", False),
                                     ("a/b", False), ("", False), ("..", False), (".x", False)])
def test_is_safe_name(name, ok):
    assert is_safe_name(name) is ok
