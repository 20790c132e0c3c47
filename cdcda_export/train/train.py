"""Per-user LoRA training (peft) on a user's LaMP profile pairs plus optional synthetic examples.

For each user: build (question, answer) pairs from the profile (``TaskSpec.profile_pairs``), hold
out a seeded part for evaluation, add synthetic examples from ``SYNTHETIC/<user>/*.jsonl`` at a
real:synthetic ratio, and fine-tune one LoRA adapter with a small deterministic torch loop (AdamW,
linear decay, loss on answer tokens only). The held-out pairs and the user's LaMP query (when a
gold exists) are answered greedily before and after training.

Output per user, written atomically (``utils.atomic_dir``; an interrupted run leaves only a hidden
``.<user>.partial-<pid>-*`` folder, which the next run removes once that process is gone)::

    ADAPTERS/<user>/adapter_config.json, adapter_model.safetensors   (peft)
    ADAPTERS/<user>/training.json                                    (provenance, data, loss, metrics)
    ADAPTERS/train_report.json                                       (every user's status, incl. skipped)

A user whose ``training.json`` exists is skipped on re-runs unless ``force``.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..errors import UserError
from ..utils import atomic_dir, clean_stale_partials, now_iso, sha256_dir, versions, write_json_atomic
from .format import (ANSWER_PREFIX, DEFAULT_MAX_SEQ_LEN, IGNORE_INDEX, PLAIN, PROMPT_FORMATS, RETRIEVE_K,
                     PromptFormat, encode_example, eos_token_ids, pair_text, query_text, resolve_prompt_format)

REPORT_NAME = "train_report.json"
TRAINING_JSON = "training.json"


@dataclass
class Hyper:
    """Training hyper-parameters (recorded in training.json)."""

    rank: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] | None = None
    epochs: int = 5
    max_steps: int | None = None
    lr: float = 1e-3
    batch_size: int = 4
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_seq_len: int = DEFAULT_MAX_SEQ_LEN
    seed: int = 0
    holdout: float = 0.2
    synthetic_ratio: float = 1.0
    retrieve_k: int = RETRIEVE_K
    prompt_format: str = "auto"   # auto | chat | plain; training.json records the resolved one
    device: str = "auto"          # auto | cpu | cuda | mps (train.device); training.json's "device" block: resolved
    precision: str = "auto"       # auto | fp32 | bf16 | fp16 (autocast; auto: bf16/fp16 on CUDA, else fp32)

    def check(self) -> None:
        problems = []
        if self.rank < 1:
            problems.append(f"--rank {self.rank}: expected an integer >= 1")
        if self.alpha <= 0:
            problems.append(f"--alpha {self.alpha}: expected > 0")
        if not 0 <= self.dropout < 1:
            problems.append(f"--dropout {self.dropout}: expected 0 <= dropout < 1")
        if self.epochs < 1 and not self.max_steps:
            problems.append(f"--epochs {self.epochs}: expected >= 1 (or give --max-steps)")
        if self.max_steps is not None and self.max_steps < 1:
            problems.append(f"--max-steps {self.max_steps}: expected >= 1")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            problems.append(f"--lr {self.lr}: expected a positive number")
        if self.batch_size < 1:
            problems.append(f"--batch-size {self.batch_size}: expected >= 1")
        if not 0 <= self.holdout < 1:
            problems.append(f"--holdout {self.holdout}: expected 0 <= holdout < 1")
        if not (self.synthetic_ratio >= 0 and math.isfinite(self.synthetic_ratio)):
            problems.append(f"--synthetic-ratio {self.synthetic_ratio}: expected >= 0 (synthetic per real example)")
        if self.prompt_format not in PROMPT_FORMATS:
            problems.append(f"--prompt-format {self.prompt_format}: expected one of {', '.join(PROMPT_FORMATS)}")
        from .device import DEVICES, PRECISIONS

        if self.device not in DEVICES:
            problems.append(f"--device {self.device}: expected one of {', '.join(DEVICES)}")
        if self.precision not in PRECISIONS:
            problems.append(f"--precision {self.precision}: expected one of {', '.join(PRECISIONS)}")
        if self.max_seq_len < 16:
            problems.append(f"--max-seq-len {self.max_seq_len}: expected >= 16")
        if problems:
            from ..errors import ValidationErrors

            raise ValidationErrors(problems, hint="fix the flags and re-run `cdcda train`")


@dataclass
class UserTrainResult:
    """Outcome for one user: ``status`` is ``trained``, ``exists`` (done before) or ``skipped``."""

    user_id: str
    status: str
    adapter_dir: Path | None = None
    reason: str | None = None
    counts: dict[str, int] = field(default_factory=dict)
    metric_name: str | None = None
    metric_before: float | None = None
    metric_after: float | None = None
    loss_first: float | None = None
    loss_last: float | None = None
    duration_s: float = 0.0

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["adapter_dir"] = str(self.adapter_dir) if self.adapter_dir else None
        return d


@dataclass
class UserData:
    train: list[tuple[str, str, str]]           # (formatted prompt, answer, "real"|"synthetic")
    heldout: list[tuple[str, str]]              # (formatted prompt, gold)
    query: tuple[str, str] | None               # the LaMP query, when a gold exists
    counts: dict[str, int]
    heldout_items: list[int] = field(default_factory=list)  # profile indices of the held-out pairs


# --------------------------------------------------------------------------- data
def n_heldout(n_pairs: int, fraction: float) -> int:
    """Held-out pairs: round(fraction * n), at least 1 when n >= 5, never all (one-item: none)."""
    if n_pairs <= 1 or fraction <= 0:
        return 0
    k = int(round(fraction * n_pairs))
    if n_pairs >= 5:
        k = max(k, 1)
    return min(k, n_pairs - 1)


def read_synthetic_dir(synthetic: Path, user_id: str) -> list[dict]:
    """Rows ``{"input", "output", ...}`` of ``synthetic/<user>/*.jsonl`` (sorted files; [] if none)."""
    udir = Path(synthetic) / user_id
    rows: list[dict] = []
    for f in sorted(udir.glob("*.jsonl")) if udir.is_dir() else []:
        with open(f, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"line {n} is not JSON ({e.msg})", file=str(f),
                                    expected='{"input": ..., "output": ..., "provenance": {...}} per line',
                                    hint="re-run `cdcda augment` for this user") from None
                ok = isinstance(row, dict) and all(isinstance(row.get(k), str) and row[k].strip()
                                                   for k in ("input", "output"))
                if not ok:
                    raise UserError(f"line {n} lacks non-empty string fields 'input' and 'output'", file=str(f),
                                    field="input/output", expected='{"input": "...", "output": "..."}',
                                    hint="re-run `cdcda augment` for this user")
                rows.append(row)
    return rows


NEGATIVES_CAP = 1000


def negatives_pool(flat: Sequence[tuple[str, dict]], user_id: str, seed: int, cap: int = NEGATIVES_CAP) -> list[dict]:
    """Up to ``cap`` profile items of other users (seeded sample): LaMP-1's unrelated references.

    ``flat`` is every (owner id, item) of the dataset, built once, so a file with thousands of
    users does not cost a pass over all of them per user and per item."""
    if len(flat) <= cap * 2:
        return [it for owner, it in flat if owner != user_id]
    rng = random.Random(f"{seed}:{user_id}:others")
    picked = [flat[i][1] for i in rng.sample(range(len(flat)), min(len(flat), cap * 2)) if flat[i][0] != user_id]
    return picked[:cap]


def build_user_data(task, user, others: Sequence[dict], synthetic_rows: Sequence[dict], hp: Hyper,
                    fmt: PromptFormat = PLAIN) -> UserData | str:
    """Training / held-out / query examples of one user (texts in prompt format ``fmt``), or the reason
    the user cannot be trained."""
    if not user.profile:
        return "empty profile: no personal data to train on (evaluated with the base model only)"
    rng = random.Random(f"{hp.seed}:{user.id}")
    pairs = task.profile_pairs(user.profile, rng, others=others)
    if not pairs:
        return ("no usable training pairs in the profile"
                + (" (LaMP-1 needs other users' papers as negatives: train several users together)"
                   if task.name == "LaMP-1" else ""))
    order = list(range(len(pairs)))
    rng.shuffle(order)
    k_hold = n_heldout(len(pairs), hp.holdout)
    held = [pairs[i] for i in sorted(order[:k_hold])]
    train_pairs = [pairs[i] for i in sorted(order[k_hold:])]
    held_items = {p[2] for p in held}
    pool_idx = [i for i in range(len(user.profile)) if i not in held_items]  # held-out items never seen

    def pool_without(i: int) -> list[dict]:
        return [user.profile[j] for j in pool_idx if j != i]

    train = [(pair_text(task, q, pool_without(i), hp.retrieve_k, fmt), a, "real") for q, a, i in train_pairs]
    heldout = [(pair_text(task, q, pool_without(i), hp.retrieve_k, fmt), a) for q, a, i in held]
    n_syn = min(len(synthetic_rows), int(round(hp.synthetic_ratio * len(train_pairs))))
    syn_rng = random.Random(f"{hp.seed}:{user.id}:synthetic")
    chosen = syn_rng.sample(list(range(len(synthetic_rows))), n_syn) if n_syn else []
    pool_all = [user.profile[j] for j in pool_idx]
    for j in sorted(chosen):
        row = synthetic_rows[j]
        train.append((pair_text(task, row["input"], pool_all, hp.retrieve_k, fmt), row["output"], "synthetic"))
    query = (query_text(task, user, hp.retrieve_k, fmt), user.gold) if user.gold is not None else None
    counts = {"profile_items": len(user.profile), "real_pairs": len(pairs), "real": len(train_pairs),
              "heldout": len(heldout), "synthetic": n_syn, "synthetic_available": len(synthetic_rows),
              "eval_query": int(query is not None)}
    return UserData(train=train, heldout=heldout, query=query, counts=counts, heldout_items=sorted(held_items))


def user_data(ds, user, hp: Hyper, synthetic_rows: Sequence[dict] = (), fmt: PromptFormat = PLAIN) -> UserData | str:
    """Exactly the examples ``train_users`` builds for ``user`` of dataset ``ds`` with ``hp``
    (same negatives pool, same seeded split): for the fidelity gate and benchmarks that need the
    user's held-out pairs. Returns the skip reason (str) when the user cannot be trained."""
    flat = [(o.id, item) for o in ds.users for item in o.profile]
    return build_user_data(ds.task, user, negatives_pool(flat, user.id, hp.seed), synthetic_rows, hp, fmt)


def hyper_from_training(adapter_dir: str | Path) -> Hyper:
    """The hyper-parameters an adapter was trained with (its training.json), defaults elsewhere."""
    hp = Hyper()
    tj = Path(adapter_dir) / TRAINING_JSON
    if tj.is_file():
        meta = json.loads(tj.read_text(encoding="utf-8"))
        recorded = meta.get("hyperparameters") or {}
        for k in asdict(hp):
            if k in recorded and k not in ("device", "precision"):   # where it trained, not how to rebuild it
                setattr(hp, k, recorded[k])
        from .format import recorded_prompt_format

        hp.prompt_format = recorded_prompt_format(meta)   # before it was recorded: plain
    return hp


# --------------------------------------------------------------------------- training loop
def _batches(n: int, batch_size: int, rng: random.Random, total_steps: int) -> list[list[int]]:
    out: list[list[int]] = []
    while len(out) < total_steps:
        order = list(range(n))
        rng.shuffle(order)
        out += [order[i:i + batch_size] for i in range(0, n, batch_size)]
    return out[:total_steps]


def _collate(examples, pad_id: int):
    import torch

    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for r, e in enumerate(examples):
        n = len(e.input_ids)
        ids[r, :n] = torch.tensor(e.input_ids)
        labels[r, :n] = torch.tensor(e.labels)
        mask[r, :n] = 1
    return ids, mask, labels


def total_steps(n_examples: int, hp: Hyper) -> int:
    return hp.max_steps if hp.max_steps else hp.epochs * math.ceil(n_examples / hp.batch_size)


def _eval_metrics(task, model, tok, data: UserData, hp: Hyper, eos: list[int]) -> dict[str, Any]:
    from .evaluate import generate_texts

    out: dict[str, Any] = {}
    if data.heldout:
        raw = generate_texts(model, tok, [p for p, _ in data.heldout], task.max_new_tokens,
                             max_seq_len=hp.max_seq_len, eos_ids=eos)
        out["heldout"] = task.metrics([task.parse(r) for r in raw], [g for _, g in data.heldout])
        out["heldout_predictions"] = [task.parse(r) for r in raw]
    if data.query:
        raw = generate_texts(model, tok, [data.query[0]], task.max_new_tokens, max_seq_len=hp.max_seq_len, eos_ids=eos)
        out["query"] = task.metrics([task.parse(raw[0])], [data.query[1]])
        out["query_prediction"] = task.parse(raw[0])
    return out


def train_one(base_model, tok, task, data: UserData, hp: Hyper, target_modules: list[str],
              progress: bool = True, desc: str = "train", fmt: PromptFormat = PLAIN, placement=None,
              timing: dict | None = None):
    """Train a LoRA adapter on ``data`` (texts in format ``fmt``); returns (peft model, loss curve,
    metrics before, after). A chat example ends with the template's end-of-turn token.

    ``placement`` (:func:`.device.resolve_placement`; default: CPU, fp32): ``base_model`` must already be on
    its device; batches go there and the forward runs under its autocast (fp16: with a GradScaler). The
    LoRA weights are created on the CPU from the seed (peft moves them to the base's device), so every
    device starts from the same adapter; they and the optimizer state stay fp32. Evaluation is fp32.
    ``timing``: a dict to fill with ``eval_before_s``, ``step_s`` (wall seconds of each optimizer step, the
    loss read back included, so a GPU step is complete) and ``eval_after_s``."""
    import torch
    from peft import LoraConfig, get_peft_model
    from tqdm.auto import tqdm

    from .device import resolve_placement

    placement = placement or resolve_placement("cpu", "fp32")
    dev = placement.device

    eos = eos_token_ids(tok, base_model.generation_config)
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
    end = eos[0]
    if fmt.kind == "chat" and fmt.end_of_turn_id is not None:
        end = fmt.end_of_turn_id
        eos = eos if end in eos else [*eos, end]   # generation stops where training ended the answer
    limit = min(hp.max_seq_len, int(getattr(base_model.config, "max_position_embeddings", 0) or hp.max_seq_len))
    examples = [encode_example(tok, p, a, end, limit) for p, a, _ in data.train]
    timing = {} if timing is None else timing
    t0 = time.perf_counter()
    before = _eval_metrics(task, base_model, tok, data, hp, eos)
    timing["eval_before_s"] = round(time.perf_counter() - t0, 4)
    step_s: list[float] = timing.setdefault("step_s", [])

    torch.manual_seed(hp.seed)  # LoRA A init and dropout masks
    cfg = LoraConfig(r=hp.rank, lora_alpha=hp.alpha, lora_dropout=hp.dropout, target_modules=target_modules,
                     bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(base_model, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay)
    steps = total_steps(len(examples), hp)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1.0 - s / steps))
    batches = _batches(len(examples), hp.batch_size, random.Random(f"{hp.seed}:{desc}:order"), steps)
    losses: list[float] = []
    scaler = placement.scaler()
    model.train()
    bar = tqdm(batches, desc=desc, disable=not progress, leave=False)
    for idx in bar:
        t0 = time.perf_counter()
        ids, mask, labels = _collate([examples[i] for i in idx], pad)
        if dev != "cpu":
            ids, mask, labels = ids.to(dev), mask.to(dev), labels.to(dev)
        with placement.autocast():
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        if scaler is None:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, hp.max_grad_norm)
            opt.step()
        else:   # fp16: scale the loss, unscale before clipping, skip steps with inf/nan gradients
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, hp.max_grad_norm)
            scaler.step(opt)
            scaler.update()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))   # reads the loss back: on a GPU, the step has finished
        step_s.append(round(time.perf_counter() - t0, 4))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    t0 = time.perf_counter()
    after = _eval_metrics(task, model, tok, data, hp, eos)
    timing["eval_after_s"] = round(time.perf_counter() - t0, 4)
    return model, losses, before, after


def _primary(metrics: dict, task) -> float | None:
    for key in ("heldout", "query"):
        if key in metrics and task.primary_metric in metrics[key]:
            return metrics[key][task.primary_metric]
    return None


def _save_adapter(model, dest: Path) -> None:
    model.save_pretrained(str(dest), safe_serialization=True)


def is_complete(adapter_dir: Path) -> bool:
    """True when ``adapter_dir`` holds a finished adapter (training.json is written last)."""
    return all((adapter_dir / n).is_file() for n in (TRAINING_JSON, "adapter_config.json", "adapter_model.safetensors"))


def _clean_partials(out: Path, user_id: str) -> None:
    """Remove what killed runs left of this user (``.<user>.partial-<pid>-*`` of a process that is gone);
    a concurrent run's partial folder is left alone."""
    clean_stale_partials(out / user_id)


def _update_report(out: Path, task: str, base_info: dict, results: list[UserTrainResult]) -> None:
    path = out / REPORT_NAME
    report: dict[str, Any] = {}
    if path.is_file():
        try:
            report = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            report = {}
    users = report.get("users", {}) if report.get("task") == task else {}
    users.update({r.user_id: r.to_json() for r in results})
    write_json_atomic(path, {"task": task, "base_model": base_info, "updated_at": now_iso(), "users": users})


def train_users(base: Path, task: str, questions: Path, outputs: Path | None, out: Path,
                users: list[str] | None = None, synthetic: Path | None = None,
                synthetic_ratio: float = Hyper.synthetic_ratio, rank: int = Hyper.rank, alpha: int = Hyper.alpha,
                target_modules: list[str] | None = None, epochs: int = Hyper.epochs,
                max_steps: int | None = Hyper.max_steps, lr: float = Hyper.lr, seed: int = Hyper.seed,
                holdout: float = Hyper.holdout, force: bool = False, progress: bool = True, *,
                batch_size: int = Hyper.batch_size, dropout: float = Hyper.dropout,
                max_seq_len: int = Hyper.max_seq_len, threads: int | None = None,
                prompt_format: str = Hyper.prompt_format, device: str = Hyper.device,
                precision: str = Hyper.precision) -> list[UserTrainResult]:
    """Train one LoRA adapter per user into ``out/<user>/``; returns one result per selected user.

    ``synthetic``: a ``cdcda augment`` output (``DIR/<user>/*.jsonl``); ``synthetic_ratio`` is the
    number of synthetic examples per real training pair (0 = real only; capped by what exists).
    ``target_modules`` defaults to every attention and MLP linear of the model. ``max_steps``
    overrides ``epochs`` (None or negative: use ``epochs``). ``prompt_format``: auto | chat | plain
    (``train.format``; auto = the base's chat template when it has one and is pretrained), recorded resolved
    in training.json. ``threads``: torch intra-op threads (None: 1 for small models, see
    ``modeling.torch_threads``). ``device``: auto | cpu | cuda | mps and ``precision``: auto | fp32 | bf16 |
    fp16 (:mod:`.device`; an unavailable device is a UserError before any work). Users already done are skipped (``status="exists"``) unless ``force``;
    users with an empty profile are skipped with a reason. Same ``seed`` -> same adapter bytes.
    """
    from tqdm.auto import tqdm

    from ..data import load_lamp
    from .modeling import check_base_dir, load_base, resolve_target_modules, torch_threads

    if max_steps is not None and max_steps < 0:
        max_steps = None  # the CLI's "-1: use --epochs"
    hp = Hyper(rank=rank, alpha=alpha, dropout=dropout, target_modules=target_modules, epochs=epochs,
               max_steps=max_steps, lr=lr, batch_size=batch_size, max_seq_len=max_seq_len, seed=seed,
               holdout=holdout, synthetic_ratio=synthetic_ratio, prompt_format=prompt_format, device=device,
               precision=precision)
    hp.check()
    from .device import resolve_placement

    placement = resolve_placement(hp.device, hp.precision)
    base = check_base_dir(base)   # a .gguf base becomes its cached HF directory
    if synthetic is not None and not Path(synthetic).is_dir():
        raise UserError("synthetic data directory not found", file=str(synthetic), field="--synthetic",
                        expected="a `cdcda augment` output: DIR/<user>/*.jsonl",
                        hint="run `cdcda augment --task T --questions Q --out DIR` first")
    ds = load_lamp(task, questions, outputs)
    spec = ds.task
    selected = ds.select(users)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    from ..models.gguf import base_provenance

    base_info = {"source": str(base), "sha256": sha256_dir(base), "provenance": base_provenance(base)}

    results: list[UserTrainResult] = []
    todo = []
    for u in selected:
        udir = out / u.id
        if is_complete(udir) and not force:
            meta = json.loads((udir / TRAINING_JSON).read_text(encoding="utf-8"))
            if meta.get("task") != spec.name or meta.get("base_model", {}).get("sha256") != base_info["sha256"]:
                raise UserError(f"an adapter for user {u.id} exists from another task or base model",
                                file=str(udir / TRAINING_JSON), field="base_model.sha256 / task",
                                expected=f"task {spec.name} on base {base_info['sha256'][:12]}...",
                                hint="pass --force to retrain it, or choose another --out")
            hm = meta.get("heldout_metric") or {}
            results.append(UserTrainResult(u.id, "exists", udir, reason="already trained (use --force to retrain)",
                                           counts=meta.get("data", {}), metric_name=hm.get("name"),
                                           metric_before=hm.get("before"), metric_after=hm.get("after"),
                                           loss_first=(meta.get("loss_curve") or [None])[0],
                                           loss_last=(meta.get("loss_curve") or [None])[-1]))
        else:
            todo.append(u)
    if not todo:
        _update_report(out, spec.name, base_info, results)
        return results

    base_model, tok = load_base(base)
    if placement.device != "cpu":
        base_model.to(placement.device)   # once; each user trains on a deep copy made on the device
    fmt = resolve_prompt_format(tok, hp.prompt_format, base)
    hp.prompt_format = fmt.kind
    targets = resolve_target_modules(base_model, target_modules)
    hp.target_modules = targets
    flat = [(o.id, item) for o in ds.users for item in o.profile]
    with torch_threads(base_model, threads):
        for u in tqdm(todo, desc=f"users {spec.name}", disable=not progress):
            results.append(_train_user(u, flat, spec, base_model, tok, hp, targets, out, base_info, synthetic,
                                       progress, fmt, placement))
    order = {u.id: i for i, u in enumerate(selected)}
    results.sort(key=lambda r: order[r.user_id])
    _update_report(out, spec.name, base_info, [r for r in results if r.status == "exists"])
    return results


def _train_user(u, flat, spec, base_model, tok, hp: Hyper, targets: list[str], out: Path, base_info: dict,
                synthetic: Path | None, progress: bool, fmt: PromptFormat = PLAIN, placement=None) -> UserTrainResult:
    import copy

    t0 = time.time()
    others = negatives_pool(flat, u.id, hp.seed)
    rows = read_synthetic_dir(Path(synthetic), u.id) if synthetic is not None else []
    data = build_user_data(spec, u, others, rows, hp, fmt)
    if isinstance(data, str):
        res = UserTrainResult(u.id, "skipped", None, reason=data)
        _update_report(out, spec.name, base_info, [res])
        return res
    _clean_partials(out, u.id)
    timing: dict = {}
    model, losses, before, after = train_one(copy.deepcopy(base_model), tok, spec, data, hp, targets,
                                             progress=progress, desc=u.id, fmt=fmt, placement=placement,
                                             timing=timing)
    if placement is not None and placement.device != "cpu":
        model.to("cpu")   # the adapter is saved from fp32 CPU tensors, as CPU training saves it
    udir = out / u.id
    with atomic_dir(udir, overwrite=True) as tmp:
        _save_adapter(model, tmp)
        meta = {
            "user_id": u.id, "task": spec.name, "status": "trained",
            "base_model": base_info,
            "adapter": {"sha256": sha256_dir(tmp), "files": sorted(p.name for p in tmp.iterdir())},
            "data": data.counts,
            "hyperparameters": dict(asdict(hp), steps=len(losses),
                                    answer_prefix=ANSWER_PREFIX if fmt.kind == "plain" else None,
                                    optimizer="AdamW", schedule="linear decay to 0", loss="answer tokens + eos"),
            "loss_curve": losses,
            "device": (placement.record() if placement is not None else None),
            "timing": timing,
            "eval": {"primary_metric": spec.primary_metric, "higher_is_better": spec.higher_is_better,
                     "n_heldout": len(data.heldout), "query": data.query is not None,
                     "before": before, "after": after},
            "heldout_metric": {"name": spec.primary_metric, "before": _primary(before, spec),
                               "after": _primary(after, spec)},
            "versions": versions(), "created_at": now_iso(), "duration_s": round(time.time() - t0, 3),
        }
        write_json_atomic(tmp / TRAINING_JSON, meta)
    res = UserTrainResult(u.id, "trained", udir, counts=data.counts, metric_name=spec.primary_metric,
                          metric_before=_primary(before, spec), metric_after=_primary(after, spec),
                          loss_first=losses[0] if losses else None, loss_last=losses[-1] if losses else None,
                          duration_s=round(time.time() - t0, 3))
    _update_report(out, spec.name, base_info, [res])
    return res
