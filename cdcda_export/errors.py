"""User-facing errors.

Every error a user can cause is a :class:`UserError`: it names the file, the field (or record),
what was expected and what to run next. The CLI prints it without a traceback and exits 2.
"""

from __future__ import annotations


class UserError(Exception):
    """An error caused by input the user controls (files, flags, recipes)."""

    def __init__(self, message: str, *, file: str | None = None, field: str | None = None,
                 expected: str | None = None, hint: str | None = None):
        self.file, self.field, self.expected, self.hint = file, field, expected, hint
        parts = []
        if file:
            parts.append(f"{file}")
        if field:
            parts.append(f"field {field!r}")
        head = ": ".join(parts)
        text = f"{head}: {message}" if head else message
        if expected:
            text += f" (expected {expected})"
        if hint:
            text += f"\n  next: {hint}"
        super().__init__(text)


class ValidationErrors(UserError):
    """Several problems found at once (collected, then raised together, litgpt-style)."""

    def __init__(self, problems: list[str], *, file: str | None = None, hint: str | None = None):
        self.problems = problems
        shown = problems[:20]
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        body = "\n".join(f"  - {p}" for p in shown) + more
        super().__init__(f"{len(problems)} problem(s):\n{body}", file=file, hint=hint)
