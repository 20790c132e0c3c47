"""Ship the base once, each user a small delta: base packages and adapter packages.

* :func:`base_package` builds (or reuses from a content-addressed cache) one artifact per (base, recipe,
  LoRA layout) whose graph takes LoRA A/B tensors as inputs (``export/lora.py``). Its manifest has
  ``delivery: base-package``, ``lora`` and ``adapter: null``.
* :func:`adapter_package` converts one user's peft adapter into the format's adapter file beside a small
  manifest: ``delivery: adapter-package``, ``base_package`` {sha256, recipe, format}, ``adapter`` {source,
  sha256, rank, targets, dtype, scale ...}, ``user_id``, ``task``, ``files``. No model is loaded: a user
  costs reading one safetensors file and writing one small file.

Adapter file per format:

* ``onnx``: ``adapter.onnx_adapter`` written with ``onnxruntime.AdapterFormat``, loaded by
  ORT GenAI's ``og.Adapters`` (or ``onnxruntime.LoraAdapter``; our runner binds the tensors itself, see
  ``runtime/onnx.py``).
* ``executorch`` / ``coreml``: ``adapter.safetensors`` (the same named tensors). Both base packages take
  the LoRA weights as method / model inputs (LoRA-as-inputs); see the README section on adapter packages
  for why, and for ExecuTorch's program-data separation, which we do not use yet.

The base package's hash (``package_sha256``) is the sha256 of its manifest's ``files`` table: it changes
with any model file and costs no hashing of large files at load time (the runtime verifies the files
against that table anyway).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from ..errors import UserError
from ..utils import atomic_dir, now_iso, sha256_dir, versions, write_json_atomic
from .lora import LoraLayout, adapter_tensors
from ..runtime.adapters import lora_input_shapes, package_sha256, read_adapter_package, read_json  # noqa: F401
from .manifest import MANIFEST, file_table

ADAPTER_FILES = {"onnx": "adapter.onnx_adapter", "executorch": "adapter.safetensors",
                 "coreml": "adapter.safetensors"}


def _cache_dir() -> Path:
    from ..models.gguf import cache_root

    return cache_root() / "base-packages"


def base_package(base: str | Path, recipe, layout: LoraLayout, out: str | Path | None = None, *,
                 overrides: list[str] | None = None, progress: bool = True, overwrite: bool = False) -> Path:
    """The base package for (base, recipe, layout): ``out`` when given, else a directory in the cache keyed by
    the base's sha256, the resolved recipe and the layout; built once, returned at once afterwards."""
    from ..models.gguf import resolve_base
    from .api import export
    from .recipe import Recipe
    from .registry import resolve_recipe

    base = resolve_base(base)
    rec = recipe if isinstance(recipe, Recipe) else resolve_recipe(recipe, overrides)[0]
    if out is None:
        key = json.dumps({"base": sha256_dir(base), "recipe": rec.to_dict(), "lora": layout.to_dict()},
                         sort_keys=True)
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        out = _cache_dir() / f"{rec.format}-{rec.name}-{digest}"
    return export(base, None, rec, out, progress=progress, overwrite=overwrite, lora=layout)


def _write_adapter_file(fmt: str, tensors: dict, path: Path) -> None:
    if fmt == "onnx":
        import onnxruntime as ort

        af = ort.AdapterFormat()
        af.set_adapter_version(1)
        af.set_model_version(1)
        af.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in tensors.items()})
        af.export_adapter(str(path))
    else:
        from safetensors.numpy import save_file

        save_file(tensors, str(path), metadata={"format": "cdcda-lora-inputs"})


def read_base_package(pkg: Path) -> dict:
    m = read_json(Path(pkg) / MANIFEST, "an artifact directory")
    if m.get("delivery") != "base-package" or not m.get("lora"):
        raise UserError("not a base package (no LoRA inputs): it was exported as a merged artifact",
                        file=str(Path(pkg) / MANIFEST), field="delivery", expected="base-package",
                        hint="build one with `cdcda export --base B --recipe R --base-package --out DIR`")
    return m


def adapter_package(base_pkg: str | Path, adapter: str | Path, out: str | Path, *, overwrite: bool = False,
                    allow_base_mismatch: bool = False) -> Path:
    """Write one user's adapter package for ``base_pkg`` into ``out`` (atomic); returns ``out``."""
    from ..train.modeling import check_adapter_dir
    from .api import adapter_provenance, base_mismatch

    t0 = time.perf_counter()
    base_pkg, adapter, out = Path(base_pkg), Path(adapter), Path(out)
    bm = read_base_package(base_pkg)
    check_adapter_dir(adapter)
    mismatch = base_mismatch(adapter, bm["base_model"]["sha256"], allow_base_mismatch,
                             "use a base package built from the base the adapter was trained on, or pass "
                             "--allow-base-mismatch (recorded in the adapter manifest)")
    layout = LoraLayout.from_dict(bm["lora"])
    shape_io = bm["io"].get("decoder") or bm["io"]   # Core ML keeps the decoder's shape facts under io.decoder
    tensors, facts = adapter_tensors(adapter, layout, lora_input_shapes(shape_io, bm["lora"]))
    if bm["io"].get("lora", {}).get("rank_dim", "").startswith("dynamic") and facts["rank"] < layout.rank:
        # the graph takes any rank: ship the adapter's own rank, not zero padding
        r = facts["rank"]
        tensors = {k: (v[:, :r] if k.endswith(".A") else v[:r, :]) for k, v in tensors.items()}
    adapter_sha = sha256_dir(adapter)
    user_id, task = adapter_provenance(adapter)
    fmt = bm["format"]
    name = ADAPTER_FILES[fmt]
    base_sha = package_sha256(bm)
    if out.exists() and not overwrite:
        old = out / MANIFEST
        if old.is_file():
            m = read_json(old, "an adapter package")
            if (m.get("adapter") or {}).get("sha256") == adapter_sha and \
                    (m.get("base_package") or {}).get("sha256") == base_sha:
                return out
        raise UserError("output directory already exists (from other inputs)", file=str(out),
                        hint="pass --force to replace it, or choose another --out")
    with atomic_dir(out, overwrite=overwrite) as tmp:
        _write_adapter_file(fmt, tensors, tmp / name)
        if (adapter / "training.json").is_file():
            (tmp / "training.json").write_bytes((adapter / "training.json").read_bytes())
        manifest = {
            "format": fmt,
            "delivery": "adapter-package",
            "adapter_file": name,
            "base_package": {"sha256": base_sha, "recipe": bm["recipe"]["name"], "format": fmt,
                             "source": str(base_pkg.resolve()), "base_model_sha256": bm["base_model"]["sha256"]},
            "adapter": {"source": str(adapter.resolve()), "sha256": adapter_sha, **facts,
                        **({"base_mismatch": mismatch} if mismatch else {})},
            "user_id": user_id,
            "task": task,
            "files": file_table(tmp),
            "versions": versions(),
            "created_at": now_iso(),
            "export": {"seconds": round(time.perf_counter() - t0, 3)},
        }
        write_json_atomic(tmp / MANIFEST, manifest)
    return out


__all__ = ["base_package", "adapter_package", "read_adapter_package", "read_base_package", "package_sha256",
           "ADAPTER_FILES"]
