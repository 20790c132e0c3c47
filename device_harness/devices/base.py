"""The device protocol: open a work folder, push, run, pull, clean up.

Devices that run our Python bench runner (host, qemu-arm64, ssh) implement :class:`Device`;
``device_harness.protocol.bench`` drives them the same way. Devices that run a native runner
the user points to (adb: ``llama_main``/``executor_runner``/``onnxruntime_perf_test``; ios: a
bench app through ``xcrun devicectl``) implement ``bench_native`` instead.
"""

from __future__ import annotations

import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from cdcda_export.errors import UserError


@dataclass
class Completed:
    returncode: int
    stdout: str
    stderr: str


def run_local(argv: Sequence[str], *, timeout: float | None = None, input: str | None = None,
              env: dict | None = None, check: bool = False, what: str = "") -> Completed:
    """Run a local command; a missing executable becomes a UserError naming it."""
    try:
        p = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, input=input, env=env)
    except FileNotFoundError as e:
        raise UserError(f"{argv[0]!r} not found{' (' + what + ')' if what else ''}",
                        hint=f"install it, e.g. apt-get install -y {_package_for(argv[0])}") from e
    except subprocess.TimeoutExpired as e:
        raise UserError(f"timed out after {timeout:.0f} s: {shlex.join(argv)[:200]}",
                        hint="raise --timeout or lower --runs/--gen-len") from e
    res = Completed(p.returncode, p.stdout, p.stderr)
    if check and p.returncode != 0:
        raise UserError(f"command failed (exit {p.returncode}): {shlex.join(argv)[:300]}\n{p.stderr[-1500:]}")
    return res


def _package_for(exe: str) -> str:
    return {"ssh": "openssh-client", "scp": "openssh-client", "rsync": "rsync", "sshd": "openssh-server",
            "adb": "adb", "qemu-aarch64-static": "qemu-user-static", "debootstrap": "debootstrap",
            "chroot": "coreutils"}.get(Path(exe).name, Path(exe).name)


class Device:
    """A machine that can run ``bench_runner.py`` (Python 3.10+ with the artifact's runtime)."""

    kind: str = "device"
    emulated: bool = False
    runner = "cdcda-python"

    def open(self) -> str:
        """Create a fresh work folder on the device; return its path there."""
        raise NotImplementedError

    def push(self, local: Path, dest_name: str) -> str:
        """Copy a local file/folder into the work folder as ``dest_name``; return its device path."""
        raise NotImplementedError

    def run(self, argv: Sequence[str], *, timeout: float | None = None) -> Completed:
        """Run ``python3 argv...`` on the device (argv[0] is the script path there)."""
        raise NotImplementedError

    def pull(self, remote: str, local: Path) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Remove the work folder."""

    def label(self) -> str:
        return self.kind

    def device_block(self, reported: dict | None) -> dict:
        """The result's ``device`` block: what the runner reported on the device + kind/emulated."""
        r = dict(reported or {})
        return {"kind": self.kind, "name": r.pop("name", None) or self.label(), "cpu": r.pop("cpu", "unknown"),
                "os": r.pop("os", "unknown"), "arch": r.pop("arch", "unknown"), "emulated": bool(self.emulated),
                **r}

    def __enter__(self):
        self.open()
        return self

    def __exit__(self, *exc):
        self.close()
