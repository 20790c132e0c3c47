"""``host``: this machine. The artifact is used in place; the bundle goes to a temp folder."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Sequence

from .base import Completed, Device, run_local


class HostDevice(Device):
    kind = "host"
    emulated = False

    def __init__(self, python: str | None = None, keep: bool = False):
        self.python = python or sys.executable
        self.keep = keep
        self.workdir: Path | None = None

    def open(self) -> str:
        self.workdir = Path(tempfile.mkdtemp(prefix="cdcda-bench-"))
        return str(self.workdir)

    def push(self, local: Path, dest_name: str) -> str:
        local = Path(local)
        if dest_name == "artifact":   # no copy on the host: run the artifact where it is
            return str(local.resolve())
        dst = self.workdir / dest_name
        if local.is_dir():
            shutil.copytree(local, dst)
        else:
            shutil.copy2(local, dst)
        return str(dst)

    def run(self, argv: Sequence[str], *, timeout: float | None = None) -> Completed:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        return run_local([self.python, *argv], timeout=timeout, env=env)

    def pull(self, remote: str, local: Path) -> None:
        if Path(remote).resolve() != Path(local).resolve():
            shutil.copy2(remote, local)

    def close(self) -> None:
        if self.workdir and not self.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)
        self.workdir = None

    def label(self) -> str:
        import platform

        return platform.node() or "host"
