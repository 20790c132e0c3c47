"""Integration: real benches of tiny exported artifacts on the host and over a real loopback sshd.

The sshd is started by the test itself on 127.0.0.1 on a free port, with a temporary host key and
authorized_keys (``.ci/run`` installs openssh-server from Debian when it is missing).
"""

from __future__ import annotations

import getpass
import json
import os
import shutil
import socket
import subprocess
import sys
import time
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


# ------------------------------------------------------------------ loopback sshd
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    sshd_bin = shutil.which("sshd") or ("/usr/sbin/sshd" if os.path.exists("/usr/sbin/sshd") else None)
    assert sshd_bin, "sshd is missing: apt-get install -y openssh-server (.ci/run does this)"
    d = tmp_path_factory.mktemp("sshd")
    os.chmod(d, 0o700)
    for name in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)], check=True)
    shutil.copy(d / "client_key.pub", d / "authorized_keys")
    os.chmod(d / "authorized_keys", 0o600)
    port = _free_port()
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'host_key'}\nPidFile {d / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {d / 'authorized_keys'}\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "PubkeyAuthentication yes\nPermitRootLogin prohibit-password\nUsePAM no\nStrictModes no\n"
        "Subsystem sftp internal-sftp\n")
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", exist_ok=True)   # privilege separation directory
    proc = subprocess.Popen([sshd_bin, "-D", "-e", "-f", str(d / "sshd_config")], stderr=subprocess.PIPE, text=True)
    pub = (d / "host_key.pub").read_text().split()
    (d / "known_hosts").write_text(f"[127.0.0.1]:{port} {pub[0]} {pub[1]}\n")
    dev = SshDevice("127.0.0.1", getpass.getuser(), port, identity=str(d / "client_key"),
                    known_hosts=str(d / "known_hosts"), python=sys.executable)
    deadline = time.time() + 20
    while True:
        r = subprocess.run(dev.ssh_argv("echo ready"), capture_output=True, text=True)
        if r.returncode == 0 and "ready" in r.stdout:
            break
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"sshd did not come up: {r.stderr} {proc.stderr.read() if proc.poll() is not None else ''}")
        time.sleep(0.3)
    yield dev
    proc.terminate()
    proc.wait(timeout=10)


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
