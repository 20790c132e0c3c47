"""Parse a teacher's reply into candidate examples (wire contract: ``{"examples": [...]}``)."""

from __future__ import annotations

import json
import re

FENCE = re.compile(r"```(?:json|JSON)?\s*\n?(.*?)```", re.DOTALL)


class MalformedReply(ValueError):
    """The reply holds no usable ``{"examples": [...]}`` object."""


def _candidates(text: str):
    yield text
    for m in FENCE.finditer(text):
        yield m.group(1)
    a, b = text.find("{"), text.rfind("}")
    if 0 <= a < b:
        yield text[a:b + 1]


def parse_examples(text: str | None) -> list:
    """The list under ``"examples"`` (items unchecked: the schema filter judges each one).

    Tolerates code fences and prose around the object. Raises :class:`MalformedReply`.
    """
    if not text or not text.strip():
        raise MalformedReply("empty reply")
    for chunk in _candidates(text.strip()):
        try:
            obj = json.loads(chunk)
        except (json.JSONDecodeError, ValueError):
            continue
        if isinstance(obj, dict) and isinstance(obj.get("examples"), list):
            return obj["examples"]
        if isinstance(obj, list):
            return obj
        if isinstance(obj, dict) and {"input", "output"} <= obj.keys():
            return [obj]
    raise MalformedReply("no JSON object with an 'examples' list")
