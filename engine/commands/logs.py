"""`engine logs AGENT [-f]`: the agent's output, with escape sequences and control
characters removed (`reader.for_terminal`): an agent's output never drives the terminal."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from engine import runtimes
from engine.commands import _common
from engine.trust import reader


def register(sub: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser("logs", help="print an agent's output")
    _common.add_agent_arg(p)
    p.add_argument("-f", "--follow", action="store_true", help="keep printing until it ends")
    return p


def run(args: argparse.Namespace) -> int:
    r = _common.repo()
    loc = _common.locate(r, args)
    rt = runtimes.get(loc.runtime, r.root, loc.host or None)
    for line in rt.logs(loc.grove, loc.agent, follow=args.follow):
        sys.stdout.write(reader.for_terminal(line) + "\n")
        if args.follow:
            sys.stdout.flush()
    return 0
