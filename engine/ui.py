"""Output helpers for the command line: colour only on a TTY and never with NO_COLOR.

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
    return "NO_COLOR" not in os.environ and hasattr(stream, "isatty") and stream.isatty()


def console(stderr: bool = False) -> Console:
    from rich.console import Console  # rich takes a while to import; most output is plain

    stream = sys.stderr if stderr else sys.stdout
    color = use_color(stream)
    return Console(file=stream, no_color=not color, force_terminal=color,
                   highlight=False, soft_wrap=True, emoji=False,
                   color_system="standard" if color else None)


def is_tty() -> bool:
    return sys.stdin.isatty() and sys.stdout.isatty()


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True) + "\n")


def out(text: str = "") -> None:
    sys.stdout.write(text + "\n")


def err(text: str) -> None:
    sys.stderr.write(text + "\n")
