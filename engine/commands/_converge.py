"""Running one converge pass from a command: take the grove's lock (waiting for a
controller's pass in progress, and saying so), run `converge.run`, and the notes a person
needs about what is converged (uncommitted manifests, the commit new branches start from)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from engine import converge, desired, inventory, paths
from engine.observe import Runtimes
from engine.plan import Action, GrovePlan

LOCK_WAIT = 120.0  # seconds a command waits for another operation's pass (a controller's)


def locked_pass(root: Path, ask: converge.Ask, rts: Runtimes, opts: desired.Options,
                operation: str, note: Callable[[str], None],
                wait: float = LOCK_WAIT) -> converge.Result:
    state = paths.state(root)
    held = inventory.read_lock(state, ask.grove)
    if held is not None and wait > 0:
        note(f"grove {ask.grove}: waiting up to {wait:g}s for {held.operation} (pid "
             f"{held.pid}) to finish its pass")
    with inventory.locked(state, ask.grove, operation, wait=wait) as info:
        return converge.run(root, dataclasses.replace(ask, lock_id=info.id), rts, opts, note)


def source_notes(root: Path, p: GrovePlan, base_ref: str) -> list[str]:
    """What a person applying from the working tree should know: manifests that are not
    committed, and the commit new agents' branches start from."""
    out = []
    if converge.manifests_modified(root, p.grove):
        out.append(f"grove {p.grove}: groves/{p.grove}/ has changes that are not committed; "
                   "this is the working tree's plan (a controller converges only commits)")
        ctl = inventory.read_lock(paths.state(root), f"{p.grove}.controller")
        if ctl is not None:
            out.append(f"grove {p.grove}: a controller runs for it (engine watch, pid "
                       f"{ctl.pid}): it converges commits and will undo what is applied "
                       "here from uncommitted manifests; commit them")
    if any(c.action in (Action.CREATE, Action.REPLACE) for c in p.changes):
        from engine import workspace

        try:
            ref, commit = workspace.base_commit(root, base_ref)
        except Exception:
            return out
        out.append(f"grove {p.grove}: new agents' branches start from {ref} at {commit[:12]}")
    return out
