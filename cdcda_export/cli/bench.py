"""Device-harness verbs: ``bench``, ``bench-report``, ``bench-compare``, ``harness setup-emulator``.

Thin: parse flags, call ``device_harness``, print. Heavy imports happen inside the functions.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from . import app

harness_app = typer.Typer(help="Device harness set-up (ARM64 emulator).", no_args_is_help=True)
app.add_typer(harness_app, name="harness")


@app.command("bench")
def bench_cmd(
    artifact: Path = typer.Argument(..., help="Artifact directory (manifest.json + model + tokenizer.json)."),
    device: str = typer.Option("host", help="host | qemu-arm64 | ssh://user@host[:port] | adb[:serial] | ios[:udid]"),
    prompt_len: int = typer.Option(64, help="Prompt tokens (ids fixed by --seed)."),
    gen_len: int = typer.Option(128, help="Tokens to generate (greedy, no EOS stop)."),
    runs: int = typer.Option(5, help="Measured runs (one fresh runner process each)."),
    warmup: int = typer.Option(1, help="Warm-up runs, discarded."),
    threads: int = typer.Option(0, help="Runtime threads (0: runtime default)."),
    engine: str = typer.Option("", help="Runtime engine instead of the format's own (onnx artifacts: "
                                        "onnxruntime-genai = ONNX Runtime GenAI's generator, reading "
                                        "genai_config.json)."),
    seed: int = typer.Option(0, help="Seed of the prompt token ids."),
    adapter: Optional[Path] = typer.Option(None, help="Adapter package to apply to ARTIFACT (a base package); "
                                                      "its load and user-switch times are reported."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the bench result (JSON) here."),
    compare_host: bool = typer.Option(True, help="Non-host devices: compare greedy tokens with a host run."),
    remote_python: str = typer.Option("python3", help="ssh: Python on the board (with numpy + the runtime)."),
    identity: Optional[Path] = typer.Option(None, help="ssh: private key file."),
    emulator_dir: Optional[Path] = typer.Option(None, help="qemu-arm64: emulator folder (default build/emulator-arm64)."),
    runner: Optional[Path] = typer.Option(None, help="adb: native runner to push (llama_main, executor_runner, "
                                                       "onnxruntime_perf_test)."),
    settle: float = typer.Option(0.0, help="adb: idle seconds before each run + cpufreq snapshot before/after."),
    ios_app: Optional[Path] = typer.Option(None, help="ios: the bench .app to install."),
    bundle_id: str = typer.Option("org.cdcda.bench", help="ios: the bench app's bundle id."),
    timeout: float = typer.Option(3600, help="Seconds before a device run is abandoned."),
):
    """Measure load time, TTFT, prefill/decode tok/s and peak RSS of ARTIFACT on DEVICE."""
    from device_harness import BenchConfig
    from device_harness.devices import get_device
    from device_harness.protocol import bench
    from device_harness.report import markdown_table

    opts: dict = {}
    if device.startswith("ssh://"):
        opts = {"python": remote_python, "identity": str(identity) if identity else None}
    elif device in ("qemu-arm64", "qemu", "emulator"):
        opts = {"root": emulator_dir} if emulator_dir else {}
    elif device == "adb" or device.startswith("adb:"):
        opts = {"runner": str(runner) if runner else None, "settle_s": settle}
    elif device == "ios" or device.startswith("ios:"):
        opts = {"app": str(ios_app) if ios_app else None, "bundle_id": bundle_id}
    cfg = BenchConfig(prompt_len=prompt_len, gen_len=gen_len, runs=runs, warmup=warmup, threads=threads, seed=seed,
                      compare_host=compare_host, engine=engine, adapter=str(adapter) if adapter else "")
    res = bench(artifact, get_device(device, **opts), cfg, json_out=json_out, timeout=timeout,
                progress=lambda m: typer.echo(m, err=True))
    typer.echo(markdown_table([res]))
    for k in ("adapter_load_ms", "adapter_switch_ms"):
        if (res["metrics"].get(k) or {}).get("median") is not None:
            typer.echo(f"{k.replace('_ms', '').replace('_', ' ')}: {res['metrics'][k]['median']:.2f} ms (median)")
    for n in res.get("notes", []):
        typer.echo(f"note: {n}")
    g = res.get("greedy") or {}
    if g.get("matches_host") is False:
        typer.echo(f"greedy tokens differ from the host's from position {g.get('first_mismatch')}")
    if json_out:
        typer.echo(f"wrote {json_out}")


@app.command("bench-report")
def bench_report_cmd(
    results: List[Path] = typer.Argument(..., help="Bench result JSON files."),
    markdown: Optional[Path] = typer.Option(None, help="Write the markdown table here."),
    csv: Optional[Path] = typer.Option(None, help="Write a CSV table here."),
    plot: Optional[Path] = typer.Option(None, help="Write a PNG figure here (decode tok/s, TTFT, RSS vs speed)."),
):
    """Tables and plots of bench results."""
    from device_harness.report import render
    from device_harness.schema import load_results

    items = [r for p in results for r in load_results(p)]
    typer.echo(render(items, markdown=markdown, csv_path=csv, plot_path=plot))
    for p in (markdown, csv, plot):
        if p:
            typer.echo(f"wrote {p}")


@app.command("bench-compare")
def bench_compare_cmd(
    base: Path = typer.Argument(..., help="Baseline bench result JSON."),
    new: Path = typer.Argument(..., help="New bench result JSON."),
    max_regression: str = typer.Option("10%", help="Allowed regression per metric, e.g. 10%."),
    include_emulated: bool = typer.Option(False, help="Let emulated results fail the gate too."),
    github_json: Optional[Path] = typer.Option(None, help="Write github-action-benchmark JSON for NEW (F and "
                                                          "F.bigger.json)."),
):
    """Exit 1 when NEW regresses beyond the bound (the whole NEW sample range past BASE's median)."""
    from device_harness.compare import compare, load_pair, parse_bound, write_github_json

    bound = parse_bound(max_regression)
    b, n = load_pair(base, new)
    verdicts, unmatched = compare(b, n, bound, include_emulated=include_emulated)
    for v in verdicts:
        typer.echo(v.line())
    for k in unmatched:
        typer.echo(f"{k}: no baseline result to compare with")
    if github_json:
        s, g = write_github_json(n, github_json)
        typer.echo(f"wrote {s} (customSmallerIsBetter) and {g} (customBiggerIsBetter)")
    bad = [v for v in verdicts if v.gated]
    if bad:
        typer.echo(f"FAILED: {len(bad)} metric(s) regressed by more than {bound:.0%} "
                   "(even the best new sample is past the baseline median)")
        raise typer.Exit(1)
    typer.echo(f"passed: no metric regressed by more than {bound:.0%}")


@harness_app.command("setup-emulator")
def setup_emulator_cmd(
    dir: Path = typer.Option(Path("build/emulator-arm64"), "--dir", help="Project folder for the emulator."),
    suite: str = typer.Option("bookworm", help="Debian suite to debootstrap."),
    mirror: str = typer.Option("http://deb.debian.org/debian", help="Debian mirror."),
    executorch: bool = typer.Option(True, help="Also install the emulator's ExecuTorch runtime (torch 2.10 pair)."),
    force: bool = typer.Option(False, help="Rebuild from scratch."),
):
    """Build the qemu-arm64 device: qemu-user-static + binfmt_misc + debootstrap arm64 + aarch64 wheels."""
    import json

    from device_harness.emulator import setup_emulator

    rec = setup_emulator(dir, suite=suite, mirror=mirror, executorch=executorch, force=force,
                         progress=lambda m: typer.echo(m, err=True))
    typer.echo(json.dumps(rec, indent=1))
    typer.echo(f"ready: cdcda bench ART --device qemu-arm64 --emulator-dir {dir}")
