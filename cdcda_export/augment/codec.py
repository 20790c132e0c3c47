"""Between training pairs and what the teacher sees.

Training pairs (``TaskSpec.profile_pairs``) carry the task's full question, e.g. LaMP-3's
``What is the score of the following review ... review: <text>``. Sending that wrapper in every
few-shot wastes tokens and invites the teacher to garble it, so for questions with one slot the
teacher sees only the slot (the review text) and the slot is put back into the task's
``question_template`` when the example is written. Questions with several slots (LaMP-1: title and
two references) go to the teacher whole and must come back matching the template exactly (the
schema filter checks it). Filters (duplicates, relevance) judge the teacher-facing text, so the
shared wrapper does not make every example look alike.
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
