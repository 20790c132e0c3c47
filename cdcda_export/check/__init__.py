"""Fidelity gate: every artifact against the eager merged model it came from (``cdcda check``).

Library API::

    from cdcda_export.check import CheckOptions, check_artifacts, run_check
    reports = check_artifacts(["art/onnx-fp32"], CheckOptions(max_new_tokens=16))
    code = run_check(["art/onnx-fp32"], CheckOptions(), report="r.json", junit="r.xml")

See ``core.py`` (flow), ``metrics.py``, ``thresholds.py``, ``localise.py``, ``report.py``,
``baseline.py`` and README.md (CI snippet).
"""

from __future__ import annotations

from .core import SCHEMA, CheckOptions, check_artifacts
from .run import run_check

__all__ = ["CheckOptions", "check_artifacts", "run_check", "SCHEMA"]
