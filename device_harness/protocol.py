"""The bench protocol, the same for every device.

1. read the artifact's manifest; fix the prompt ids by seed (from its ``tokenizer.json``);
2. build the bundle (``bench_runner.py`` + a copy of ``cdcda_export.runtime`` + ``prompt.json``);
3. on the device: open a work folder, push bundle and artifact, run the supervisor
   (``bench_runner.py bench``: warm-up runs, then measured runs, one child process each, peak
   RSS of each child read from outside), pull ``results.jsonl``, clean up;
4. parse the JSON lines with :mod:`device_harness.parsers` (the same parser on every device) and
   write the bench-result contract; for devices other than the host, also run the prompt once on
   the host and report whether the greedy tokens match (``greedy.matches_host``).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Callable

from cdcda_export.errors import UserError
from cdcda_export.runtime.base import verify_artifact
from cdcda_export.utils import now_iso, write_json_atomic

from . import parsers
from .bundle import build_bundle
from .devices import Device, get_device
from .schema import ENGINE_FORMATS, BenchConfig, artifact_summary, build_result, greedy_block, make_prompt, read_artifact


def _check_fits(art: Path, manifest: dict, cfg: BenchConfig) -> None:
    msl = (manifest.get("io") or {}).get("max_seq_len")
    if msl and cfg.prompt_len + cfg.gen_len > int(msl):
        raise UserError(f"--prompt-len {cfg.prompt_len} + --gen-len {cfg.gen_len} = {cfg.prompt_len + cfg.gen_len} "
                        f"does not fit the artifact's max_seq_len {msl}", file=str(Path(art) / "manifest.json"),
                        field="io.max_seq_len", hint=f"use e.g. --prompt-len {min(cfg.prompt_len, int(msl) // 2)} "
                        f"--gen-len {int(msl) - min(cfg.prompt_len, int(msl) // 2)}")


def bench(artifact: str | Path, device: str | Device = "host", cfg: BenchConfig | None = None, *,
          json_out: str | Path | None = None, timeout: float = 3600.0,
          progress: Callable[[str], None] = lambda m: None) -> dict:
    """Benchmark one artifact on one device; returns (and optionally writes) the result dict."""
    cfg = cfg or BenchConfig()
    cfg.validate()
    art = Path(artifact)
    manifest = read_artifact(art)
    # every listed file has its recorded size and sha256 (once per artifact per process), before
    # anything is copied to a device; the measured children then skip the check
    verify_artifact(art, manifest)
    _check_fits(art, manifest, cfg)
    if cfg.engine and manifest.get("format") not in ENGINE_FORMATS[cfg.engine]:
        raise UserError(f"--engine {cfg.engine} runs {', '.join(ENGINE_FORMATS[cfg.engine])} artifacts, not "
                        f"format {manifest.get('format')!r}", file=str(art / "manifest.json"), field="format",
                        hint="leave --engine out to use the format's own runtime")
    if cfg.adapter:
        from cdcda_export.runtime.adapters import read_adapter_package

        if manifest.get("delivery") != "base-package":
            raise UserError("--adapter needs a base package; this artifact is a merged artifact",
                            file=str(art / "manifest.json"), field="delivery", expected="base-package",
                            hint="bench the base package the adapter package was written for")
        read_adapter_package(cfg.adapter, manifest)   # its files and the base package's hash, before copying
    dev = get_device(device) if isinstance(device, str) else device
    if hasattr(dev, "bench_native"):
        if cfg.adapter:
            raise UserError(f"--adapter: {dev.label()} runs its own native runner, which does not apply adapter "
                            "packages yet", field="--adapter", hint="bench adapter packages on host, ssh or qemu devices")
        if cfg.engine:
            raise UserError(f"--engine {cfg.engine}: {dev.label()} runs its own native runner, not the Python "
                            "bench runner that switches engines", hint="leave --engine out on adb/ios devices")
        res = dev.bench_native(art, manifest, cfg, progress=progress)
    else:
        res = bench_python(art, manifest, dev, cfg, timeout=timeout, progress=progress)
    if json_out:
        write_json_atomic(json_out, res)
    return res


def bench_python(art: Path, manifest: dict, dev: Device, cfg: BenchConfig, *, timeout: float,
                 progress: Callable[[str], None]) -> dict:
    prompt = make_prompt(art / "tokenizer.json", cfg.prompt_len, cfg.seed)
    with tempfile.TemporaryDirectory(prefix="cdcda-bundle-") as tmp:
        bundle = build_bundle(Path(tmp) / "bundle", prompt)
        progress(f"{dev.label()}: pushing runner and artifact")
        with dev:
            rb = dev.push(bundle, "bundle")
            ra = dev.push(art, "artifact")
            argv = [f"{rb}/bench_runner.py", "bench", "--artifact", ra, "--prompt-file", f"{rb}/prompt.json",
                    "--gen-len", str(cfg.gen_len), "--runs", str(cfg.runs), "--warmup", str(cfg.warmup),
                    "--threads", str(cfg.threads), "--out", f"{rb}/results.jsonl"]
            if cfg.engine:
                argv += ["--engine", cfg.engine]
            if cfg.adapter:
                argv += ["--adapter", dev.push(Path(cfg.adapter), "adapter")]
            progress(f"{dev.label()}: {cfg.warmup} warm-up + {cfg.runs} runs")
            proc = dev.run(argv, timeout=timeout)
            local = Path(tmp) / "results.jsonl"
            try:
                dev.pull(f"{rb}/results.jsonl", local)
                text = local.read_text(encoding="utf-8")
            except Exception:  # noqa: BLE001 - fall back to what the runner printed
                text = proc.stdout
    info, runs = parsers.parse_runner_output(text)
    failed = [r for r in runs if r.get("error")]
    measured = [r for r in runs if not r.get("warmup") and not r.get("error")]
    if info is None or not measured:
        detail = (failed[0].get("detail") if failed else "") or ""
        raise UserError(f"the bench runner on {dev.label()} produced no measured run (exit {proc.returncode})\n"
                        f"stderr: {proc.stderr[-2000:]}\n{detail[-1500:]}",
                        hint="check that the device has the artifact's runtime installed "
                        "(qemu-arm64: cdcda harness setup-emulator)")
    notes = []
    if failed:
        notes.append(f"{len(failed)} run(s) failed: {failed[0].get('error')}")
    if dev.emulated:
        notes.append("timings are emulated (qemu user-mode); peak RSS includes the emulator's own memory")
    greedy = greedy_block(measured)
    if dev.kind != "host" and cfg.compare_host and greedy["tokens"] is not None:
        progress("host reference run for greedy-token equality")
        host_tokens = host_reference_tokens(art, prompt, cfg)
        greedy["host_tokens"] = host_tokens
        greedy["matches_host"] = host_tokens == greedy["tokens"]
        if not greedy["matches_host"]:
            first = next((i for i, (a, b) in enumerate(zip(host_tokens, greedy["tokens"])) if a != b),
                         min(len(host_tokens), len(greedy["tokens"])))
            greedy["first_mismatch"] = first
    config = {**cfg.to_dict(), "prompt_sha256": prompt["sha256"], "runner": dev.runner}
    runtime = next((r.get("runtime") for r in measured if r.get("runtime")), None)
    if runtime:
        config["runtime"] = runtime
    return build_result(device=dev.device_block(info), artifact=artifact_summary(art, manifest), config=config,
                        runs=runs, notes=notes, greedy=greedy, created_at=now_iso())


def host_reference_tokens(art: Path, prompt: dict, cfg: BenchConfig) -> list[int]:
    """Greedy tokens of one run on this host (same bundle, same prompt) for equality checks."""
    from .devices.host import HostDevice

    with tempfile.TemporaryDirectory(prefix="cdcda-ref-") as tmp:
        bundle = build_bundle(Path(tmp) / "bundle", prompt)
        dev = HostDevice()
        argv = [f"{bundle}/bench_runner.py", "child", "--artifact", str(art.resolve()), "--prompt-file",
                f"{bundle}/prompt.json", "--gen-len", str(cfg.gen_len), "--threads", str(cfg.threads)]
        if cfg.engine:
            argv += ["--engine", cfg.engine]
        if cfg.adapter:
            argv += ["--adapter", str(Path(cfg.adapter).resolve())]
        proc = _run_with_pythonpath(dev.python, argv, str(bundle))
    lines = [ln for ln in proc.splitlines() if parsers.OBSERVER + " " in ln]
    if not lines:
        raise UserError(f"host reference run of {art} failed:\n{proc[-1500:]}")
    stats = parsers.parse_observer_line(lines[-1])
    return [int(t) for t in stats.get("tokens", [])]


def _run_with_pythonpath(python: str, argv: list[str], pythonpath: str) -> str:
    import os
    import subprocess

    env = dict(os.environ)
    env["PYTHONPATH"] = pythonpath
    p = subprocess.run([python, *argv], capture_output=True, text=True, env=env, timeout=3600)
    return p.stdout + ("\n" + p.stderr if p.returncode else "")


def load_json(path: str | Path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))
