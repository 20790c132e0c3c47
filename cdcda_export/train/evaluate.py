"""Greedy evaluation of base / personalized models on LaMP queries, and scoring of predictions files.

``evaluate`` answers each user's LaMP query (the retrieval-augmented prompt of ``train.format``)
greedily, with that user's adapter when ``adapter_root/<user>/`` has one, and reports the task
metrics per user and overall. ``score_predictions`` scores an existing LaMP predictions file
(``{"task": "LaMP_3", "golds": [{"id", "output"}]}``) as LaMP's official evaluator does: the task
names must agree and the prediction ids must be exactly the gold ids.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

from ..errors import UserError
from ..utils import now_iso, sha256_dir, versions, write_json_atomic
from .format import (DEFAULT_MAX_SEQ_LEN, RETRIEVE_K, PromptFormat, encode_prompt, eos_token_ids, query_text,
                     recorded_prompt_format, resolve_prompt_format)


def generate_texts(model, tokenizer, prompts: Sequence[str], max_new_tokens: int, *,
                   max_seq_len: int = DEFAULT_MAX_SEQ_LEN, eos_ids: list[int] | None = None,
                   progress: bool = False, desc: str = "generate") -> list[str]:
    """Greedy answers (decoded text, special tokens dropped) for formatted prompts, one at a time."""
    import torch
    from tqdm.auto import tqdm
    from transformers import GenerationConfig

    eos = eos_ids or eos_token_ids(tokenizer, getattr(model, "generation_config", None))
    limit = min(max_seq_len, int(getattr(model.config, "max_position_embeddings", max_seq_len) or max_seq_len))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    gen = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, eos_token_id=eos,
                           pad_token_id=pad, temperature=None, top_p=None, top_k=None)
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device   # prompts go where the model is (a GPU after `cdcda train --device`)
    out: list[str] = []
    try:
        with torch.no_grad():
            for text in tqdm(prompts, desc=desc, disable=not progress, leave=False):
                ids = encode_prompt(tokenizer, text, max(1, limit - max_new_tokens))
                x = torch.tensor([ids], dtype=torch.long, device=dev)
                y = model.generate(input_ids=x, attention_mask=torch.ones_like(x), generation_config=gen)
                out.append(tokenizer.decode(y[0, len(ids):].tolist(), skip_special_tokens=True))
    finally:
        model.train(was_training)
    return out


def _adapter_plan(adapter_root: Path | None, user_ids: list[str]) -> dict[str, Path | None]:
    if adapter_root is None:
        return {u: None for u in user_ids}
    root = Path(adapter_root)
    if not root.is_dir():
        raise UserError("adapter directory not found", file=str(root), field="--adapter",
                        hint="train adapters first: `cdcda train ... --out ADAPTERS`, then pass --adapter ADAPTERS")
    if (root / "adapter_config.json").is_file():  # one adapter for every user
        return {u: root for u in user_ids}
    plan = {u: (root / u if (root / u / "adapter_config.json").is_file() else None) for u in user_ids}
    if not any(plan.values()):
        raise UserError(f"no adapter for any of the selected users ({', '.join(user_ids[:5])}...)", file=str(root),
                        field="--adapter", expected="ADAPTERS/<user>/adapter_config.json (cdcda train output)",
                        hint="check --adapter and --users, or run `cdcda train` for these users")
    return plan


def _adapter_formats(plan: dict[str, Path | None], tok, base: Path, requested: str) -> dict[Path, PromptFormat]:
    """The prompt format each adapter was trained with (its training.json); an explicit --prompt-format
    that contradicts it is refused (the adapter would be scored on prompts it never saw)."""
    from ..data import read_json

    out: dict[Path, PromptFormat] = {}
    for a in sorted({p for p in plan.values() if p is not None}):
        tj = a / "training.json"
        kind = recorded_prompt_format(read_json(tj) if tj.is_file() else None)
        if requested not in ("auto", kind):
            raise UserError(f"--prompt-format {requested}, but this adapter was trained on {kind} prompts",
                            file=str(tj), field="hyperparameters.prompt_format", expected=requested,
                            hint="drop --prompt-format (eval uses what training recorded), or retrain with it")
        out[a] = resolve_prompt_format(tok, kind, base)
    return out


def _eval_user(model, tok, spec, u, adapter: Path | None, eos: list[int], k: int, max_seq_len: int,
               fmt: PromptFormat):
    """(base model back, result row) for one user's query, with their adapter when given."""
    from peft import PeftModel

    prompt = query_text(spec, u, k=k, fmt=fmt)
    if fmt.kind == "chat" and fmt.end_of_turn_id is not None and fmt.end_of_turn_id not in eos:
        eos = [*eos, fmt.end_of_turn_id]
    if adapter is None:
        raw = generate_texts(model, tok, [prompt], spec.max_new_tokens, max_seq_len=max_seq_len, eos_ids=eos)[0]
    else:
        peft_model = PeftModel.from_pretrained(model, str(adapter))
        try:
            raw = generate_texts(peft_model, tok, [prompt], spec.max_new_tokens, max_seq_len=max_seq_len,
                                 eos_ids=eos)[0]
        finally:
            model = peft_model.unload()  # the base modules back, LoRA layers removed (not merged)
    pred = spec.parse(raw)
    row: dict[str, Any] = {"adapter": str(adapter) if adapter else None, "prompt_format": fmt.kind,
                           "prediction": pred, "raw": raw,
                           "gold": u.gold, "metrics": spec.metrics([pred], [u.gold]) if u.gold is not None else {}}
    return model, row


def evaluate(base: Path, task: str, questions: Path, outputs: Path | None, adapter_root: Path | None = None,
             users: list[str] | None = None, save_predictions: Path | None = None, *,
             k: int = RETRIEVE_K, max_seq_len: int = DEFAULT_MAX_SEQ_LEN, progress: bool = True,
             threads: int | None = None, prompt_format: str = "auto") -> dict[str, Any]:
    """Greedy answers to each selected user's LaMP query and the task metrics per user and overall.

    ``adapter_root``: None (base model for everyone), one adapter directory (used for every user), or
    a ``cdcda train`` output ``ADAPTERS/<user>/`` (each user with their own adapter; users without
    one use the base and are marked ``"adapter": null``). Deterministic (greedy, no sampling).
    ``save_predictions`` writes ``{"task", "golds": [{"id", "output"}]}`` (LaMP's own format).
    ``prompt_format`` (auto|chat|plain, ``train.format``) applies to users answered by the base; a user
    with an adapter gets the format its training.json records.
    Returns a JSON-ready dict: ``task``, ``base_model``, ``overall`` (metrics over users with a gold),
    ``per_user`` (``{uid: {adapter, prediction, raw, gold, metrics}}``), ``primary_metric`` ...
    """
    from tqdm.auto import tqdm

    from ..data import load_lamp
    from .modeling import check_adapter_dir, check_adapter_provenance, load_base, torch_threads

    t0 = time.time()
    ds = load_lamp(task, questions, outputs)
    spec = ds.task
    selected = ds.select(users)
    plan = _adapter_plan(Path(adapter_root) if adapter_root else None, [u.id for u in selected])
    base_sha = sha256_dir(base)
    for a in {p for p in plan.values() if p is not None}:
        check_adapter_dir(a)
        check_adapter_provenance(a, base_sha, spec.name)
    model, tok = load_base(base)
    eos = eos_token_ids(tok, model.generation_config)
    base_fmt = resolve_prompt_format(tok, prompt_format, base)
    adapter_fmt = _adapter_formats(plan, tok, base, prompt_format)

    per_user: dict[str, dict] = {}
    with torch_threads(model, threads):
        for u in tqdm(selected, desc=f"eval {spec.name}", disable=not progress):
            a = plan[u.id]
            model, per_user[u.id] = _eval_user(model, tok, spec, u, a, eos, k, max_seq_len,
                                               adapter_fmt[a] if a is not None else base_fmt)

    scored = [uid for uid, r in per_user.items() if r["gold"] is not None]
    overall = spec.metrics([per_user[i]["prediction"] for i in scored], [per_user[i]["gold"] for i in scored])
    if save_predictions:
        write_predictions(save_predictions, spec.official_name, {uid: r["prediction"] for uid, r in per_user.items()})
    return {
        "task": spec.name, "questions": str(questions), "outputs": str(outputs) if outputs else None,
        "base_model": {"source": str(base), "sha256": base_sha},
        "adapter_root": str(adapter_root) if adapter_root else None,
        "primary_metric": spec.primary_metric, "higher_is_better": spec.higher_is_better,
        "overall": overall, "n_users": len(per_user), "n_scored": len(scored),
        "n_with_adapter": sum(1 for r in per_user.values() if r["adapter"]),
        "per_user": per_user,
        "generation": {"greedy": True, "max_new_tokens": spec.max_new_tokens, "retrieve_k": k,
                       "max_seq_len": max_seq_len,
                       "prompt_format": sorted({r["prompt_format"] for r in per_user.values()})},
        "predictions": str(save_predictions) if save_predictions else None,
        "versions": versions(), "created_at": now_iso(), "duration_s": round(time.time() - t0, 3),
    }


def write_predictions(path: str | Path, official_task: str, preds: dict[str, str]) -> Path:
    """Write predictions in LaMP's own format, atomically."""
    write_json_atomic(path, {"task": official_task, "golds": [{"id": i, "output": o} for i, o in preds.items()]})
    return Path(path)


def read_predictions(spec, path: str | Path) -> dict[str, str]:
    """Predictions file -> {id: output}. Outputs may be anything a model wrote (scored, not validated)."""
    from ..data import read_json

    src = str(path)
    data = read_json(path)
    want = f'{{"task": "{spec.official_name}", "golds": [{{"id": "...", "output": "..."}}]}}'
    if not isinstance(data, dict) or not isinstance(data.get("golds"), list):
        raise UserError("not a LaMP predictions file", file=src, field="golds", expected=want)
    if data.get("task") != spec.official_name:
        raise UserError(f"task is {data.get('task')!r}, but --task is {spec.name}", file=src, field="task",
                        expected=repr(spec.official_name), hint="pass the --task the predictions were made for")
    out: dict[str, str] = {}
    for i, g in enumerate(data["golds"]):
        if not isinstance(g, dict) or not isinstance(g.get("id"), str) or "output" not in g:
            raise UserError(f"golds[{i}] is not an {{id, output}} object with a string id", file=src,
                            field=f"golds[{i}]", expected=want)
        if g["id"] in out:
            raise UserError(f"duplicate prediction id {g['id']!r}", file=src, field=f"golds[{i}].id",
                            expected="one prediction per gold id")
        out[g["id"]] = "" if g["output"] is None else str(g["output"])
    return out


def score_predictions(task: str, predictions_path: Path, outputs_path: Path) -> dict[str, Any]:
    """Score a LaMP predictions file against a gold outputs file with the official semantics.

    The ids of the predictions must be exactly the gold ids (the official evaluator asserts this);
    otherwise a UserError lists what is missing and what is extra. Returns ``{task, n, metrics,
    primary_metric, higher_is_better, predictions, outputs}``.
    """
    from ..data import get_task, load_outputs

    spec = get_task(task)
    golds = load_outputs(spec, outputs_path)
    preds = read_predictions(spec, predictions_path)
    missing = sorted(set(golds) - set(preds))
    extra = sorted(set(preds) - set(golds))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} gold id(s) without a prediction (e.g. {missing[:5]})")
        if extra:
            parts.append(f"{len(extra)} prediction id(s) not in the golds (e.g. {extra[:5]})")
        raise UserError("prediction ids and gold ids do not match: " + "; ".join(parts), file=str(predictions_path),
                        field="golds[].id", expected=f"exactly the {len(golds)} ids of {outputs_path}",
                        hint="predict every query of the questions file those golds belong to "
                             "(`cdcda eval ... --save-predictions P.json` without --users)")
    ids = sorted(golds)
    metrics = spec.metrics([preds[i] for i in ids], [golds[i] for i in ids])
    return {"task": spec.name, "n": len(ids), "metrics": metrics, "primary_metric": spec.primary_metric,
            "higher_is_better": spec.higher_is_better, "predictions": str(predictions_path),
            "outputs": str(outputs_path)}
