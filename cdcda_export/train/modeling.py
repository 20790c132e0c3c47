"""Loading base models and adapters from local directories (safetensors only), LoRA target discovery."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

from ..errors import UserError

INIT_HINT = ("point --base at a Hugging Face model directory or a .gguf file; the real SmolLM2-135M-Instruct: "
             "`cdcda init-model --arch smollm2-135m-instruct --out DIR` (random weights: `--arch tiny`)")
TRAIN_HINT = "train one first: `cdcda train --base DIR --task T --questions Q --outputs O --out ADAPTERS`"
# Linear layers that are never LoRA targets by default (output head, classifier heads).
_NOT_TARGETS = {"lm_head", "score", "classifier"}


def check_base_dir(base: str | Path) -> Path:
    """The base model directory, or a UserError naming what is missing. A ``.gguf`` file is converted
    once into a cached HF directory (:func:`cdcda_export.models.gguf.resolve_base`)."""
    from ..models.gguf import resolve_base

    p = resolve_base(base)
    if not p.is_dir():
        raise UserError("base model directory not found", file=str(p), field="--base", hint=INIT_HINT)
    if not (p / "config.json").is_file():
        raise UserError("no config.json: not a Hugging Face model directory", file=str(p), field="--base",
                        expected="config.json, *.safetensors and tokenizer files", hint=INIT_HINT)
    if not any(p.glob("*.safetensors")):
        found = sorted(x.name for x in p.iterdir())[:10]
        raise UserError(f"no *.safetensors weights (found {found}); only safetensors checkpoints are loaded",
                        file=str(p), field="--base", expected="model.safetensors or sharded *.safetensors",
                        hint="convert the checkpoint to safetensors (transformers: save_pretrained(safe_serialization=True))")
    return p


def check_adapter_dir(adapter: str | Path) -> Path:
    p = Path(adapter)
    if not (p / "adapter_config.json").is_file() or not (p / "adapter_model.safetensors").is_file():
        raise UserError("not a LoRA adapter directory", file=str(p), field="--adapter",
                        expected="adapter_config.json and adapter_model.safetensors (peft, safetensors)",
                        hint=TRAIN_HINT)
    check_adapter_weights(p)
    return p


def _damaged_weights(weights: Path, e: Exception) -> UserError:
    return UserError(f"adapter weights cannot be read ({type(e).__name__}: {e})", file=str(weights),
                     expected="a complete safetensors file written by `cdcda train` / peft",
                     hint="retrain the user's adapter with `cdcda train ... --force`")


def check_adapter_weights(adapter: str | Path) -> None:
    """UserError when ``adapter_config.json`` and ``adapter_model.safetensors`` disagree.

    peft trusts the config: weights of a larger or smaller rank fail deep inside ``load_state_dict``, weights
    for modules the config does not target are dropped with a warning, and targets without weights stay at
    their zero init -- an adapter that silently does less than it was trained to. Only the safetensors header
    is read (shapes, not tensors). Checked: ``r`` (and ``rank_pattern``) against every ``lora_A`` rank, each
    weight's module against ``target_modules`` (a list, or a regex string; "all-linear" is not checked), and
    every listed target having weights.
    """
    import json
    import re

    p = Path(adapter)
    cfg_path, weights = p / "adapter_config.json", p / "adapter_model.safetensors"
    if not cfg_path.is_file() or not weights.is_file():
        return
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"not valid JSON ({e})", file=str(cfg_path), hint=TRAIN_HINT) from None
    if not isinstance(cfg, dict):
        raise UserError(f"a JSON {type(cfg).__name__}, not an object", file=str(cfg_path), hint=TRAIN_HINT)
    try:
        from safetensors import safe_open

        with safe_open(str(weights), framework="np") as f:
            shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - SafetensorError / OSError on a damaged file
        raise _damaged_weights(weights, e) from None
    # module path -> rank (from lora_A [r, in] / lora_embedding_A [r, num_embeddings])
    ranks: dict[str, int] = {}
    for k, shape in shapes.items():
        m = re.match(r"^(?:base_model\.model\.)?(.+)\.(lora_A|lora_embedding_A)(?:\.[^.]+)?(?:\.weight)?$", k)
        if m and shape:
            ranks[m.group(1)] = int(shape[0])
    if not ranks:
        raise UserError("no LoRA weights (no lora_A tensors) in the file", file=str(weights),
                        expected=f"lora_A/lora_B tensors for {cfg.get('target_modules')}", hint=TRAIN_HINT)
    hint = ("the config and the weights come from different adapters (or one was edited); restore the pair "
            "`cdcda train` wrote, or retrain with `cdcda train ... --force`")
    r = cfg.get("r")
    pattern = cfg.get("rank_pattern") or {}
    for mod, got in sorted(ranks.items()):
        want = next((v for pat, v in pattern.items() if re.match(rf"(.*\.)?({pat})$", mod)), r)   # peft's rule
        if isinstance(want, int) and got != want:
            raise UserError(f"says rank {want}, but {weights.name} holds rank-{got} LoRA weights for {mod}",
                            file=str(cfg_path), field="r" if want == r else f"rank_pattern.{mod}",
                            expected=f"r = {got}, the rank of the weights", hint=hint)
    targets = cfg.get("target_modules")
    if isinstance(targets, (list, tuple)):
        names = [str(t) for t in targets]
        stray = sorted({m for m in ranks if not any(m == t or m.endswith("." + t) for t in names)})
        if stray:
            leaves = sorted({m.rsplit(".", 1)[-1] for m in stray})
            raise UserError(f"target_modules {sorted(names)} does not include {leaves}, but {weights.name} holds "
                            f"LoRA weights for them (e.g. {stray[0]}); peft would drop them silently",
                            file=str(cfg_path), field="target_modules", expected=f"names covering {leaves}",
                            hint=hint)
        missing = sorted(t for t in names if not any(m == t or m.endswith("." + t) for m in ranks))
        if missing:
            raise UserError(f"target_modules lists {missing}, but {weights.name} has no LoRA weights for them; "
                            "peft would leave them at their zero init silently", file=str(cfg_path),
                            field="target_modules", expected=f"only modules with weights "
                            f"({sorted({m.rsplit('.', 1)[-1] for m in ranks})})", hint=hint)
    elif isinstance(targets, str) and targets != "all-linear":
        stray = sorted(m for m in ranks if not re.fullmatch(targets, m))
        if stray:
            raise UserError(f"target_modules regex {targets!r} does not match {stray[0]}, which "
                            f"{weights.name} holds LoRA weights for", file=str(cfg_path), field="target_modules",
                            hint=hint)


def check_adapter_provenance(adapter: Path, base_sha: str, task: str | None = None) -> None:
    """UserError when the adapter's training.json names another task or another base model hash."""
    import json

    tj = adapter / "training.json"
    if not tj.is_file():
        return  # a peft adapter from elsewhere: nothing recorded to check against
    meta = json.loads(tj.read_text(encoding="utf-8"))
    if task is not None and meta.get("task") not in (None, task):
        raise UserError(f"adapter was trained for {meta.get('task')}, not {task}", file=str(tj), field="task",
                        hint="pass the --task the adapters were trained for")
    rec = (meta.get("base_model") or {}).get("sha256")
    if rec and rec != base_sha:
        raise UserError("adapter was trained on a different base model (sha256 differs)", file=str(tj),
                        field="base_model.sha256", expected=f"{rec[:12]}... (the base it was trained on)",
                        hint=f"pass --base {(meta.get('base_model') or {}).get('source')}, or retrain with --force")


def load_tokenizer(base: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(base))


def load_base(base: str | Path, dtype: str = "float32"):
    """(model in eval mode, tokenizer) from a local HF directory; safetensors weights only."""
    import torch
    from transformers import AutoModelForCausalLM

    p = check_base_dir(base)
    model = AutoModelForCausalLM.from_pretrained(str(p), dtype=getattr(torch, dtype), use_safetensors=True)
    model.eval()
    return model, load_tokenizer(p)


def linear_module_names(model) -> list[str]:
    """Leaf names of every nn.Linear in the model except output heads, in order of appearance."""
    import torch

    names: list[str] = []
    for full, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            leaf = full.rsplit(".", 1)[-1]
            if leaf not in _NOT_TARGETS and leaf not in names:
                names.append(leaf)
    return names


def resolve_target_modules(model, requested: list[str] | None) -> list[str]:
    """Default: all attention + MLP linears found in the model (q/k/v/o + gate/up/down, or fused
    qkv_proj / gate_up_proj for Phi-3). Requested names must exist; output heads and embeddings are
    refused when tied (a merge would change the shared embedding matrix)."""
    available = linear_module_names(model)
    if not requested:
        if not available:
            raise UserError("no linear layers found to adapt", field="--target-modules")
        return available
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    bad = [n for n in requested if n not in available and not (n in {"lm_head"} and not tied)]
    if bad:
        raise UserError(f"target module(s) {bad} not found in this model", field="--target-modules",
                        expected=f"names among {available}" + ("" if tied else " or lm_head"),
                        hint="leave --target-modules out to adapt all attention and MLP linears")
    return list(dict.fromkeys(requested))


SMALL_MODEL_PARAMS = 50_000_000


@contextlib.contextmanager
def torch_threads(model, threads: int | None) -> Iterator[int]:
    """Run a block with ``threads`` intra-op threads (None: 1 for models under 50M parameters,
    where thread start-up costs more than it saves -- measured 12x faster on a busy 2-core host --
    else torch's default). The previous setting is restored afterwards."""
    import torch

    before = torch.get_num_threads()
    if threads is None:
        n_params = sum(p.numel() for p in model.parameters())
        threads = 1 if n_params < SMALL_MODEL_PARAMS else before
    torch.set_num_threads(max(1, int(threads)))
    try:
        yield threads
    finally:
        torch.set_num_threads(before)
