"""Errors that reach a user: each says where the problem is and what to do about it."""

from __future__ import annotations


class GradtoolError(Exception):
    """A problem a user can fix. The CLI prints it as one line and exits 1."""

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None,
                 hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.file = file
        self.line = line
        self.hint = hint

    def location(self) -> str:
        if self.file is None:
            return ""
        return f"{self.file}:{self.line}" if self.line else str(self.file)

    def __str__(self) -> str:
        where = self.location()
        text = f"{where}: {self.message}" if where else self.message
        if self.hint:
            text += f" — {self.hint}"
        return text


class SpecError(GradtoolError):
    """A spec that cannot be read, validated or differentiated."""
