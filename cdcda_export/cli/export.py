"""Export verbs: ``cdcda export``, ``cdcda recipes``, ``cdcda generate``."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from . import app


@app.command("export")
def export_cmd(
    base: Path = typer.Option(..., help="Base model: HF directory or .gguf file (converted once, cached by content hash)."),
    recipe: str = typer.Option(..., help="Recipe name (e.g. onnx/int4, xnnpack-8da4w) or a recipe YAML file."),
    out: Path = typer.Option(..., help="Artifact directory to write."),
    adapter: Optional[Path] = typer.Option(None, help="peft LoRA adapter directory to merge first."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Recipe override KEY.PATH=VALUE (repeatable)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing artifact directory."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress display."),
    allow_base_mismatch: bool = typer.Option(
        False, "--allow-base-mismatch",
        help="Export even though the adapter's training.json names another base (recorded in the manifest)."),
    base_package: bool = typer.Option(
        False, "--base-package",
        help="Write a base package to --out: the base once, its graph taking each user's LoRA weights as inputs "
             "(no --adapter; layout from --lora-rank/--lora-targets)."),
    adapter_only: bool = typer.Option(
        False, "--adapter-only",
        help="Write the --adapter as a small adapter package to --out, for the base package --base-package-dir "
             "(or one built once and cached for this base, recipe and LoRA layout)."),
    base_package_dir: Optional[Path] = typer.Option(
        None, "--base-package-dir", help="With --adapter-only: the base package the adapter package is for."),
    lora_rank: Optional[int] = typer.Option(
        None, "--lora-rank", help="LoRA rank a base package takes (ONNX takes any rank; default: the adapter's, else 8)."),
    lora_targets: Optional[str] = typer.Option(
        None, "--lora-targets", help="Comma-separated LoRA targets of a base package (default: all of q,k,v,o,"
                                     "gate,up,down_proj)."),
    lora_dtype: Optional[str] = typer.Option(
        None, "--lora-dtype", help="Precision of the LoRA inputs: float16 | float32 (default: float16; float32 "
                                   "for unquantized recipes, whose fp32 gate an fp16 delta would exceed)."),
):
    """Merge the adapter, quantize and export by recipe into an artifact dir with manifest.json.

    Adapter delivery: `--base-package` writes the base once per (base, recipe, LoRA layout);
    `--adapter-only --adapter A` writes one user's adapter package (the format's adapter file + manifest
    naming the base package's hash) in well under a second."""
    import json
    import time

    from ..export.api import export

    t0 = time.time()
    if base_package or adapter_only:
        _adapter_delivery(base, recipe, out, adapter, set_, force, quiet, allow_base_mismatch, base_package,
                          adapter_only, base_package_dir, lora_rank, lora_targets, lora_dtype)
        return
    p = export(base, adapter, recipe, out, overwrite=force, progress=not quiet, overrides=set_ or None,
               allow_base_mismatch=allow_base_mismatch)
    m = json.loads((p / "manifest.json").read_text())
    size = sum(v["bytes"] for v in m["files"].values()) / 1e6
    verb = "up to date (same base, adapter and recipe)" if (p / "manifest.json").stat().st_mtime < t0 else "wrote"
    typer.echo(f"{verb}: {p} ({m['format']}/{m['recipe']['name']}, {size:.1f} MB, "
               f"{m['export']['seconds']:.0f} s, peak RSS {m['export']['peak_rss_mb']:.0f} MB)")


def _adapter_delivery(base, recipe, out, adapter, set_, force, quiet, allow_base_mismatch, base_package, adapter_only,
                      base_package_dir, lora_rank, lora_targets, lora_dtype):
    import json

    from ..errors import UserError
    from ..export.lora import ALL_TARGETS, LoraLayout
    from ..export.packages import adapter_package, base_package as build_base

    if base_package and adapter_only:
        raise UserError("--base-package and --adapter-only are two steps", field="--adapter-only",
                        hint="build the base package first, then one adapter package per user")
    if adapter_only and adapter is None:
        raise UserError("--adapter-only needs --adapter (the user's peft adapter)", field="--adapter")
    if base_package and adapter is not None:
        raise UserError("a base package takes no --adapter", field="--adapter",
                        hint="drop --adapter; then `cdcda export --adapter-only --adapter A ...` per user")
    targets = tuple(t.strip() for t in lora_targets.split(",") if t.strip()) if lora_targets else None
    if lora_dtype is None:
        from ..export.registry import resolve_recipe

        scheme = resolve_recipe(recipe, set_ or None)[0].quantization.scheme
        lora_dtype = "float32" if scheme == "none" else "float16"
    if adapter is not None:
        need = LoraLayout.of_adapter(adapter, dtype=lora_dtype)
        layout = LoraLayout(rank=lora_rank or need.rank, targets=targets or ALL_TARGETS, dtype=lora_dtype)
    else:
        layout = LoraLayout(rank=lora_rank or 8, targets=targets or ALL_TARGETS, dtype=lora_dtype)
    if base_package:
        p = build_base(base, recipe, layout, out, overrides=set_ or None, progress=not quiet, overwrite=force)
        m = json.loads((p / "manifest.json").read_text())
        size = sum(v["bytes"] for v in m["files"].values()) / 1e6
        typer.echo(f"base package: {p} ({m['format']}/{m['recipe']['name']}, {size:.1f} MB, LoRA rank "
                   f"{layout.rank}, targets {','.join(layout.targets)}, {m['export']['seconds']:.0f} s)")
        return
    bp = base_package_dir or build_base(base, recipe, layout, None, overrides=set_ or None, progress=not quiet)
    p = adapter_package(bp, adapter, out, overwrite=force, allow_base_mismatch=allow_base_mismatch)
    m = json.loads((p / "manifest.json").read_text())
    size = sum(v["bytes"] for v in m["files"].values()) / 1e6
    typer.echo(f"adapter package: {p} ({size:.2f} MB, rank {m['adapter']['rank']}, {m['export']['seconds']:.2f} s) "
               f"for base package {bp}")


@app.command("recipes")
def recipes_cmd():
    """List the shipped recipes: name, format, quantization, target, whether it runs on this host, what it
    is for, and the fidelity gate `cdcda check` holds its artifacts to (the scheme's defaults, with the
    recipe's own thresholds marked *). A table on wide terminals; one block per recipe below 120 columns."""
    from rich.console import Console
    from rich.markup import escape
    from rich.padding import Padding
    from rich.table import Table

    from ..export.registry import list_recipes

    rows = []
    for e in list_recipes():
        r = e.recipe
        q = r.quantization
        qs = q.scheme + (f" b{q.block_size or q.group_size}" if (q.block_size or q.group_size) else "")
        rows.append((e.key, r.format, qs, r.target, "yes" if r.runs_on_this_host() else "no (needs macOS)",
                     r.description + "\ngate: " + recipe_gate(r)))
    console = Console()
    if console.width >= 120:
        t = Table("recipe", "format", "quantization", "target", "runs here")
        for c in t.columns:
            c.no_wrap = True
        t.add_column("description", overflow="fold", ratio=1)   # whole: known risks (e.g. #2716) are in it
        for row in rows:
            t.add_row(*(escape(x) for x in row))
        console.print(t)
        return
    for key, fmt, qs, target, here, desc in rows:   # narrow: every field readable, the description wrapped
        console.print(f"[bold]{escape(key)}[/]  {escape(fmt)}, {escape(qs)}, {escape(target)}, "
                      f"runs here: {escape(here)}")
        console.print(Padding(escape(desc), (0, 0, 1, 2), expand=False))


_GATE_LABELS = {"top1_agreement": "top-1", "mean_kl": "KL", "max_abs_logit_err": "max|dlogit|",
                "greedy_match_rate": "greedy", "greedy_match_rate_free": "free greedy", "ppl_ratio": "ppl x",
                "task_metric_drop": "task drop"}


def recipe_gate(recipe) -> str:
    """The thresholds `cdcda check` applies to this recipe's artifacts (check/thresholds.py: scheme defaults,
    then the recipe's ``thresholds``), one line; * marks a threshold the recipe sets itself."""
    from ..check.thresholds import DIRECTION, GATED, resolve_thresholds

    values, sources = resolve_thresholds({"format": recipe.format, "recipe": {"resolved": recipe.to_dict()}})
    parts = []
    for m in GATED:
        v = values.get(m)
        if v is None:
            continue
        op = "<=" if DIRECTION[m] == "max" else ">="
        parts.append(f"{_GATE_LABELS[m]} {op} {v:g}{'*' if sources.get(m) == 'recipe' else ''}")
    return ", ".join(parts) + ("  (* set by the recipe)" if any(p.endswith("*") for p in parts) else "")


@app.command("generate")
def generate_cmd(
    artifact: Path = typer.Argument(..., help="Artifact directory (from `cdcda export`)."),
    prompt: str = typer.Option(..., help="Prompt text."),
    max_new_tokens: int = typer.Option(64, help="Tokens to generate (greedy)."),
    threads: Optional[int] = typer.Option(None, help="CPU threads for the runtime."),
    adapter: Optional[Path] = typer.Option(None, help="Adapter package (`cdcda export --adapter-only`) to apply "
                                                      "to ARTIFACT, a base package."),
    chat: bool = typer.Option(False, "--chat", help="Send the prompt as one user turn of the model's chat template "
                                                    "(the manifest's io.prompt_format, as the app does; else the "
                                                    "template in the artifact's tokenizer files) and print the answer."),
):
    """Greedy generation through the artifact's runtime; prints the text and tokens/s."""
    from ..errors import UserError
    from ..runtime import greedy_generate, load, load_tokenizer
    from ..runtime.base import RuntimeUnavailable

    try:
        runner = load(artifact, threads=threads, adapter=adapter)
    except FileNotFoundError as e:
        raise UserError(str(e)) from None
    except RuntimeUnavailable as e:
        raise UserError(str(e), file=str(artifact)) from None
    tok = load_tokenizer(artifact)
    io = runner.manifest.get("io", {})
    eos = list(io.get("eos_token_ids") or ())
    if chat:
        fmt = _chat_format(artifact, io)
        # a chat text carries its own special tokens: tokenized as apply_chat_template does, nothing added
        ids = tok.encode(fmt.text(prompt), add_special_tokens=False).ids
        if fmt.end_of_turn_id is not None and fmt.end_of_turn_id not in eos:
            eos.append(fmt.end_of_turn_id)
    else:
        ids = tok.encode(prompt).ids   # tokenizer.json's own post-processor adds BOS where the model wants it
    res = greedy_generate(runner, ids, max_new_tokens, eos_ids=eos)
    answer = tok.decode(res.tokens)   # special tokens (the end of turn) skipped
    typer.echo(answer if chat else prompt + answer)
    typer.secho(f"[{len(ids)} prompt tokens, {len(res.tokens)} new; TTFT {res.ttft_s * 1000:.1f} ms, "
                f"prefill {res.prefill_tok_s:.1f} tok/s, decode {res.decode_tok_s:.1f} tok/s]", err=True)


def _chat_format(artifact: Path, io: dict):
    """The chat prompt format of an artifact: its manifest's ``io.prompt_format`` when that is chat, else
    the chat template in its tokenizer files (UserError when it has none)."""
    from ..errors import UserError
    from ..train.format import PromptFormat, chat_format

    fmt = PromptFormat.from_dict(io.get("prompt_format"))
    if fmt.kind == "chat":
        return fmt
    from transformers import AutoTokenizer

    fmt = chat_format(AutoTokenizer.from_pretrained(str(artifact)))
    if fmt is None:
        raise UserError("--chat, but the artifact's tokenizer has no chat template",
                        file=str(artifact / "tokenizer_config.json"), field="chat_template",
                        hint="drop --chat to send the prompt as raw text")
    if (io.get("prompt_format") or {}).get("format") == "plain":
        typer.secho("note: this artifact records plain prompts (its adapter was trained without the chat template)",
                    err=True)
    return fmt
