"""`engine restore AGENT [--archive N]`: bring archived work back into the agent's worktree."""

from __future__ import annotations

import argparse
from typing import Any

from engine import archive, ui, workspace
from engine.commands import _common
from engine.errors import EngineError


def register(sub: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(
        "restore", help="restore an agent's archived work (commits and uncommitted files)")
    p.add_argument("agent", metavar="AGENT",
                   help="NAME (of an agent with archives, current or removed) or GROVE/NAME")
    _common.add_grove_arg(p)
    p.add_argument("--archive", type=int, metavar="N", help="archive number (default: latest)")
    p.add_argument("--list", action="store_true", help="list the archives")
    return p


def run(args: argparse.Namespace) -> int:
    r = _common.repo()
    gname, aname = _common.pick_agent(args.agent,
                                      _common.agent_names(r, args.groves, archived=True))
    if args.list:
        refs = archive.archives(r.root, gname, aname)
        if not refs:
            raise EngineError(f"agent {gname}/{aname}: no archives")
        for ref in refs:
            ui.out(ref)
        return 0
    try:  # restore into the kind of working copy the grove's agents use
        mode = _common.load(r, argparse.Namespace(groves=[gname], set=[]),
                            resolve_secrets=False)[0].workspace
    except EngineError:
        mode = "worktree"
    ref, path = workspace.restore(r.root, gname, aname, args.archive, mode)
    ui.out(f"restored {ref} into {path.relative_to(r.root)}")
    return 0
