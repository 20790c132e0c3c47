"""Privacy: redact personal identifiers before profile text leaves for a teacher; local audit log.

What is detected (regular expressions; no NER model):

* e-mail addresses -> ``[EMAIL]``
* URLs (``http(s)://``, ``www.``) -> ``[URL]``
* phone numbers: 9-15 digits with optional ``+``, spaces, dots, dashes or parentheses, or the
  7-digit ``ddd-dddd`` form -> ``[PHONE]``. Years and ranges such as ``1999-2001`` are left alone.
* social handles ``@name`` -> ``[HANDLE]``
* names, by a **heuristic**: an honorific followed by a capitalized word (``Dr. Smith``), or two or
  three consecutive capitalized words inside a sentence (``... met John Smith yesterday``). It
  misses single first names and lowercase names, and it also redacts some multi-word proper
  nouns (``New York``, movie titles). Turn it off with ``names=False`` when that hurts a task.

The audit log (``audit.jsonl``) records per request hashes of what was sent, never the content.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}\b")
URL = re.compile(r"\b(?:https?://|www\.)[^\s<>\"')\]]+", re.IGNORECASE)
PHONE = re.compile(r"(?<![\w+])(?:\+?\d[\d\s().-]{5,}\d)(?!\w)")
HANDLE = re.compile(r"(?<![\w@.])@[A-Za-z0-9_]{2,30}\b")
HONORIFIC_NAME = re.compile(r"\b(?:Mr|Mrs|Ms|Miss|Dr|Prof|Sir|Madam)\.?\s+[A-Z][a-z]+(?:\s+[A-Z][a-z]+)?")
# Two or three capitalized words, not at the start of a sentence (checked in _names).
CAP_SEQ = re.compile(r"\b[A-Z][a-z]{1,20}(?:\s+[A-Z][a-z]{1,20}){1,2}\b")
_NOT_NAMES = {
    "I", "The", "A", "An", "This", "That", "These", "Those", "It", "My", "Our", "Your", "We", "He", "She",
    "They", "In", "On", "At", "For", "And", "But", "Or", "If", "When", "What", "Which", "Who", "How",
    "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday", "January", "February",
    "March", "April", "May", "June", "July", "August", "September", "October", "November", "December",
}
PLACEHOLDERS = ("[EMAIL]", "[URL]", "[PHONE]", "[HANDLE]", "[NAME]")


def _url(m: re.Match) -> str:
    text = m.group(0)
    core = text.rstrip(".,;:!?")      # sentence punctuation after a URL is not part of it
    return "[URL]" + text[len(core):]


def _phone(m: re.Match) -> str:
    text = m.group(0)
    digits = sum(c.isdigit() for c in text)
    if 9 <= digits <= 15 or re.fullmatch(r"\d{3}[-.]\d{4}", text):
        return "[PHONE]"
    return text


@dataclass
class Redactor:
    """Replaces identifiers with placeholders and counts what it replaced."""

    names: bool = True
    counts: Counter = field(default_factory=Counter)

    def _sub(self, kind: str, pattern: re.Pattern, text: str, repl=None) -> str:
        def f(m: re.Match) -> str:
            out = repl(m) if repl else f"[{kind.upper()}]"
            if out != m.group(0):
                self.counts[kind] += 1
            return out
        return pattern.sub(f, text)

    def _names(self, m: re.Match) -> str:
        words = m.group(0).split()
        start = m.start()
        prefix = m.string[:start].rstrip()
        sentence_start = not prefix or prefix[-1] in ".!?:;\"'(\n"
        if sentence_start or words[0] in _NOT_NAMES or any(w in _NOT_NAMES for w in words):
            return m.group(0)
        return "[NAME]"

    def redact(self, text: str) -> str:
        if not text:
            return text
        text = self._sub("email", EMAIL, text)
        text = self._sub("url", URL, text, _url)
        text = self._sub("phone", PHONE, text, _phone)
        text = self._sub("handle", HANDLE, text)
        if self.names:
            text = self._sub("name", HONORIFIC_NAME, text)
            text = self._sub("name", CAP_SEQ, text, self._names)
        return text

    def redact_item(self, item: dict, keep: tuple[str, ...] = ("id",)) -> dict:
        """A copy of a profile item with every string value (except ``keep`` keys) redacted."""
        return {k: (self.redact(v) if isinstance(v, str) and k not in keep else v) for k, v in item.items()}


def find_identifiers(text: str) -> list[tuple[str, str]]:
    """(kind, string) of every e-mail, URL, handle, phone number and redaction placeholder in ``text``."""
    found = []
    for kind, pat in (("email", EMAIL), ("url", URL), ("handle", HANDLE)):
        found += [(kind, m.group(0)) for m in pat.finditer(text)]
    found += [("phone", m.group(0)) for m in PHONE.finditer(text) if _phone(m) == "[PHONE]"]
    found += [("placeholder", p) for p in PLACEHOLDERS if p in text]
    return found


def contains_identifier(text: str, allowed: set[str] | frozenset = frozenset()) -> str | None:
    """Kind of the first identifier in ``text`` that is not in ``allowed`` (placeholders never are)."""
    for kind, value in find_identifiers(text):
        if kind == "placeholder" or value not in allowed:
            return kind
    return None


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class AuditLog:
    """Append-only JSONL: one line per request sent to a teacher, with hashes, never content."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def record(self, **entry) -> None:
        line = json.dumps(entry, sort_keys=True, ensure_ascii=False)
        # One write() of a whole line with O_APPEND: a kill leaves at most one torn final line.
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, (line + "\n").encode("utf-8"))
        finally:
            os.close(fd)
