"""``adb[:serial]``: Android phones and emulators, running a native runner the user points to.

Supported runners (``--runner PATH``, pushed to ``/data/local/tmp/cdcda``):

- ExecuTorch ``llama_main`` (``.pte`` artifacts): prints ``PyTorchObserver {json}``, parsed by the
  same :func:`device_harness.parsers.observer_to_run` as our Python runner.
- ExecuTorch ``executor_runner``: one forward per execution; only load/forward latency.
- ``onnxruntime_perf_test`` (``.onnx`` artifacts): two invocations per run, a prefill-shaped one
  (the prompt, empty cache) and a decode-shaped one (one token on a cache of ``prompt_len``),
  with ``test_data_set_0/input_*.pb`` written on the host.

Each run is wrapped in a small ``sh`` script that starts the runner in the background, polls
``/proc/<pid>/status`` ``VmHWM`` until it exits (peak memory measured from outside the runner) and
prints ``CDCDA_VMHWM_KB=`` / ``CDCDA_EXIT=``. Optional settling before each run: an idle wait and
a cpufreq snapshot before/after (``settle_s``; thermal throttling shows as a frequency drop).

No phone is attached to the machine this was written on: command construction and parsing are
unit-tested on recorded outputs (``tests/data/recorded``).
"""

from __future__ import annotations

import json
import shlex
import tempfile
from pathlib import Path
from typing import Callable

from cdcda_export.errors import UserError
from cdcda_export.utils import now_iso

from .. import parsers
from ..schema import BenchConfig, artifact_summary, build_result, greedy_block, make_prompt
from .base import run_local

REMOTE_ROOT = "/data/local/tmp/cdcda"
PREFILL_REPEATS = 3   # perf_test repeats of the prefill-shaped call (P50 of these is the TTFT)
RUNNERS = ("llama_main", "executor_runner", "onnxruntime_perf_test")
CPUFREQ = ('for c in /sys/devices/system/cpu/cpu[0-9]*; do '
           'echo "${c##*/} $(cat $c/cpufreq/scaling_cur_freq 2>/dev/null || echo 0)"; done')


def runner_kind(path: str) -> str:
    name = Path(path).name
    for r in RUNNERS:
        if name.startswith(r):
            return r
    raise UserError(f"unknown runner {name!r}", field="--runner", expected=", ".join(RUNNERS),
                    hint="build ExecuTorch's llama_main or onnxruntime_perf_test for Android and pass its path")


def measured_script(workdir: str, command: str, *, poll_s: float = 0.05) -> str:
    """sh script: run ``command`` in the background, track the peak VmHWM of its pid, print markers."""
    # `cd ... || exit` first, so that `command &` is a simple command: $! is the runner's own pid
    return (f"cd {shlex.quote(workdir)} || exit 97; {command} > run.out 2>&1 & pid=$!; hwm=0; "
            f"while kill -0 $pid 2>/dev/null; do "
            f"v=$(grep VmHWM /proc/$pid/status 2>/dev/null | tr -dc 0-9); "
            f'[ -n "$v" ] && [ "$v" -gt "$hwm" ] && hwm=$v; sleep {poll_s}; done; '
            f"wait $pid; rc=$?; cat {shlex.quote(workdir)}/run.out; echo CDCDA_VMHWM_KB=$hwm; echo CDCDA_EXIT=$rc")


def llama_main_command(model: str, tokenizer: str, prompt: str, seq_len: int, threads: int) -> str:
    args = ["./llama_main", f"--model_path={model}", f"--tokenizer_path={tokenizer}", f"--prompt={prompt}",
            f"--seq_len={seq_len}", "--temperature=0"]
    if threads:
        args.append(f"--cpu_threads={threads}")
    return shlex.join(args)


def executor_runner_command(model: str, executions: int) -> str:
    return shlex.join(["./executor_runner", f"--model_path={model}", f"--num_executions={executions}"])


def perf_test_command(model: str, repeats: int, threads: int) -> str:
    args = ["./onnxruntime_perf_test", "-e", "cpu", "-m", "times", "-r", str(repeats)]
    if threads:
        args += ["-x", str(threads)]
    return shlex.join([*args, model])


class AdbDevice:
    kind = "adb"
    emulated = False

    def __init__(self, serial: str | None = None, runner: str | None = None, settle_s: float = 0.0,
                 adb: str = "adb", keep: bool = False, timeout: float = 1800):
        self.serial = serial
        self.runner_path = runner
        self.settle_s = settle_s
        self.adb = adb
        self.keep = keep
        self.timeout = timeout

    # ------------------------------------------------------------ command construction
    def argv(self, *args: str) -> list[str]:
        return [self.adb, *(["-s", self.serial] if self.serial else []), *args]

    def shell_argv(self, script: str) -> list[str]:
        return self.argv("shell", script)

    def push_argv(self, local: str | Path, remote: str) -> list[str]:
        return self.argv("push", str(local), remote)

    def label(self) -> str:
        return f"adb:{self.serial}" if self.serial else "adb"

    # ------------------------------------------------------------ running
    def _run(self, argv: list[str], what: str, check: bool = True):
        res = run_local(argv, timeout=self.timeout, what=what)
        if check and res.returncode != 0:
            raise UserError(f"{what} failed (exit {res.returncode}): {shlex.join(argv)[:300]}\n{res.stderr[-1000:]}",
                            hint="check `adb devices` lists the phone (USB debugging on)")
        return res

    def shell(self, script: str, what: str = "adb shell", check: bool = True) -> str:
        return self._run(self.shell_argv(script), what, check).stdout

    def describe(self) -> dict:
        keys = ("ro.product.manufacturer", "ro.product.model", "ro.soc.model", "ro.board.platform",
                "ro.build.version.release", "ro.product.cpu.abi", "ro.kernel.qemu", "ro.boot.qemu")
        out = self.shell("; ".join(f"echo {k}=$(getprop {k})" for k in keys), "adb getprop")
        return device_from_getprop(out, self.serial)

    def bench_native(self, art: Path, manifest: dict, cfg: BenchConfig, *,
                     progress: Callable[[str], None] = lambda m: None) -> dict:
        if not self.runner_path:
            raise UserError("adb needs a native runner", field="--runner",
                            expected="path to llama_main / executor_runner (for .pte) or onnxruntime_perf_test (.onnx)")
        kind = runner_kind(self.runner_path)
        fmt = manifest.get("format")
        if (kind == "onnxruntime_perf_test") != (fmt == "onnx"):
            raise UserError(f"runner {kind} cannot run a {fmt} artifact", field="--runner",
                            expected="onnxruntime_perf_test for onnx, llama_main/executor_runner for executorch")
        dev = self.describe()
        prompt = make_prompt(art / "tokenizer.json", cfg.prompt_len, cfg.seed)
        wd = f"{REMOTE_ROOT}/{art.resolve().name}"
        self.shell(f"mkdir -p {shlex.quote(wd)}", "adb mkdir")
        self._run(self.push_argv(self.runner_path, f"{wd}/{Path(self.runner_path).name}"), "adb push runner")
        self.shell(f"chmod 755 {shlex.quote(wd + '/' + Path(self.runner_path).name)}", "adb chmod")
        model_files = [f for f in (manifest.get("files") or {}) if f.endswith((".pte", ".onnx", ".onnx.data", ".ptd"))]
        for f in [*model_files, "tokenizer.json"]:
            progress(f"adb push {f}")
            self._run(self.push_argv(art / f, f"{wd}/{f}"), f"adb push {f}")
        runs: list[dict] = []
        with tempfile.TemporaryDirectory(prefix="cdcda-adb-") as tmp:
            if kind == "onnxruntime_perf_test":
                model = next(f for f in model_files if f.endswith(".onnx"))
                for case, arrays in perf_test_inputs(art / model, prompt["ids"]).items():
                    local = Path(tmp) / case
                    write_test_data(local / "test_data_set_0", arrays)
                    self._run(self.push_argv(local, f"{wd}/{case}"), "adb push test data")
                    self.shell(f"cd {shlex.quote(wd)} && ln -sf ../{model} {case}/{model}" +
                               "".join(f" && ln -sf ../{f} {case}/{f}" for f in model_files if f != model), "adb ln")
            for i in range(cfg.warmup + cfg.runs):
                warm = i < cfg.warmup
                progress(f"{'warm-up' if warm else 'run'} {i + 1 - (0 if warm else cfg.warmup)}")
                before = self._settle()
                if kind == "llama_main":
                    text = self._prompt_text(art, prompt["ids"])
                    out = self.shell(measured_script(wd, llama_main_command(
                        next(f for f in model_files if f.endswith(".pte")), "tokenizer.json", text,
                        cfg.prompt_len + cfg.gen_len, cfg.threads)), "llama_main")
                    rec = llama_main_run(out, run=i, warmup=warm)
                elif kind == "executor_runner":
                    out = self.shell(measured_script(wd, executor_runner_command(
                        next(f for f in model_files if f.endswith(".pte")), cfg.gen_len)), "executor_runner")
                    rec = executor_runner_run(out, run=i, warmup=warm)
                else:
                    model = next(f for f in model_files if f.endswith(".onnx"))
                    pre = self.shell(measured_script(wd, perf_test_command(f"prefill/{model}", PREFILL_REPEATS, cfg.threads)),
                                     "perf_test prefill")
                    dec = self.shell(measured_script(wd, perf_test_command(f"decode/{model}", cfg.gen_len, cfg.threads)),
                                     "perf_test decode")
                    rec = perf_test_run(pre, dec, cfg.prompt_len, run=i, warmup=warm)
                if self.settle_s:
                    rec["cpufreq_khz"] = {"before": before, "after": parsers.parse_cpufreq(self.shell(CPUFREQ, "cpufreq"))}
                runs.append(rec)
        if not self.keep:
            self.shell(f"rm -rf {shlex.quote(wd)}", "adb cleanup", check=False)
        measured = [r for r in runs if not r.get("warmup") and not r.get("error")]
        if not measured:
            raise UserError(f"{kind} produced no measured run on {self.label()}: {runs[-1] if runs else ''}")
        notes = [f"runner: {kind}; peak RSS: VmHWM polled from /proc/<pid>/status"]
        if kind == "executor_runner":
            notes.append("executor_runner runs single forwards: ttft_ms is one forward, no decode metrics")
        config = {**cfg.to_dict(), "prompt_sha256": prompt["sha256"], "runner": kind, "settle_s": self.settle_s}
        return build_result(device=dev, artifact=artifact_summary(art, manifest), config=config, runs=runs,
                            notes=notes, greedy=greedy_block(measured), created_at=now_iso())

    def _settle(self) -> dict:
        if not self.settle_s:
            return {}
        return parsers.parse_cpufreq(self.shell(f"sleep {self.settle_s}; {CPUFREQ}", "settle"))

    @staticmethod
    def _prompt_text(art: Path, ids: list[int]) -> str:
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(art / "tokenizer.json")).decode(ids)


# ---------------------------------------------------------------- parsing helpers (pure)
def device_from_getprop(text: str, serial: str | None = None) -> dict:
    props = {}
    for line in text.splitlines():
        if "=" in line:
            k, v = line.split("=", 1)
            props[k.strip()] = v.strip()
    model = " ".join(x for x in (props.get("ro.product.manufacturer"), props.get("ro.product.model")) if x)
    abi = props.get("ro.product.cpu.abi", "")
    arch = {"arm64-v8a": "aarch64", "armeabi-v7a": "armv7l", "x86_64": "x86_64", "x86": "i686"}.get(abi, abi or "unknown")
    return {"kind": "adb", "name": model or serial or "android", "cpu": props.get("ro.soc.model") or
            props.get("ro.board.platform") or "unknown", "os": f"Android {props.get('ro.build.version.release', '?')}",
            "arch": arch, "emulated": props.get("ro.kernel.qemu") == "1" or props.get("ro.boot.qemu") == "1",
            "serial": serial}


def _exit_code(out: str) -> int | None:
    v = parsers.parse_marked_value(out, "CDCDA_EXIT")
    return v


def llama_main_run(out: str, *, run: int, warmup: bool) -> dict:
    lines = [ln for ln in out.splitlines() if parsers.OBSERVER + " " in ln]
    if not lines or _exit_code(out):
        return {"run": run, "warmup": warmup, "error": f"llama_main exit {_exit_code(out)}", "detail": out[-1500:]}
    stats = parsers.parse_observer_line(lines[-1])
    hwm = parsers.parse_marked_value(out, "CDCDA_VMHWM_KB")
    if hwm:
        stats.update(peak_rss_kb=hwm, rss_source="VmHWM")
    rec = parsers.observer_to_run(stats)
    rec.update(run=run, warmup=warmup)
    return rec


def executor_runner_run(out: str, *, run: int, warmup: bool) -> dict:
    try:
        r = parsers.parse_executor_runner(out)
    except parsers.ParseError as e:
        return {"run": run, "warmup": warmup, "error": str(e)}
    hwm = parsers.parse_marked_value(out, "CDCDA_VMHWM_KB")
    return {"run": run, "warmup": warmup, "load_ms": None, "ttft_ms": r["per_execution_ms"], "prefill_tok_s": None,
            "decode_tok_s": None, "peak_rss_mb": hwm / 1024 if hwm else None, "rss_source": "VmHWM" if hwm else None}


def perf_test_run(prefill_out: str, decode_out: str, prompt_len: int, *, run: int, warmup: bool) -> dict:
    try:
        pre, dec = parsers.parse_perf_test(prefill_out), parsers.parse_perf_test(decode_out)
    except parsers.ParseError as e:
        return {"run": run, "warmup": warmup, "error": str(e)}
    hwm = max(parsers.parse_marked_value(prefill_out, "CDCDA_VMHWM_KB") or 0,
              parsers.parse_marked_value(decode_out, "CDCDA_VMHWM_KB") or 0)
    return parsers.perf_test_to_run(pre, dec, prompt_len, run=run, warmup=warmup, peak_rss_kb=hwm or None)


def perf_test_inputs(model_path: Path, prompt_ids: list[int]) -> dict[str, dict]:
    """Inputs for a prefill-shaped and a decode-shaped perf_test run of a past/present-KV ONNX model."""
    import numpy as np
    import onnx
    from onnx import helper

    m = onnx.load(str(model_path), load_external_data=False)
    init = {i.name for i in m.graph.initializer}
    p = len(prompt_ids)
    cases: dict[str, dict] = {"prefill": {}, "decode": {}}
    for inp in m.graph.input:
        if inp.name in init:
            continue
        tt = inp.type.tensor_type
        dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type)
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        name = inp.name
        if name == "input_ids":
            cases["prefill"][name] = np.asarray([prompt_ids], dtype=dtype)
            cases["decode"][name] = np.asarray([[prompt_ids[-1]]], dtype=dtype)
        elif name == "attention_mask":
            cases["prefill"][name] = np.ones((1, p), dtype=dtype)
            cases["decode"][name] = np.ones((1, p + 1), dtype=dtype)
        elif name == "position_ids":
            cases["prefill"][name] = np.arange(p, dtype=dtype)[None]
            cases["decode"][name] = np.asarray([[p]], dtype=dtype)
        elif name.startswith("past_key_values."):
            heads, hd = dims[1], dims[3]
            cases["prefill"][name] = np.zeros((1, heads, 0, hd), dtype=dtype)
            cases["decode"][name] = np.zeros((1, heads, p, hd), dtype=dtype)
        else:
            raise UserError(f"onnxruntime_perf_test inputs: do not know how to fill input {name!r}",
                            file=str(model_path), expected="input_ids, attention_mask, position_ids, past_key_values.*")
    return cases


def write_test_data(folder: Path, arrays: dict) -> None:
    from onnx import numpy_helper

    folder.mkdir(parents=True, exist_ok=True)
    for i, (name, arr) in enumerate(arrays.items()):
        (folder / f"input_{i}.pb").write_bytes(numpy_helper.from_array(arr, name=name).SerializeToString())
    (folder / "inputs.json").write_text(json.dumps({k: list(v.shape) for k, v in arrays.items()}))
