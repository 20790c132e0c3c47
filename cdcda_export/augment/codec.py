"""Between training pairs and what the teacher sees.

Training pairs (``TaskSpec.profile_pairs``) carry the task's full question, e.g. LaMP-3's
``What is the score of the following review ... review: <text>``. Sending that wrapper in every
few-shot wastes tokens and invites the teacher to garble it, so for questions with one slot the
teacher sees only the slot (the review text) and the slot is put back into the task's
``question_template`` when the example is written. Questions with several slots (LaMP-1: title and
two references) go to the teacher as one JSON object per input, a field per slot
(``{"title": ..., "ref1": ..., "ref2": ...}``, :meth:`Codec.fields`), and the reply's objects are put
back into the template (:meth:`Codec.from_fields`). Before, the teacher had to write the whole
question back in the template's exact wording: the real SmolLM2-135M teacher never did (LaMP-1, 8
users: 0 of 54 candidates passed the schema filter). Internally an input stays the full question
string. Filters (duplicates, relevance) judge the slots' text (:meth:`Codec.view`), so the shared
wrapper does not make every example look alike.
"""

from __future__ import annotations

import re
from typing import Callable

_SLOT = re.compile(r"\{(\w+)\}")


class Codec:
    def __init__(self, question_template: str | None):
        self.template = question_template or "{text}"
        self.slots = _SLOT.findall(self.template)
        parts = _SLOT.split(self.template)   # literal, name, literal, name, ...
        rx = ""
        for i, part in enumerate(parts):
            rx += f"(?P<{part}>.+?)" if i % 2 else re.escape(part)
        self._rx = re.compile(rf"^{rx}$", re.DOTALL)

    @property
    def single(self) -> bool:
        return len(self.slots) == 1

    def match(self, question: str) -> dict | None:
        m = self._rx.match(question.strip())
        return m.groupdict() if m else None

    def fields(self, question: str) -> dict | None:
        """A multi-slot question as the teacher sees it: ``{slot: text}`` (None when it does not fit the
        template)."""
        groups = self.match(question)
        return {n: groups[n].strip() for n in self.slots} if groups else None

    def from_fields(self, obj) -> str | None:
        """The question for a teacher-written ``{slot: text}`` object, or None when the object does not fill the
        template: a slot missing, extra or empty, a value that is not a string, or one that would read back
        differently (it contains the template's own separators, e.g. ``" [2]: "`` in LaMP-1's ``ref1``)."""
        if not isinstance(obj, dict) or set(obj) != set(self.slots):
            return None
        vals = {}
        for n in self.slots:
            v = obj[n]
            if not isinstance(v, str) or not v.strip():
                return None
            vals[n] = " ".join(v.split())   # one line: a template slot never spans lines
        out = self.template
        for n in self.slots:
            out = out.replace("{" + n + "}", vals[n], 1)
        return out if self.fields(out) == vals else None

    def slot_bounds(self, questions, ratio: float, ceiling: int) -> dict[str, tuple[int, int]]:
        """Length bounds of each slot from the user's real questions, as :func:`.filters.length_bounds` sets them
        for whole inputs (:func:`.filters.span_bounds`, at least 1 character)."""
        from .filters import span_bounds

        found = [f for f in map(self.fields, questions) if f]
        return {n: span_bounds([len(f[n]) for f in found], ratio, 1, ceiling) for n in self.slots}

    def unwrap(self, question: str) -> str:
        """Teacher-facing input for a training question (the slot, or the whole question)."""
        if self.single:
            m = self.match(question)
            return m[self.slots[0]].strip() if m else question
        return question

    def wrap(self, core: str) -> str | None:
        """Training question for a teacher-written input, or None when it does not fit the task."""
        core = core.strip()
        if self.single:
            if self.match(core):  # the teacher copied the wrapper: accept it once, do not double it
                return core
            return self.template.replace("{" + self.slots[0] + "}", core)
        return core if self.match(core) else None

    def view(self, core: str) -> str:
        """Text that duplicate/relevance filters compare: the slots, without the shared wording."""
        if self.single:
            return core
        groups = self.match(core)
        return " | ".join(groups[n] for n in self.slots) if groups else core

    def editable(self, core: str) -> tuple[str, Callable[[str], str]]:
        """(text an offline perturbation may change, function that rebuilds the input from it)."""
        if self.single:
            return core, lambda t: t
        groups = self.match(core)
        if not groups:
            return core, lambda t: t
        first = self.slots[0]

        def rebuild(t: str) -> str:
            out = self.template
            for name in self.slots:
                out = out.replace("{" + name + "}", t if name == first else groups[name], 1)
            return out

        return groups[first], rebuild
