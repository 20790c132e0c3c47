"""Merge a LoRA adapter into its base model: a plain HF directory (safetensors, tokenizer, merge.json).

The merge runs in float32 and is saved in the base checkpoint's dtype (``dtype`` overrides).
``merge.json`` records what was consumed (base and adapter sha256, versions) and the output hash;
a re-run whose recorded input hashes match returns at once (litgpt's ``merge_lora`` does the same).
Writing is atomic: an interrupted merge never leaves a directory that looks complete.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from ..errors import UserError
from ..utils import atomic_dir, now_iso, sha256_dir, versions, write_json_atomic

MERGE_JSON = "merge.json"
# Files copied verbatim from the base directory (tokenizer and generation settings).
_COPY = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
         "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json", "generation_config.json")
_DTYPES = ("float32", "bfloat16", "float16")


def _base_dtype(base: Path) -> str:
    cfg = json.loads((base / "config.json").read_text(encoding="utf-8"))
    d = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    return d if d in _DTYPES else "float32"


def merge_is_current(out: Path, base_sha: str, adapter_sha: str) -> bool:
    """True when ``out`` is a finished merge of exactly these inputs."""
    mj = out / MERGE_JSON
    if not mj.is_file() or not (out / "config.json").is_file():
        return False
    try:
        meta = json.loads(mj.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return (meta.get("base_model", {}).get("sha256") == base_sha
            and meta.get("adapter", {}).get("sha256") == adapter_sha
            and meta.get("output_sha256") == sha256_dir(out))


def merge_adapter(base: Path, adapter: Path, out: Path, *, dtype: str | None = None, force: bool = False) -> Path:
    """Write ``out``: ``base`` with the LoRA ``adapter`` folded into its weights; returns ``out``.

    Returns early when ``out/merge.json`` records the same base and adapter hashes (unless
    ``force``). Refuses to overwrite a directory that is not a previous merge output.
    """
    import torch
    from peft import PeftModel

    from .modeling import check_adapter_dir, check_adapter_provenance, check_base_dir, load_base

    t0 = time.time()
    base, adapter, out = check_base_dir(base), check_adapter_dir(adapter), Path(out)
    if dtype is not None and dtype not in _DTYPES:
        raise UserError(f"dtype {dtype!r} is not supported", field="--dtype", expected=f"one of {_DTYPES}")
    base_sha, adapter_sha = sha256_dir(base), sha256_dir(adapter)
    check_adapter_provenance(adapter, base_sha)
    if out.exists():
        if not force and merge_is_current(out, base_sha, adapter_sha):
            return out
        if not (out / MERGE_JSON).is_file() and any(out.iterdir()):
            raise UserError("output directory exists and is not a merge output (no merge.json); refusing to "
                            "overwrite it", file=str(out), field="--out", hint="choose another --out")
    save_dtype = dtype or _base_dtype(base)
    model, _ = load_base(base, dtype="float32")
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    merged = merged.to(getattr(torch, save_dtype))
    meta_adapter: dict = {"source": str(adapter), "sha256": adapter_sha}
    tj = adapter / "training.json"
    if tj.is_file():
        t = json.loads(tj.read_text(encoding="utf-8"))
        meta_adapter.update(user_id=t.get("user_id"), task=t.get("task"))
    with atomic_dir(out, overwrite=True) as tmp:
        merged.save_pretrained(str(tmp), safe_serialization=True)
        for name in _COPY:
            if (base / name).is_file():
                shutil.copy2(base / name, tmp / name)
        write_json_atomic(tmp / MERGE_JSON, {
            "base_model": {"source": str(base), "sha256": base_sha}, "adapter": meta_adapter,
            "dtype": save_dtype, "merged_in": "float32", "output_sha256": sha256_dir(tmp),
            "versions": versions(), "created_at": now_iso(), "duration_s": round(time.time() - t0, 3),
        })
    return out
