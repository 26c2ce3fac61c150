"""`engine attach AGENT`: attach this terminal to the agent's tmux session."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from engine import runtimes
from engine.commands import _common
from engine.errors import EngineError


def register(sub: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser("attach", help="attach to an agent's session")
    _common.add_agent_arg(p)
    return p


def run(args: argparse.Namespace) -> int:
    if not sys.stdin.isatty():
        raise EngineError("attach needs a terminal; use engine look or engine logs -f")
    r = _common.repo()
    loc = _common.locate(r, args)
    return runtimes.get(loc.runtime, r.root, loc.host or None).attach(loc.grove, loc.agent)
