"""The base model every peer runs: a random-weight HF directory with the exact shape of a real model.

Uses ``cdcda_export.models.init_model`` (the product's own builder) when it is importable; until it
lands, builds the smollm2-135m shape here from its published config and a byte-level BPE tokenizer
trained locally with ``tokenizers`` (nothing is downloaded).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

# Published SmolLM2-135M shape (HuggingFaceTB/SmolLM2-135M config.json).
SMOLLM2_135M = dict(
    hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, head_dim=64, vocab_size=49152, tie_word_embeddings=True,
    rope_theta=100000.0, rms_norm_eps=1e-5, max_position_embeddings=8192, hidden_act="silu",
    bos_token_id=0, eos_token_id=0, attention_bias=False, mlp_bias=False,
)


def _corpus() -> list[str]:
    """Plain English-ish text from the Python standard library's docstrings (always present)."""
    import pydoc
    import importlib

    texts = []
    for name in ("json", "pathlib", "argparse", "collections", "functools", "itertools", "re", "string",
                 "textwrap", "statistics", "random", "datetime", "subprocess", "threading", "logging",
                 "email", "http.client", "urllib.request", "csv", "decimal", "fractions", "heapq"):
        try:
            mod = importlib.import_module(name)
            texts.append(pydoc.render_doc(mod, renderer=pydoc.plaintext))
        except Exception:  # noqa: BLE001 - a missing module only shrinks the corpus
            continue
    return texts


def _train_tokenizer(out_dir: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(), trainer=trainer)
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "model_max_length": 8192,
        "add_prefix_space": False,
    }, indent=2))
    (out_dir / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}, indent=2))


def _fallback_smollm2(out_dir: Path, seed: int) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(**SMOLLM2_135M, initializer_range=0.02, torch_dtype="float32")
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    GenerationConfig(bos_token_id=0, eos_token_id=0).save_pretrained(out_dir)
    _train_tokenizer(out_dir, 49152)


def ensure_base_model(arch: str, cache: Path, seed: int = 0) -> Path:
    """Return a cached HF directory for ``arch`` (built once; atomic: built under a temp name)."""
    out = cache / f"base-{arch}-seed{seed}"
    if (out / "config.json").exists() and any(out.glob("*.safetensors")) and (out / "tokenizer.json").exists():
        return out
    tmp = cache / f".base-{arch}-seed{seed}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        try:
            from cdcda_export.models import init_model  # the product's own builder
        except ImportError:
            init_model = None
        if init_model is not None:
            shutil.rmtree(tmp)
            init_model(arch, tmp, seed=seed)
        elif arch == "smollm2-135m":
            _fallback_smollm2(tmp, seed)
        else:
            raise SystemExit(f"--arch {arch}: cdcda_export.models is not importable yet; only smollm2-135m "
                             "has a built-in fallback here")
        (tmp / "BENCH_BASE.json").write_text(json.dumps(
            {"arch": arch, "seed": seed, "builder": "cdcda_export.models.init_model" if init_model else
             "benchmarks/_peers/base_model.py fallback"}, indent=2))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
