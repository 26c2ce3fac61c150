"""`engine diff AGENT`: the agent's branch against its base, plus uncommitted work."""

from __future__ import annotations

import argparse
from typing import Any

from engine import review, ui
from engine.commands import _common
from engine.workspace import fetch_back, path_for


def register(sub: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser("diff", help="show an agent's changes")
    _common.add_agent_arg(p)
    p.add_argument("--stat", action="store_true", help="only a summary per file")
    return p


def _base(r: _common.Repo, grove: str) -> str:
    try:
        import argparse as _a
        return _common.load(r, _a.Namespace(groves=[grove], set=[]),
                            resolve_secrets=False)[0].base_ref
    except Exception:  # manifests broken: fall back to the current branch
        return ""


def run(args: argparse.Namespace) -> int:
    r = _common.repo()
    loc = _common.locate(r, args)
    branch = loc.record.branch if loc.record else f"engine/{loc.grove}/{loc.agent}"
    if loc.record is not None and loc.record.workspace == "clone":
        fetch_back(r.root, path_for(r.root, loc.grove, loc.agent), branch)
    workdir = path_for(r.root, loc.grove, loc.agent)
    ui.out(review.diff(r.root, branch, _base(r, loc.grove), workdir, args.stat))
    return 0
