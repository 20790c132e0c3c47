"""``ios[:udid]``: an iPhone/iPad from a macOS host with Xcode 15+, through ``xcrun devicectl``.

iOS runs no scripts, so the runner is a bench app the user builds (it links the ExecuTorch or
Core ML runtime, reads its arguments, prints one ``PyTorchObserver {json}`` line per run -- the
same line and parser as every other device -- and writes them to ``Documents/cdcda/results.jsonl``;
its peak memory is the app's own ``task_vm_info.phys_footprint`` high-water mark, reported as
``rss_source: "phys_footprint"``, since iOS lets no other process read it).

The protocol, as ``devicectl`` commands (see :meth:`IosDevice.commands`):
install the app, copy the artifact into the app's data container, launch the app with
``--console`` (its stdout comes back), copy ``results.jsonl`` back, terminate.

No iOS device or macOS host is attached here: only the command construction is unit-tested.
"""

from __future__ import annotations

import shlex
import sys
import tempfile
from pathlib import Path
from typing import Callable

from cdcda_export.errors import UserError
from cdcda_export.utils import now_iso

from .. import parsers
from ..schema import BenchConfig, artifact_summary, build_result, greedy_block, make_prompt
from .base import run_local

CONTAINER_DIR = "Documents/cdcda"


class IosDevice:
    kind = "ios"
    emulated = False

    def __init__(self, udid: str | None = None, app: str | None = None, bundle_id: str = "org.cdcda.bench",
                 xcrun: str = "xcrun", timeout: float = 3600):
        self.udid = udid
        self.app = app
        self.bundle_id = bundle_id
        self.xcrun = xcrun
        self.timeout = timeout

    def label(self) -> str:
        return f"ios:{self.udid}" if self.udid else "ios"

    def _dc(self, *args: str) -> list[str]:
        return [self.xcrun, "devicectl", *args]

    def _dev(self) -> list[str]:
        if not self.udid:
            raise UserError("ios needs a device id", field="--device", expected="ios:<udid>",
                            hint="xcrun devicectl list devices")
        return ["--device", self.udid]

    def _container(self) -> list[str]:
        return ["--domain-type", "appDataContainer", "--domain-identifier", self.bundle_id]

    def commands(self, art: Path, cfg: BenchConfig, local_results: Path) -> dict[str, list[str]]:
        """Every devicectl command of one bench, in order."""
        name = Path(art).resolve().name
        remote_art = f"{CONTAINER_DIR}/{name}"
        app_args = ["--artifact", remote_art, "--prompt-file", f"{remote_art}/prompt.json",
                    "--gen-len", str(cfg.gen_len), "--runs", str(cfg.runs), "--warmup", str(cfg.warmup),
                    "--threads", str(cfg.threads), "--out", f"{CONTAINER_DIR}/results.jsonl"]
        return {
            "list": self._dc("list", "devices"),
            "install": self._dc("device", "install", "app", *self._dev(), str(self.app or "<app>")),
            "copy_to": self._dc("device", "copy", "to", *self._dev(), "--source", str(Path(art).resolve()),
                                "--destination", remote_art, *self._container()),
            "launch": self._dc("device", "process", "launch", *self._dev(), "--console", "--terminate-existing",
                               self.bundle_id, *app_args),
            "copy_from": self._dc("device", "copy", "from", *self._dev(), "--source", f"{CONTAINER_DIR}/results.jsonl",
                                  "--destination", str(local_results), *self._container()),
        }

    def bench_native(self, art: Path, manifest: dict, cfg: BenchConfig, *,
                     progress: Callable[[str], None] = lambda m: None) -> dict:
        if sys.platform != "darwin":
            raise UserError("ios devices are driven from macOS with Xcode (xcrun devicectl)",
                            hint="run cdcda bench ART --device ios:<udid> --ios-app Bench.app on a Mac")
        if not self.app:
            raise UserError("ios needs the bench app", field="--ios-app", expected="path to the built .app")
        prompt = make_prompt(art / "tokenizer.json", cfg.prompt_len, cfg.seed)
        with tempfile.TemporaryDirectory(prefix="cdcda-ios-") as tmp:
            staged = Path(tmp) / Path(art).resolve().name
            import shutil

            shutil.copytree(art, staged)
            import json

            (staged / "prompt.json").write_text(json.dumps(prompt))
            results = Path(tmp) / "results.jsonl"
            cmds = self.commands(staged, cfg, results)
            out = ""
            for step in ("install", "copy_to", "launch", "copy_from"):
                progress(f"devicectl {step}")
                res = run_local(cmds[step], timeout=self.timeout, what="xcrun devicectl (Xcode 15+)")
                if res.returncode != 0:
                    raise UserError(f"devicectl {step} failed: {shlex.join(cmds[step])[:300]}\n{res.stderr[-1000:]}")
                if step == "launch":
                    out = res.stdout
            text = results.read_text(encoding="utf-8") if results.exists() else out
        info, runs = parsers.parse_runner_output(text)
        measured = [r for r in runs if not r.get("warmup") and not r.get("error")]
        if not measured:
            raise UserError(f"the bench app printed no measured {parsers.OBSERVER} line")
        dev = {"kind": "ios", "name": (info or {}).get("name", self.udid), "cpu": (info or {}).get("cpu", "unknown"),
               "os": (info or {}).get("os", "iOS"), "arch": (info or {}).get("arch", "arm64"), "emulated": False,
               "udid": self.udid}
        config = {**cfg.to_dict(), "prompt_sha256": prompt["sha256"], "runner": "ios-app:" + self.bundle_id}
        return build_result(device=dev, artifact=artifact_summary(art, manifest), config=config, runs=runs,
                            notes=["peak memory reported by the app (phys_footprint)"],
                            greedy=greedy_block(measured), created_at=now_iso())
