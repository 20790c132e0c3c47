"""Base models: random-weight HF directories with real small models' configs, local tokenizer."""

from .zoo import ARCHS, init_model, train_tokenizer

__all__ = ["ARCHS", "init_model", "train_tokenizer"]
