"""The project's own fidelity regression: tiny models of every architecture family, every Linux-runnable
recipe, checked against the eager model and compared with the baselines committed in
``tests/fidelity/baselines/<arch>-<format>-<recipe>.json``.

A case fails when a metric is worse than its baseline by more than the tolerance of
``cdcda_export.check.baseline.TOLERANCES``, or when a gate that passed in the baseline fails now.

Refresh the baselines (after an intended change, review the diff before committing)::

    CDCDA_REFRESH_BASELINES=1 .venv/bin/pytest tests/fidelity/test_fidelity_regression.py

(``-m "not slow"`` for the ``make test`` tier only.)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from cdcda_export.check import CheckOptions, check_artifacts
from cdcda_export.check.baseline import baseline_view, compare, regressed

pytestmark = pytest.mark.integration

BASELINES = Path(__file__).parent / "baselines"
ARCHS = ("tiny", "tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-phi3")
REFRESH = os.environ.get("CDCDA_REFRESH_BASELINES") == "1"


def linux_recipes() -> list[str]:
    """Shipped recipes whose artifacts run on this host and whose exporter's SDK is installed."""
    from cdcda_export.export.registry import available_formats, list_recipes

    fmts = set(available_formats())
    return [e.key for e in list_recipes() if e.recipe.format in fmts and e.recipe.runs_on_this_host()]


def _case(arch: str, recipe: str):
    """ExecuTorch quantized exports take minutes each on a 2-core host (measured 3-7 min under load), so
    beyond the ``tiny`` shape they run with the slow tier; every other case is part of ``make test``."""
    slow = recipe.startswith("executorch/") and not recipe.endswith("-fp32") and arch != "tiny"
    return pytest.param(arch, recipe, id=f"{arch}-{recipe.replace('/', '-')}",
                        marks=[pytest.mark.slow] if slow else [])


CASES = [_case(a, r) for a in ARCHS for r in linux_recipes()]


@pytest.mark.parametrize("arch,recipe", CASES)
def test_fidelity_against_committed_baseline(arch, recipe, tiny_artifact):
    art = tiny_artifact(arch, recipe)
    report = check_artifacts([art], CheckOptions(max_new_tokens=12, localise="on-fail"))[0]
    path = BASELINES / f"{arch}-{recipe.replace('/', '-')}.json"
    view = baseline_view(report)
    if REFRESH:
        BASELINES.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(view, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    assert path.is_file(), (f"no baseline {path.name}; write it with "
                            "CDCDA_REFRESH_BASELINES=1 .venv/bin/pytest tests/fidelity/test_fidelity_regression.py")
    base = json.loads(path.read_text(encoding="utf-8"))
    rows = compare([report], [base])
    worse = [r for r in rows if r["status"] == "regressed"]
    assert not regressed(rows), f"{arch} {recipe} regressed against {path.name}: {worse}"
    was_ok = {g["metric"] for g in base["gates"] if g["passed"]}
    newly_failing = [g for g in report["gates"] if not g["passed"] and g["metric"] in was_ok]
    assert not newly_failing, (f"{arch} {recipe}: gates that passed in the baseline fail now: {newly_failing}; "
                               f"divergence: {(report.get('divergence') or {}).get('summary')}")
