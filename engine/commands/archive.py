"""`engine archive list [AGENT] [--json]` and `engine archive prune --older-than D`:
the work saved under `refs/engine/archive/<grove>/<agent>/<n>`.

list: every archive (of the selected groves, of AGENT), with when it was made, how many of
its commits are not on the grove's base branch now (0 once the work is merged), how many
files it changes against the commit the agent started from (uncommitted files included),
and whether it holds uncommitted files. prune: delete the archives made longer ago than
DURATION, except the newest archive of an agent that has no working copy now: that one is
the last copy of the agent's work `engine restore` can bring back, and stays whatever its
age (delete it by hand with `git update-ref -d REF` if you must). The deletion is one git
transaction; the objects go at git's next garbage collection.
"""

from __future__ import annotations

import argparse
import datetime as dt
import time
from pathlib import Path
from typing import Any

from engine import archive, manifest, ui, workspace
from engine.commands import _common
from engine.commands._duration import duration
from engine.errors import EngineError
from engine.trust.reader import for_terminal


def register(sub: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(
        "archive", help="list or expire archived work (refs/engine/archive/)",
        description="`engine archive list [-g GROVE] [AGENT] [--json]`: each archive "
        "(AGENT: NAME or GROVE/NAME) with its date, its commits not on the grove's base "
        "branch, the files it changes and whether it holds uncommitted files. `engine "
        "archive prune --older-than DURATION [-g GROVE] [--dry-run]`: delete the archives "
        "older than that, except the newest one of an agent that has no working copy.")
    verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True,
                             parser_class=type(p), help="list or prune")
    ls = verbs.add_parser("list", help="archives with date, commits and files",
                          description="Every archive of the selected groves (or of AGENT).")
    ls.add_argument("agent", nargs="?", metavar="AGENT", help="NAME or GROVE/NAME")
    _common.add_grove_arg(ls)
    ls.add_argument("--json", action="store_true", help="print JSON")
    pr = verbs.add_parser("prune", help="delete old archives",
                          description="Delete archives made longer ago than DURATION; the "
                          "newest archive of an agent without a working copy is kept.")
    _common.add_grove_arg(pr)
    pr.add_argument("--older-than", metavar="DURATION", type=duration, required=True,
                    help="age of the archives to delete (e.g. 30m, 12h, 7d)")
    pr.add_argument("--dry-run", action="store_true", help="say what would go; change nothing")
    return p


def run(args: argparse.Namespace) -> int:
    r = _common.repo()
    if args.verb == "list":
        return _list(r, args)
    return _prune(r, args)


def _select(r: _common.Repo, args: argparse.Namespace) -> list[archive.Archived]:
    if getattr(args, "agent", None):
        grove, agent = _common.pick_agent(args.agent,
                                          _common.agent_names(r, args.groves, archived=True))
        return archive.listing(r.root, grove, agent)
    found = []
    for g in args.groves or [None]:
        found += archive.listing(r.root, g)
    return sorted(found, key=lambda a: (a.grove, a.agent, a.number))


def _base_tips(r: _common.Repo, groves: set[str]) -> dict[str, str]:
    """The base branch's commit of each grove ("" when its manifests are gone or broken:
    commits are then counted against the commit each agent started from)."""
    known = {d.name for d in manifest.grove_dirs(r.root)}
    tips = {}
    for g in sorted(groves):
        tips[g] = ""
        if g not in known:
            continue
        try:
            loaded = _common.load(r, argparse.Namespace(groves=[g], set=[]),
                                  resolve_secrets=False)
            tips[g] = workspace.base_commit(r.root, loaded[0].base_ref)[1]
        except EngineError:
            continue
    return tips


def _date(ts: int) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _list(r: _common.Repo, args: argparse.Namespace) -> int:
    found = _select(r, args)
    found = archive.measure(r.root, found, _base_tips(r, {a.grove for a in found}))
    if args.json:
        ui.print_json({"apiVersion": "engine/v1alpha1", "kind": "ArchiveList",
                       "formatVersion": 1, "archives": [
            {"grove": a.grove, "agent": a.agent, "number": a.number, "ref": a.ref,
             "commit": a.commit, "createdAt": _date(a.date), "base": a.base,
             "commitsNotOnBase": a.commits, "filesChanged": a.files,
             "uncommitted": a.dirty} for a in found]})
        return 0
    if not found:
        ui.out("no archives" + (f" of {args.agent}" if args.agent else ""))
        return 0
    cols = ["AGENT", "#", "DATE", "COMMITS", "FILES", "UNCOMMITTED", "REF"]
    rows = [[f"{a.grove}/{a.agent}", str(a.number), _date(a.date),
             str(a.commits) if a.commits >= 0 else "?", str(a.files) if a.files >= 0 else "?",
             "yes" if a.dirty else "no", a.ref] for a in found]
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    for line in [cols, *rows]:
        ui.out(for_terminal("  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True))
                            .rstrip()))
    return 0


def _has_workspace(root: Path, grove: str, agent: str) -> bool:
    path = workspace.path_for(root, grove, agent)
    return path.is_dir() and not path.is_symlink()


def _prune(r: _common.Repo, args: argparse.Namespace) -> int:
    found = _select(r, args)
    drop, keep = archive.expired(found, time.time(), args.older_than,
                                 lambda g, a: _has_workspace(r.root, g, a))
    for a in keep:
        ui.out(for_terminal(f"kept {a.ref} ({_date(a.date)}): the newest archive of "
                            f"{a.grove}/{a.agent}, which has no working copy"))
    verb = "would delete" if args.dry_run else "deleted"
    if not args.dry_run:
        archive.delete(r.root, drop)
    for a in drop:
        ui.out(for_terminal(f"{verb} {a.ref} ({_date(a.date)})"))
    ui.out(f"{len(drop)} archive{'s' if len(drop) != 1 else ''} "
           f"{verb.replace('would delete', 'to delete')}, {len(keep)} old one"
           f"{'s' if len(keep) != 1 else ''} kept")
    return 0
