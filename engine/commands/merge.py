"""`engine merge AGENT`: land the agent's branch on the base branch (refuses on conflict)."""

from __future__ import annotations

import argparse
from typing import Any

from engine import review, ui
from engine.commands import _common
from engine.commands.diff import _base
from engine.workspace import fetch_back, path_for


def register(sub: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(
        "merge", help="merge an agent's branch into the base branch")
    _common.add_agent_arg(p)
    p.add_argument("-m", "--message", help="merge commit message")
    return p


def run(args: argparse.Namespace) -> int:
    r = _common.repo()
    loc = _common.locate(r, args)
    branch = loc.record.branch if loc.record else f"engine/{loc.grove}/{loc.agent}"
    if loc.record is not None and loc.record.workspace == "clone":
        fetch_back(r.root, path_for(r.root, loc.grove, loc.agent), branch)
    msg = args.message or f"Merge agent {loc.grove}/{loc.agent} ({branch})"
    commit = review.merge(r.root, branch, _base(r, loc.grove), msg)
    ui.out(f"merged {branch}: {commit[:12]}")
    return 0
