"""Base models: real pretrained bases from GGUF files (packaged SmolLM2-135M-Instruct, any ``--base X.gguf``),
and random-weight HF directories with real small models' configs and a local tokenizer (tests, speed work)."""

from .gguf import PACKAGED, base_provenance, gguf_to_hf, resolve_base
from .zoo import ARCHS, init_model, train_tokenizer

__all__ = ["ARCHS", "PACKAGED", "base_provenance", "gguf_to_hf", "init_model", "resolve_base", "train_tokenizer"]
