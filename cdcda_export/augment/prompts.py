"""Versioned prompt templates for teacher requests (package files under ``augment/templates``).

``base.yaml`` holds the chat wording shared by all tasks; ``<task>.yaml`` holds the task's
description and output rule (``generic.yaml`` when a task has none). A template's identity is
``"<task>@v<task version>+base@v<base version>"`` plus a sha256 over both files: both go into
every cache key and every example's provenance, so editing a template never reuses stale replies.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from string import Template

import yaml

from ..errors import UserError


REPLY_FORMAT = '{"examples": [{"input": "...", "output": "..."}]}'


def reply_format(slots: list[str] | None = None) -> str:
    """The reply's shape as the prompt shows it: the input a string, or for a multi-slot question an object with
    one field per slot (see :class:`.codec.Codec`)."""
    if not slots or len(slots) < 2:
        return REPLY_FORMAT
    inner = ", ".join(f'"{n}": "..."' for n in slots)
    return '{"examples": [{"input": {' + inner + '}, "output": "..."}]}'


@dataclass(frozen=True)
class PromptTemplate:
    task: str
    version: str          # e.g. "LaMP-3@v1+base@v1"
    sha256: str           # over the raw text of both files
    system: str
    user: str
    reask: str
    task_description: str
    output_rule: str
    reply_format: str = REPLY_FORMAT

    def messages(self, shots: list[tuple], k: int) -> list[dict]:
        """Chat messages asking for ``k`` new examples given the (already redacted) ``shots``; a shot's input is a
        string, or a ``{slot: text}`` object for a multi-slot question."""
        shot_lines = "\n".join(json.dumps({"input": i, "output": o}, ensure_ascii=False) for i, o in shots)
        user = Template(self.user).safe_substitute(
            task_description=self.task_description, output_rule=self.output_rule,
            n_shots=len(shots), shots=shot_lines, k=k, reply_format=self.reply_format)
        return [{"role": "system", "content": self.system.strip()},
                {"role": "user", "content": user.strip()}]

    def reask_message(self, problem: str, k: int) -> dict:
        text = Template(self.reask).safe_substitute(problem=problem, k=k, reply_format=self.reply_format)
        return {"role": "user", "content": text.strip()}


def _read(name: str) -> str | None:
    f = resources.files(__package__).joinpath("templates", f"{name}.yaml")
    return f.read_text(encoding="utf-8") if f.is_file() else None


def _parse(name: str, text: str, required: tuple[str, ...]) -> dict:
    data = yaml.safe_load(text) or {}
    missing = [k for k in required if k not in data]
    if missing:
        raise UserError(f"template is missing {missing}", file=f"cdcda_export/augment/templates/{name}.yaml",
                        expected=f"keys {list(required)}", hint="reinstall the package (pip install -e .)")
    return data


def load_template(task_name: str, labels: list[str] | None = None, slots: list[str] | None = None) -> PromptTemplate:
    """The prompt template for ``task_name`` (falls back to ``generic.yaml``); ``slots``: the question template's
    slots (:attr:`.codec.Codec.slots`), which set the reply's shape (:func:`reply_format`)."""
    base_text = _read("base")
    if base_text is None:
        raise UserError("template base.yaml not found in the package", hint="reinstall: pip install -e .")
    base = _parse("base", base_text, ("version", "system", "user", "reask"))
    own = _read(task_name)
    name = task_name if own is not None else "generic"
    text = own if own is not None else _read("generic")
    spec = _parse(name, text, ("version", "task_description", "output_rule"))
    label_list = ", ".join(labels) if labels else ""
    subst = {"labels": label_list, "task_name": task_name,
             "labels_clause": f"; one of: {label_list}" if labels else ""}
    desc = Template(str(spec["task_description"]).strip()).safe_substitute(subst)
    rule = Template(str(spec["output_rule"]).strip()).safe_substitute(subst)
    fmt = reply_format(slots)
    h = hashlib.sha256(b"\0".join(x.encode() for x in (base_text, text, label_list, fmt))).hexdigest()
    return PromptTemplate(
        task=task_name, version=f"{name}@v{spec['version']}+base@v{base['version']}", sha256=h,
        system=str(base["system"]), user=str(base["user"]), reask=str(base["reask"]),
        task_description=desc, output_rule=rule, reply_format=fmt)
