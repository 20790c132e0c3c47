"""LaMP task registry: profile fields, prompts, label spaces, training pairs, parsers, metrics.

Reference: the official LaMP repository (LaMP-Benchmark/LaMP): ``LaMP/prompts/prompts.py`` for the
question and profile prompt templates and ``eval/evaluation.py`` for metric semantics. Our metrics
give that evaluator's numbers on the same predictions, including how it scores unparseable ones:

- LaMP-1/2 (classification): prediction and gold are ``strip()``-ed and mapped to their index in the
  label list, anything else to -1; accuracy over the mapped ints (so an unparseable prediction is
  wrong, and -1 == -1 would count as right); macro-F1 over *all* labels (``labels=range(n)``,
  labels with no support and no prediction score 0), exactly as ``evaluate``'s sklearn-backed f1.
- LaMP-3 (regression): ``float(pred)``; when that fails the prediction becomes whichever of 1.0 or
  5.0 is farther from the gold. MAE and RMSE.
- LaMP-4/5/7 (generation): ROUGE-1 and ROUGE-L F-measure with ``rouge_score`` (the library
  ``evaluate``'s rouge wraps; default tokenizer, no stemmer). ``evaluate`` aggregates with a
  bootstrap whose ``mid`` is an estimate of the mean F-measure; we report the mean itself, which is
  the value that estimate converges to and is deterministic.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, field
from typing import Callable, Sequence

LAMP2_MOVIE_TAGS = [
    "sci-fi", "based on a book", "comedy", "action", "twist ending", "dystopia", "dark comedy", "classic",
    "psychology", "fantasy", "romance", "thought-provoking", "social commentary", "violence", "true story",
]
LAMP2_OLD_CATEGORIES = [
    "food & drink", "sports", "education", "parents", "religion", "travel", "business", "crime",
    "science & technology", "culture & arts", "entertainment", "politics", "women", "style & beauty",
    "healthy living",
]

# Question templates exactly as LaMP's data files phrase them (used to build training pairs from
# profile items, so training inputs look like the user's real queries).
Q_LAMP1 = ('For an author who has written the paper with the title "{title}", which reference is related? '
           'Just answer with [1] or [2] without explanation. [1]: "{ref1}" [2]: "{ref2}"')
Q_LAMP2 = ("Which tag does this movie relate to among the following tags? Just answer with the tag name "
           "without further explanation. tags: [" + ", ".join(LAMP2_MOVIE_TAGS) + "] description: {text}")
Q_LAMP2_OLD = ("Which category does this article relate to among the following categories? Just answer with "
               "the category name without further explanation. categories: ["
               + ", ".join(LAMP2_OLD_CATEGORIES) + "] article: {text}")
Q_LAMP3 = ("What is the score of the following review on a scale of 1 to 5? just answer with 1, 2, 3, 4, or 5 "
           "without further explanation. review: {text}")
Q_LAMP4 = "Generate a headline for the following article: {text}"
Q_LAMP5 = "Generate a title for the following abstract of a paper: {text}"
Q_LAMP7 = "Paraphrase the following tweet without any explanation before or after it: {text}"


def _truncate_words(text: str, n: int) -> str:
    words = str(text).split()
    return " ".join(words[:n]) + (" ..." if len(words) > n else "")


def _after(marker: str) -> Callable[[str], str]:
    def f(inp: str) -> str:
        i = inp.rfind(marker)
        return inp[i + len(marker):].strip() if i >= 0 else inp

    return f


def _lamp1_query(inp: str) -> str:
    quoted = re.findall(r'"(.*?)"', inp)
    return " ".join(quoted[1:3]) if len(quoted) >= 3 else inp


def _style_strip(tweet: str) -> str:
    """A plain, style-free version of a tweet (LaMP-7 training input for the user's own tweet)."""
    t = re.sub(r"[@#]\w+", "", tweet)
    t = re.sub(r"https?://\S+", "", t)
    t = re.sub(r"[!?.]{2,}", ".", t)
    t = re.sub(r"[^\w\s,.'-]", "", t)
    return re.sub(r"\s+", " ", t).strip().lower()


@dataclass(frozen=True)
class TaskSpec:
    """Everything task-specific. ``kind`` is classification, regression or generation."""

    name: str
    kind: str
    official_name: str                      # "LaMP_3" as in the outputs files
    profile_fields: dict[str, type | tuple[type, ...]]
    labels: list[str] | None
    question_template: str
    profile_item_prompt: Callable[[dict, int], str]   # (item, max_words) -> text, as LaMP's prompts.py
    profile_prefix_suffix: tuple[str, str] = ("", "")  # text around the joined profile prompts
    query_extract: Callable[[str], str] = lambda s: s
    corpus_text: Callable[[dict], str] = lambda p: " ".join(str(v) for v in p.values())
    pair_fn: Callable[[dict, random.Random, Sequence[dict]], tuple[str, str] | None] | None = None
    max_new_tokens: int = 16
    primary_metric: str = "accuracy"
    higher_is_better: bool = True
    extra: dict = field(default_factory=dict)

    # ----------------------------------------------------------------- prompts
    def query_prompt(self, inp: str, profile: Sequence[dict], k: int = 1, max_words: int = 40) -> str:
        """LaMP's retrieval-augmented prompt: top-k profile items by BM25 against the query."""
        items = self.retrieve(inp, profile, k)
        if not items:
            return inp
        joined = ", and ".join(self.profile_item_prompt(p, max_words) for p in items)
        pre, mid = self.profile_prefix_suffix
        if self.name == "LaMP-1":
            # LaMP-1 puts the user's own paper titles right after the query paper's title.
            return _lamp1_add_titles(inp, joined)
        return f"{pre}{joined}{mid} {inp}".strip()

    def retrieve(self, inp: str, profile: Sequence[dict], k: int) -> list[dict]:
        if k <= 0 or not profile:
            return []
        if len(profile) <= k:
            return list(profile)
        from rank_bm25 import BM25Okapi

        corpus = [self.corpus_text(p).split() or [""] for p in profile]
        bm25 = BM25Okapi(corpus)
        return list(bm25.get_top_n(self.query_extract(inp).split(), list(profile), n=k))

    def training_input(self, pair_input: str, rest_profile: Sequence[dict], k: int = 1, max_words: int = 40) -> str:
        return self.query_prompt(pair_input, rest_profile, k=k, max_words=max_words)

    def profile_pairs(self, profile: Sequence[dict], rng: random.Random,
                      others: Sequence[dict] = ()) -> list[tuple[str, str, int]]:
        """(question, answer, index of the profile item it came from) for each usable profile item.

        ``others`` are profile items of other users (LaMP-1 needs unrelated papers as negatives).
        """
        out = []
        for i, item in enumerate(profile):
            pair = self.pair_fn(item, rng, others) if self.pair_fn else None
            if pair is not None:
                out.append((pair[0], pair[1], i))
        return out

    # ----------------------------------------------------------------- outputs
    def parse(self, text: str) -> str:
        """Model output -> answer string (first line, trimmed; canonical label where one is named)."""
        t = str(text).strip().split("\n")[0].strip().strip('"').strip()
        if self.kind == "regression":
            m = re.search(r"[1-5](?:\.\d+)?", t)
            return m.group(0) if m else t
        if self.labels:
            low = t.lower()
            for lab in sorted(self.labels, key=len, reverse=True):
                if low.startswith(lab.lower()):
                    return lab
            for lab in sorted(self.labels, key=len, reverse=True):
                if lab.lower() in low:
                    return lab
        return t

    def metrics(self, preds: Sequence[str], golds: Sequence[str]) -> dict[str, float]:
        if len(preds) != len(golds):
            raise ValueError(f"{len(preds)} predictions for {len(golds)} golds")
        if not golds:
            return {}
        if self.kind == "classification":
            return classification_metrics(preds, golds, self.labels or [])
        if self.kind == "regression":
            return regression_metrics(preds, golds)
        return rouge_metrics(preds, golds)

    def validate_output(self, value) -> str | None:
        """None when ``value`` is a valid gold output for this task, else what was expected."""
        if not isinstance(value, str):
            return f"a string, got {type(value).__name__}"
        if self.kind == "regression":
            if value.strip() not in {"1", "2", "3", "4", "5"}:
                return 'one of "1".."5"'
        elif self.labels and value.strip() not in self.labels:
            return f"one of the labels {self.labels}"
        elif not value.strip():
            return "a non-empty string"
        return None


# --------------------------------------------------------------------------- metrics (official semantics)
def classification_metrics(preds: Sequence[str], golds: Sequence[str], labels: list[str]) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, f1_score

    def idx(x):
        x = str(x).strip()
        return labels.index(x) if x in labels else -1

    p = [idx(x) for x in preds]
    g = [idx(x) for x in golds]
    acc = float(accuracy_score(g, p))
    f1 = float(f1_score(g, p, labels=list(range(len(labels))), average="macro", zero_division=0))
    return {"accuracy": acc, "f1": f1}


def regression_metrics(preds: Sequence[str], golds: Sequence[str]) -> dict[str, float]:
    def to_float(x, y):
        try:
            return float(str(x).strip())
        except ValueError:
            y = float(str(y).strip())
            return 1.0 if abs(1 - y) > abs(5 - y) else 5.0

    p = [to_float(x, y) for x, y in zip(preds, golds)]
    g = [to_float(y, y) for y in golds]
    n = len(g)
    mae = sum(abs(a - b) for a, b in zip(p, g)) / n
    rmse = math.sqrt(sum((a - b) ** 2 for a, b in zip(p, g)) / n)
    return {"MAE": mae, "RMSE": rmse}


def rouge_metrics(preds: Sequence[str], golds: Sequence[str]) -> dict[str, float]:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=False)
    r1 = rl = 0.0
    for p, g in zip(preds, golds):
        s = scorer.score(str(g).strip(), str(p).strip())
        r1 += s["rouge1"].fmeasure
        rl += s["rougeL"].fmeasure
    n = len(golds)
    return {"rouge-1": r1 / n, "rouge-L": rl / n}


# --------------------------------------------------------------------------- per-task pieces
def _lamp1_add_titles(inp: str, titles_joined: str) -> str:
    # LaMP's add_string_after_title: insert after the quoted title of the question's paper.
    m = re.search(r'title "(.*?)"', inp)
    if not m:
        return f"{titles_joined}. {inp}"
    end = m.end()
    return inp[:end] + ", and " + titles_joined + inp[end:]


def _pair_lamp1(item, rng, others):
    candidates = [o for o in others if o.get("title") and o.get("title") != item.get("title")]
    if not candidates:
        return None
    neg = rng.choice(candidates)["title"]
    # The paper's own abstract stands for "the paper", its title is the related reference.
    pos_first = rng.random() < 0.5
    ref1, ref2 = (item["title"], neg) if pos_first else (neg, item["title"])
    q = Q_LAMP1.format(title=_truncate_words(item.get("abstract", ""), 24), ref1=ref1, ref2=ref2)
    return q, "[1]" if pos_first else "[2]"


def _score_str(v) -> str:
    try:
        return str(int(float(v)))
    except (TypeError, ValueError):
        return str(v)


TASKS: dict[str, TaskSpec] = {}


def _register(spec: TaskSpec) -> None:
    TASKS[spec.name] = spec


_register(TaskSpec(
    name="LaMP-1", kind="classification", official_name="LaMP_1",
    profile_fields={"title": str, "abstract": str}, labels=["[1]", "[2]"],
    question_template=Q_LAMP1,
    profile_item_prompt=lambda p, n: f'"{_truncate_words(p["title"], n)}"',
    query_extract=_lamp1_query,
    corpus_text=lambda p: f'{p.get("title", "")} {p.get("abstract", "")}',
    pair_fn=_pair_lamp1, max_new_tokens=4, primary_metric="accuracy",
))
_register(TaskSpec(
    name="LaMP-2", kind="classification", official_name="LaMP_2",
    profile_fields={"description": str, "tag": str}, labels=LAMP2_MOVIE_TAGS,
    question_template=Q_LAMP2,
    profile_item_prompt=lambda p, n: f'the tag for the movie: "{_truncate_words(p["description"], n)}" is "{p["tag"]}" ',
    profile_prefix_suffix=("", "."),
    query_extract=_after("description:"),
    corpus_text=lambda p: f'{p.get("description", "")}',
    pair_fn=lambda it, rng, o: (Q_LAMP2.format(text=it["description"]), it["tag"]),
    max_new_tokens=8, primary_metric="accuracy",
))
_register(TaskSpec(
    name="LaMP-2-old", kind="classification", official_name="LaMP_2",
    profile_fields={"text": str, "title": str, "category": str}, labels=LAMP2_OLD_CATEGORIES,
    question_template=Q_LAMP2_OLD,
    profile_item_prompt=lambda p, n: f'the category for the article: "{_truncate_words(p["text"], n)}" is "{p["category"]}" ',
    profile_prefix_suffix=("", "."),
    query_extract=_after("article:"),
    corpus_text=lambda p: f'{p.get("title", "")} {p.get("text", "")}',
    pair_fn=lambda it, rng, o: (Q_LAMP2_OLD.format(text=it["text"]), it["category"]),
    max_new_tokens=8, primary_metric="accuracy", extra={"legacy": True},
))
_register(TaskSpec(
    name="LaMP-3", kind="regression", official_name="LaMP_3",
    profile_fields={"text": str, "score": (str, int, float)}, labels=["1", "2", "3", "4", "5"],
    question_template=Q_LAMP3,
    profile_item_prompt=lambda p, n: f'{_score_str(p["score"])} is the score for "{_truncate_words(p["text"], n)}" ',
    profile_prefix_suffix=("", "."),
    query_extract=_after("review:"),
    corpus_text=lambda p: f'{p.get("text", "")}',
    pair_fn=lambda it, rng, o: (Q_LAMP3.format(text=it["text"]), _score_str(it["score"])),
    max_new_tokens=3, primary_metric="MAE", higher_is_better=False,
))
_register(TaskSpec(
    name="LaMP-4", kind="generation", official_name="LaMP_4",
    profile_fields={"text": str, "title": str}, labels=None,
    question_template=Q_LAMP4,
    profile_item_prompt=lambda p, n: f'"{p["title"]}" is the title for "{_truncate_words(p["text"], n)}" ',
    profile_prefix_suffix=("", "."),
    query_extract=_after("article:"),
    corpus_text=lambda p: f'{p.get("title", "")} {p.get("text", "")}',
    pair_fn=lambda it, rng, o: (Q_LAMP4.format(text=it["text"]), it["title"]),
    max_new_tokens=24, primary_metric="rouge-1",
))
_register(TaskSpec(
    name="LaMP-5", kind="generation", official_name="LaMP_5",
    profile_fields={"title": str, "abstract": str}, labels=None,
    question_template=Q_LAMP5,
    profile_item_prompt=lambda p, n: f'"{p["title"]}" is a title for "{_truncate_words(p["abstract"], n)}" ',
    profile_prefix_suffix=("", ". Following the given patterns"),
    query_extract=_after("paper:"),
    corpus_text=lambda p: f'{p.get("title", "")} {p.get("abstract", "")}',
    pair_fn=lambda it, rng, o: (Q_LAMP5.format(text=it["abstract"]), it["title"]),
    max_new_tokens=24, primary_metric="rouge-1",
))
_register(TaskSpec(
    name="LaMP-7", kind="generation", official_name="LaMP_7",
    profile_fields={"text": str}, labels=None,
    question_template=Q_LAMP7,
    profile_item_prompt=lambda p, n: f'"{_truncate_words(p["text"], n)}" ',
    profile_prefix_suffix=("", " are written by a person. Following the given patterns"),
    query_extract=_after(":"),
    corpus_text=lambda p: f'{p.get("text", "")}',
    pair_fn=lambda it, rng, o: (Q_LAMP7.format(text=_style_strip(it["text"])), it["text"]),
    max_new_tokens=40, primary_metric="rouge-1",
))

ALIASES = {"LaMP_1": "LaMP-1", "LaMP_2": "LaMP-2", "LaMP_3": "LaMP-3", "LaMP_4": "LaMP-4", "LaMP_5": "LaMP-5",
           "LaMP_7": "LaMP-7", "LaMP_2_old": "LaMP-2-old"}


def get_task(name: str) -> TaskSpec:
    from ..errors import UserError

    key = ALIASES.get(name, name)
    if key not in TASKS:
        hint = " (LaMP-6 data is private and not supported)" if "6" in str(name) else ""
        raise UserError(f"task {name!r} is not known{hint}", field="task",
                        expected=f"one of {', '.join(TASKS)}")
    return TASKS[key]


def task_names() -> list[str]:
    return list(TASKS)
