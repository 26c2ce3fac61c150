"""`engine look AGENT`: the agent's current screen, as text safe for a terminal
(`reader.for_terminal`: no escape sequences or control characters)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from engine import runtimes
from engine.commands import _common
from engine.trust import reader


def register(sub: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser("look", help="show an agent's current screen")
    _common.add_agent_arg(p)
    return p


def run(args: argparse.Namespace) -> int:
    r = _common.repo()
    loc = _common.locate(r, args)
    screen = runtimes.get(loc.runtime, r.root, loc.host or None).look(loc.grove, loc.agent)
    sys.stdout.write(reader.for_terminal(screen))
    return 0
