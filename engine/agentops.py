"""Operations on one recorded agent that a command and the converge spine share: stop it
(and keep it stopped), and keep a stopped agent's work safe.

Called by `engine stop` (a person) and by `budget.enforce` (the engine, from converge's
stage 7). The caller holds the grove's lock and passes the inventory it loaded under it;
nothing here takes a lock, prints or deletes anything.
"""

from __future__ import annotations

from pathlib import Path

from engine import archive, inventory, paths
from engine.inventory import Inventory, Record
from engine.runtimes import Runtime


def stop(root: Path, inv: Inventory, name: str, rt: Runtime, reason: str = "") -> None:
    """Mark agent `name` stopped, then end it with its runtime's `stop`. The mark is saved
    first, so neither `engine apply` nor a controller starts it again, even when ending it
    fails; its workspace, branch, home and record stay. `reason` says why the engine
    stopped it ("" for a person); an agent stopped already keeps its first reason."""
    rec = inv.agents[name]
    if not rec.stopped:
        rec.stopped, rec.stopped_reason = True, reason
        inventory.save(paths.state(root), inv)
    rt.stop(inv.grove, name)


def keep_work(root: Path, grove: str, name: str, rec: Record) -> str | None:
    """Archive a stopped agent's uncommitted files and unmerged commits under
    `refs/engine/archive/<grove>/<agent>/<n>`, leaving its workspace as it is, so the work
    outlives a later delete. Returns the archive ref; None when there is nothing that is
    not already on its base, or no working copy of its own (a shared workspace is the
    repository's checkout). Raises EngineError when the work cannot be saved."""
    if rec.workspace == "shared" or not rec.workdir or not rec.branch:
        return None
    return archive.archive(root, grove, name, root / rec.workdir, rec.branch,
                           rec.base_commit)
