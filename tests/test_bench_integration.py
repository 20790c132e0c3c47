"""Integration: real benches of tiny exported artifacts on the host and over a real loopback SSH server.

The SSH server is asyncssh (the ``test`` extra), started by the test itself on 127.0.0.1 on a free
port with a temporary host key and one authorized client key: no system ``sshd`` and no root. The
harness reaches it with the system ``ssh``/``scp`` clients (openssh-client), as it reaches a board.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from device_harness import BenchConfig, bench
from device_harness.devices.ssh import SshDevice
from device_harness.schema import METRICS

pytestmark = pytest.mark.integration

CFG = BenchConfig(prompt_len=16, gen_len=12, runs=2, warmup=1, threads=1)


def _check_result(res: dict, fmt: str, kind: str, runs: int = 2) -> None:
    assert res["device"]["kind"] == kind and res["device"]["emulated"] is False
    assert res["artifact"]["format"] == fmt
    assert res["config"]["prompt_len"] == 16 and res["config"]["runs"] == runs
    for m in METRICS:
        s = res["metrics"][m]
        assert len(s["samples"]) == runs, m
        assert 0 < s["min"] <= s["median"] <= s["max"], (m, s)
    assert len([r for r in res["runs"] if r["warmup"]]) == 1
    # peak RSS is measured from outside: a Python process with a runtime loaded is > 20 MiB
    assert res["metrics"]["peak_rss_mb"]["min"] > 20
    assert all(r["rss_source"] in ("wait4", "VmHWM") for r in res["runs"])
    assert res["greedy"]["consistent_across_runs"] is True and len(res["greedy"]["tokens"]) == 12


@pytest.fixture(scope="module")
def onnx_art(tiny_artifact):
    return tiny_artifact("tiny", "onnx/fp32")


def test_host_bench_onnx(onnx_art, tmp_path):
    res = bench(onnx_art, "host", CFG, json_out=tmp_path / "b.json")
    _check_result(res, "onnx", "host")
    assert json.loads((tmp_path / "b.json").read_text())["metrics"] == res["metrics"]
    assert all(r["heavy_imports"] == [] for r in res["runs"])   # the ONNX runner pulled in no torch


def test_host_bench_onnx_through_onnxruntime_genai(onnx_art, tmp_path):
    """``--engine onnxruntime-genai``: the same artifact through ORT GenAI's generator, same greedy tokens."""
    import dataclasses

    ours = bench(onnx_art, "host", CFG)
    res = bench(onnx_art, "host", dataclasses.replace(CFG, engine="onnxruntime-genai"))
    _check_result(res, "onnx", "host")
    assert res["config"]["engine"] == "onnxruntime-genai" and res["config"]["runtime"]["onnxruntime_genai"]
    assert res["greedy"]["tokens"] == ours["greedy"]["tokens"]
    assert all(r["heavy_imports"] == [] for r in res["runs"])
    from device_harness.schema import result_key

    assert result_key(res) != result_key(ours)   # reports and compare keep the two engines apart


def test_engine_for_another_format_is_a_user_error(tiny_artifact):
    import dataclasses

    from cdcda_export.errors import UserError

    art = tiny_artifact("tiny", "executorch/xnnpack-fp32")
    with pytest.raises(UserError, match="--engine onnxruntime-genai runs onnx artifacts"):
        bench(art, "host", dataclasses.replace(CFG, engine="onnxruntime-genai"))


def test_host_bench_executorch(tiny_artifact, tmp_path):
    art = tiny_artifact("tiny", "executorch/xnnpack-fp32")
    res = bench(art, "host", CFG, json_out=tmp_path / "b.json")
    _check_result(res, "executorch", "host")
    assert res["config"]["runtime"]["executorch"]
    # the measured child runs with one OpenMP/MKL thread, whatever the caller's environment
    # (bench_runner.CHILD_ENV: libtorch's MKL inside custom_sdpa must not open a second pool)
    assert res["config"]["runtime"]["omp_num_threads"] == "1"
    assert res["config"]["runtime"]["mkl_num_threads"] == "1"
    # load_ms is the model load; importing torch + ExecuTorch is timed apart (import_ms)
    assert all(r["import_ms"] > 0 for r in res["runs"])


def test_cli_bench_then_report(onnx_art, tmp_path):
    from typer.testing import CliRunner

    from cdcda_export.cli import app

    out = CliRunner().invoke(app, ["bench", str(onnx_art), "--device", "host", "--prompt-len", "8", "--gen-len", "4",
                                   "--runs", "1", "--warmup", "0", "--json", str(tmp_path / "r.json")])
    assert out.exit_code == 0, out.output
    assert "| onnx | host" in out.output
    rep = CliRunner().invoke(app, ["bench-report", str(tmp_path / "r.json"), "--plot", str(tmp_path / "p.png")])
    assert rep.exit_code == 0, rep.output
    assert (tmp_path / "p.png").stat().st_size > 10_000
    bad = CliRunner().invoke(app, ["bench", str(onnx_art), "--prompt-len", "500", "--gen-len", "100"])
    assert bad.exit_code != 0 and "does not fit the artifact's max_seq_len" in str(bad.exception or bad.output)


# ------------------------------------------------------------------ loopback SSH server
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sftp_server_class():
    import asyncssh

    class SftpServer(asyncssh.SFTPServer):
        """asyncssh's SFTP server on the real filesystem, ending with an exit status as sftp-server does:
        without one, OpenSSH 9's ``scp`` (SFTP by default) exits 1 after a successful copy."""

        def exit(self) -> None:
            self.channel.exit(0)

    return SftpServer


class LoopbackSshServer:
    """A real SSH server (asyncssh, a pip package) on 127.0.0.1, run on its own event loop in a thread.

    No system ``sshd`` or root is needed. It authenticates one temporary client key and executes each
    requested command through ``/bin/sh -c`` in a real subprocess with a login-like environment, the
    way sshd does, so ``mktemp``, ``python3 bench_runner.py``, ``rm -rf`` and ``rsync --server`` run
    for real. File copies go through SFTP (OpenSSH 9's ``scp`` default) and legacy ``scp -t/-f``.
    The harness talks to it with the system ``ssh``/``scp`` clients, exactly as to a board.
    """

    def __init__(self, d: Path):
        self.d = d
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="loopback-ssh", daemon=True)
        self.server = None
        self.port = 0
        self.procs: set = set()

    # -------------------------------------------------------- set-up
    def start(self) -> "LoopbackSshServer":
        import asyncssh

        host_key = asyncssh.generate_private_key("ssh-ed25519")
        client_key = asyncssh.generate_private_key("ssh-ed25519")
        client_key.write_private_key(str(self.d / "client_key"))
        os.chmod(self.d / "client_key", 0o600)
        (self.d / "authorized_keys").write_bytes(client_key.export_public_key())
        self.thread.start()
        _SftpServer = _sftp_server_class()

        async def listen():
            return await asyncssh.listen(
                "127.0.0.1", 0, server_host_keys=[host_key],
                authorized_client_keys=str(self.d / "authorized_keys"), process_factory=self._run_command,
                encoding=None, sftp_factory=_SftpServer, allow_scp=True, password_auth=False, kbdint_auth=False)

        self.server = self._call(listen())
        self.port = self.server.get_port()
        pub = host_key.export_public_key().decode().split()
        (self.d / "known_hosts").write_text(f"[127.0.0.1]:{self.port} {pub[0]} {pub[1]}\n")
        return self

    def stop(self) -> None:
        async def close():
            for p in list(self.procs):
                if p.returncode is None:
                    p.kill()
            self.server.close()
            await self.server.wait_closed()

        try:
            if self.server is not None:
                self._call(close())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=10)
            if not self.thread.is_alive():
                self.loop.close()

    def _call(self, coro, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    # -------------------------------------------------------- one exec request
    async def _run_command(self, process) -> None:
        if not process.command:   # an interactive shell: the harness never asks for one
            process.stderr.write(b"loopback server: commands only\n")
            process.exit(1)
            return
        home = os.path.expanduser("~")
        env = {"HOME": home, "USER": getpass.getuser(), "LOGNAME": getpass.getuser(), "SHELL": "/bin/sh",
               "PATH": "/usr/local/bin:/usr/bin:/bin"}
        env.update({k: v for k, v in (process.env or {}).items()
                    if isinstance(k, str) and (k == "LANG" or k.startswith("LC_"))})
        proc = await asyncio.create_subprocess_exec(
            "/bin/sh", "-c", process.command, cwd=home, env=env,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        self.procs.add(proc)

        async def feed_stdin():
            try:
                while chunk := await process.stdin.read(65536):
                    proc.stdin.write(chunk)
                    await proc.stdin.drain()
            except (BrokenPipeError, ConnectionResetError):
                pass
            finally:
                proc.stdin.close()

        async def pump(src, dst):
            while chunk := await src.read(65536):
                dst.write(chunk)
                await dst.drain()

        stdin_task = asyncio.ensure_future(feed_stdin())
        try:
            await asyncio.gather(pump(proc.stdout, process.stdout), pump(proc.stderr, process.stderr))
            rc = await proc.wait()
        finally:   # a client that went away leaves no command running
            if proc.returncode is None:
                proc.kill()
            self.procs.discard(proc)
            stdin_task.cancel()
        process.exit(rc if rc >= 0 else 128 - rc)


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    """An :class:`SshDevice` pointed at a loopback SSH server this fixture starts (no system sshd)."""
    missing = [c for c in ("ssh", "scp") if shutil.which(c) is None]
    if missing:   # the harness drives boards with the system client; CI (.ci/run) installs it
        msg = f"{' and '.join(missing)} missing: apt-get install -y openssh-client"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    d = tmp_path_factory.mktemp("sshd")
    os.chmod(d, 0o700)
    server = LoopbackSshServer(d).start()
    try:
        dev = SshDevice("127.0.0.1", getpass.getuser(), server.port, identity=str(d / "client_key"),
                        known_hosts=str(d / "known_hosts"), python=sys.executable)
        r = subprocess.run(dev.ssh_argv("echo ready"), capture_output=True, text=True, timeout=30)
        assert r.returncode == 0 and r.stdout.strip() == "ready", f"loopback SSH server: {r.returncode} {r.stderr}"
        yield dev
    finally:
        server.stop()


def test_ssh_bench_against_loopback_sshd(sshd, onnx_art):
    res = bench(onnx_art, sshd, CFG)
    _check_result(res, "onnx", "ssh")
    # the board ran the same prompt through the same runtime: tokens equal the host's reference run
    assert res["greedy"]["matches_host"] is True
    assert res["device"]["name"] == socket.gethostname()
    # the work folder was removed on the "board"
    assert sshd.last_workdir.startswith("/tmp/cdcda-bench.")
    assert not Path(sshd.last_workdir).exists()


def test_ssh_unreachable_board_is_a_user_error(tmp_path, onnx_art):
    from cdcda_export.errors import UserError

    dev = SshDevice("127.0.0.1", "nobody", _free_port(), known_hosts=str(tmp_path / "kh"), connect_timeout=3)
    with pytest.raises(UserError, match="without a password"):
        bench(onnx_art, dev, CFG)


def test_api_bench_artifact_for_pipeline_and_demo(onnx_art):
    from device_harness.api import bench_artifact, table

    res = bench_artifact(onnx_art, device="host", prompt_len=8, gen_len=4, runs=1, warmup=0, threads=1)
    assert res["config"]["gen_len"] == 4 and len(res["metrics"]["decode_tok_s"]["samples"]) == 1
    assert "| onnx | host" in table([res])
