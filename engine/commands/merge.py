"""`engine merge AGENT`: land the agent's branch on the base branch (refuses on conflict)."""

from __future__ import annotations

import argparse
from typing import Any

from engine import review, ui
from engine.commands import _common


def register(sub: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(
        "merge", help="merge an agent's branch into the base branch")
    _common.add_agent_arg(p)
    p.add_argument("-m", "--message", help="merge commit message")
    return p


def run(args: argparse.Namespace) -> int:
    r = _common.repo()
    loc, branch, base = _common.review_target(r, args)
    msg = args.message or f"Merge agent {loc.grove}/{loc.agent} ({branch})"
    commit = review.merge(r.root, branch, base, msg)
    ui.out(f"merged {branch}: {commit[:12]}")
    return 0
