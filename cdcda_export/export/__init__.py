"""Export: recipes (typed YAML), the export-ready decoder, one module per format, manifests.

Light on import: heavy SDKs (torch, onnx, executorch, coremltools) load inside the functions that
use them. The public entry point is :func:`cdcda_export.export.api.export`.
"""

from __future__ import annotations

from .recipe import Recipe, load_recipe
from .registry import available_formats, get_exporter, list_recipes, register_exporter, resolve_recipe

__all__ = ["Recipe", "load_recipe", "available_formats", "get_exporter", "list_recipes",
           "register_exporter", "resolve_recipe", "export"]


def export(*args, **kwargs):
    """See :func:`cdcda_export.export.api.export`."""
    from .api import export as _export

    return _export(*args, **kwargs)
