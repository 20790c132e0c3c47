"""``qemu-arm64``: the ARM64 Debian userland built by ``cdcda harness setup-emulator``.

Runs the bench runner under ``chroot`` with qemu user-mode emulation (binfmt_misc), so the
aarch64 builds of numpy/onnxruntime/executorch execute their real ARM kernels. Timings are
emulated (``device.emulated: true``); peak RSS is the emulated process as the kernel sees it,
i.e. it includes qemu's own translation buffers. Correctness is real: the bench compares the
greedy tokens with a host run (``greedy.matches_host``). Needs root (chroot, mounting /proc).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

from cdcda_export.errors import UserError

from .. import emulator
from .base import Completed, Device, run_local


def _format(art: Path) -> str | None:
    try:
        return json.loads((Path(art) / "manifest.json").read_text(encoding="utf-8")).get("format")
    except (OSError, ValueError):
        return None


class QemuArm64Device(Device):
    kind = "qemu-arm64"
    emulated = True

    def __init__(self, root: str | Path | None = None, keep: bool = False):
        self.root = Path(root or emulator.DEFAULT_DIR).resolve()
        self.keep = keep
        self.host_dir: Path | None = None
        self._mounted: list[Path] = []

    @property
    def rootfs(self) -> Path:
        return self.root / "rootfs"

    def _dev_path(self, host_path: Path) -> str:
        return "/" + str(Path(host_path).resolve().relative_to(self.rootfs.resolve()))

    def open(self) -> str:
        if not emulator.rootfs_ready(self.root):
            raise UserError(f"no ARM64 emulator in {self.root}", hint="sudo cdcda harness setup-emulator "
                            f"--dir {self.root}")
        if os.geteuid() != 0:
            raise UserError("the qemu-arm64 device needs root (chroot)", hint="run cdcda bench as root")
        emulator.ensure_binfmt(lambda m: None)
        self._mounted = emulator.mount_proc(self.rootfs)
        (self.rootfs / "tmp").mkdir(exist_ok=True)
        self.host_dir = Path(tempfile.mkdtemp(prefix="cdcda-bench-", dir=self.rootfs / "tmp"))
        return self._dev_path(self.host_dir)

    def push(self, local: Path, dest_name: str) -> str:
        if dest_name == "artifact" and _format(local) == "executorch":
            self._mounted += emulator.mount_proc(self.rootfs, sys_too=True)   # XNNPACK needs /sys
        dst = self.host_dir / dest_name
        if Path(local).is_dir():
            shutil.copytree(local, dst)
        else:
            shutil.copy2(local, dst)
        return self._dev_path(dst)

    def run(self, argv: Sequence[str], *, timeout: float | None = None) -> Completed:
        return run_local(emulator.chroot_argv(self.root, list(argv)), timeout=timeout, what="chroot")

    def pull(self, remote: str, local: Path) -> None:
        shutil.copy2(self.rootfs / remote.lstrip("/"), local)

    def close(self) -> None:
        if self.host_dir and not self.keep:
            shutil.rmtree(self.host_dir, ignore_errors=True)
        for t in self._mounted:
            emulator._umount(t)
        self._mounted = []
        self.host_dir = None

    def label(self) -> str:
        return "qemu-arm64"

    def device_block(self, reported: dict | None) -> dict:
        d = super().device_block(reported)
        d["name"] = "qemu-arm64"
        d["cpu"] = f"{emulator.qemu_version()} user-mode on host ({d.get('cpu', 'unknown')})"
        return d
