"""``export(base, adapter, recipe, out)``: merge -> decoder -> format exporter -> artifact dir.

The flow is flat on purpose:

1. resolve the recipe (name, ``<format>/<name>`` or file; dotted overrides);
2. load the HF base (float32, eager attention) and merge the peft adapter when given;
3. hand an :class:`ExportJob` to the format's exporter (``@register_exporter``), which builds the
   :class:`~cdcda_export.export.decoder.ExportDecoder` with the cache strategy it needs and writes
   its model file(s);
4. copy the tokenizer files, hash everything and write ``manifest.json`` -- all inside a temporary
   directory renamed into place at the end (``utils.atomic_dir``), so an interrupted export never
   leaves a directory that looks complete.

Re-running with the same inputs returns the existing artifact at once.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from ..errors import UserError
from ..runtime.base import manifest_claims
from ..utils import atomic_dir, now_iso, peak_rss_mb, sha256_dir, versions, write_json_atomic
from .manifest import MANIFEST, file_table
from .recipe import Recipe
from .registry import get_exporter, resolve_recipe

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "chat_template.jinja")


@dataclass
class ExportJob:
    """What a format exporter gets. It writes model files into ``out_dir`` and returns an ExportResult dict:
    ``{"io": {"methods", "inputs", "outputs", "kv_cache", ...}, "quantization_applied": {...},
    "extra": {...}}``.
    """

    model: Any                      # HF *ForCausalLM, float32, eval, adapter merged
    recipe: Recipe
    out_dir: Path                   # the (temporary) artifact directory
    work_dir: Path                  # scratch space, deleted afterwards
    base_dir: Path
    progress: Callable[[str], None] = lambda msg: None
    lora: Any = None                # LoraLayout: a base package whose graph takes LoRA A/B inputs (export/lora.py)
    prompt_format: dict | None = None   # io.prompt_format (PromptFormat.describe): how calibration text is formatted
    merged_adapter: bool = False    # a LoRA is merged into ``model`` (its weights are off the base's grid)
    _merged_dir: Path | None = field(default=None, repr=False)

    def decoder(self, cache="io", **kwargs):
        """The export-ready decoder over this job's (merged) weights; with ``lora`` set, its targeted linears
        take LoRA A/B inputs after the cache strategy's inputs."""
        from .decoder import ExportDecoder

        dec = ExportDecoder.from_hf(self.model, max_seq_len=self.recipe.max_seq_len, cache=cache, **kwargs)
        if self.lora is not None:
            from .lora import attach

            attach(dec, self.lora)
        return dec

    def merged_hf_dir(self) -> Path:
        """The merged model saved as a HF directory (for tools that read one, e.g. ORT GenAI's builder)."""
        if self._merged_dir is None:
            d = self.work_dir / "merged"
            self.model.save_pretrained(d, safe_serialization=True)
            for name in TOKENIZER_FILES:
                if (self.base_dir / name).is_file():
                    shutil.copy2(self.base_dir / name, d / name)
            self._merged_dir = d
        return self._merged_dir


# ----------------------------------------------------------------------------- inputs


def check_model_dir(path: Path) -> None:
    if not (path / "config.json").is_file():
        found = sorted(p.name for p in path.iterdir())[:10] if path.is_dir() else "nothing (no such directory)"
        raise UserError(f"not a Hugging Face model directory: no config.json (found {found})", file=str(path),
                        hint="pass a Hugging Face model directory or a .gguf file as --base; the real "
                             "SmolLM2-135M-Instruct: `cdcda init-model --arch smollm2-135m-instruct --out DIR`")
    if not (path / "tokenizer.json").is_file():
        raise UserError("no tokenizer.json (a fast tokenizer is needed on device)", file=str(path),
                        hint="save the tokenizer with tokenizer.save_pretrained(DIR)")


def check_adapter_dir(path: Path) -> None:
    if not (path / "adapter_config.json").is_file():
        found = sorted(p.name for p in path.iterdir())[:10] if path.is_dir() else "nothing (no such directory)"
        raise UserError(f"not a peft adapter directory: no adapter_config.json (found {found})", file=str(path),
                        hint="train one with `cdcda train ...`")


def _load_adapter(model, adapter: Path):
    """peft adapter onto ``model``; a damaged weights file is a UserError naming it, not a traceback."""
    from peft import PeftModel

    from ..train.modeling import check_adapter_weights

    check_adapter_weights(adapter)   # config vs weights (rank, targets); a damaged file is named there too
    weights = adapter / "adapter_model.safetensors"
    try:
        from safetensors import safe_open

        if weights.is_file():
            with safe_open(str(weights), framework="pt") as f:
                list(f.keys())
        return PeftModel.from_pretrained(model, adapter)
    except Exception as e:  # noqa: BLE001 - safetensors raises SafetensorError/OSError on a truncated file
        if type(e).__name__ in ("SafetensorError", "HeaderTooLarge", "OSError") or "safetensors" in str(e).lower():
            raise UserError(f"adapter weights cannot be read ({type(e).__name__}: {e})", file=str(weights),
                            expected="a complete safetensors file written by `cdcda train` / peft",
                            hint="retrain the user's adapter with `cdcda train ... --force`") from None
        raise


def load_merged_model(base: str | Path, adapter: str | Path | None = None):
    """HF causal LM in float32 with eager attention, with the peft adapter merged when given."""
    import torch
    from transformers import AutoModelForCausalLM

    from ..models.gguf import resolve_base

    base = resolve_base(base)
    check_model_dir(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, attn_implementation="eager")
    if adapter is not None:
        adapter = Path(adapter)
        check_adapter_dir(adapter)
        model = _load_adapter(model, adapter).merge_and_unload()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def base_mismatch(adapter: Path, base_sha: str, allow: bool, hint: str) -> str | None:
    """None when ``adapter``'s training.json names the base ``base_sha`` (or names none); else the problem, which
    is a UserError with ``hint`` unless ``allow`` (then the caller records it)."""
    from ..train.modeling import check_adapter_provenance

    try:
        check_adapter_provenance(adapter, base_sha)
        return None
    except UserError as e:
        problem = str(e).split("\n  next:")[0]
        if not allow:
            raise UserError(problem, hint=hint) from None
        return problem


def adapter_provenance(adapter: Path | None) -> tuple[str | None, str | None]:
    """(user_id, task) from the adapter's ``training.json``; user_id falls back to the folder name."""
    if adapter is None:
        return None, None
    meta = {}
    tj = adapter / "training.json"
    if tj.is_file():
        try:
            meta = json.loads(tj.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            meta = {}
    return str(meta.get("user_id") or adapter.name), meta.get("task")


def artifact_prompt_format(base: Path, adapter: Path | None) -> dict:
    """``io.prompt_format``: how the app formats a prompt (``train.format.PromptFormat.describe``): the
    format the adapter's training.json records (plain before it was recorded), else auto on the base."""
    from transformers import AutoTokenizer

    from ..train.format import recorded_prompt_format, resolve_prompt_format

    kind = "auto"
    if adapter is not None:
        tj = adapter / "training.json"
        try:
            kind = recorded_prompt_format(json.loads(tj.read_text(encoding="utf-8")) if tj.is_file() else None)
        except json.JSONDecodeError:
            kind = "plain"
    return resolve_prompt_format(AutoTokenizer.from_pretrained(str(base)), kind, base).describe()


# ----------------------------------------------------------------------------- progress


@contextmanager
def _progress(enabled: bool, total: int) -> Iterator[Callable[..., None]]:
    """``step(msg)`` advances one stage; ``step(msg, advance=False)`` only updates the text (exporters)."""
    if not enabled:
        yield lambda msg, advance=True: None
        return
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(SpinnerColumn(), TextColumn("[bold]export[/] {task.description}"), BarColumn(),
                  TimeElapsedColumn(), transient=False) as prog:
        task = prog.add_task("starting", total=total)

        def step(msg: str, advance: bool = True) -> None:
            prog.update(task, description=msg, advance=1 if advance else 0)

        yield step
        prog.update(task, description="done", completed=total)


# ----------------------------------------------------------------------------- export


def _same_inputs(out: Path, recipe_resolved: dict, base_sha: str, adapter_sha: str | None,
                 lora: dict | None = None) -> bool:
    mp = out / MANIFEST
    if not mp.is_file():
        return False
    try:
        m = json.loads(mp.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return False
    return (m.get("recipe", {}).get("resolved") == recipe_resolved and m.get("base_model", {}).get("sha256") == base_sha
            and (m.get("adapter") or {}).get("sha256") == adapter_sha and m.get("lora") == lora)


def _check_writable(out: Path) -> None:
    """UserError naming ``--out`` when its parent cannot be created or written (checked before any work)."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        probe = Path(tempfile.mkdtemp(prefix=f".{out.name}.probe-", dir=out.parent))
        probe.rmdir()
    except OSError as e:
        raise UserError(f"cannot be written: {e.strerror or e} ({e.filename or out.parent})", file=str(out),
                        field="--out", expected="a path in a writable directory",
                        hint="choose another --out, or fix the permissions of its parent directory") from None


def export(base: str | Path, adapter: str | Path | None, recipe: str | Path | Recipe, out: str | Path, *,
           overwrite: bool = False, progress: bool = True, overrides: list[str] | None = None,
           allow_base_mismatch: bool = False, lora=None) -> Path:
    """Export ``base`` (+ ``adapter``) with ``recipe`` into the artifact directory ``out``; returns ``out``.

    An adapter whose ``training.json`` names another base (sha256) or is damaged is refused before any work;
    ``allow_base_mismatch`` exports anyway and records it in the manifest (``adapter.base_mismatch``).
    ``lora`` (a :class:`~cdcda_export.export.lora.LoraLayout`, no adapter): a **base package** whose graph
    takes each user's LoRA weights as inputs (manifest ``delivery: base-package``, ``lora``); see
    :mod:`cdcda_export.export.packages`."""
    import torch

    from ..models.gguf import base_provenance, resolve_base

    t0 = time.perf_counter()
    base, out = resolve_base(base), Path(out)
    adapter = Path(adapter) if adapter is not None else None
    if isinstance(recipe, Recipe):
        rec, recipe_src = recipe, None
    else:
        rec, recipe_src = resolve_recipe(recipe, overrides)
    check_model_dir(base)
    if adapter is not None:
        check_adapter_dir(adapter)
    exporter = get_exporter(rec.format)   # unknown/missing format fails before any heavy work
    resolved = rec.to_dict()
    base_sha = sha256_dir(base)
    adapter_sha = sha256_dir(adapter) if adapter is not None else None
    mismatch = None
    if adapter is not None:
        mismatch = base_mismatch(adapter, base_sha, allow_base_mismatch,
                                 "pass the --base the adapter was trained on, or --allow-base-mismatch to export "
                                 "anyway (recorded in the manifest)")
    if lora is not None and adapter is not None:
        raise UserError("a base package is built without an adapter (users' adapters become adapter packages)",
                        field="--adapter", hint="build the base package first, then `cdcda export --adapter-only`")
    lora_dict = lora.to_dict() if lora is not None else None
    if out.exists() and not overwrite:
        if _same_inputs(out, resolved, base_sha, adapter_sha, lora_dict):
            return out
        raise UserError("output directory already exists (from other inputs)", file=str(out),
                        hint="pass --force to replace it, or choose another --out")
    _check_writable(out)
    user_id, task = adapter_provenance(adapter)
    prompt_format = artifact_prompt_format(base, adapter)

    with _progress(progress, total=4) as step, atomic_dir(out, overwrite=overwrite) as tmp, \
            tempfile.TemporaryDirectory(prefix=".cdcda-export-work-", dir=out.parent) as work:
        step("loading base" + (" + merging adapter" if adapter else ""))
        model = load_merged_model(base, adapter)
        step(f"exporting {rec.format}/{rec.name}")
        job = ExportJob(model=model, recipe=rec, out_dir=tmp, work_dir=Path(work), base_dir=base,
                        progress=lambda msg: step(msg, advance=False), lora=lora, prompt_format=prompt_format,
                        merged_adapter=adapter is not None)
        with torch.no_grad():
            result = exporter(job) or {}
        step("writing tokenizer + manifest")
        for name in TOKENIZER_FILES:
            if (base / name).is_file() and not (tmp / name).exists():
                shutil.copy2(base / name, tmp / name)
        cfg = model.config
        gen = getattr(model, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None) if gen is not None else None
        eos = eos if eos is not None else cfg.eos_token_id
        eos_ids = [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None]
        bos = getattr(gen, "bos_token_id", None) if gen is not None else None
        bos = bos if bos is not None else getattr(cfg, "bos_token_id", None)
        io = {"methods": ["forward"], "inputs": {}, "outputs": {}, "kv_cache": {},
              "max_seq_len": rec.max_seq_len, "prefill_len": rec.prefill_len,
              "vocab_size": int(cfg.vocab_size), "eos_token_ids": eos_ids,
              "bos_token_id": None if bos is None else int(bos), "model_type": cfg.model_type,
              "prompt_format": prompt_format}
        io.update(result.get("io", {}))
        eot = prompt_format.get("end_of_turn_token_id")
        if eot is not None and int(eot) not in io["eos_token_ids"]:
            io["eos_token_ids"] = [*io["eos_token_ids"], int(eot)]   # a chat answer ends with end-of-turn
        manifest = {
            "format": rec.format,
            "recipe": {"name": rec.name, "source": str(recipe_src) if recipe_src else None, "resolved": resolved},
            "files": file_table(tmp),
            "base_model": {"source": str(base.resolve()), "sha256": base_sha,
                           "provenance": base_provenance(base)},
            "adapter": ({"source": str(adapter.resolve()), "sha256": adapter_sha,
                         **({"base_mismatch": mismatch} if mismatch else {})} if adapter is not None else None),
            "user_id": user_id,
            "task": task,
            "io": io,
            "versions": versions(),
            "created_at": now_iso(),
            "export": {"seconds": round(time.perf_counter() - t0, 2), "peak_rss_mb": round(peak_rss_mb(), 1)},
            "quantization_applied": result.get("quantization_applied", {}),
        }
        if lora is not None:
            manifest["delivery"] = "base-package"
            manifest["lora"] = lora_dict
        if result.get("extra"):
            manifest["export"].update(result["extra"])
        # digests of what the artifact claims to be: a later hand edit of these fields is named on load
        manifest["claims_sha256"] = manifest_claims(json.loads(json.dumps(manifest, default=str)))
        write_json_atomic(tmp / MANIFEST, manifest)
        step("done")
        del model, job
    return out
