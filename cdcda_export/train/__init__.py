"""Per-user LoRA training, merge and evaluation (peft, transformers; imported lazily).

Public API (the CLI verbs ``train``, ``merge`` and ``eval`` call these):

- :func:`train_users` -- one LoRA adapter per user into ``ADAPTERS/<user>/``
- :func:`merge_adapter` -- base + adapter -> merged HF directory with ``merge.json``
- :func:`evaluate` -- greedy answers + task metrics per user and overall
- :func:`score_predictions` -- score a LaMP predictions file like the official evaluator

The text format shared with the fidelity gate and export lives in :mod:`.format`.
"""

from __future__ import annotations

from .evaluate import evaluate, generate_texts, score_predictions, write_predictions
from .format import ANSWER_PREFIX, encode_example, encode_prompt, eos_token_ids, format_prompt, pair_text, query_text
from .merge import merge_adapter
from .train import Hyper, UserTrainResult, hyper_from_training, train_users, user_data

__all__ = ["train_users", "UserTrainResult", "Hyper", "hyper_from_training", "user_data", "merge_adapter", "evaluate", "score_predictions", "write_predictions",
           "generate_texts", "format_prompt", "query_text", "pair_text", "encode_prompt", "encode_example",
           "eos_token_ids", "ANSWER_PREFIX"]
