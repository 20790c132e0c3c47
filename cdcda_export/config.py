"""Typed config trees: dataclasses built from YAML/dicts with dotted overrides.

``build(Cls, data, source=...)`` turns a nested dict into a (nested) dataclass, collecting every
problem (unknown key, wrong type, value not allowed) and raising them once as a
:class:`~cdcda_export.errors.ValidationErrors` that names the file, the dotted key, the bad value
and what is allowed. Dataclasses may declare ``__post_init__`` checks that raise ``ValueError``;
those are reported with the dotted path of the node.

Allowed values for a string field are declared with ``field(metadata={"choices": (...)})``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .errors import UserError, ValidationErrors

T = TypeVar("T")


def load_yaml(path: str | Path) -> dict:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError("file not found", file=str(p)) from None
    except UnicodeDecodeError as e:
        raise UserError(f"not UTF-8 text ({e.reason} at byte {e.start})", file=str(p)) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UserError(f"invalid YAML: {e}", file=str(p)) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"top level is a {type(data).__name__}", file=str(p), expected="a mapping of keys")
    return data


def parse_override(text: str) -> tuple[str, Any]:
    """``'quantization.group_size=64'`` -> ``('quantization.group_size', 64)`` (value parsed as YAML)."""
    if "=" not in text:
        raise UserError(f"override {text!r} has no '='", expected="KEY.PATH=VALUE, e.g. quantization.group_size=64")
    key, _, raw = text.partition("=")
    return key.strip(), yaml.safe_load(raw) if raw.strip() else ""


def apply_overrides(data: dict, overrides: list[str] | dict[str, Any]) -> dict:
    """Return a deep copy of ``data`` with dotted overrides applied."""
    import copy

    out = copy.deepcopy(data)
    items = overrides.items() if isinstance(overrides, dict) else (parse_override(o) for o in overrides)
    for key, value in items:
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                node[p] = {}
            node = node[p]
        node[parts[-1]] = value
    return out


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _convert(tp: Any, value: Any, path: str, problems: list[str]) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        sub: list[str] = []
        for a in non_none:
            sub = []
            out = _convert(a, value, path, sub)
            if not sub:
                return out
        problems.extend(sub)
        return None
    if origin is typing.Literal:
        if value not in args:
            problems.append(f"{path}: {value!r} is not allowed; allowed: {', '.join(map(repr, args))}")
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path, problems)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            problems.append(f"{path}: expected a list, got {type(value).__name__} {value!r}")
            return []
        inner = args[0] if args else Any
        return [_convert(inner, v, f"{path}[{i}]", problems) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(f"{path}: expected a mapping, got {type(value).__name__}")
            return {}
        vt = args[1] if len(args) == 2 else Any
        return {k: _convert(vt, v, f"{path}.{k}", problems) for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{path}: expected a number, got {value!r}")
            return value
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            problems.append(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            problems.append(f"{path}: expected a string, got {type(value).__name__} {value!r}")
        return value
    return value


def _build(cls: type[T], data: Any, path: str, problems: list[str]) -> T | None:
    if isinstance(data, cls):
        return data
    if data is None:
        data = {}
    if not isinstance(data, dict):
        problems.append(f"{path or '<root>'}: expected a mapping, got {type(data).__name__} {data!r}")
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for k in data:
        if k not in fields:
            problems.append(f"{path + '.' if path else ''}{k}: unknown key; known keys: {', '.join(sorted(fields))}")
    kwargs = {}
    n_before = len(problems)
    for name, f in fields.items():
        p = f"{path}.{name}" if path else name
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                problems.append(f"{p}: required key is missing")
            continue
        value = _convert(hints[name], data[name], p, problems)
        choices = f.metadata.get("choices")
        if choices and value is not None and value not in choices:
            problems.append(f"{p}: {value!r} is not allowed; allowed: {', '.join(map(str, choices))}")
        kwargs[name] = value
    if len(problems) > n_before:
        return None
    try:
        return cls(**kwargs)
    except ValueError as e:
        problems.append(f"{path or '<root>'}: {e}")
        return None
    except TypeError as e:  # pragma: no cover - missing required args already reported
        problems.append(f"{path or '<root>'}: {e}")
        return None


def build(cls: type[T], data: dict, *, source: str | None = None, hint: str | None = None) -> T:
    """Build dataclass ``cls`` from ``data``; raise every problem at once, naming ``source``."""
    problems: list[str] = []
    out = _build(cls, data, "", problems)
    if problems or out is None:
        raise ValidationErrors(problems or ["invalid config"], file=source, hint=hint)
    return out


def to_dict(obj: Any) -> Any:
    """Dataclass tree -> plain dict (for manifests and reports)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj
