"""Errors: the one root every stage raises, and the diagnostics the loaders collect.

Every stage raises `EngineError` (or a subclass) for a user-facing problem; the CLI maps it
to exit 1 with a one-line summary. Anything else escaping to the CLI is a bug (exit 3).
Loaders collect `Diagnostic`s instead of stopping at the first problem.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, order=True)
class Diagnostic:
    """One problem with the input, located at file:line:col when known."""

    file: str = ""
    line: int = 0
    col: int = 0
    message: str = ""
    path: str = ""  # JSON path inside the document, e.g. spec.agents[2].name

    def __str__(self) -> str:
        where = self.file
        if self.line:
            where += f":{self.line}:{self.col}" if self.col else f":{self.line}"
        return f"{where}: {self.message}" if where else self.message

    def to_json(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "line": self.line,
            "col": self.col,
            "path": self.path,
            "message": self.message,
        }


class EngineError(Exception):
    """A problem the user can fix: exit 1, one line, no traceback."""

    exit_code = 1

    def __init__(self, summary: str, detail: str = "") -> None:
        super().__init__(summary)
        self.summary = summary
        self.detail = detail


class InvalidManifests(EngineError):
    """Manifests failed to load or validate; carries every diagnostic found."""

    def __init__(self, diagnostics: list[Diagnostic]) -> None:
        self.diagnostics = sorted(set(diagnostics))
        n = len(self.diagnostics)
        first = str(self.diagnostics[0]) if n else "invalid manifests"
        more = f" (and {n - 1} more)" if n > 1 else ""
        super().__init__(first + more, "\n".join(str(d) for d in self.diagnostics))


class UsageError(EngineError):
    """The command line itself is wrong: exit 2."""

    exit_code = 2


class LockedError(EngineError):
    """Another operation holds the grove's lock."""


class StalePlanError(EngineError):
    """A saved plan no longer matches the manifests or the inventory."""


class RuntimeUnavailable(EngineError):
    """A runtime (Docker engine, cluster) cannot be reached."""


class TemporaryError(EngineError):
    """A runtime step failed in a way that may succeed if retried after `delay` seconds."""

    def __init__(self, summary: str, delay: float = 1.0, detail: str = "") -> None:
        super().__init__(summary, detail)
        self.delay = delay


class PermanentError(EngineError):
    """A runtime step failed and retrying will not help."""
