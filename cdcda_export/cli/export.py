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
):
    """Merge the adapter, quantize and export by recipe into an artifact dir with manifest.json."""
    import json
    import time

    from ..export.api import export

    t0 = time.time()
    p = export(base, adapter, recipe, out, overwrite=force, progress=not quiet, overrides=set_ or None,
               allow_base_mismatch=allow_base_mismatch)
    m = json.loads((p / "manifest.json").read_text())
    size = sum(v["bytes"] for v in m["files"].values()) / 1e6
    verb = "up to date (same base, adapter and recipe)" if (p / "manifest.json").stat().st_mtime < t0 else "wrote"
    typer.echo(f"{verb}: {p} ({m['format']}/{m['recipe']['name']}, {size:.1f} MB, "
               f"{m['export']['seconds']:.0f} s, peak RSS {m['export']['peak_rss_mb']:.0f} MB)")


@app.command("recipes")
def recipes_cmd():
    """List the shipped recipes: name, format, quantization, target, and whether it runs on this host."""
    from rich.console import Console
    from rich.table import Table

    from ..export.registry import list_recipes

    t = Table("recipe", "format", "quantization", "target", "runs here")
    t.add_column("description", overflow="fold", max_width=60)   # whole: known risks (e.g. #2716) are in it
    for e in list_recipes():
        r = e.recipe
        q = r.quantization
        qs = q.scheme + (f" b{q.block_size or q.group_size}" if (q.block_size or q.group_size) else "")
        t.add_row(e.key, r.format, qs, r.target, "yes" if r.runs_on_this_host() else "no (needs macOS)",
                  r.description)
    Console().print(t)


@app.command("generate")
def generate_cmd(
    artifact: Path = typer.Argument(..., help="Artifact directory (from `cdcda export`)."),
    prompt: str = typer.Option(..., help="Prompt text."),
    max_new_tokens: int = typer.Option(64, help="Tokens to generate (greedy)."),
    threads: Optional[int] = typer.Option(None, help="CPU threads for the runtime."),
):
    """Greedy generation through the artifact's runtime; prints the text and tokens/s."""
    from ..errors import UserError
    from ..runtime import greedy_generate, load, load_tokenizer
    from ..runtime.base import RuntimeUnavailable

    try:
        runner = load(artifact, threads=threads)
    except FileNotFoundError as e:
        raise UserError(str(e)) from None
    except RuntimeUnavailable as e:
        raise UserError(str(e), file=str(artifact)) from None
    tok = load_tokenizer(artifact)
    ids = tok.encode(prompt).ids   # tokenizer.json's own post-processor adds BOS where the model wants it
    io = runner.manifest.get("io", {})
    res = greedy_generate(runner, ids, max_new_tokens, eos_ids=io.get("eos_token_ids") or ())
    typer.echo(prompt + tok.decode(res.tokens))
    typer.secho(f"[{len(ids)} prompt tokens, {len(res.tokens)} new; TTFT {res.ttft_s * 1000:.1f} ms, "
                f"prefill {res.prefill_tok_s:.1f} tok/s, decode {res.decode_tok_s:.1f} tok/s]", err=True)
