"""The code a stage runs, as a hash: part of each stage's ledger fingerprint.

A stage's code is its function in :mod:`.stages` plus every module of ``cdcda_export`` and
``device_harness`` that function imports, followed transitively through the modules' own imports
(read with ``ast``, imports inside functions included, so a lazily imported SDK wrapper counts too).
The hash is the sha256 of those files' relative paths and bytes, computed once per process. Editing
``train/train.py`` therefore makes ``train`` (and what follows from its output) stale; editing
``device_harness/protocol.py`` makes only ``bench`` stale.

Only modules inside the two packages are followed: third-party code is covered by the library
versions (:func:`cdcda_export.utils.versions`) that the fingerprint carries beside this hash.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import inspect
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]          # holds cdcda_export/ and device_harness/
PACKAGES = ("cdcda_export", "device_harness")
HERE = "cdcda_export.pipeline.stages"                  # where the stage functions live


def module_file(name: str) -> Path | None:
    """The source file of module ``name`` (a package's ``__init__.py``), or None when not ours / absent."""
    if name.split(".")[0] not in PACKAGES:
        return None
    p = ROOT.joinpath(*name.split("."))
    if (p / "__init__.py").is_file():
        return p / "__init__.py"
    if p.with_suffix(".py").is_file():
        return p.with_suffix(".py")
    return None


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


DYNAMIC = ("import_module", "iter_modules", "__import__")


def _imported(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Names of the modules ``tree`` imports (absolute), with ``from X import y`` also giving ``X.y``
    (``y`` may be a submodule). Imports by name at run time count too: a string constant that names one
    of our modules (``"cdcda_export.runtime.onnx"``) or a script in the same package (``"bench_runner.py"``), and, where the module calls ``importlib.import_module``,
    ``pkgutil.iter_modules`` or ``__import__``, every module of its package (a registry discovering its
    formats by file)."""
    package = module if is_package else module.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            v = node.value
            if v.split(".")[0] in PACKAGES:
                out.add(v)
            elif v.endswith(".py") and v[:-3].isidentifier():   # a script beside it, run as a file
                out.add(f"{package}.{v[:-3]}")
        elif isinstance(node, (ast.Attribute, ast.Name)) and getattr(node, "attr", getattr(node, "id", "")) in DYNAMIC:
            pdir = module_file(package)
            if pdir is not None:
                out.update(f"{package}.{p.stem}" for p in pdir.parent.glob("*.py") if p.stem != "__init__")
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                src = ".".join(base + ([node.module] if node.module else []))
            else:
                src = node.module or ""
            out.add(src)
            out.update(f"{src}.{a.name}" for a in node.names if a.name != "*")
    return out


def closure(sources: dict[str, str]) -> list[Path]:
    """Every file of ours reachable by imports from ``sources`` (``{module name: source text}``), sorted."""
    seen: dict[Path, None] = {}
    todo: list[tuple[str, str, bool]] = [(m, s, False) for m, s in sources.items()]
    while todo:
        module, text, is_package = todo.pop()
        for name in _imported(ast.parse(text), module, is_package):
            f = module_file(name)
            # every enclosing package's __init__ runs on import too
            parents = [module_file(".".join(name.split(".")[:i])) for i in range(1, name.count(".") + 1)]
            for p in [f, *parents]:
                if p is not None and p not in seen:
                    seen[p] = None
                    todo.append((_module_name(p), p.read_text(encoding="utf-8"), p.name == "__init__.py"))
    return sorted(seen)


def stage_sources(stage: str) -> dict[str, str]:
    """The stage function's own source (not the whole of stages.py: editing ``stage_bench`` leaves the
    other stages current) plus the helpers in stages.py that every stage runs through."""
    from . import stages

    fn = stages.STAGE_FNS[stage]
    own = textwrap.dedent(inspect.getsource(fn))
    common = "".join(inspect.getsource(f) for f in (stages.run_job, stages._write_stage_json, stages.safe_folder,
                                                    stages.is_transient, stages._inject_fault))
    return {HERE: own + "\n" + common}


def stage_files(stage: str) -> list[Path]:
    """The source files ``stage`` depends on (relative to the repository root)."""
    return [p.relative_to(ROOT) for p in closure(stage_sources(stage))]


@functools.cache
def code_hash(stage: str) -> str:
    """sha256 over the stage's own source and every file it depends on (path + bytes), once per process."""
    h = hashlib.sha256()
    for name, text in sorted(stage_sources(stage).items()):
        h.update(f"{name}\0{text}\0".encode())
    for rel in stage_files(stage):
        h.update(str(rel).encode() + b"\0" + (ROOT / rel).read_bytes() + b"\0")
    return h.hexdigest()
