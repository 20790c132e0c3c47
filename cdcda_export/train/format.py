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

Prompt formats (:class:`PromptFormat`): ``plain`` is the LaMP prompt followed by ``\nAnswer: ``;
``chat`` puts the LaMP prompt in one user turn of the base's chat template with the assistant's
generation prompt after it (``tokenizer.apply_chat_template(..., add_generation_prompt=True)``), and
training appends the answer and the template's end-of-turn token. A chat text carries its own special
tokens, so it is tokenized as ``apply_chat_template`` tokenizes it (no added specials); when it does not
fit, the LaMP prompt inside the turn is cut from the left and the turn's head and tail are kept.
``auto`` (the default of train/eval) is chat when the base's tokenizer has a chat template and its
weights are pretrained; a random-weight ``cdcda init-model`` base (``cdcda_init.json``) and a tokenizer
without a template use plain. ``cdcda train`` records the resolved format in training.json
(``hyperparameters.prompt_format``); eval, export and check of an adapter use that record (an adapter
without it was trained on plain prompts).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:  # pragma: no cover
    from ..data import TaskSpec, UserRecord

ANSWER_PREFIX = "\nAnswer: "
RETRIEVE_K = 1  # profile items retrieved into each prompt (LaMP's BM25 retrieval-augmented prompt)
IGNORE_INDEX = -100
DEFAULT_MAX_SEQ_LEN = 512  # prompt + answer tokens, training and evaluation alike


PROMPT_FORMATS = ("auto", "chat", "plain")


def format_prompt(task_prompt: str) -> str:
    """Plain model input text for a task prompt (training and inference alike)."""
    return f"{task_prompt.rstrip()}{ANSWER_PREFIX}"


@dataclass(frozen=True)
class PromptFormat:
    """Model input text of a LaMP task prompt: ``user_prefix + prompt.rstrip() + user_suffix``.

    For ``chat`` the prefix and suffix are the base's chat template rendered around one user message
    (system prompt, user header / end of turn, assistant header), checked to equal
    ``apply_chat_template`` for any message; ``end_of_turn_id`` closes the assistant's answer."""

    kind: str = "plain"                 # "plain" | "chat"
    user_prefix: str = ""
    user_suffix: str = ANSWER_PREFIX
    end_of_turn_id: int | None = None   # chat only

    @property
    def add_special_tokens(self) -> bool:
        """Plain text gets the tokenizer's own specials (a BOS where it adds one); a chat text has them."""
        return self.kind != "chat"

    def text(self, task_prompt: str) -> str:
        return f"{self.user_prefix}{task_prompt.rstrip()}{self.user_suffix}"

    def describe(self) -> dict[str, Any]:
        """What an app needs to format prompts as the model was trained (the manifest's ``io.prompt_format``)."""
        d: dict[str, Any] = {"format": self.kind, "user_prefix": self.user_prefix, "user_suffix": self.user_suffix,
                             "add_special_tokens": self.add_special_tokens}
        if self.kind == "chat":
            d["end_of_turn_token_id"] = self.end_of_turn_id
        return d

    @classmethod
    def from_dict(cls, d: dict | None) -> "PromptFormat":
        """The inverse of :meth:`describe`; None or a dict without ``format`` (older manifests) is plain."""
        if not d or d.get("format") != "chat":
            return PLAIN
        return cls("chat", str(d.get("user_prefix", "")), str(d.get("user_suffix", "")), d.get("end_of_turn_token_id"))


PLAIN = PromptFormat()
_PROBE = ("CDCDA-USER-MESSAGE-7f3a", "CDCDA-ASSISTANT-MESSAGE-7f3a")
_CHAT_CACHE: dict[tuple, PromptFormat | None] = {}


def _end_of_turn_id(tokenizer, after_answer: str) -> int | None:
    """The special token the template writes right after an assistant message (``<|im_end|>``,
    ``<end_of_turn>``, ``<|eot_id|>``, ...), else the tokenizer's eos."""
    ids = list(tokenizer(after_answer, add_special_tokens=False, verbose=False)["input_ids"])
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    if ids and ids[0] in special:
        return int(ids[0])
    return int(tokenizer.eos_token_id) if tokenizer.eos_token_id is not None else None


def chat_format(tokenizer) -> PromptFormat | None:
    """The chat :class:`PromptFormat` of ``tokenizer``, or None when it has no chat template or its
    template does not place a user message verbatim between a fixed head and tail."""
    template = getattr(tokenizer, "chat_template", None)
    if not template or not isinstance(template, str):
        return None
    key = (id(tokenizer), template, len(tokenizer))
    if key not in _CHAT_CACHE:
        fmt = None
        try:
            user, answer = _PROBE
            gen = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                                add_generation_prompt=True)
            turn = tokenizer.apply_chat_template([{"role": "user", "content": user},
                                                  {"role": "assistant", "content": answer}], tokenize=False)
            other = tokenizer.apply_chat_template([{"role": "user", "content": "x y"}], tokenize=False,
                                                  add_generation_prompt=True)
        except Exception:  # noqa: BLE001 - a template that cannot render one user turn is not usable here
            gen = turn = other = ""
        if gen.count(_PROBE[0]) == 1 and _PROBE[1] in turn:
            prefix, suffix = gen.split(_PROBE[0])
            if other == f"{prefix}x y{suffix}" and prefix:
                fmt = PromptFormat("chat", prefix, suffix, _end_of_turn_id(tokenizer, turn.split(_PROBE[1], 1)[1]))
        _CHAT_CACHE[key] = fmt
    return _CHAT_CACHE[key]


def _random_weights(base_dir) -> bool:
    if base_dir is None:
        return False
    from ..models.gguf import base_provenance

    return bool((base_provenance(base_dir) or {}).get("random_weights"))


def resolve_prompt_format(tokenizer, requested: str = "auto", base_dir=None) -> PromptFormat:
    """``requested`` (auto|chat|plain) for this base: auto is chat when the tokenizer has a usable chat
    template and the weights are pretrained (not a random-weight ``cdcda init-model`` directory)."""
    from ..errors import UserError

    if requested not in PROMPT_FORMATS:
        raise UserError(f"prompt format {requested!r} is not known", field="--prompt-format",
                        expected=" | ".join(PROMPT_FORMATS))
    if requested == "plain":
        return PLAIN
    chat = chat_format(tokenizer)
    if requested == "chat" and chat is None:
        where = f"{base_dir}/tokenizer_config.json" if base_dir is not None else "tokenizer_config.json"
        raise UserError("--prompt-format chat, but the base model's tokenizer has no usable chat template",
                        file=where, field="chat_template",
                        expected="a template that renders one user message between a fixed head and tail",
                        hint="use --prompt-format plain (or auto), or add the model's chat_template.jinja")
    if chat is None or (requested == "auto" and _random_weights(base_dir)):
        return PLAIN
    return chat


def recorded_prompt_format(training_meta: dict | None) -> str:
    """The prompt format a training.json records; an adapter trained before it was recorded used plain."""
    hp = (training_meta or {}).get("hyperparameters") or {}
    return hp.get("prompt_format") or "plain"


def query_text(task: "TaskSpec", user: "UserRecord", k: int = RETRIEVE_K, fmt: PromptFormat = PLAIN) -> str:
    """Formatted prompt of a user's LaMP query: BM25 top-k of their whole profile + the question."""
    return fmt.text(task.query_prompt(user.input, user.profile, k=k))


def pair_text(task: "TaskSpec", question: str, pool: Sequence[dict], k: int = RETRIEVE_K,
              fmt: PromptFormat = PLAIN) -> str:
    """Formatted prompt of a training/held-out pair: retrieval from ``pool`` (never the item itself)."""
    return fmt.text(task.training_input(question, list(pool), k=k))


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


def _chat_parts(tokenizer, text: str) -> tuple[str, str, str] | None:
    """(head, LaMP prompt, tail) when ``text`` is a rendering of the tokenizer's chat template."""
    chat = chat_format(tokenizer)
    if chat is None or not text.startswith(chat.user_prefix) or not text.endswith(chat.user_suffix) \
            or len(text) < len(chat.user_prefix) + len(chat.user_suffix):
        return None
    return chat.user_prefix, text[len(chat.user_prefix):len(text) - len(chat.user_suffix)], chat.user_suffix


def encode_prompt(tokenizer, text: str, max_tokens: int) -> list[int]:
    """Token ids of a formatted prompt, cut from the left to ``max_tokens`` (leading specials kept).

    A chat-template rendering (:func:`chat_format`) is tokenized without added specials, exactly as
    ``apply_chat_template`` does; cut, it keeps the turn's head and tail and loses the prompt's start."""
    parts = _chat_parts(tokenizer, text)
    if parts is not None:
        ids = list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
        if len(ids) <= max_tokens:
            return ids
        head, body, tail = (list(tokenizer(t, add_special_tokens=False, verbose=False)["input_ids"]) for t in parts)
        room = max(max_tokens - len(head) - len(tail), 0)
        return head + (body[len(body) - room:] if room else []) + tail
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
    """Prompt + answer + eos for training; loss only on the answer and eos (for a chat prompt, pass the
    template's end-of-turn id, ``PromptFormat.end_of_turn_id``)."""
    ans = list(tokenizer(answer, add_special_tokens=False, verbose=False)["input_ids"]) + [eos_id]
    ans = ans[: max(1, max_seq_len // 2)]  # an over-long answer keeps its head; the prompt keeps its room
    prompt = encode_prompt(tokenizer, prompt_text, max_seq_len - len(ans))
    return Encoded(prompt + ans, [IGNORE_INDEX] * len(prompt) + ans)
