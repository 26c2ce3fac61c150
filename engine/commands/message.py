"""`engine message AGENT TEXT`: type a message into an agent's session. An interactive
agent (harness `mode: interactive`) takes it as its next turn, and its WaitingForInput
condition is cleared."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from engine import runtimes, signals, ui
from engine.commands import _common
from engine.errors import EngineError


def register(sub: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(
        "message", help="send text to an agent (pasted into its session, then Enter)")
    _common.add_agent_arg(p)
    p.add_argument("text", metavar="TEXT", help="the message; '-' reads it from stdin")
    return p


def run(args: argparse.Namespace) -> int:
    text = sys.stdin.read() if args.text == "-" else args.text
    if not text.strip():
        raise EngineError("message: empty text")
    r = _common.repo()
    loc = _common.locate(r, args)
    runtimes.get(loc.runtime, r.root, loc.host or None).send(loc.grove, loc.agent, text)
    signals.answered(r.root, loc.grove, loc.agent)  # no longer waiting for a person
    ui.out(f"delivered to {loc.grove}/{loc.agent}")
    return 0
