"""`engine approve REQUEST` and `engine deny REQUEST --reason TEXT`: a person's decision on
a spawn request that waits for approval (`policy.approval: manual`).

A thin caller of `ingest.decide`, under the grove's lock (waiting for a controller's pass
in progress, as the other mutating commands do). REQUEST is the request id `engine plan`
shows, or PARENT/ID. Who decided: `--as NAME`, else git's user.email, else user.name, else
the login name. Approve takes the request in at once (spawned.yaml, committed when the
grove commits spawns; the next apply starts the child); deny answers it rejected.
"""

from __future__ import annotations

import argparse
import getpass
from pathlib import Path
from typing import Any

from engine import inbox, ingest, inventory, notify, paths, ui, writeback
from engine.commands import _common, _converge
from engine.desired import DesiredGrove
from engine.errors import EngineError, UsageError
from engine.trust import reader
from engine.trust.git import run as git

MAX_WHO = 100  # characters of a name recorded as who decided
MAX_WHY = 200  # characters of a denial's reason


def register(sub: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(
        "approve", help="approve a spawn request that waits for a person",
        description="Approve a spawn request waiting for approval (policy.approval: "
        "manual; engine plan lists them): the spawn gate checks it again, the child is "
        "written to spawned.yaml and the parent is answered. The next apply starts it.")
    _add_args(p)
    p.add_argument("--digest", metavar="HEX", help="approve only if the request still asks "
                   "for the child with this digest (as the plan and the spawn-requested "
                   "notification show it)")
    d: argparse.ArgumentParser = sub.add_parser(
        "deny", help="deny a spawn request that waits for a person",
        description="Deny a spawn request waiting for approval: the parent is answered "
        "'rejected' with 'denied by WHO: REASON', and nothing is written.")
    _add_args(d)
    d.add_argument("--reason", required=True, help="why (sent to the parent agent)")
    d.set_defaults(_run=run_deny)
    return p


def _add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("request", metavar="REQUEST",
                   help="the request id (as engine plan shows it), or PARENT/ID")
    _common.add_grove_arg(p)
    p.add_argument("--as", dest="who", metavar="NAME", help="who decides (default: git's "
                   "user.email, else user.name, else the login name)")
    p.add_argument("--lock-timeout", type=float, default=_converge.LOCK_WAIT,
                   metavar="SECONDS", help="wait this long for another operation's pass "
                   f"(a controller's) to end (default {_converge.LOCK_WAIT:g})")


def run(args: argparse.Namespace) -> int:
    return _decide(args, None)


def run_deny(args: argparse.Namespace) -> int:
    reason = reader.one_line(args.reason or "", MAX_WHY)
    if not reason:
        raise EngineError("deny: --reason must say why (the parent agent is told)")
    return _decide(args, reason)


def _decide(args: argparse.Namespace, deny: str | None) -> int:
    if args.lock_timeout < 0:
        raise UsageError("--lock-timeout must not be negative")
    r = _common.repo()
    by = who(r.root, args.who)
    grove = _grove(r, args)
    opts = _common.options(r, args, resolve_secrets=False)
    state = paths.state(r.root)
    held = inventory.read_lock(state, grove.name)
    if held is not None and args.lock_timeout > 0:
        ui.err(f"grove {grove.name}: waiting up to {args.lock_timeout:g}s for "
               f"{held.operation} (pid {held.pid}) to finish its pass")
    with inventory.locked(state, grove.name, "deny" if deny else "approve",
                          wait=args.lock_timeout):
        done = ingest.decide(r.root, grove, opts, args.request, by, deny,
                             getattr(args, "digest", None))
    notify.dispatch(r.root, grove)  # people hear of the decision
    where = f"grove {grove.name}: request {done.key} ({done.child})"
    if deny is not None:
        ui.out(f"{where}: denied; the parent is answered: {done.reason}")
        return 0
    if done.status != "accepted":
        ui.err(f"{where}: approved, but the spawn gate refuses it now; answered rejected: "
               f"{done.reason}")
        return 1
    path = writeback.spawned_path(r.root, grove.name).relative_to(r.root)
    committed = " (committed)" if grove.commit_spawns and not done.note else ""
    ui.out(f"{where}: approved by {by}; written to {path}{committed}; engine apply "
           "starts it")
    return 0


def who(root: Path, given: str | None) -> str:
    """The name recorded as who decided."""
    if given is not None:
        name = reader.one_line(given, MAX_WHO)
        if not name:
            raise EngineError("--as: give the name of who decides")
        return name
    for key in ("user.email", "user.name"):  # the user's own configuration counts here
        name = reader.one_line(git(root, "config", "--get", key, check=False, remote=True),
                               MAX_WHO)
        if name:
            return name
    try:
        return reader.one_line(getpass.getuser(), MAX_WHO) or "unknown"
    except (OSError, KeyError):
        return "unknown"


def _grove(r: _common.Repo, args: argparse.Namespace) -> DesiredGrove:
    """The grove named with -g, the only one, or the only one with such a request."""
    groves = _common.load(r, args, resolve_secrets=False)
    if len(groves) == 1:
        return groves[0]
    rid = str(args.request).rpartition("/")[2]
    hits = [g for g in groves if any(q.id == rid for q in inbox.scan(r.root, g.name)[0])]
    if len(hits) == 1:
        return hits[0]
    raise EngineError(f"request {args.request}: name its grove with -g GROVE (groves: "
                      f"{', '.join(g.name for g in groves) or 'none'})")
