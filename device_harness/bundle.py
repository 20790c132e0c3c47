"""The bundle that travels to a device: ``bench_runner.py`` + a small copy of ``cdcda_export.runtime``.

Layout (what lands in the device's work folder)::

    bundle/
      bench_runner.py
      prompt.json                      seeded prompt ids
      cdcda_export/__init__.py         empty stub: only the runtime travels
      cdcda_export/errors.py           UserError (stdlib only), which the runtime raises
      cdcda_export/runtime/*.py        base + the format runners (numpy, tokenizers, the runtime)

With ``PYTHONPATH=bundle`` the runner imports this copy, never the exporters or training code,
and never torch/transformers through our code (ExecuTorch's own pybindings import torch on
their own: that is reported per run as ``heavy_imports``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

STUB = '"""Device-side stub: only cdcda_export.runtime (and errors) travel with the bench runner."""\n'


def runtime_dir() -> Path:
    import cdcda_export.runtime as rt

    return Path(rt.__file__).resolve().parent


def build_bundle(dest: Path, prompt: dict | None = None) -> Path:
    """Write the bundle into ``dest`` (created) and return it."""
    dest = Path(dest)
    (dest / "cdcda_export" / "runtime").mkdir(parents=True, exist_ok=True)
    shutil.copy2(Path(__file__).with_name("bench_runner.py"), dest / "bench_runner.py")
    (dest / "cdcda_export" / "__init__.py").write_text(STUB, encoding="utf-8")
    shutil.copy2(runtime_dir().parent / "errors.py", dest / "cdcda_export" / "errors.py")
    for f in sorted(runtime_dir().glob("*.py")):
        shutil.copy2(f, dest / "cdcda_export" / "runtime" / f.name)
    if prompt is not None:
        (dest / "prompt.json").write_text(json.dumps(prompt), encoding="utf-8")
    return dest
