"""The ``cdcda`` command line: a thin layer over the library's typed functions.

One module per area registers its verbs on :data:`app` (``cli/data.py``, ``cli/export.py`` ...),
so the areas can grow without editing one big file. Heavy libraries are imported inside the
command functions, so ``cdcda --help`` stays fast.
"""

from __future__ import annotations

import errno
import sys

import typer

from ..errors import UserError

app = typer.Typer(
    name="cdcda",
    help="Personalized on-device LMs: LaMP data -> augment -> per-user LoRA -> export (ExecuTorch / ONNX / "
    "Core ML) -> fidelity check -> device bench.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Each module adds its commands to `app` on import.
from . import augment, bench, check, core, export  # noqa: E402,F401


_DISK_FULL = {errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}


def _disk_full(exc: BaseException) -> OSError | None:
    """The out-of-space OSError (ENOSPC, EFBIG past a file-size limit, EDQUOT) in ``exc``'s chain, if any:
    exporters and libraries sometimes wrap it."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def _out_arg(argv: list[str]) -> str | None:
    """The value of ``--out`` on the command line (the directory being written), if given."""
    for i, a in enumerate(argv):
        if a == "--out" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--out="):
            return a.split("=", 1)[1]
    return None


def disk_full_error(e: OSError, argv: list[str]) -> UserError:
    """A UserError for running out of space while writing: which output, what the OS said, what to do."""
    out = _out_arg(argv)
    where = out or e.filename or "the output"
    what = {errno.ENOSPC: "no space left on the device", errno.EFBIG: "a file grew past the size limit "
            "(ulimit -f / RLIMIT_FSIZE) or the filesystem's maximum"}.get(e.errno, "disk quota exceeded")
    return UserError(f"ran out of space while writing ({what}: {e.strerror or e}); nothing was left there that "
                     "looks complete (an interrupted write never leaves a manifest.json)", file=str(where),
                     hint="free space (or raise the file-size limit) on the --out filesystem, or choose another "
                          "--out, then re-run the same command")


def main() -> None:
    try:
        app()
    except UserError as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        sys.exit(2)
    except Exception as e:  # noqa: BLE001 - only out-of-space is turned into a message; the rest re-raises
        full = _disk_full(e)
        if full is None:
            raise
        typer.secho(f"error: {disk_full_error(full, sys.argv[1:])}", fg=typer.colors.RED, err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.secho("interrupted; re-run the same command to resume", err=True)
        sys.exit(130)
