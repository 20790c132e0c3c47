"""``cdcda harness setup-emulator``: an ARM64 Linux userland run by qemu user-mode emulation.

Built from Debian packages, in a project folder (default ``build/emulator-arm64``):

1. host tools: ``qemu-user-static`` (+ ``binfmt-support``) and ``debootstrap`` (apt-get when root);
2. ``binfmt_misc``: mounted, with the ``qemu-aarch64`` handler enabled (flag ``F``: the static
   interpreter is opened at registration, so nothing has to be copied into the chroot);
3. ``debootstrap --arch=arm64 --variant=minbase`` of Debian (python3 included) into ``rootfs``;
4. aarch64 wheels from PyPI, downloaded and unpacked on the host with ``pip install --target
   --platform manylinux_2_28_aarch64 --only-binary=:all:`` (no pip run under emulation):
   ``site/``: onnxruntime, numpy, tokenizers;
   ``site-et/``: the ExecuTorch route (below);
5. a check run inside the chroot; ``emulator.json`` records versions and what works.

ExecuTorch on the emulator -- what we found (torch/executorch aarch64 wheels on PyPI):

- executorch 1.5.1's aarch64 pybindings (``_C.so``) link ``libtorch_python``/``libtorch``/
  ``libtorch_cpu`` and need the matching torch 2.13. torch's aarch64 wheels on PyPI are CUDA
  builds from 2.11 on: even ``libtorch_cpu.so`` links ``libcudart.so.13`` and ``libcupti.so.13``,
  so ``--no-deps`` does not help (``import torch`` fails without ~3 GB of nvidia-* wheels).
- torch 2.10.0's aarch64 wheel is CPU-only (146 MB, no nvidia dependencies on aarch64) and
  executorch 1.1.0 (``Requires-Dist: torch>=2.10.0``) is built against it. So the emulator gets
  this older pinned pair, installed ``--no-deps`` with the few pure-Python packages that
  ``import torch`` needs. It is the emulator's runtime only; exports stay on 1.5.1.
- Whether a .pte written by executorch 1.5.1 loads in the 1.1.0 runtime is checked by the bench
  itself (``greedy.matches_host`` compares tokens with the host's 1.5.1 run); see
  ``emulator.json["executorch"]`` and the README for what this setup measured.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from cdcda_export.errors import UserError
from cdcda_export.utils import now_iso, write_json_atomic

DEFAULT_DIR = Path(os.environ.get("CDCDA_EMULATOR_DIR", "build/emulator-arm64"))
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
PLATFORMS = ("manylinux_2_28_aarch64", "manylinux_2_17_aarch64", "manylinux2014_aarch64")
ORT_PACKAGES = ("onnxruntime", "numpy>=2.0,<2.4", "tokenizers")
# The ExecuTorch pair for the emulator (see module docstring) + what `import torch` needs.
ET_PACKAGES = ("executorch==1.1.0", "torch==2.10.0", "typing_extensions", "sympy", "mpmath", "networkx",
               "jinja2", "markupsafe", "fsspec", "filelock", "packaging", "flatbuffers", "pyyaml", "ruamel.yaml",
               "tabulate")
SITE_DIRS = ("/opt/cdcda/site", "/opt/cdcda/site-et")


def rootfs_ready(root: Path) -> bool:
    """debootstrap removes ``/debootstrap`` when its second stage finished."""
    rfs = Path(root) / "rootfs"
    return (rfs / "usr" / "bin" / "python3").exists() and not (rfs / "debootstrap").exists()


def rootfs_python(root: Path) -> str:
    libs = sorted((Path(root) / "rootfs" / "usr" / "lib").glob("python3.*"))
    vers = [p.name[len("python"):] for p in libs if re.fullmatch(r"python3\.\d+", p.name)]
    if not vers:
        raise UserError("no python3 in the emulator rootfs", file=str(root), hint="cdcda harness setup-emulator --force")
    return vers[-1]


def _sh(argv: list[str], what: str, timeout: float = 3600, env: dict | None = None) -> str:
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
    except FileNotFoundError as e:
        raise UserError(f"{argv[0]} not found ({what})", hint="apt-get install -y qemu-user-static binfmt-support debootstrap") from e
    if p.returncode != 0:
        raise UserError(f"{what} failed (exit {p.returncode}): {' '.join(argv)[:300]}\n{(p.stderr or p.stdout)[-2000:]}")
    return p.stdout


def ensure_tools(progress: Callable[[str], None]) -> None:
    missing = [t for t in ("qemu-aarch64-static", "debootstrap") if shutil.which(t) is None]
    if not missing:
        return
    if os.geteuid() != 0:
        raise UserError(f"missing {', '.join(missing)}", hint="sudo apt-get install -y qemu-user-static binfmt-support debootstrap")
    progress("apt-get install qemu-user-static binfmt-support debootstrap")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    _sh(["apt-get", "update", "-qq"], "apt-get update", env=env)
    _sh(["apt-get", "install", "-y", "-qq", "qemu-user-static", "binfmt-support", "debootstrap"], "apt-get install", env=env)


BINFMT = Path("/proc/sys/fs/binfmt_misc")
# The qemu-user-static Debian package's registration for aarch64 (flags F: fix binary, P: preserve argv0).
AARCH64_REGISTER = (":qemu-aarch64:M::\\x7fELF\\x02\\x01\\x01\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x02\\x00"
                    "\\xb7\\x00:\\xff\\xff\\xff\\xff\\xff\\xff\\xff\\x00\\xff\\xff\\xff\\xff\\xff\\xff\\xff\\xff\\xfe\\xff"
                    "\\xff\\xff:/usr/bin/qemu-aarch64-static:FP")


def ensure_binfmt(progress: Callable[[str], None]) -> str:
    """Make sure aarch64 ELF files run through qemu; returns the interpreter path."""
    if not (BINFMT / "register").exists():
        progress("mounting binfmt_misc")
        subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT)], capture_output=True)
    entry = BINFMT / "qemu-aarch64"
    if not entry.exists() and shutil.which("update-binfmts"):
        subprocess.run(["update-binfmts", "--enable", "qemu-aarch64"], capture_output=True)
    if not entry.exists() and (BINFMT / "register").exists():
        try:
            (BINFMT / "register").write_text(AARCH64_REGISTER)
        except OSError:
            pass
    if not entry.exists():
        raise UserError("binfmt_misc has no qemu-aarch64 handler: aarch64 programs cannot run here",
                        hint="as root: mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc && "
                        "update-binfmts --enable qemu-aarch64")
    text = entry.read_text()
    if not text.startswith("enabled"):
        (entry).write_text("1")
    m = re.search(r"interpreter (\S+)", text)
    return m.group(1) if m else "qemu-aarch64"


def debootstrap(root: Path, suite: str, mirror: str, progress: Callable[[str], None]) -> None:
    rfs = root / "rootfs"
    if rootfs_ready(root):
        return
    if rfs.exists():
        progress(f"removing incomplete {rfs}")
        _umount(rfs / "proc")
        shutil.rmtree(rfs)
    part = root / "rootfs.partial"
    if part.exists():
        _umount(part / "proc")
        shutil.rmtree(part)
    progress(f"debootstrap --arch=arm64 {suite} (several minutes: the second stage runs under qemu)")
    _sh(["debootstrap", "--arch=arm64", "--variant=minbase", "--include=python3,ca-certificates", suite, str(part),
         mirror], "debootstrap", timeout=7200)
    os.replace(part, rfs)


def pip_target(dest: Path, packages: tuple[str, ...], py: str, *, no_deps: bool, progress: Callable[[str], None]) -> None:
    """Unpack aarch64 wheels into ``dest`` on the host (atomic: built as ``dest.partial``)."""
    if (dest / ".complete").exists():
        return
    part = dest.with_name(dest.name + ".partial")
    shutil.rmtree(part, ignore_errors=True)
    argv = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--target", str(part),
            "--only-binary=:all:", "--python-version", py, "--implementation", "cp", "--abi", f"cp{py.replace('.', '')}"]
    for p in PLATFORMS:
        argv += ["--platform", p]
    if no_deps:
        argv.append("--no-deps")
    progress(f"pip (aarch64 wheels) -> {dest.name}: {' '.join(packages)}")
    _sh([*argv, *packages], f"pip install aarch64 wheels into {dest}")
    (part / ".complete").write_text(" ".join(packages) + "\n")
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(part, dest)


def _mounted(path: Path) -> bool:
    try:
        with open("/proc/mounts", encoding="utf-8") as f:
            return any(line.split()[1] == str(path.resolve()) for line in f)
    except OSError:
        return False


def mount_proc(rfs: Path, sys_too: bool = False) -> list[Path]:
    """Mount /proc (and /sys when asked) in the chroot; returns what we mounted (to unmount after).

    /proc: VmHWM polling and platform facts. /sys is a per-runtime trade-off under qemu-user,
    because both runtimes' bundled ``cpuinfo`` read the *host's* CPU description:
    - ExecuTorch/XNNPACK needs it: cpuinfo counts CPUs from /sys/devices/system/cpu, and without
      it XNNPACK fails to initialise ("XNNPACK status: 0x5", unsupported hardware), then crashes;
    - onnxruntime 1.31.1 segfaults at import with it (its cpuinfo parses the x86 host's sysfs as
      ARM); without it ORT warns "cpuinfo_initialize failed" and runs its default ARM64 kernels.
    So /sys is mounted for .pte artifacts only (``sys_too``).
    """
    done = []
    for fs, name in (("proc", "proc"), ("sysfs", "sys"))[: 2 if sys_too else 1]:
        target = rfs / name
        target.mkdir(exist_ok=True)
        if _mounted(target):
            continue
        p = subprocess.run(["mount", "-t", fs, fs, str(target)], capture_output=True, text=True)
        if p.returncode != 0:
            for t in done:
                _umount(t)
            raise UserError(f"cannot mount /{name} in the emulator rootfs: {p.stderr.strip()}",
                            hint="run as root (chroot and mount need it)")
        done.append(target)
    return done


def _umount(path: Path) -> None:
    if _mounted(path):
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def chroot_argv(root: Path, argv: list[str], extra_paths: tuple[str, ...] = SITE_DIRS) -> list[str]:
    """``chroot ROOTFS env -i ... python3 argv`` with the emulator's site folders on PYTHONPATH."""
    return ["chroot", str(Path(root) / "rootfs"), "/usr/bin/env", "-i", "PATH=/usr/local/bin:/usr/bin:/bin",
            "HOME=/root", "LANG=C.UTF-8", f"PYTHONPATH={':'.join(extra_paths)}", "/usr/bin/python3", *argv]


CHECK = r"""
import json, platform, sys
out = {"python": platform.python_version(), "machine": platform.machine()}
try:
    import numpy, onnxruntime, tokenizers
    out.update(numpy=numpy.__version__, onnxruntime=onnxruntime.__version__, tokenizers=tokenizers.__version__)
except Exception as e:
    out["onnx_error"] = repr(e)
print("CHECK " + json.dumps(out))
"""

CHECK_ET = r"""
import json
out = {}
try:
    import torch
    from executorch.extension.pybindings import portable_lib
    from importlib import metadata
    out.update(torch=torch.__version__, executorch=metadata.version("executorch"))
except Exception as e:
    out["executorch_error"] = repr(e)[:500]
print("CHECK " + json.dumps(out))
"""


def check(root: Path, timeout: float = 900, executorch: bool = True) -> dict:
    rfs = Path(root) / "rootfs"
    mounted = mount_proc(rfs)
    try:
        t0 = time.perf_counter()
        p = subprocess.run(chroot_argv(root, ["-c", CHECK]), capture_output=True, text=True, timeout=timeout)
        took = time.perf_counter() - t0
        p_et = None
        if executorch:  # the ExecuTorch check (torch import) runs with /sys, as a .pte bench does
            mounted += mount_proc(rfs, sys_too=True)
            p_et = subprocess.run(chroot_argv(root, ["-c", CHECK_ET]), capture_output=True, text=True,
                                  timeout=timeout)
    finally:
        for t in mounted:
            _umount(t)
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("CHECK ")), None)
    if line is None:
        raise UserError(f"python in the emulator did not run (exit {p.returncode}): {p.stderr[-1500:]}",
                        hint="cdcda harness setup-emulator --force")
    info = json.loads(line[6:])
    if p_et is not None:
        et_line = next((ln for ln in p_et.stdout.splitlines() if ln.startswith("CHECK ")), None)
        info.update(json.loads(et_line[6:]) if et_line else {"executorch_error": p_et.stderr[-500:] or "no output"})
    info["check_seconds"] = round(took, 1)
    return info


def qemu_version() -> str:
    try:
        out = subprocess.run(["qemu-aarch64-static", "--version"], capture_output=True, text=True).stdout
        return out.splitlines()[0].strip() if out else "qemu-aarch64"
    except FileNotFoundError:
        return "qemu-aarch64"


def setup_emulator(root: str | Path = DEFAULT_DIR, *, suite: str = SUITE, mirror: str = MIRROR,
                   executorch: bool = True, force: bool = False,
                   progress: Callable[[str], None] = lambda m: None) -> dict:
    """Build (or finish building) the emulator in ``root``; returns what ``emulator.json`` records."""
    if sys.platform != "linux":
        raise UserError("the qemu-arm64 emulator needs a Linux host (binfmt_misc, chroot)")
    if os.geteuid() != 0:
        raise UserError("setup-emulator needs root (debootstrap, binfmt_misc, chroot)",
                        hint="sudo cdcda harness setup-emulator")
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    if force:
        for d in ("rootfs", "rootfs.partial"):
            _umount(root / d / "proc")
            _umount(root / d / "sys")
            shutil.rmtree(root / d, ignore_errors=True)
        (root / "emulator.json").unlink(missing_ok=True)
    ensure_tools(progress)
    interp = ensure_binfmt(progress)
    debootstrap(root, suite, mirror, progress)
    py = rootfs_python(root)
    rfs = root / "rootfs"
    pip_target(rfs / SITE_DIRS[0].lstrip("/"), ORT_PACKAGES, py, no_deps=False, progress=progress)
    if executorch:
        pip_target(rfs / SITE_DIRS[1].lstrip("/"), ET_PACKAGES, py, no_deps=True, progress=progress)
    progress("checking the runtimes inside the emulator")
    info = check(root, executorch=executorch)
    record = {
        "created_at": now_iso(), "root": str(root), "suite": suite, "interpreter": interp, "qemu": qemu_version(),
        "python": info.get("python"), "machine": info.get("machine"),
        "onnxruntime": info.get("onnxruntime"), "numpy": info.get("numpy"), "tokenizers": info.get("tokenizers"),
        "executorch": ({"route": "executorch 1.1.0 + torch 2.10.0 (CPU aarch64 wheel), --no-deps",
                        "version": info.get("executorch"), "torch": info.get("torch"),
                        "error": info.get("executorch_error")} if executorch else None),
        "onnx_error": info.get("onnx_error"), "check_seconds": info.get("check_seconds"),
    }
    write_json_atomic(root / "emulator.json", record)
    return record
