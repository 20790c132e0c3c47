"""Device specs and command construction (adb, ios, ssh), the adb wrapper script run for real."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cdcda_export.errors import UserError
from device_harness import parsers
from device_harness.devices import adb, get_device
from device_harness.devices.ios import IosDevice
from device_harness.devices.ssh import SshDevice
from device_harness.schema import BenchConfig


def test_get_device_specs():
    assert get_device("host").kind == "host"
    assert get_device("qemu-arm64").emulated is True
    s = get_device("ssh://pi@board.local:2222")
    assert (s.user, s.host, s.port) == ("pi", "board.local", 2222)
    s6 = get_device("ssh://root@[::1]:22")
    assert s6.host == "::1" and s6.remote("/tmp/x") == "root@[::1]:/tmp/x"
    assert get_device("ssh://board").user is None
    assert get_device("adb:emulator-5554").serial == "emulator-5554"
    assert get_device("adb").serial is None
    assert get_device("ios:00008110-001A").udid == "00008110-001A"
    with pytest.raises(UserError, match="expected host, qemu-arm64"):
        get_device("phone")
    with pytest.raises(UserError, match=r"ssh://user@host\[:port\]"):
        get_device("ssh://pi@board:notaport")


def test_ssh_command_construction():
    d = SshDevice("10.0.0.5", "pi", 2200, identity="/k/id", known_hosts="/k/kh", python="/opt/venv/bin/python")
    argv = d.ssh_argv("true")
    assert argv[:3] == ["ssh", "-p", "2200"] and argv[-2:] == ["pi@10.0.0.5", "true"]
    assert "BatchMode=yes" in argv and "UserKnownHostsFile=/k/kh" in argv and "StrictHostKeyChecking=yes" in argv
    assert argv[argv.index("-i") + 1] == "/k/id"
    scp = d.scp_argv("/local/dir", d.remote("/tmp/w/bundle"), recursive=True)
    assert scp[:4] == ["scp", "-q", "-r", "-P"] and scp[-2:] == ["/local/dir", "pi@10.0.0.5:/tmp/w/bundle"]
    rs = d.rsync_argv("/local/dir/", "pi@10.0.0.5:/tmp/w/a")
    assert rs[:3] == ["rsync", "-a", "--delete"] and shlex.split(rs[4])[:3] == ["ssh", "-p", "2200"]


def test_adb_commands():
    d = adb.AdbDevice(serial="R5CT", runner="/x/llama_main")
    assert d.push_argv("/a/model.pte", "/data/local/tmp/cdcda/a/model.pte") == [
        "adb", "-s", "R5CT", "push", "/a/model.pte", "/data/local/tmp/cdcda/a/model.pte"]
    assert d.shell_argv("ls")[:4] == ["adb", "-s", "R5CT", "shell"]
    cmd = adb.llama_main_command("model.pte", "tokenizer.json", "hello 'world'", 192, 4)
    assert shlex.split(cmd) == ["./llama_main", "--model_path=model.pte", "--tokenizer_path=tokenizer.json",
                                "--prompt=hello 'world'", "--seq_len=192", "--temperature=0", "--cpu_threads=4"]
    assert shlex.split(adb.perf_test_command("decode/model.onnx", 128, 2)) == [
        "./onnxruntime_perf_test", "-e", "cpu", "-m", "times", "-r", "128", "-x", "2", "decode/model.onnx"]
    assert shlex.split(adb.executor_runner_command("m.pte", 10)) == ["./executor_runner", "--model_path=m.pte",
                                                                     "--num_executions=10"]
    assert adb.runner_kind("/build/onnxruntime_perf_test") == "onnxruntime_perf_test"
    with pytest.raises(UserError, match="unknown runner"):
        adb.runner_kind("/build/llama-cli")


def test_adb_wrapper_script_measures_vmhwm_from_outside(tmp_path):
    """Run the exact sh script the adb device sends, on this Linux host, around a process that
    allocates ~120 MiB: the polled VmHWM must see it, and the exit status must come back."""
    alloc = shlex.join([sys.executable, "-c", "import time; b = bytearray(120 * 2**20); time.sleep(0.5)"])
    script = adb.measured_script(str(tmp_path), alloc)
    out = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=60).stdout
    hwm = parsers.parse_marked_value(out, "CDCDA_VMHWM_KB")
    assert hwm is not None and hwm >= 120 * 1024, out          # >= the 120 MiB it touched
    assert parsers.parse_marked_value(out, "CDCDA_EXIT") == 0
    fail = subprocess.run(["sh", "-c", adb.measured_script(str(tmp_path), "sh -c 'exit 3'")],
                          capture_output=True, text=True, timeout=60).stdout
    assert parsers.parse_marked_value(fail, "CDCDA_EXIT") == 3


def test_perf_test_inputs_for_past_present_model(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    def vi(name, elem, dims):
        return helper.make_tensor_value_info(name, elem, dims)

    inputs = [vi("input_ids", TensorProto.INT64, [1, "seq"]), vi("attention_mask", TensorProto.INT64, [1, "total"]),
              vi("position_ids", TensorProto.INT64, [1, "seq"]),
              vi("past_key_values.0.key", TensorProto.FLOAT, [1, 2, "past", 16]),
              vi("past_key_values.0.value", TensorProto.FLOAT, [1, 2, "past", 16])]
    g = helper.make_graph([helper.make_node("Identity", ["input_ids"], ["out"])], "g", inputs,
                          [vi("out", TensorProto.INT64, [1, "seq"])])
    onnx.save(helper.make_model(g), tmp_path / "model.onnx")
    cases = adb.perf_test_inputs(tmp_path / "model.onnx", [5, 6, 7])
    assert cases["prefill"]["input_ids"].tolist() == [[5, 6, 7]]
    assert cases["prefill"]["past_key_values.0.key"].shape == (1, 2, 0, 16)
    assert cases["decode"]["input_ids"].tolist() == [[7]]
    assert cases["decode"]["attention_mask"].shape == (1, 4)
    assert cases["decode"]["position_ids"].tolist() == [[3]]
    assert cases["decode"]["past_key_values.0.value"].shape == (1, 2, 3, 16)
    adb.write_test_data(tmp_path / "decode" / "test_data_set_0", cases["decode"])
    from onnx import numpy_helper

    t = onnx.TensorProto()
    t.ParseFromString((tmp_path / "decode" / "test_data_set_0" / "input_0.pb").read_bytes())
    assert t.name == "input_ids" and numpy_helper.to_array(t).tolist() == [[7]]


def test_ios_devicectl_commands(tmp_path):
    d = IosDevice(udid="00008110-001A", app="/b/Bench.app", bundle_id="org.example.bench")
    art = tmp_path / "u1-onnx"
    art.mkdir()
    c = d.commands(art, BenchConfig(prompt_len=32, gen_len=64, runs=3, warmup=1, threads=2), tmp_path / "r.jsonl")
    assert c["install"] == ["xcrun", "devicectl", "device", "install", "app", "--device", "00008110-001A", "/b/Bench.app"]
    assert c["copy_to"][:5] == ["xcrun", "devicectl", "device", "copy", "to"]
    assert c["copy_to"][c["copy_to"].index("--destination") + 1] == "Documents/cdcda/u1-onnx"
    assert c["copy_to"][-4:] == ["--domain-type", "appDataContainer", "--domain-identifier", "org.example.bench"]
    launch = c["launch"]
    assert launch[:5] == ["xcrun", "devicectl", "device", "process", "launch"]
    assert "--console" in launch and launch[launch.index("--terminate-existing") + 1] == "org.example.bench"
    assert launch[launch.index("--gen-len") + 1] == "64" and launch[launch.index("--runs") + 1] == "3"
    assert c["copy_from"][c["copy_from"].index("--source") + 1] == "Documents/cdcda/results.jsonl"
    with pytest.raises(UserError, match="ios:<udid>"):
        IosDevice().commands(art, BenchConfig(), tmp_path / "r.jsonl")


def test_bundle_has_runtime_and_no_exporters(tmp_path):
    from device_harness.bundle import build_bundle

    b = build_bundle(tmp_path / "b", {"ids": [1, 2], "seed": 0, "sha256": "x"})
    names = {p.relative_to(b).as_posix() for p in b.rglob("*.py")}
    assert {"bench_runner.py", "cdcda_export/__init__.py", "cdcda_export/errors.py", "cdcda_export/runtime/__init__.py",
            "cdcda_export/runtime/base.py"} <= names
    assert not any(n.startswith(("cdcda_export/export", "cdcda_export/train", "device_harness")) for n in names)
    assert json.loads((b / "prompt.json").read_text())["ids"] == [1, 2]
    # the bundle imports with a bare interpreter path: no torch/transformers pulled in
    code = ("import sys, cdcda_export.runtime as r; "
            "print(sorted(m for m in ('torch','transformers','peft','device_harness') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=b, capture_output=True, text=True,
                         env={"PYTHONPATH": str(b), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


FAKE_ADB = r'''#!/usr/bin/env python3
"""Stand-in for `adb` in a unit test: /data/local/tmp lives under $FAKE_ADB_ROOT; shell scripts run in sh."""
import os, shutil, subprocess, sys
root = os.environ["FAKE_ADB_ROOT"]
args = sys.argv[1:]
if args[:1] == ["-s"]:
    args = args[2:]
m = lambda p: p.replace("/data/local/tmp", root + "/data/local/tmp")
os.makedirs(root, exist_ok=True)
with open(os.path.join(root, "log"), "a") as f:
    f.write(" ".join(args) + "\n")
if args[0] == "push":
    dst = m(args[2]); os.makedirs(os.path.dirname(dst), exist_ok=True)
    (shutil.copytree if os.path.isdir(args[1]) else shutil.copy2)(args[1], dst)
elif args[0] == "shell" and "getprop" in args[1]:
    sys.stdout.write(open(os.environ["FAKE_GETPROP"]).read())
elif args[0] == "shell":
    sys.exit(subprocess.run(["sh", "-c", m(args[1])]).returncode)
'''


def test_adb_bench_flow_with_a_stand_in_adb(tmp_path):
    """The whole adb protocol (getprop, push, chmod, wrapped runs, parse, cleanup) against a stand-in
    `adb` and a stand-in `llama_main` that prints the recorded PyTorchObserver output."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from device_harness.protocol import bench

    rec = Path(__file__).parent / "data" / "recorded"
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(50)} | {"<unk>": 50}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    art = tmp_path / "u1-xnnpack"
    art.mkdir()
    tok.save(str(art / "tokenizer.json"))
    (art / "model.pte").write_bytes(b"\0" * 1000)
    (art / "manifest.json").write_text(json.dumps({"format": "executorch", "recipe": {"name": "xnnpack-fp32"},
                                                   "files": {"model.pte": {"sha256": hashlib.sha256(b"\0" * 1000).hexdigest(),
                                                                         "bytes": 1000}},
                                                   "io": {"max_seq_len": 256}}))
    observer = "\n".join(ln for ln in (rec / "llama_main_android.txt").read_text().splitlines()
                         if not ln.startswith("CDCDA_"))
    runner = tmp_path / "llama_main"
    runner.write_text(f"#!/bin/sh\ncat <<'EOF'\n{observer}\nEOF\nsleep 0.4\n")   # a runner takes a while
    runner.chmod(0o755)
    fake = tmp_path / "adb"
    fake.write_text(FAKE_ADB)
    fake.chmod(0o755)
    os.environ.update(FAKE_ADB_ROOT=str(tmp_path / "phone"), FAKE_GETPROP=str(rec / "getprop_pixel.txt"))
    try:
        dev = adb.AdbDevice(serial="R5CT", runner=str(runner), adb=str(fake))
        res = bench(art, dev, BenchConfig(prompt_len=64, gen_len=128, runs=2, warmup=1))
    finally:
        del os.environ["FAKE_ADB_ROOT"], os.environ["FAKE_GETPROP"]
    assert res["device"]["name"] == "Google Pixel 8" and res["device"]["arch"] == "aarch64"
    assert res["config"]["runner"] == "llama_main"
    assert res["metrics"]["decode_tok_s"]["samples"] == [pytest.approx(127 / 0.78)] * 2
    assert res["metrics"]["ttft_ms"]["median"] == pytest.approx(60.0)
    # peak RSS came from the wrapper polling VmHWM of the (stand-in) runner process: a real, small number
    assert all(r["rss_source"] == "VmHWM" and 0 < r["peak_rss_mb"] < 64 for r in res["runs"])
    log = (tmp_path / "phone" / "log").read_text()
    assert "push" in log and "--seq_len=192" in log and "rm -rf /data/local/tmp/cdcda/u1-xnnpack" in log
    assert not (tmp_path / "phone" / "data" / "local" / "tmp" / "cdcda" / "u1-xnnpack").exists()


def test_bad_inputs_are_user_errors(tmp_path):
    from device_harness.protocol import bench

    with pytest.raises(UserError, match="no manifest.json") as e:
        bench(tmp_path, "host")
    assert str(tmp_path) in str(e.value) and "cdcda export" in str(e.value)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "onnx", "io": {"max_seq_len": 64}}))
    with pytest.raises(UserError, match="does not fit the artifact's max_seq_len 64"):
        bench(tmp_path, "host", BenchConfig(prompt_len=64, gen_len=128))
    with pytest.raises(UserError, match="--runs 0: expected >= 1"):
        bench(tmp_path, "host", BenchConfig(runs=0))
    with pytest.raises(UserError, match="runner llama_main cannot run a onnx artifact"):
        bench(tmp_path, adb.AdbDevice(runner="/x/llama_main", adb="/bin/true"), BenchConfig(prompt_len=8, gen_len=8))
