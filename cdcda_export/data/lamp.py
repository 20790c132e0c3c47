"""Load and validate LaMP files exactly as the benchmark ships them.

``*_questions.json``: a list of ``{"id", "input", "profile": [...]}`` -- one entry per user (the
entry's id is the user id here). ``*_outputs.json``: ``{"task": "LaMP_3", "golds": [{"id", "output"}]}``.

Every problem is collected and raised once, each naming the file, the record (index and id) and
the field, so a user fixes a file in one pass. Empty and one-item profiles are valid input: they
are reported (``LampDataset.notes``) and handled by training (see ``train``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError, ValidationErrors
from ..utils import is_safe_name
from .tasks import TaskSpec, get_task

NEXT = "fix the file, then run `cdcda data validate --task {task} --questions Q.json [--outputs O.json]`"


@dataclass
class UserRecord:
    id: str
    input: str
    profile: list[dict]
    gold: str | None = None


@dataclass
class LampDataset:
    task: TaskSpec
    users: list[UserRecord]
    questions_path: str
    outputs_path: str | None = None
    notes: list[str] = field(default_factory=list)

    def user(self, uid: str) -> UserRecord:
        for u in self.users:
            if u.id == uid:
                return u
        raise UserError(f"user {uid!r} not found", file=self.questions_path, field="id",
                        expected=f"one of {[u.id for u in self.users][:10]}...")

    def select(self, ids: list[str] | None) -> list[UserRecord]:
        return self.users if not ids else [self.user(i) for i in ids]


def read_json(path: str | Path) -> Any:
    p = Path(path)
    if not p.is_file():
        raise UserError("file not found" if not p.exists() else "is not a file", file=str(p),
                        hint="check the path; LaMP files are named like train_questions.json / train_outputs.json")
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"not UTF-8 (invalid byte 0x{raw[e.start]:02x} at offset {e.start})", file=str(p),
                        expected="UTF-8 JSON", hint="re-save the file as UTF-8") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        what = "truncated or invalid JSON" if e.pos >= len(text.rstrip()) - 1 else "invalid JSON"
        raise UserError(f"{what}: {e.msg} at line {e.lineno} column {e.colno}", file=str(p),
                        hint="the file may be cut short; download or copy it again") from None


def _check_profile_item(task: TaskSpec, item: Any, where: str, problems: list[str]) -> None:
    if not isinstance(item, dict):
        problems.append(f"{where}: expected an object with fields {list(task.profile_fields)}, got {type(item).__name__}")
        return
    for name, typ in task.profile_fields.items():
        if name not in item:
            problems.append(f"{where}: missing field {name!r}")
        elif not isinstance(item[name], typ) or isinstance(item[name], bool):
            tn = typ.__name__ if isinstance(typ, type) else "/".join(t.__name__ for t in typ)
            problems.append(f"{where}: field {name!r} should be {tn}, got {type(item[name]).__name__}")
    if task.name == "LaMP-3" and "score" in item and not isinstance(item["score"], bool):
        try:
            ok = float(item["score"]) in (1.0, 2.0, 3.0, 4.0, 5.0)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            problems.append(f"{where}: field 'score' is {item['score']!r}, expected one of 1, 2, 3, 4, 5")
    for key in ("tag", "category"):
        if key in task.profile_fields and isinstance(item.get(key), str) and task.labels and item[key] not in task.labels:
            problems.append(f"{where}: field {key!r} is {item[key]!r}, not in the label space {task.labels}")


def _opening(text: str, words: int = 5) -> str:
    return " ".join(str(text).lower().split()[:words])


def _task_openings() -> dict[str, str]:
    """First words of each task's LaMP question template -> task name (LaMP-2's two phrasings both)."""
    from . import tasks as T

    pairs = [(T.Q_LAMP1, "LaMP-1"), (T.Q_LAMP2, "LaMP-2"), (T.Q_LAMP2_OLD, "LaMP-2"), (T.Q_LAMP3, "LaMP-3"),
             (T.Q_LAMP4, "LaMP-4"), (T.Q_LAMP5, "LaMP-5"), (T.Q_LAMP7, "LaMP-7")]
    return {_opening(q.split("{")[0]): name for q, name in pairs}


def _wrong_task(spec: TaskSpec, records: list[tuple[int, str, str]], problems: list[str]) -> None:
    """One problem when questions read like another task's (``records``: (index, id, input)). Profile fields
    alone do not tell LaMP-1 from LaMP-5 or LaMP-3/4 from LaMP-7; the questions' template does."""
    openings = _task_openings()
    hits: dict[str, list[tuple[int, str, str]]] = {}
    for i, rid, inp in records:
        other = openings.get(_opening(inp))
        if other is not None and other != spec.name:
            hits.setdefault(other, []).append((i, rid, inp))
    found = []
    for other, recs in hits.items():
        i, rid, inp = recs[0]
        found.append(f"record {i} (id {rid!r}) field 'input' reads like a {other} question "
                        f"({' '.join(inp.split()[:8])!r} ...), but --task is {spec.name}; {len(recs)} of "
                        f"{len(records)} records do: this looks like a {other} questions file")
    problems[:0] = found   # first: it explains the field errors that follow


def load_questions(task: str | TaskSpec, path: str | Path) -> tuple[list[UserRecord], list[str]]:
    spec = get_task(task) if isinstance(task, str) else task
    data = read_json(path)
    src = str(path)
    if not isinstance(data, list):
        raise UserError(f"top level is a {type(data).__name__}", file=src,
                        expected="a list of {id, input, profile} objects (a LaMP *_questions.json)",
                        hint=NEXT.format(task=spec.name))
    problems: list[str] = []
    notes: list[str] = []
    users: list[UserRecord] = []
    seen: dict[str, int] = {}
    for i, rec in enumerate(data):
        where = f"record {i}"
        if not isinstance(rec, dict):
            problems.append(f"{where}: expected an object, got {type(rec).__name__}")
            continue
        rid = rec.get("id")
        where = f"record {i} (id {rid!r})"
        bad = False
        if "id" not in rec:
            problems.append(f"{where}: missing field 'id'"); bad = True
        elif not isinstance(rid, str):
            problems.append(f"{where}: field 'id' should be a string (LaMP ids are quoted), got {type(rid).__name__}"); bad = True
        elif not is_safe_name(rid):
            problems.append(f"{where}: field 'id' {rid!r} is not safe as a folder name "
                            "(letters, digits, '.', '_', '-' only; no '/', no '..')"); bad = True
        elif rid in seen:
            problems.append(f"{where}: duplicate id (first at record {seen[rid]})"); bad = True
        else:
            seen[rid] = i
        if "input" not in rec:
            problems.append(f"{where}: missing field 'input'"); bad = True
        elif not isinstance(rec["input"], str) or not rec["input"].strip():
            problems.append(f"{where}: field 'input' should be a non-empty string"); bad = True
        prof = rec.get("profile")
        if "profile" not in rec:
            problems.append(f"{where}: missing field 'profile'"); bad = True
        elif not isinstance(prof, list):
            problems.append(f"{where}: field 'profile' should be a list, got {type(prof).__name__}"); bad = True
        else:
            for j, item in enumerate(prof):
                _check_profile_item(spec, item, f"{where} profile[{j}]", problems)
            if len(prof) == 0:
                notes.append(f"user {rid}: empty profile (no personal training data; evaluated with the base model only)")
            elif len(prof) == 1:
                notes.append(f"user {rid}: one-item profile (trained on it, nothing held out)")
        if not bad:
            users.append(UserRecord(id=rid, input=rec["input"], profile=list(prof)))
    _wrong_task(spec, [(i, r.get("id"), r["input"]) for i, r in enumerate(data)
                       if isinstance(r, dict) and isinstance(r.get("input"), str)], problems)
    if problems:
        raise ValidationErrors(problems, file=src, hint=NEXT.format(task=spec.name))
    if not users:
        raise UserError("no users in file", file=src, expected="at least one {id, input, profile} record")
    return users, notes


def load_outputs(task: str | TaskSpec, path: str | Path) -> dict[str, str]:
    spec = get_task(task) if isinstance(task, str) else task
    data = read_json(path)
    src = str(path)
    if not isinstance(data, dict) or "golds" not in data:
        raise UserError("not a LaMP outputs file", file=src,
                        expected='an object {"task": "' + spec.official_name + '", "golds": [{"id", "output"}]}',
                        hint=NEXT.format(task=spec.name))
    problems: list[str] = []
    t = data.get("task")
    if t is not None and get_task_name_or_none(t) not in (spec.name, None) and not (
            spec.name == "LaMP-2-old" and t in ("LaMP_2", "LaMP-2")):
        problems.append(f"field 'task' is {t!r}, but --task is {spec.name} ({spec.official_name})")
    golds = data["golds"]
    if not isinstance(golds, list):
        raise UserError(f"field 'golds' is a {type(golds).__name__}", file=src, field="golds", expected="a list")
    out: dict[str, str] = {}
    for i, g in enumerate(golds):
        if not isinstance(g, dict):
            problems.append(f"golds[{i}]: expected an object, got {type(g).__name__}")
            continue
        gid = g.get("id")
        where = f"golds[{i}] (id {gid!r})"
        if not isinstance(gid, str):
            problems.append(f"{where}: field 'id' missing or not a string")
            continue
        if gid in out:
            problems.append(f"{where}: duplicate id")
            continue
        if "output" not in g:
            problems.append(f"{where}: missing field 'output'")
            continue
        why = spec.validate_output(g["output"])
        if why:
            problems.append(f"{where}: field 'output' is {g['output']!r}, expected {why}")
            continue
        out[gid] = g["output"]
    if problems:
        raise ValidationErrors(problems, file=src, hint=NEXT.format(task=spec.name))
    return out


def get_task_name_or_none(name: str) -> str | None:
    try:
        return get_task(name).name
    except UserError:
        return None


def load_lamp(task: str | TaskSpec, questions: str | Path, outputs: str | Path | None = None,
              *, require_all_golds: bool = True) -> LampDataset:
    spec = get_task(task) if isinstance(task, str) else task
    users, notes = load_questions(spec, questions)
    ds = LampDataset(task=spec, users=users, questions_path=str(questions),
                     outputs_path=str(outputs) if outputs else None, notes=notes)
    if outputs:
        golds = load_outputs(spec, outputs)
        qids = {u.id for u in users}
        problems = [f"gold id {gid!r} has no question in {questions}" for gid in golds if gid not in qids]
        if require_all_golds:
            problems += [f"question id {u.id!r} has no gold output" for u in users if u.id not in golds]
        if problems:
            raise ValidationErrors(problems, file=str(outputs), hint=NEXT.format(task=spec.name))
        for u in users:
            u.gold = golds.get(u.id)
    return ds
