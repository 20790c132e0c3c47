"""The artifact manifest (``manifest.json``): what was exported, from what, how, and how to run it.

Keys (ARCHITECTURE.md): ``format``, ``recipe`` {name, resolved}, ``files`` {name: {sha256, bytes}},
``base_model`` {source, sha256}, ``adapter`` {source, sha256} | null, ``user_id``, ``task``, ``io``
(methods, inputs, outputs, max_seq_len, prefill_len, kv_cache, bos/eos ids, vocab_size), ``versions``,
``created_at``; plus ``export`` {seconds, peak_rss_mb}, ``quantization_applied`` and ``claims_sha256``
(a sha256 per claimed field, :func:`cdcda_export.runtime.base.manifest_claims`: edits are named on load).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError
from ..runtime.base import edited_claims, file_problems
from ..utils import sha256_file

MANIFEST = "manifest.json"
REQUIRED_KEYS = ("format", "recipe", "files", "base_model", "adapter", "user_id", "task", "io", "versions",
                 "created_at", "export", "quantization_applied")
REQUIRED_IO_KEYS = ("methods", "inputs", "outputs", "max_seq_len", "prefill_len", "kv_cache", "vocab_size",
                    "eos_token_ids", "bos_token_id")


def file_table(root: Path) -> dict[str, dict]:
    """``{relative posix path: {sha256, bytes}}`` of every file under ``root`` except the manifest."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            out[p.relative_to(root).as_posix()] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    return out


def verify(artifact_dir: str | Path) -> list[str]:
    """Problems with an artifact directory (missing keys, missing files, hash mismatches); [] when sound."""
    root = Path(artifact_dir)
    mp = root / MANIFEST
    if not mp.is_file():
        return [f"{mp}: missing (incomplete artifact)"]
    m = json.loads(mp.read_text(encoding="utf-8"))
    problems = [f"manifest key {k!r} missing" for k in REQUIRED_KEYS if k not in m]
    problems += [f"manifest io.{k} missing" for k in REQUIRED_IO_KEYS if k not in m.get("io", {})]
    problems += [f"manifest field {f!r} edited after export (differs from claims_sha256)" for f in edited_claims(m)]
    try:   # the runtime's file check (sizes, sha256), cached per process: a later runtime.load hashes nothing
        problems += [f"{name}: {what} (expected {expected})" for name, what, expected in file_problems(root, m)]
    except UserError as e:
        problems.append(str(e).split("\n  next:")[0])
    return problems


def artifact_bytes(manifest: dict, suffixes: tuple[str, ...] | None = None) -> int:
    """Total bytes of the artifact's model files (all files when ``suffixes`` is None)."""
    files = manifest.get("files", {})
    return sum(v["bytes"] for k, v in files.items() if suffixes is None or any(s in k for s in suffixes))
