"""The one text format shared by training, evaluation, the fidelity gate and export.

A training example and an evaluation query are both ``format_prompt(task prompt)`` followed by the
answer. Training sees ``prompt tokens + answer tokens + eos`` with the loss on the answer (and eos)
only; evaluation feeds the same prompt tokens and decodes greedily. Everything that turns a LaMP
record into model input lives here, so the paths cannot drift apart.

Tokenization: the prompt is encoded with the tokenizer's special tokens (a BOS where the model's
tokenizer adds one) and the answer without, then concatenated, so the token ids a model sees at
evaluation are exactly the prefix it was trained on. Prompts that do not fit are cut from the left
(the retrieved profile text comes first in LaMP prompts; the question and ``Answer:`` stay), keeping
the leading special tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:  # pragma: no cover
    from ..data import TaskSpec, UserRecord

ANSWER_PREFIX = "\nAnswer: "
RETRIEVE_K = 1  # profile items retrieved into each prompt (LaMP's BM25 retrieval-augmented prompt)
IGNORE_INDEX = -100
DEFAULT_MAX_SEQ_LEN = 512  # prompt + answer tokens, training and evaluation alike


def format_prompt(task_prompt: str) -> str:
    """Model input text for a task prompt (training and inference alike)."""
    return f"{task_prompt.rstrip()}{ANSWER_PREFIX}"


def query_text(task: "TaskSpec", user: "UserRecord", k: int = RETRIEVE_K) -> str:
    """Formatted prompt of a user's LaMP query: BM25 top-k of their whole profile + the question."""
    return format_prompt(task.query_prompt(user.input, user.profile, k=k))


def pair_text(task: "TaskSpec", question: str, pool: Sequence[dict], k: int = RETRIEVE_K) -> str:
    """Formatted prompt of a training/held-out pair: retrieval from ``pool`` (never the item itself)."""
    return format_prompt(task.training_input(question, list(pool), k=k))


def eos_token_ids(tokenizer, generation_config=None) -> list[int]:
    """Every id that ends an answer: the tokenizer's eos plus the generation config's eos list."""
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    gen_eos = getattr(generation_config, "eos_token_id", None) if generation_config is not None else None
    for i in (gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos]):
        if i is not None and int(i) not in ids:
            ids.append(int(i))
    if not ids:
        from ..errors import UserError

        raise UserError("the tokenizer has no eos token and generation_config.json names none",
                        file="tokenizer_config.json", field="eos_token",
                        expected="an end-of-sequence token", hint="set eos_token in the base model's tokenizer_config.json")
    return ids


def _special_prefix_len(tokenizer, ids: list[int]) -> int:
    special = set(tokenizer.all_special_ids)
    n = 0
    while n < len(ids) and ids[n] in special:
        n += 1
    return n


def encode_prompt(tokenizer, text: str, max_tokens: int) -> list[int]:
    """Token ids of a formatted prompt, cut from the left to ``max_tokens`` (leading specials kept)."""
    ids = list(tokenizer(text, add_special_tokens=True, verbose=False)["input_ids"])  # we cut it below
    if len(ids) <= max_tokens:
        return ids
    keep = min(_special_prefix_len(tokenizer, ids), max(max_tokens - 1, 0))
    return ids[:keep] + ids[len(ids) - (max_tokens - keep):]


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]          # IGNORE_INDEX on the prompt, answer ids (+ eos) elsewhere


def encode_example(tokenizer, prompt_text: str, answer: str, eos_id: int, max_seq_len: int) -> Encoded:
    """Prompt + answer + eos for training; loss only on the answer and eos."""
    ans = list(tokenizer(answer, add_special_tokens=False, verbose=False)["input_ids"]) + [eos_id]
    ans = ans[: max(1, max_seq_len // 2)]  # an over-long answer keeps its head; the prompt keeps its room
    prompt = encode_prompt(tokenizer, prompt_text, max_seq_len - len(ans))
    return Encoded(prompt + ans, [IGNORE_INDEX] * len(prompt) + ans)
