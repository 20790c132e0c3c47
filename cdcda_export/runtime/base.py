"""One runner interface over every artifact format.

A runner holds one loaded model and its KV cache. ``prefill`` feeds a real sequence (chunked by
the artifact's prefill length when longer) and returns the logits of every fed position;
``decode`` feeds one token and returns the next-token logits. A runner may also offer
``prefill_last`` (the last position's logits only, for artifacts whose lm_head runs on the last
position alone); ``generate`` uses it when present. ``generate`` is greedy decoding
on top of the two, shared by all formats, and reports its timings.

This package is what travels to a phone, board or emulator with the bench runner: it imports
neither the exporters nor training code, only numpy, the runtimes and ``tokenizers`` (and
``cdcda_export.errors``, stdlib only, which travels with it).

Before a model is loaded, :func:`verify_artifact` checks the files the manifest lists
(``files: {name: {sha256, bytes}}``) once per artifact per process, so a truncated, missing or
swapped file is named in a :class:`~cdcda_export.errors.UserError` instead of failing deep inside
a runtime.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol, Sequence, runtime_checkable

import numpy as np

from ..errors import UserError


class RuntimeUnavailable(RuntimeError):
    """The artifact's runtime cannot run on this host (e.g. Core ML predictions need macOS)."""


@dataclass
class GenerationResult:
    prompt_ids: list[int]
    tokens: list[int]                      # generated token ids (without the prompt)
    ttft_s: float                          # prompt fed -> first new token's logits available
    decode_s: float                        # time spent in decode() calls
    prefill_tok_s: float
    decode_tok_s: float
    logits: list[np.ndarray] = field(default_factory=list)  # per generated step, when asked


@runtime_checkable
class Runner(Protocol):
    manifest: dict
    max_seq_len: int
    position: int            # number of tokens already in the KV cache

    def reset(self) -> None: ...
    def prefill(self, token_ids: Sequence[int]) -> np.ndarray: ...   # [T, vocab] float32
    def decode(self, token_id: int) -> np.ndarray: ...               # [vocab] float32


def chunked_prefill(run: Callable[[list[int]], np.ndarray], token_ids: Sequence[int], prefill_len: int,
                    *, last: bool = False) -> np.ndarray:
    """Feed ``token_ids`` in chunks of at most ``prefill_len`` through ``run`` (one model call each);
    return the float32 logits of every fed position, [T, vocab], or with ``last`` only the last
    position's [vocab] (no copy of the other positions: the TTFT path). Shared by every format's runner."""
    ids = [int(i) for i in token_ids]
    if not ids:
        raise ValueError("prefill needs at least one token")
    if last:
        for i in range(0, len(ids), prefill_len):
            logits = run(ids[i:i + prefill_len])
        return logits[-1].astype(np.float32, copy=False)
    chunks = [run(ids[i:i + prefill_len]) for i in range(0, len(ids), prefill_len)]
    return np.concatenate(chunks, axis=0).astype(np.float32, copy=False)


def read_manifest(artifact_dir: str | Path) -> dict:
    """``manifest.json`` of an artifact directory; a :class:`UserError` naming it when missing or broken."""
    art = Path(artifact_dir)
    p = art / "manifest.json"
    if not art.is_dir():
        raise UserError("artifact directory not found", file=str(art),
                        hint="export one with `cdcda export --base BASE --recipe RECIPE --out ART`")
    if not p.is_file():
        raise UserError("no manifest.json; this is not a complete artifact directory (an interrupted export "
                        "leaves none)", file=str(art), hint="re-run `cdcda export ...` to build it")
    try:
        m = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"not valid JSON ({e})", file=str(p), hint="re-run `cdcda export ...` to rebuild the "
                        "artifact") from None
    if not isinstance(m, dict):
        raise UserError(f"a JSON {type(m).__name__}, not an object", file=str(p), expected="the manifest "
                        "`cdcda export` writes", hint="re-run `cdcda export ...` to rebuild the artifact")
    return m


# ---------------------------------------------------------------- artifact file verification
# artifact dir (resolved) -> stat signature of manifest + listed files when they last verified.
_VERIFIED: dict[str, tuple] = {}
MODEL_SUFFIXES = (".pte", ".onnx", ".mlpackage", ".mlmodelc", ".mlmodel")


def reexport_hint(artifact_dir: str | Path, manifest: dict) -> str:
    """``cdcda export ...`` that rebuilds this artifact, from what its manifest records."""
    base = (manifest.get("base_model") or {}).get("source") if isinstance(manifest.get("base_model"), dict) else None
    adapter = (manifest.get("adapter") or {}).get("source") if isinstance(manifest.get("adapter"), dict) else None
    rec = manifest.get("recipe") if isinstance(manifest.get("recipe"), dict) else {}
    name = rec.get("name")
    recipe = f"{manifest.get('format')}/{name}" if name and manifest.get("format") and "/" not in str(name) else name
    parts = ["cdcda export", f"--base {base or 'BASE'}"] + ([f"--adapter {adapter}"] if adapter else [])
    parts += [f"--recipe {recipe or 'RECIPE'}", f"--out {artifact_dir}", "--force"]
    return "re-export the artifact: " + " ".join(parts)


def model_file(artifact_dir: str | Path, manifest: dict) -> Path:
    """The artifact's model file (``io.model_file``, else the first listed model-format file)."""
    io = manifest.get("io") if isinstance(manifest.get("io"), dict) else {}
    if io.get("model_file"):
        return Path(artifact_dir) / str(io["model_file"])
    files = manifest.get("files") if isinstance(manifest.get("files"), dict) else {}
    for name in sorted(files):
        top = str(name).split("/")[0]
        if top.endswith(MODEL_SUFFIXES):
            return Path(artifact_dir) / top
    return Path(artifact_dir)


def _file_table(artifact_dir: Path, manifest: dict) -> dict[str, tuple[str, int]]:
    """``{name: (sha256, bytes)}`` from the manifest; a UserError for a malformed ``files`` entry."""
    mp = str(artifact_dir / "manifest.json")
    files = manifest.get("files")
    if files is None:
        return {}        # an older or hand-made manifest lists no files: nothing to verify
    if not isinstance(files, dict):
        raise UserError(f"a JSON {type(files).__name__}", file=mp, field="files",
                        expected="{name: {sha256, bytes}}", hint=reexport_hint(artifact_dir, manifest))
    out = {}
    for name, info in files.items():
        parts = Path(str(name)).parts
        if not name or Path(str(name)).is_absolute() or ".." in parts:
            raise UserError(f"file name {name!r} points outside the artifact directory", file=mp,
                            field=f"files.{name}", hint=reexport_hint(artifact_dir, manifest))
        sha = info.get("sha256") if isinstance(info, dict) else None
        size = info.get("bytes") if isinstance(info, dict) else None
        if not isinstance(sha, str) or len(sha) != 64 or not isinstance(size, int) or isinstance(size, bool) \
                or size < 0:
            raise UserError(f"entry is {info!r}", file=mp, field=f"files.{name}",
                            expected="{sha256: 64 hex digits, bytes: int}", hint=reexport_hint(artifact_dir, manifest))
        out[str(name)] = (sha.lower(), size)
    return out


def _signature(artifact_dir: Path, names) -> tuple:
    """(name, size, mtime_ns, ctime_ns, inode) of the manifest and each listed file (None when missing)."""
    sig = []
    for name in ("manifest.json", *sorted(names)):
        try:
            st = os.stat(artifact_dir / name)
            sig.append((name, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino))
        except OSError:
            sig.append((name, None))
    return tuple(sig)


def _sha256(path: Path, chunk: int = 1 << 20) -> str:
    # utils.sha256_file's twin on purpose: this package travels to devices without cdcda_export.utils
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


# ---------------------------------------------------------------- manifest claims
# What an artifact claims to be: ``cdcda export`` records a sha256 of each of these manifest fields
# (``claims_sha256``), and every load compares them, so a manifest edited by hand to claim another recipe,
# quantization, I/O contract, base, adapter, user or task is named instead of trusted. Not covered: ``files``
# (checked against the files themselves), ``*.source`` paths (sources move; ``cdcda check --base`` finds
# them), and bookkeeping (versions, created_at, export timings). This catches edits, not forgery: whoever
# edits a field can also rewrite its digest.
CLAIM_FIELDS = ("format", "recipe.name", "recipe.resolved", "quantization_applied", "io", "base_model.sha256",
                "adapter.sha256", "adapter.base_mismatch", "user_id", "task", "delivery", "lora", "base_package")
_EXPANDED = ("recipe.resolved", "io")     # digested per sub-key, so an edit names e.g. recipe.resolved.quantization
_ABSENT = object()


def _get(manifest: dict, dotted: str):
    cur = manifest
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return _ABSENT
        cur = cur[part]
    return cur


def _digest(value) -> str:
    if value is _ABSENT:
        return "absent"
    blob = json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def manifest_claims(manifest: dict) -> dict[str, str]:
    """``{field: sha256 of its canonical JSON}`` over :data:`CLAIM_FIELDS` (``cdcda export`` stores it as
    ``claims_sha256``); ``recipe.resolved`` and ``io`` per sub-key."""
    out = {}
    for f in CLAIM_FIELDS:
        v = _get(manifest, f)
        if f in _EXPANDED and isinstance(v, dict):
            out.update({f"{f}.{k}": _digest(v[k]) for k in sorted(v)})
        else:
            out[f] = _digest(v)
    return out


def edited_claims(manifest: dict) -> list[str]:
    """Manifest fields that differ from the digests recorded at export ([] when none, or for a manifest
    written before ``claims_sha256`` existed)."""
    rec = manifest.get("claims_sha256")
    if rec is None:
        return []
    if not isinstance(rec, dict):
        return ["claims_sha256"]
    now = manifest_claims(manifest)
    return sorted(k for k in set(rec) | set(now) if rec.get(k, "absent") != now.get(k, "absent"))


def check_claims(artifact_dir: str | Path, manifest: dict) -> None:
    """UserError naming the manifest fields edited since export (see :data:`CLAIM_FIELDS`)."""
    edited = edited_claims(manifest)
    if edited:
        art = Path(artifact_dir)
        shown = ", ".join(edited[:8]) + (" ..." if len(edited) > 8 else "")
        raise UserError(f"edited after export ({len(edited)} field(s): {shown}); the manifest no longer describes "
                        "the model files it ships with (e.g. it claims another recipe or quantization)",
                        file=str(art / "manifest.json"), field=edited[0],
                        expected="the values `cdcda export` recorded (claims_sha256)",
                        hint=reexport_hint(art, manifest) + " (to change the recipe, re-export; do not edit the "
                             "manifest)")


def verify_artifact(artifact_dir: str | Path, manifest: dict | None = None) -> None:
    """Check that every file ``manifest.json`` lists is there with its recorded size and sha256.

    Raises a :class:`UserError` naming the first missing or differing file (and how many others
    differ), with what was expected and the ``cdcda export`` command that rebuilds the artifact.
    Files the manifest does not list are ignored. First, a manifest whose recorded claims (recipe,
    quantization, io, base/adapter hashes, user, task) were edited after export is refused, naming the
    field (:func:`check_claims`). Sizes are checked for all files before any hash.
    The result is cached per process by artifact path and by the (size, mtime, ctime, inode) of the
    manifest and of every listed file, so a load after the first costs a few ``stat`` calls and a
    file that changes on disk is verified again.
    """
    art = Path(artifact_dir)
    if manifest is None:
        manifest = read_manifest(art)
    check_claims(art, manifest)
    problems = file_problems(art, manifest)
    if problems:
        name, what, expected = problems[0]
        more = ""
        if len(problems) > 1:
            more = f"; {len(problems) - 1} more: " + ", ".join(f"{n} ({w.split(' (')[0]})" for n, w, _ in problems[1:6])
            more += " ..." if len(problems) > 6 else ""
        raise UserError(f"{what}: the artifact does not match its manifest.json{more}", file=str(art / name),
                        expected=expected, hint=reexport_hint(art, manifest))


def file_problems(artifact_dir: str | Path, manifest: dict) -> list[tuple[str, str, str]]:
    """``[(file, what is wrong, expected)]`` for the files the manifest lists ([] when all match): sizes of
    every file first, then sha256. The one file check of the project: :func:`verify_artifact` raises from
    it and ``export.manifest.verify`` (``cdcda check``) reports it, sharing one per-process cache keyed by
    the (size, mtime, ctime, inode) of the manifest and of every listed file, so a check followed by a load
    hashes each file once. A malformed ``files`` table is a :class:`UserError`."""
    art = Path(artifact_dir)
    table = _file_table(art, manifest)
    key = str(art.resolve())
    sig = _signature(art, table)
    if _VERIFIED.get(key) == sig:
        return []
    problems: list[tuple[str, str, str]] = []   # (name, what is wrong, expected)
    for name, (sha, size) in table.items():
        p = art / name
        if not p.is_file():
            problems.append((name, "missing" if not p.exists() else "not a regular file",
                             f"a file of {size} bytes, sha256 {sha[:16]}..."))
        elif (got := p.stat().st_size) != size:
            problems.append((name, f"is {got} bytes ({'truncated' if got < size else 'larger'})",
                             f"{size} bytes as the manifest records"))
    if not problems:
        for name, (sha, size) in table.items():
            try:
                got = _sha256(art / name)
            except OSError as e:
                problems.append((name, f"cannot be read ({e.strerror or e})", "a readable file"))
                continue
            if got != sha:
                problems.append((name, f"sha256 {got[:16]}... differs from the manifest's (damaged, or swapped in "
                                       "from another artifact)", f"sha256 {sha}"))
    if problems:
        _VERIFIED.pop(key, None)
    else:
        _VERIFIED[key] = sig
    return problems


def teacher_forced_logits(runner, ids: Sequence[int], cont: Sequence[int]) -> np.ndarray:
    """Teacher-forced logits [len(ids) + len(cont) - 1, vocab]: prefill(ids) (every position), then decode() of
    each continuation token but the last, on a fresh cache (``runner.reset()``)."""
    runner.reset()
    rows = [np.asarray(runner.prefill(list(ids)), dtype=np.float32)]
    for tok in list(cont)[:-1]:
        rows.append(np.asarray(runner.decode(int(tok)), dtype=np.float32)[None])
    return np.concatenate(rows, axis=0)


def greedy_generate(runner: Runner, prompt_ids: Sequence[int], max_new_tokens: int, *,
                    eos_ids: Sequence[int] = (), keep_logits: bool = False,
                    on_token: Callable[[int], None] | None = None) -> GenerationResult:
    """Greedy decoding through prefill + step-by-step decode (the KV-cache path)."""
    prompt_ids = list(prompt_ids)
    room = runner.max_seq_len - len(prompt_ids)
    if room <= 0:
        raise ValueError(f"prompt of {len(prompt_ids)} tokens does not fit max_seq_len={runner.max_seq_len}")
    max_new_tokens = min(max_new_tokens, room)
    runner.reset()
    t0 = time.perf_counter()
    prefill_last = getattr(runner, "prefill_last", None)   # runners with a last-position-only fast path
    logits = prefill_last(prompt_ids) if prefill_last else runner.prefill(prompt_ids)[-1]
    ttft = time.perf_counter() - t0
    out: list[int] = []
    kept: list[np.ndarray] = []
    decode_s = 0.0
    eos = set(eos_ids)
    for i in range(max_new_tokens):
        if keep_logits:
            kept.append(np.asarray(logits, dtype=np.float32).copy())
        tok = int(np.argmax(logits))
        out.append(tok)
        if on_token:
            on_token(tok)
        if tok in eos or i == max_new_tokens - 1:
            break
        t1 = time.perf_counter()
        logits = runner.decode(tok)
        decode_s += time.perf_counter() - t1
    n_dec = max(len(out) - 1, 0)
    return GenerationResult(
        prompt_ids=prompt_ids, tokens=out, ttft_s=ttft, decode_s=decode_s,
        prefill_tok_s=len(prompt_ids) / ttft if ttft > 0 else float("inf"),
        decode_tok_s=(n_dec / decode_s) if decode_s > 0 else float("nan"),
        logits=kept,
    )
