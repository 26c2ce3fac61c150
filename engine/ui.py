"""Output helpers for the command line: colour only on a TTY, and never when NO_COLOR is set
to a non-empty value (https://no-color.org: an empty NO_COLOR is as if unset).

The core never prints; commands render results through these helpers.
"""

from __future__ import annotations

import json
import os
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console


def use_color(stream: Any = None) -> bool:
    stream = stream or sys.stdout
    return not os.environ.get("NO_COLOR") and hasattr(stream, "isatty") and stream.isatty()


def console(stderr: bool = False) -> Console:
    from rich.console import Console  # rich takes a while to import; most output is plain

    class _Console(Console):
        def on_broken_pipe(self) -> None:
            """A reader gone is the command line's to handle (quietly, exit 0), not rich's
            (exit 1)."""
            self.quiet = True
            raise BrokenPipeError

    stream = sys.stderr if stderr else sys.stdout
    color = use_color(stream)
    return _Console(file=stream, no_color=not color, force_terminal=color,
                    highlight=False, soft_wrap=True, emoji=False,
                    color_system="standard" if color else None)


def is_tty() -> bool:
    return sys.stdin.isatty() and sys.stdout.isatty()


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True) + "\n")


def reader_gone() -> bool:
    """Whether standard output's reader has gone (`engine logs -f | head -1`): a command
    that would print forever stops; one doing work finishes it (engine.cli's `_Stdout`)."""
    return isinstance(getattr(sys.stdout, "failed", None), BrokenPipeError)


def out(text: str = "") -> None:
    sys.stdout.write(text + "\n")


def err(text: str) -> None:
    sys.stderr.write(text + "\n")
