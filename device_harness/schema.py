"""The bench-result contract (ARCHITECTURE.md "Bench result") and the pieces that build it.

A result file is one JSON object::

    {"schema": "cdcda-bench/1", "created_at": ...,
     "device":   {"kind", "name", "cpu", "os", "arch", "emulated": bool, ...},
     "artifact": {manifest summary: "name", "format", "recipe", "user_id", "task", "bytes", ...},
     "config":   {"prompt_len", "gen_len", "runs", "warmup", "threads", "seed", "runner", ...},
     "metrics":  {"load_ms" | "ttft_ms" | "prefill_tok_s" | "decode_tok_s" | "peak_rss_mb" |
                  "artifact_mb": {"min", "median", "max", "samples"}},
     "greedy":   {"tokens", "consistent_across_runs", "matches_host"},
     "runs":     [per-run records, warm-up runs included and flagged], "notes": [...]}

Only measured (non-warm-up) runs feed ``metrics``.
"""

from __future__ import annotations

import hashlib
import json
import random
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cdcda_export.errors import UserError
from cdcda_export.runtime.onnx import ENGINES as ONNX_ENGINES

SCHEMA = "cdcda-bench/1"
METRICS = ("load_ms", "ttft_ms", "prefill_tok_s", "decode_tok_s", "peak_rss_mb", "artifact_mb")
# with an adapter package (``cdcda bench BASE_PACKAGE --adapter PKG``): applying it to the loaded base package,
# and switching to it again from the plain base (a user switch), in ms
ADAPTER_METRICS = ("adapter_load_ms", "adapter_switch_ms")
# direction of "better" per metric (used by compare and the github-action-benchmark export)
HIGHER_IS_BETTER = {"prefill_tok_s": True, "decode_tok_s": True, "load_ms": False, "ttft_ms": False,
                    "peak_rss_mb": False, "artifact_mb": False}
UNITS = {"load_ms": "ms", "ttft_ms": "ms", "prefill_tok_s": "tok/s", "decode_tok_s": "tok/s",
         "peak_rss_mb": "MiB", "artifact_mb": "MB"}
DEVICE_KEYS = ("kind", "name", "cpu", "os", "arch", "emulated")


# runtime engines ``cdcda bench --engine`` takes ("" = the format's default) and the formats they run
ENGINE_FORMATS = {engine: ("onnx",) for engine in ONNX_ENGINES}
ENGINES = ("", *ENGINE_FORMATS)


@dataclass
class BenchConfig:
    prompt_len: int = 64
    gen_len: int = 128
    runs: int = 5
    warmup: int = 1
    threads: int = 0          # 0: the runtime's default
    seed: int = 0
    compare_host: bool = True  # non-host devices: also run once on the host and compare greedy tokens
    engine: str = ""           # "": the format's default runtime; onnx: "onnxruntime-genai" (ORT GenAI's generator)
    adapter: str = ""          # an adapter package applied to a base package (its load and switch times reported)

    def validate(self) -> None:
        problems = []
        if self.prompt_len < 1:
            problems.append(f"--prompt-len {self.prompt_len}: expected >= 1")
        if self.gen_len < 2:
            problems.append(f"--gen-len {self.gen_len}: expected >= 2 (decode speed needs 2+ tokens)")
        if self.runs < 1:
            problems.append(f"--runs {self.runs}: expected >= 1")
        if self.warmup < 0:
            problems.append(f"--warmup {self.warmup}: expected >= 0")
        if self.threads < 0:
            problems.append(f"--threads {self.threads}: expected >= 0 (0 = runtime default)")
        if self.engine not in ENGINES:
            problems.append(f"--engine {self.engine!r}: expected one of {', '.join(repr(e) for e in ENGINES)}")
        if problems:
            from cdcda_export.errors import ValidationErrors

            raise ValidationErrors(problems, hint="cdcda bench --help")

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(samples: list[float | None]) -> dict:
    """``{min, median, max, samples}`` over the non-missing samples (None when there are none)."""
    vals = [float(s) for s in samples if s is not None]
    if not vals:
        return {"min": None, "median": None, "max": None, "samples": []}
    return {"min": min(vals), "median": statistics.median(vals), "max": max(vals), "samples": vals}


# ---------------------------------------------------------------- prompt
def _vocab_and_specials(tokenizer_json: Path) -> tuple[int, set[int]]:
    try:
        tok = json.loads(Path(tokenizer_json).read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise UserError("no tokenizer.json in the artifact", file=str(tokenizer_json),
                        expected="an artifact directory written by `cdcda export`",
                        hint="re-export the artifact: cdcda export ...") from e
    vocab = tok.get("model", {}).get("vocab") or {}
    ids = set(vocab.values()) if isinstance(vocab, dict) else set(range(len(vocab)))
    specials = {int(a["id"]) for a in tok.get("added_tokens", []) if a.get("special", True)}
    size = max(ids | specials) + 1 if (ids or specials) else 0
    return size, specials


def make_prompt(tokenizer_json: Path, length: int, seed: int) -> dict:
    """Prompt token ids fixed by ``seed``: uniform over the tokenizer's non-special ids.

    Same seed + same tokenizer -> same ids on every device, so runs compare.
    """
    size, specials = _vocab_and_specials(tokenizer_json)
    pool = [i for i in range(size) if i not in specials]
    if not pool:
        raise UserError("tokenizer has no regular tokens", file=str(tokenizer_json))
    rng = random.Random(seed)
    ids = [rng.choice(pool) for _ in range(length)]
    digest = hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:16]
    return {"ids": ids, "seed": seed, "sha256": digest}


# ---------------------------------------------------------------- artifact summary
def read_artifact(art: Path) -> dict:
    p = Path(art) / "manifest.json"
    if not p.is_file():
        raise UserError("not an artifact directory: no manifest.json", file=str(art),
                        expected="a directory written by `cdcda export` (model file(s), tokenizer.json, "
                        "manifest.json)", hint="cdcda export --recipe RECIPE --base BASE --out ART")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"manifest.json is not JSON ({e})", file=str(p),
                        hint="re-export the artifact: cdcda export ...") from e


def artifact_bytes(art: Path, manifest: dict) -> int:
    files = manifest.get("files") or {}
    if files:
        return int(sum(int(v.get("bytes", 0)) for v in files.values()))
    return sum(f.stat().st_size for f in Path(art).rglob("*") if f.is_file())


def artifact_summary(art: Path, manifest: dict) -> dict:
    recipe = manifest.get("recipe") or {}
    io = manifest.get("io") or {}
    files = manifest.get("files") or {}
    model_files = {k: v.get("sha256") for k, v in files.items() if not k.endswith((".json", ".jinja", ".txt"))}
    return {
        "name": Path(art).resolve().name,
        "path": str(Path(art).resolve()),
        "format": manifest.get("format"),
        "recipe": recipe.get("name") if isinstance(recipe, dict) else recipe,
        "user_id": manifest.get("user_id"),
        "task": manifest.get("task"),
        "base_model": (manifest.get("base_model") or {}).get("source"),
        "adapter": (manifest.get("adapter") or {}).get("source") if manifest.get("adapter") else None,
        "max_seq_len": io.get("max_seq_len"),
        "bytes": artifact_bytes(art, manifest),
        "model_files": model_files,
        "versions": manifest.get("versions"),
        "created_at": manifest.get("created_at"),
    }


# ---------------------------------------------------------------- result
@dataclass
class DeviceInfo:
    kind: str
    name: str
    cpu: str
    os: str
    arch: str
    emulated: bool
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in DEVICE_KEYS}
        d.update(self.extra)
        return d


def build_result(*, device: dict, artifact: dict, config: dict, runs: list[dict], notes: list[str] | None = None,
                 greedy: dict | None = None, created_at: str | None = None) -> dict:
    measured = [r for r in runs if not r.get("warmup") and not r.get("error")]
    metrics = {k: summarize([r.get(k) for r in measured]) for k in METRICS if k != "artifact_mb"}
    metrics["artifact_mb"] = summarize([artifact["bytes"] / 1e6] * max(len(measured), 1))
    adapter_metrics = {k: summarize([r.get(k) for r in measured]) for k in ADAPTER_METRICS
                       if any(r.get(k) is not None for r in measured)}
    if greedy is None:
        greedy = greedy_block(measured)
    res = {
        "schema": SCHEMA,
        "created_at": created_at,
        "device": device,
        "artifact": artifact,
        "config": config,
        "metrics": {**{k: metrics[k] for k in METRICS}, **adapter_metrics},
        "greedy": greedy,
        "runs": runs,
        "notes": notes or [],
    }
    validate_result(res)
    return res


def greedy_block(measured: list[dict]) -> dict:
    seqs = [r.get("tokens") for r in measured if r.get("tokens") is not None]
    return {
        "tokens": seqs[0] if seqs else None,
        "consistent_across_runs": (all(s == seqs[0] for s in seqs) if seqs else None),
        "matches_host": None,
    }


def validate_result(res: Any, source: str = "<result>") -> None:
    """Raise UserError listing every way ``res`` breaks the contract."""
    problems: list[str] = []
    if not isinstance(res, dict):
        raise UserError("a bench result must be a JSON object", file=source, expected="the output of `cdcda bench --json`")
    for key in ("device", "artifact", "config", "metrics"):
        if not isinstance(res.get(key), dict):
            problems.append(f"missing object {key!r}")
    dev = res.get("device") or {}
    for k in DEVICE_KEYS:
        if k not in dev:
            problems.append(f"device.{k} missing")
    if "emulated" in dev and not isinstance(dev["emulated"], bool):
        problems.append(f"device.emulated must be true/false, got {dev['emulated']!r}")
    for k in ("prompt_len", "gen_len", "runs", "warmup", "threads"):
        if k not in (res.get("config") or {}):
            problems.append(f"config.{k} missing")
    for m in METRICS:
        v = (res.get("metrics") or {}).get(m)
        if not isinstance(v, dict) or not {"min", "median", "max", "samples"} <= set(v):
            problems.append(f"metrics.{m} must be {{min, median, max, samples}}")
    if problems:
        from cdcda_export.errors import ValidationErrors

        raise ValidationErrors(problems, file=source, hint="re-run `cdcda bench ART --device D --json OUT`")


def load_results(path: str | Path) -> list[dict]:
    """A result file (one object, a list of objects, or JSON lines) -> validated results."""
    p = Path(path)
    if not p.is_file():
        raise UserError("no such bench result file", file=str(p), hint="cdcda bench ART --device host --json OUT.json")
    text = p.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
        items = data if isinstance(data, list) else [data]
    except json.JSONDecodeError:
        try:
            items = [json.loads(ln) for ln in text.splitlines() if ln.strip()]
        except json.JSONDecodeError as e:
            raise UserError(f"not JSON ({e})", file=str(p), expected="the output of `cdcda bench --json`") from e
    for it in items:
        validate_result(it, source=str(p))
    return items


def result_key(res: dict) -> str:
    """``artifact@device`` label used by reports and compare."""
    a, d = res["artifact"], res["device"]
    name = a.get("name") or a.get("format") or "artifact"
    dev = d.get("kind") or "device"
    if d.get("kind") not in ("host",) and d.get("name") and d.get("name") != d.get("kind"):
        dev = f"{dev}:{d['name']}"
    engine = (res.get("config") or {}).get("engine")
    return f"{name}{f'+{engine}' if engine else ''}@{dev}"
