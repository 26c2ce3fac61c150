"""`engine diff AGENT`: the agent's branch against its base, plus uncommitted work."""

from __future__ import annotations

import argparse
from typing import Any

from engine import review, ui
from engine.commands import _common
from engine.trust.reader import for_terminal
from engine.workspace import path_for


def register(sub: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser("diff", help="show an agent's changes")
    _common.add_agent_arg(p)
    p.add_argument("--stat", action="store_true", help="only a summary per file")
    return p


def run(args: argparse.Namespace) -> int:
    r = _common.repo()
    loc, branch, base = _common.review_target(r, args)
    workdir = path_for(r.root, loc.grove, loc.agent)
    # the diff is the agent's text: no escape sequence of it reaches the terminal
    ui.out(for_terminal(review.diff(r.root, branch, base, workdir, args.stat)))
    return 0
