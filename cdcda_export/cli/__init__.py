"""The ``cdcda`` command line: a thin layer over the library's typed functions.

One module per area registers its verbs on :data:`app` (``cli/data.py``, ``cli/export.py`` ...),
so the areas can grow without editing one big file. Heavy libraries are imported inside the
command functions, so ``cdcda --help`` stays fast.
"""

from __future__ import annotations

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


def main() -> None:
    try:
        app()
    except UserError as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.secho("interrupted; re-run the same command to resume", err=True)
        sys.exit(130)
