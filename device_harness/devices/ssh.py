"""``ssh://user@host[:port]``: any Linux or macOS board reachable over SSH (Pi, Jetson, a Mac).

Push with ``rsync -a`` when both ends have it, else ``scp -r``; run ``python3 bench_runner.py``
there (``--remote-python`` to pick another interpreter, e.g. a venv with onnxruntime/executorch);
pull ``results.jsonl`` with ``scp``; remove the work folder. SSH runs non-interactively
(``BatchMode=yes``): set up key login first (``ssh-copy-id user@host``).
"""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path
from typing import Sequence

from cdcda_export.errors import UserError

from .base import Completed, Device, run_local

_SPEC = re.compile(r"^ssh://(?:(?P<user>[^@/:]+)@)?(?P<host>\[[^\]]+\]|[^:/@]+)(?::(?P<port>\d+))?/?$")


class SshDevice(Device):
    kind = "ssh"
    emulated = False

    def __init__(self, host: str, user: str | None = None, port: int | None = None, *,
                 python: str = "python3", identity: str | None = None, ssh_options: Sequence[str] = (),
                 known_hosts: str | None = None, use_rsync: bool | None = None, keep: bool = False,
                 connect_timeout: int = 15):
        self.host, self.user, self.port = host, user, port
        self.python = python
        self.identity = identity
        self.extra = list(ssh_options)
        self.known_hosts = known_hosts
        self.use_rsync = use_rsync
        self.keep = keep
        self.connect_timeout = connect_timeout
        self.workdir: str | None = None
        self.last_workdir: str | None = None

    @classmethod
    def from_spec(cls, spec: str, **options) -> "SshDevice":
        m = _SPEC.match(spec)
        if not m:
            raise UserError(f"bad ssh device {spec!r}", field="--device", expected="ssh://user@host[:port]",
                            hint="cdcda bench ART --device ssh://pi@raspberrypi.local:22")
        return cls(m.group("host").strip("[]"), m.group("user"), int(m.group("port")) if m.group("port") else None,
                   **options)

    # ------------------------------------------------------------ command construction
    @property
    def target(self) -> str:
        return f"{self.user}@{self.host}" if self.user else self.host

    def _opts(self) -> list[str]:
        o = ["-o", "BatchMode=yes", "-o", f"ConnectTimeout={self.connect_timeout}"]
        if self.known_hosts:
            o += ["-o", f"UserKnownHostsFile={self.known_hosts}", "-o", "StrictHostKeyChecking=yes"]
        else:
            o += ["-o", "StrictHostKeyChecking=accept-new"]
        if self.identity:
            o += ["-i", self.identity, "-o", "IdentitiesOnly=yes"]
        return o + self.extra

    def ssh_argv(self, remote_cmd: str) -> list[str]:
        port = ["-p", str(self.port)] if self.port else []
        return ["ssh", *port, *self._opts(), self.target, remote_cmd]

    def scp_argv(self, src: str, dst: str, recursive: bool = False) -> list[str]:
        port = ["-P", str(self.port)] if self.port else []
        return ["scp", "-q", *(["-r"] if recursive else []), *port, *self._opts(), src, dst]

    def rsync_argv(self, src: str, dst: str) -> list[str]:
        ssh = shlex.join(["ssh", *(["-p", str(self.port)] if self.port else []), *self._opts()])
        return ["rsync", "-a", "--delete", "-e", ssh, src, dst]

    def remote(self, path: str) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.user + '@' if self.user else ''}{host}:{path}"

    # ------------------------------------------------------------ protocol
    def _ssh(self, remote_cmd: str, *, timeout: float | None = 120, check: bool = True) -> Completed:
        res = run_local(self.ssh_argv(remote_cmd), timeout=timeout, what="ssh client")
        if check and res.returncode != 0:
            raise UserError(f"ssh {self.target} failed (exit {res.returncode}): {remote_cmd[:200]}\n{res.stderr[-1500:]}",
                            hint=f"check `ssh {'-p ' + str(self.port) + ' ' if self.port else ''}{self.target} true` "
                            "works without a password (ssh-copy-id)")
        return res

    def open(self) -> str:
        res = self._ssh("mktemp -d /tmp/cdcda-bench.XXXXXX && command -v rsync >/dev/null && echo has-rsync || true")
        lines = [ln.strip() for ln in res.stdout.splitlines() if ln.strip()]
        if not lines:
            raise UserError(f"could not create a work folder on {self.target}: {res.stderr[-500:]}")
        self.workdir = self.last_workdir = lines[0]
        if self.use_rsync is None:
            self.use_rsync = "has-rsync" in lines and shutil.which("rsync") is not None
        return self.workdir

    def push(self, local: Path, dest_name: str) -> str:
        local = Path(local)
        dst = f"{self.workdir}/{dest_name}"
        if self.use_rsync:
            src = str(local) + ("/" if local.is_dir() else "")
            argv = self.rsync_argv(src, self.remote(dst))
        else:
            argv = self.scp_argv(str(local), self.remote(dst), recursive=local.is_dir())
        res = run_local(argv, timeout=3600, what="copy to device")
        if res.returncode != 0:
            raise UserError(f"copying {local} to {self.target}:{dst} failed: {res.stderr[-1000:]}")
        return dst

    def run(self, argv: Sequence[str], *, timeout: float | None = None) -> Completed:
        return self._ssh(shlex.join([self.python, *argv]), timeout=timeout, check=False)

    def pull(self, remote: str, local: Path) -> None:
        res = run_local(self.scp_argv(self.remote(remote), str(local)), timeout=600, what="copy from device")
        if res.returncode != 0:
            raise UserError(f"pulling {remote} from {self.target} failed: {res.stderr[-1000:]}")

    def close(self) -> None:
        if self.workdir and not self.keep and self.workdir.startswith("/tmp/cdcda-bench."):
            self._ssh(f"rm -rf {shlex.quote(self.workdir)}", check=False)
        self.workdir = None

    def label(self) -> str:
        return f"{self.target}{':' + str(self.port) if self.port else ''}"
