"""Progress of a converge pass for the commands that run one (apply, destroy, the
single-agent operations): plain lines, or JSON lines with --json-stream, coloured on a TTY.
Messages can carry an agent's text, so every line goes through `for_terminal`."""

from __future__ import annotations

import json
import sys
from typing import Any

from engine import inventory, ui
from engine.executor import Outcome
from engine.plan import Change
from engine.trust.reader import for_terminal, one_line


class Progress:
    def __init__(self, stream_json: bool = False, quiet: bool = False) -> None:
        self.stream_json = stream_json
        self.quiet = quiet
        self.console = ui.console()

    def _emit(self, event: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(event, sort_keys=True) + "\n")
        sys.stdout.flush()

    def started(self, grove: str, change: Change) -> None:
        if self.stream_json:
            self._emit({"event": "started", "grove": grove, "agent": change.agent,
                        "action": change.action.word, "time": inventory.now()})
        elif not self.quiet:
            self.console.print(for_terminal(f"{grove}/{change.agent}: "
                                            f"{change.action.word}..."), markup=False)

    def finished(self, grove: str, o: Outcome) -> None:
        if self.stream_json:
            self._emit({"event": "finished", "grove": grove, "agent": o.agent,
                        "action": o.action.word, "status": o.status, "message": o.message,
                        "archive": o.archive, "seconds": o.seconds,
                        "time": inventory.now()})
            return
        if self.quiet:
            return
        style = "red" if not o.ok else "green"
        extra = f" - {o.message}" if o.status in ("failed", "skipped") else ""
        if o.archive:
            extra += f" (work archived at {o.archive})"
        text = for_terminal(f"{grove}/{o.agent}: {o.status} ({o.seconds:.1f}s){extra}")
        if ui.use_color():
            self.console.print(f"[{style}]{text.replace('[', chr(92) + '[')}[/]")
        else:
            self.console.print(text, markup=False)

    def note(self, text: str) -> None:
        """A line about the run itself (waiting for a lock, what is converged)."""
        line = one_line(text, 2000)  # one line each: an agent's text cannot forge more
        if self.stream_json:
            self._emit({"event": "note", "message": line, "time": inventory.now()})
        elif not self.quiet:
            ui.err(line)
