"""The `--older-than DURATION` argument of `engine prune` and `engine archive prune`."""

from __future__ import annotations

import argparse
import re

from engine import desired

DURATION = re.compile(r"[0-9]{1,9}[smhd]?")


def duration(text: str) -> int:
    """Seconds in `90`, `90s`, `30m`, `12h` or `7d` (an argparse type: anything else is
    a usage error)."""
    text = text.strip()
    if not DURATION.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration (e.g. 30m, 12h, 7d)")
    return int(text) if text.isdigit() else int(desired.parse_duration(text) or 0)
