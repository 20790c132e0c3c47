"""Recipe files and format exporters, both found by name.

* Recipes live in ``recipes/<format>/<name>.yaml``. They are looked up in, in order: the folders in
  ``$CDCDA_RECIPES`` (``os.pathsep``-separated), ``cdcda_export/recipes/`` inside the installed
  package (a wheel ships them there), and ``recipes/`` next to the package (a source checkout).
  A recipe is named ``<format>/<name>`` or just ``<name>`` when that is unique; a path to a YAML
  file works too.
* Exporters register per format with ``@register_exporter("onnx")`` in
  ``cdcda_export/export/<format>.py``; modules are imported lazily the first time a format is asked
  for, so a missing optional SDK only matters for the format that needs it.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import UserError
from .recipe import FORMATS, Recipe, load_recipe

_PKG_DIR = Path(__file__).resolve().parent.parent          # cdcda_export/
_NOT_FORMATS = {"api", "decoder", "recipe", "registry", "manifest", "__init__"}
_EXPORTERS: dict[str, Callable] = {}


# ----------------------------------------------------------------------------- exporters


def register_exporter(fmt: str):
    """Decorator registering ``fn(job: api.ExportJob) -> dict`` (an ExportResult) for a format.

    The exporter receives an :class:`ExportJob` (see ``api.py``) and writes model file(s) into
    ``job.out_dir``; it returns ``{"files": [...], "io": {...}, "quantization_applied": {...}}``.
    """

    def deco(fn: Callable) -> Callable:
        _EXPORTERS[fmt] = fn
        return fn

    return deco


def _format_modules() -> list[str]:
    here = Path(__file__).resolve().parent
    return sorted(m.name for m in pkgutil.iter_modules([str(here)]) if m.name not in _NOT_FORMATS)


def available_formats() -> list[str]:
    """Formats with an exporter module in this install (imports nothing heavy)."""
    return [m for m in _format_modules() if m in FORMATS]


def get_exporter(fmt: str) -> Callable:
    if fmt not in _EXPORTERS:
        if fmt in _format_modules():
            try:
                importlib.import_module(f"{__package__}.{fmt}")
            except ImportError as e:  # the format's SDK is missing
                raise UserError(f"Format {fmt!r} needs a package that is not installed ({e.name or e})",
                                hint="pip install 'cdcda-export' with its pinned dependencies (see README)") from None
        if fmt not in _EXPORTERS:
            raise UserError(f"Format {fmt!r} not available. Available: {available_formats()}")
    return _EXPORTERS[fmt]


# ----------------------------------------------------------------------------- recipes


def recipe_dirs() -> list[Path]:
    dirs: list[Path] = []
    env = os.environ.get("CDCDA_RECIPES")
    if env:
        dirs += [Path(p) for p in env.split(os.pathsep) if p]
    dirs += [_PKG_DIR / "recipes", _PKG_DIR.parent / "recipes"]
    return [d for d in dirs if d.is_dir()]


@dataclass
class RecipeEntry:
    key: str            # "<format>/<name>"
    path: Path
    recipe: Recipe


def _recipe_files() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for root in recipe_dirs():
        for fmt_dir in sorted(p for p in root.iterdir() if p.is_dir()):
            for f in sorted(fmt_dir.glob("*.yaml")):
                found.setdefault(f"{fmt_dir.name}/{f.stem}", f)
    return found


def list_recipes() -> list[RecipeEntry]:
    """Every shipped recipe, loaded and validated."""
    return [RecipeEntry(k, p, load_recipe(p)) for k, p in sorted(_recipe_files().items())]


def resolve_recipe(name_or_path: str | Path, overrides: list[str] | None = None) -> tuple[Recipe, Path]:
    """A recipe by file path, ``<format>/<name>`` or unique ``<name>``; unknown -> UserError listing them."""
    text = str(name_or_path)
    p = Path(text).expanduser()
    if text.endswith((".yaml", ".yml")) or p.is_file():
        if not p.is_file():
            raise UserError("recipe file not found", file=text, hint="list shipped recipes with `cdcda recipes`")
        return load_recipe(p, overrides), p
    files = _recipe_files()
    if text in files:
        return load_recipe(files[text], overrides), files[text]
    fmt, _, rest = text.partition("-")   # "onnx-int4" is accepted for "onnx/int4"
    if fmt in FORMATS and f"{fmt}/{rest}" in files:
        return load_recipe(files[f"{fmt}/{rest}"], overrides), files[f"{fmt}/{rest}"]
    matches = [k for k in files if k.split("/", 1)[1] == text]
    if len(matches) == 1:
        return load_recipe(files[matches[0]], overrides), files[matches[0]]
    if len(matches) > 1:
        raise UserError(f"Recipe {text!r} is ambiguous: {matches}", expected="<format>/<name>")
    raise UserError(f"Recipe {text!r} not found. Available: {sorted(files)}",
                    hint="run `cdcda recipes`, or pass a path to a recipe YAML file")
