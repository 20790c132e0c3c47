"""Small shared helpers: hashing, atomic writes, versions, safe names."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def is_safe_name(name: str) -> bool:
    """True when ``name`` can be used as a single folder name (no separators, no '..')."""
    return bool(SAFE_NAME.match(name)) and ".." not in name


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def sha256_dir(path: str | Path, patterns: tuple[str, ...] = ("*.safetensors", "*.json", "*.model", "*.txt")) -> str:
    """Content hash of a model/adapter directory: sorted (relative name, file hash) of matching files.

    Only weight and config files count, so a log or cache written beside them does not change it.
    """
    root = Path(path)
    files = sorted({p for pat in patterns for p in root.glob(pat) if p.is_file()})
    h = hashlib.sha256()
    for p in files:
        if p.name in {"training.json", "manifest.json", "merge.json", "cdcda_base.json"}:
            continue  # provenance written next to the weights is not part of the model
        h.update(p.relative_to(root).as_posix().encode())
        h.update(b"\0")
        h.update(sha256_file(p).encode())
        h.update(b"\n")
    return h.hexdigest()


def write_json_atomic(path: str | Path, data: Any, indent: int = 2) -> None:
    """JSON by rename (:func:`write_text_atomic`); serialised first, so a value that cannot be written
    leaves no temporary file."""
    write_text_atomic(path, json.dumps(data, indent=indent, ensure_ascii=False, default=str) + "\n")


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write a text file by rename: a reader (or a killed writer) never sees half of it."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _pid_alive(pid: int) -> bool:
    """True when process ``pid`` exists on this machine and is not a zombie (a killed child not yet reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True  # no /proc (macOS): kill(0) said it exists


def partial_prefix(final: str | Path) -> str:
    """The name prefix of ``final``'s in-progress directories: ``.<name>.partial-<pid>-``."""
    return f".{Path(final).name}.partial-{os.getpid()}-"


def clean_stale_partials(final: str | Path) -> list[Path]:
    """Remove ``.<name>.partial-<pid>-*`` directories next to ``final`` whose owner process is gone.

    A SIGKILLed (or out-of-memory-killed) build cannot clean up after itself; its partial directory
    carries its pid, so the next build of the same output removes it. A partial directory whose pid
    is alive (a concurrent build of the same output) is never touched, nor one without a pid in
    its name (made by an older version: its owner cannot be told). Returns the removed paths.
    """
    final = Path(final)
    prefix = f".{final.name}.partial-"
    removed: list[Path] = []
    try:
        entries = list(final.parent.iterdir())
    except OSError:
        return removed
    for p in entries:
        if not p.name.startswith(prefix) or not p.is_dir():
            continue
        m = re.match(r"(\d+)-", p.name[len(prefix):])
        if not m:
            continue
        pid = int(m.group(1))
        if pid == os.getpid() or _pid_alive(pid):
            continue
        shutil.rmtree(p, ignore_errors=True)
        if not p.exists():
            removed.append(p)
    return removed


@contextlib.contextmanager
def atomic_dir(final: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Build a directory under a temporary name next to ``final``; rename into place on success.

    An interrupted build leaves only ``.<name>.partial-<pid>-*`` (never something that looks complete);
    the next build of the same ``final`` removes those whose process is gone (:func:`clean_stale_partials`).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_partials(final)
    tmp = Path(tempfile.mkdtemp(prefix=partial_prefix(final), dir=final.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; the finished directory should read like any other
    try:
        yield tmp
        if final.exists():
            if not overwrite:
                raise FileExistsError(f"{final} already exists")
            trash = final.with_name(f".{final.name}.old-{os.getpid()}-{int(time.time())}")
            os.replace(final, trash)
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def versions() -> dict[str, str | None]:
    """Versions of the stack, for manifests and reports (no heavy imports: reads dist metadata)."""
    from importlib import metadata

    out: dict[str, str | None] = {}
    for name in ("torch", "transformers", "peft", "executorch", "torchao", "onnx", "onnxruntime",
                 "onnxruntime-genai", "coremltools", "numpy", "cdcda-export"):
        try:
            out[name.replace("-", "_")] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name.replace("-", "_")] = None
    return out


def now_iso() -> str:
    import datetime as _dt

    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def peak_rss_mb() -> float:
    """Peak RSS of this process so far (MiB), from the kernel (ru_maxrss)."""
    import resource
    import sys

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024 / 1024 if sys.platform == "darwin" else r / 1024
