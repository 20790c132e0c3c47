"""Prompts of the fidelity check: the user's held-out real queries plus a small generic set.

* **User prompts** (personalized fidelity): with ``--task/--questions [--outputs]``, the artifact's
  user (``manifest.user_id`` = the LaMP question id) gets exactly the held-out profile pairs that
  ``cdcda train`` kept out of training (rebuilt with ``train.train.build_user_data`` and the seed /
  hold-out fraction / retrieval k recorded in the adapter's ``training.json``) plus the user's LaMP
  query. Each carries its gold answer, so the LaMP task metric can be computed with the reference
  and with the artifact. Texts are formatted with ``train.format`` (the one format shared with
  training and evaluation), in the prompt format the artifact records (``io.prompt_format``: the base's
  chat template where training used it, else the plain LaMP prompt).
* **Generic prompts**: ``cdcda_export/assets/generic_prompts.txt`` (one per line, ``\\n`` escapes), raw
  text continuations, never wrapped in a chat template.
* ``--prompts FILE`` replaces the generic set: a ``.txt`` (one per line) or ``.json``/``.jsonl``
  (strings, or objects with ``text`` and optional ``id``/``gold``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..errors import UserError


@dataclass
class Prompt:
    id: str
    kind: str                 # "user-heldout" | "user-query" | "generic" | "file"
    text: str
    gold: str | None = None

    def describe(self, n_tokens: int | None = None) -> dict:
        d = {"id": self.id, "kind": self.kind, "sha256": hashlib.sha256(self.text.encode()).hexdigest()[:16],
             "preview": self.text[:60].replace("\n", " ")}
        if n_tokens is not None:
            d["tokens"] = n_tokens
        if self.gold is not None:
            d["has_gold"] = True
        return d


def _parse_lines(text: str, kind: str, source: str) -> list[Prompt]:
    out = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        out.append(Prompt(id=f"{kind}-{len(out)}", kind=kind, text=line.replace("\\n", "\n")))
    return out


def generic_prompts() -> list[Prompt]:
    text = (resources.files("cdcda_export") / "assets" / "generic_prompts.txt").read_text(encoding="utf-8")
    return _parse_lines(text, "generic", "generic_prompts.txt")


def load_prompts_file(path: str | Path) -> list[Prompt]:
    p = Path(path)
    if not p.is_file():
        raise UserError("prompts file not found", file=str(p), field="--prompts",
                        expected="a .txt (one prompt per line) or .json/.jsonl file")
    text = p.read_text(encoding="utf-8")
    if p.suffix not in (".json", ".jsonl"):
        prompts = _parse_lines(text, "file", str(p))
    else:
        try:
            rows = [json.loads(l) for l in text.splitlines() if l.strip()] if p.suffix == ".jsonl" else json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"invalid JSON: {e.msg} at line {e.lineno}", file=str(p), field="--prompts") from None
        if not isinstance(rows, list):
            raise UserError("top level is not a list", file=str(p), expected='["text", ...] or [{"text": ...}, ...]')
        prompts = []
        for i, r in enumerate(rows):
            if isinstance(r, str):
                r = {"text": r}
            if not isinstance(r, dict) or not isinstance(r.get("text"), str) or not r["text"].strip():
                raise UserError(f"item {i} has no non-empty string 'text'", file=str(p), field=f"[{i}].text",
                                expected='a string or {"text": "...", "id": "...", "gold": "..."}')
            prompts.append(Prompt(id=str(r.get("id", f"file-{i}")), kind="file", text=r["text"],
                                  gold=r.get("gold")))
    if not prompts:
        raise UserError("no prompts in file", file=str(p), field="--prompts", expected="at least one prompt")
    return prompts


def _hyper_from_training(adapter_dir: Path | None):
    """The train hyper-parameters that decide the hold-out split, from the adapter's training.json."""
    from ..train.train import Hyper

    hp = Hyper()
    if adapter_dir is not None and (adapter_dir / "training.json").is_file():
        meta = json.loads((adapter_dir / "training.json").read_text(encoding="utf-8"))
        h = meta.get("hyperparameters") or {}
        for k in ("seed", "holdout", "retrieve_k"):
            if k in h and h[k] is not None:
                setattr(hp, k, h[k])
    return hp


def user_prompts(manifest: dict, task: str, questions: str | Path, outputs: str | Path | None,
                 adapter_dir: Path | None, art: Path, max_heldout: int | None = None,
                 seed: int = 0) -> tuple[list[Prompt], str]:
    """(prompts, task name): the held-out pairs and the LaMP query of the artifact's user; for a base
    artifact (no user_id), the LaMP query of every user in the file."""
    from ..data import load_lamp
    from ..train.format import PromptFormat, query_text
    from ..train.train import build_user_data

    ds = load_lamp(task, questions, outputs)
    user_id = manifest.get("user_id")
    if manifest.get("task") and manifest["task"] != ds.task.name:
        raise UserError(f"the artifact was trained for task {manifest['task']}, not {ds.task.name}",
                        file=str(art / "manifest.json"), field="task", expected=ds.task.name,
                        hint=f"pass --task {manifest['task']} with that task's LaMP files")
    hp = _hyper_from_training(adapter_dir)
    fmt = PromptFormat.from_dict((manifest.get("io") or {}).get("prompt_format"))   # absent (older export): plain
    if not user_id:
        # A base artifact (no adapter) serves every user of the file: it is checked on each one's LaMP query
        # (with gold, so the task metric covers the whole file); there are no held-out pairs without training.
        return [Prompt(id=f"query-{u.id}", kind="user-query", text=query_text(ds.task, u, hp.retrieve_k, fmt),
                       gold=u.gold) for u in ds.users], ds.task.name
    user = ds.user(str(user_id))
    others = [item for o in ds.users if o.id != user.id for item in o.profile]
    data = build_user_data(ds.task, user, others, [], hp, fmt)
    prompts: list[Prompt] = []
    if not isinstance(data, str):
        idx = list(range(len(data.heldout)))
        if max_heldout is not None and len(idx) > max_heldout:   # a seeded subset, in file order
            import random

            idx = sorted(random.Random(seed).sample(idx, max_heldout))
        prompts += [Prompt(id=f"heldout-{i}", kind="user-heldout", text=data.heldout[i][0], gold=data.heldout[i][1])
                    for i in idx]
    prompts.append(Prompt(id=f"query-{user.id}", kind="user-query",
                          text=query_text(ds.task, user, hp.retrieve_k, fmt), gold=user.gold))
    return prompts, ds.task.name
