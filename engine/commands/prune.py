"""`engine prune --finished [--older-than D]`: finished agents give back their disk.

For each agent of the selected groves that has ended (Succeeded or Failed), that the plan
leaves alone (no restart, replace or update due), and, with --older-than, that ended
longer ago than that, under the grove's lock:

  1. its parent is told it ended (as the controller would), so the note is not lost;
  2. its work is archived and its working copy removed (`workspace.remove`, which
     removes nothing when the work cannot be saved); its branch stays, for review;
  3. its runtime object goes (the runtime's `delete`);
  4. its answered inbox files go (`inbox.clean`), and the inbox when it is then empty;
  5. its record stays, marked: `pruned_at` set, no working copy, and the phase it ended
     in kept in `notified` ("<phase>:<restarts>"). The plan treats such a record as
     done (`plan.pruned_phase`): nothing is created again until its spec changes, and
     its dependents see the phase it ended in.

An agent that left requests not taken in yet, or whose parent could not be told, is kept
for a later prune. When it ended is read from what its run left on this host: the newest
of its exit file and its log (an agent can change those times: it can only hasten or delay
its own pruning, and its work is archived either way); for a runtime that leaves neither
here, the time it was first created.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine import desired, inbox, ingest, inventory, paths, plan, ui, workspace
from engine.actual import Actual
from engine.commands import _common
from engine.commands._duration import duration
from engine.errors import EngineError
from engine.inventory import Record
from engine.observe import Runtimes, observe
from engine.runtimes import FAILED, SUCCEEDED
from engine.trust import reader


def register(sub: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(
        "prune", help="remove finished agents' workspaces and runtime objects (work archived)",
        description="Remove what agents that have ended (Succeeded or Failed) still hold: "
        "their work is archived under refs/engine/archive/, then their working copy, "
        "runtime object and answered inbox files go. Their branch and their record stay: "
        "apply does not start them again until their spec changes.")
    _common.add_grove_arg(p)
    p.add_argument("--finished", action="store_true", required=True,
                   help="prune agents that Succeeded or Failed (and will not be restarted)")
    p.add_argument("--older-than", metavar="DURATION", type=duration,
                   help="only agents that ended longer ago than this (e.g. 30m, 12h, 7d)")
    p.add_argument("--dry-run", action="store_true",
                   help="say what would be pruned; change nothing")
    p.add_argument("--auto-approve", action="store_true", help="do not ask for confirmation")
    return p


@dataclass(frozen=True)
class Candidate:
    name: str
    phase: str  # Succeeded or Failed
    ended_at: float  # Unix seconds (`ended_at`)
    work: workspace.WorkState | None  # what the archive will hold (dry run only)


def run(args: argparse.Namespace) -> int:
    if not (args.auto_approve or args.dry_run or ui.is_tty()):
        raise EngineError("prune needs --auto-approve (or --dry-run) when not run from a "
                          "terminal")
    r = _common.repo()
    groves = _common.load(r, args)
    rts = Runtimes(r.root)
    failed = 0
    for g in groves:
        with inventory.locked(r.state_dir, g.name, "prune"):
            failed += _grove(r.root, g, rts, args)
    return 1 if failed else 0


def _grove(root: Path, g: desired.DesiredGrove, rts: Runtimes, args: argparse.Namespace
           ) -> int:
    """Prune one grove (its lock held); returns how many agents could not be pruned."""
    # 1. what runs, what the plan would do, and which ended agents it leaves alone
    actual = observe(root, g.name, g, rts)
    tip = _base_tip(root, g)
    found = _candidates(root, g, actual, args.older_than, tip if args.dry_run else None)
    if not found:
        ui.out(f"grove {g.name}: nothing to prune")
        return 0
    if args.dry_run:
        for c in found:
            what = c.work.describe() if c.work else ""
            ui.out(f"{g.name}/{c.name}: would prune ({c.phase.lower()}; "
                   + (f"archived first: {what})" if what else "nothing to archive)"))
        return 0
    if not args.auto_approve:
        for c in found:
            ui.out(f"  {g.name}/{c.name} ({c.phase.lower()})")
        if input(f"\nPrune these {len(found)} agents? Only 'yes' will be accepted: ") != "yes":
            raise EngineError("prune cancelled")
    # 2. parents hear of their children's end before the children go
    ingest.notify_parents(root, g, actual)
    # 3. each agent: archive and remove, record saved after each one
    failed = 0
    for c in found:
        rec = actual.inventory.agents[c.name]
        why = _keep(root, g.name, c.name, rec, c.phase)
        if why:
            ui.out(f"{g.name}/{c.name}: kept ({why})")
            continue
        try:
            ref = _prune_one(root, g.name, c, rec, rts, tip)
        except Exception as e:  # one agent's files never stop the others' pruning
            why = e.summary if isinstance(e, EngineError) else \
                str(e.strerror or e) if isinstance(e, OSError) else \
                f"internal error: {type(e).__name__}"
            ui.err(f"{g.name}/{c.name}: not pruned: {reader.one_line(why, 500)}")
            failed += 1
            continue
        finally:
            inventory.save(paths.state(root), actual.inventory)
        ui.out(f"{g.name}/{c.name}: pruned ("
               + (f"work archived at {ref})" if ref else "nothing to archive)"))
    return failed


def _candidates(root: Path, g: desired.DesiredGrove, actual: Actual,
                older_than: int | None, tip: str | None) -> list[Candidate]:
    """The grove's ended agents the plan leaves alone (and, with `older_than`, that
    ended at least that long ago), by name. `tip` given: each one's work state too."""
    changes = {c.agent: c for c in plan.plan_grove(g, actual).changes}
    now = time.time()
    out = []
    for name in sorted(g.by_name):
        rec, obs, ch = actual.inventory.agents.get(name), actual.observed.get(name), \
            changes.get(name)
        if rec is None or obs is None or obs.phase not in (SUCCEEDED, FAILED) or \
                rec.stopped or ch is None or ch.action is not plan.Action.NOOP or ch.adopt:
            continue  # not ended, stopped on purpose, or the plan still has work for it
        ended = ended_at(root, g.name, name, rec)
        if older_than is not None and now - ended <= older_than:
            continue
        work = None
        if tip is not None and rec.workdir:
            work = workspace.work_state(root, g.name, name, root / rec.workdir, rec.branch,
                                        rec.base_commit, tip)
        out.append(Candidate(name, obs.phase, ended, work))
    return out


def _keep(root: Path, grove: str, name: str, rec: Record, phase: str) -> str:
    """Why `name` cannot be pruned yet ("" when it can)."""
    if any(n.startswith("req-") and n.endswith(".json")
           for n in reader.entries(paths.state(root) / "inbox" / grove, name)):
        return "its inbox holds requests not taken in yet; apply or watch takes them first"
    if rec.parent and rec.notified != f"{phase}:{rec.restarts}":
        return f"its parent {rec.parent} could not be told it ended yet"
    return ""


def _prune_one(root: Path, grove: str, c: Candidate, rec: Record, rts: Runtimes,
               tip: str) -> str | None:
    """Archive and remove the working copy, then the runtime object, then answered
    inbox files; mark the record. Returns the archive ref (None: nothing to archive)."""
    ref = None
    if rec.workdir:  # raises, having removed nothing, when the work cannot be saved
        ref = workspace.remove(root, grove, c.name, rec.workspace, root / rec.workdir,
                               rec.branch, rec.base_commit, tip, keep_branch=True)
        rec.workdir = ""  # gone: a later delete or prune does not look for it
    rts.get(rec.runtime, rec.host or None).delete(grove, c.name)
    inbox.clean(root, grove, c.name, 0.0)  # nobody waits for an answer any more
    inbox.remove_if_empty(root, grove, c.name)
    rec.pruned_at = inventory.now()
    rec.notified = f"{c.phase}:{rec.restarts}"  # the phase it ended in (plan.pruned_phase)
    rec.pending = False
    return ref


def _base_tip(root: Path, g: desired.DesiredGrove) -> str:
    try:
        return workspace.base_commit(root, g.base_ref)[1]
    except EngineError:
        return ""


def ended_at(root: Path, grove: str, agent: str, rec: Record) -> float:
    """When the agent ended, as this host can tell (module docstring): the newest
    modification time of its exit file (local: run/<grove>/<agent>/exit, Docker:
    .../ctl/exit) and its log, read without following a symlink; else when its record
    was created."""
    state = paths.state(root)
    times = [_mtime(state / "run", (grove, agent), "exit"),
             _mtime(state / "run", (grove, agent, "ctl"), "exit"),
             _mtime(state / "logs", (grove,), f"{agent}.log")]
    known = [t for t in times if t is not None]
    if known:
        return max(known)
    try:
        created = dt.datetime.strptime(rec.created_at, "%Y-%m-%dT%H:%M:%SZ")
    except ValueError:
        return time.time()  # unknown: as if it had just ended (never pruned too early)
    return created.replace(tzinfo=dt.UTC).timestamp()


def _mtime(base: Path, parts: tuple[str, ...], name: str) -> float | None:
    try:
        with reader.opendir(base, parts) as d:
            return os.stat(name, dir_fd=d, follow_symlinks=False).st_mtime
    except (OSError, reader.Untrusted):
        return None
