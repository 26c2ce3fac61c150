"""Progress of a converge pass for the commands that run one (apply, destroy, the
single-agent operations): plain lines, or JSON lines with --json-stream, coloured on a TTY.
Messages can carry an agent's text, so every line goes through `for_terminal`.

While `apply --wait` waits (`Progress.watch`), a terminal gets a live table instead (rich's
Live display, one row per agent: phase, time in that phase, the change made), ending as a
static table; elsewhere (a pipe, TERM=dumb, CI) each phase change is one plain line."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from engine import inventory, ui
from engine.executor import Outcome
from engine.plan import Action, Change
from engine.trust.reader import for_terminal, one_line

if TYPE_CHECKING:
    from rich.console import Console, RenderableType

Phases = Callable[[], dict[str, dict[str, str]]]  # grove -> agent -> phase, as last seen
TICK = 0.25  # seconds between looks at the phases (and refreshes of the live table)
DONE = ("Succeeded", "Failed", "Blocked", "Stopped", "Deleted")  # phases an agent ends in
PHASE_STYLE = {"Succeeded": "green", "Failed": "red", "Blocked": "red", "Running": "cyan",
               "Restarting": "yellow", "Pending": "yellow"}


@dataclass
class Row:
    """One agent in the live view: its phase (since when), the change made to it, and
    how long it has run: from when this command first saw it to when it ended."""

    phase: str = ""
    since: float = field(default_factory=time.monotonic)
    change: str = ""
    failed: bool = False
    start: float = field(default_factory=time.monotonic)
    ended: float | None = None

    def elapsed(self, now: float) -> str:
        return elapsed((self.ended or now) - self.start)


def live_wanted(stream_json: bool, quiet: bool) -> bool:
    """A live view only for a person at a capable terminal (not a pipe, TERM=dumb or CI)."""
    return (not stream_json and not quiet and sys.stdout.isatty()
            and os.environ.get("TERM", "") != "dumb" and not os.environ.get("CI"))


def elapsed(seconds: float) -> str:
    s = int(seconds)
    return f"{s}s" if s < 60 else f"{s // 60}m{s % 60:02d}s" if s < 3600 else \
        f"{s // 3600}h{s % 3600 // 60:02d}m"


class Progress:
    def __init__(self, stream_json: bool = False, quiet: bool = False) -> None:
        self.stream_json = stream_json
        self.quiet = quiet
        self.console = ui.console()
        self.rows: dict[tuple[str, str], Row] = {}
        self.lock = threading.Lock()
        self.live = False  # the live table is showing: started/finished update its rows
        self.t0 = time.monotonic()

    def _emit(self, event: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(event, sort_keys=True) + "\n")
        sys.stdout.flush()

    def _row(self, grove: str, agent: str) -> Row:
        return self.rows.setdefault((grove, agent), Row())

    def started(self, grove: str, change: Change) -> None:
        with self.lock:
            self._row(grove, change.agent).change = f"{change.action.word}..."
        if self.stream_json:
            self._emit({"event": "started", "grove": grove, "agent": change.agent,
                        "action": change.action.word, "time": inventory.now()})
        elif not self.quiet and not self.live:
            self.console.print(for_terminal(f"{grove}/{change.agent}: "
                                            f"{change.action.word}..."), markup=False)

    def finished(self, grove: str, o: Outcome) -> None:
        with self.lock:
            row = self._row(grove, o.agent)
            row.change = f"{o.action.word}: {o.status} ({o.seconds:.1f}s)"
            row.failed = not o.ok
            if o.action is Action.DELETE and o.ok:  # no phase will be seen for it again
                row.phase, row.ended = "Deleted", time.monotonic()
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
        from rich.text import Text

        # above the live table, if it shows; never markup (a message can quote an agent)
        self.console.print(Text(text, style=style if ui.use_color() else ""))

    def note(self, text: str) -> None:
        """A line about the run itself (waiting for a lock, what is converged)."""
        line = one_line(text, 2000)  # one line each: an agent's text cannot forge more
        if self.stream_json:
            self._emit({"event": "note", "message": line, "time": inventory.now()})
        elif not self.quiet:
            ui.err(line)

    # -- while apply --wait waits ----------------------------------------------------------

    @contextlib.contextmanager
    def watch(self, phases: Phases) -> Iterator[None]:
        """Show the agents' phases while the body runs: a live table on a terminal, plain
        lines as phases change otherwise (nothing with --json or --json-stream)."""
        if self.quiet or self.stream_json:
            yield
            return
        if live_wanted(self.stream_json, self.quiet):
            with self._live(phases):
                yield
            return
        stop = threading.Event()
        thread = threading.Thread(target=self._plain_lines, args=(phases, stop),
                                  name="engine-progress", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            self._plain_lines(phases, None)  # the last phases seen, if not yet said

    def _observe(self, phases: Phases) -> list[tuple[str, str, Row]]:
        """Take in the phases seen now; returns the rows whose phase changed."""
        seen = {g: dict(ps) for g, ps in list(phases().items())}  # copies: another thread
        now, changed = time.monotonic(), []
        with self.lock:
            for g, ps in sorted(seen.items()):
                for name, phase in sorted(ps.items()):
                    row = self._row(g, name)
                    if row.phase != phase:
                        row.phase, row.since = phase, now
                        row.ended = now if phase in DONE else None
                        changed.append((g, name, row))
        return changed

    def _plain_lines(self, phases: Phases, stop: threading.Event | None) -> None:
        while True:
            for g, name, row in self._observe(phases):
                line = for_terminal(f"{g}/{name}: {row.phase} "
                                    f"(after {elapsed(row.since - self.t0)})")
                sys.stdout.write(line + "\n")
                sys.stdout.flush()
            if stop is None or stop.wait(TICK):
                return

    def _table(self, phases: Phases, final: bool = False) -> RenderableType:
        from rich.table import Table
        from rich.text import Text

        with contextlib.suppress(Exception):  # the view must never end the wait
            self._observe(phases)
        now = time.monotonic()
        color = ui.use_color()
        with self.lock:
            rows = sorted(self.rows.items())
        done = sum(r.phase in DONE for _, r in rows)
        title = (f"{'' if final else 'waiting: '}{done}/{len(rows)} agents finished, "
                 f"{elapsed(now - self.t0)}")
        table = Table(title=Text(title), title_justify="left", box=None, pad_edge=False,
                      show_edge=False)
        for col in ("AGENT", "PHASE", "ELAPSED", "CHANGE"):
            table.add_column(Text(col), no_wrap=col != "CHANGE")
        for (g, name), row in rows:
            style = PHASE_STYLE.get(row.phase, "") if color else ""
            table.add_row(Text(for_terminal(f"{g}/{name}")),
                          Text(row.phase or "-", style=style),
                          Text(row.elapsed(now)),
                          Text(for_terminal(row.change or "-"),
                               style="red" if row.failed and color else ""))
        return table

    @contextlib.contextmanager
    def _live(self, phases: Phases) -> Iterator[None]:
        from rich.live import Live

        console = _live_console()
        final: list[RenderableType] = []  # once set, what the live display shows last
        live = Live(console=console, refresh_per_second=1 / TICK, transient=False,
                    get_renderable=lambda: final[0] if final else self._table(phases))
        plain, self.console = self.console, console
        self.live = True
        live.start()
        try:
            yield
        finally:
            # stop first (the cursor back, the terminal sane), even on Ctrl-C; then the
            # final state once more, as a static table
            final.append(self._table(phases, final=True))
            live.stop()
            self.live = False
            self.console = plain


def _live_console() -> Console:
    """A console that animates (it is a terminal) in colour unless NO_COLOR says not."""
    from rich.console import Console

    color = ui.use_color()
    return Console(file=sys.stdout, force_terminal=True, no_color=not color,
                   color_system="standard" if color else None, highlight=False,
                   emoji=False)
