"""The reconcile spine: manifests -> desired -> observe -> plan -> execute, for one grove.

Called by the `plan`, `apply` and `destroy` commands and by the `watch` controller. Each
numbered step is one stage module; this file only wires them, takes the lock and checks
saved plans for staleness.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from engine import desired, executor, inventory, manifest, observe, plan
from engine.desired import DesiredGrove
from engine.errors import StalePlanError
from engine.observe import Runtimes


@dataclass
class Result:
    grove: str
    plan: plan.GrovePlan
    outcomes: list[executor.Outcome]

    @property
    def failed(self) -> list[executor.Outcome]:
        return [o for o in self.outcomes if not o.ok]


def load_desired(root: Path, directory: Path, opts: desired.Options) -> DesiredGrove:
    # 1. manifests -> checked documents -> resolved, frozen desired state
    return desired.build(manifest.load_grove(directory, root), opts)


def make_plan(root: Path, grove: DesiredGrove, rts: Runtimes) -> plan.GrovePlan:
    # 2. observe the runtimes, workspaces and inventory; 3. decide
    actual = observe.observe(root, grove.name, grove, rts)
    return plan.plan_grove(grove, actual)


def destroy_plan(root: Path, name: str, rts: Runtimes) -> tuple[DesiredGrove, plan.GrovePlan]:
    """A plan that deletes everything the grove owns (its desired state is empty)."""
    empty = DesiredGrove(name, root / manifest.GROVES_DIR / name, "", "worktree",
                         desired.Policy(0, 0, 0), False, "", (), (), (), "destroy")
    actual = observe.observe(root, name, empty, rts)
    return empty, plan.plan_grove(empty, actual)


def check_fresh(root: Path, grove: DesiredGrove, saved: plan.GrovePlan) -> None:
    """Refuse a saved plan when the manifests or the inventory moved since it was made."""
    inv = inventory.load(root / ".engine", grove.name)
    if saved.manifest_digest != grove.manifest_digest:
        raise StalePlanError(f"grove {grove.name}: saved plan is stale: the manifests changed "
                             "since it was made; run engine plan again")
    if (saved.lineage, saved.serial) != (inv.lineage, inv.serial):
        raise StalePlanError(f"grove {grove.name}: saved plan is stale: the state changed "
                             f"since it was made (serial {saved.serial} -> {inv.serial}); "
                             "run engine plan again")
    for c in saved.changes:
        a = grove.by_name.get(c.agent)
        deleting = c.action is plan.Action.DELETE
        if (a is None) != deleting or any(d not in grove.by_name for d in c.waits_for):
            raise StalePlanError(f"agent {grove.name}/{c.agent}: the saved plan does not "
                                 "match the manifests (edited by hand?); run engine plan "
                                 "again")
        if c.spec_hash and a is not None and a.spec_hash != c.spec_hash:
            raise StalePlanError(f"agent {grove.name}/{c.agent}: saved plan is stale: its "
                                 "spec changed (a credential rotated?); run engine plan again")


def execute(root: Path, grove: DesiredGrove, rts: Runtimes, the_plan: plan.GrovePlan,
            hooks: executor.Hooks | None = None, settings: executor.Settings | None = None
            ) -> Result:
    """4. Execute a plan. The caller holds the grove's lock (`inventory.locked`)."""
    inv = inventory.load(root / ".engine", grove.name)
    outcomes = executor.execute(root, grove, the_plan, inv, rts, hooks, settings)
    return Result(grove.name, the_plan, outcomes)


def wait_terminal(root: Path, grove: DesiredGrove, rts: Runtimes, timeout: float,
                  failed: set[str] | None = None, poll: float = 0.25) -> dict[str, str]:
    """Block until every agent of the grove has Succeeded or Failed (or is blocked behind a
    failed dependency), or `timeout` passes. Returns the last phase of each agent. Agents
    in `failed` (their start failed in this run) count as Failed while nothing is seen."""
    import time

    from engine.runtimes import FAILED, SUCCEEDED

    deadline = time.monotonic() + timeout
    while True:
        actual = observe.observe(root, grove.name, grove, rts)
        phases = {a.name: actual.observed[a.name].phase if a.name in actual.observed
                  else FAILED if a.name in (failed or ()) else "Pending"
                  for a in grove.agents}
        blocked: set[str] = set()
        changed = True
        while changed:  # behind a failed dependency, however many levels up
            changed = False
            for a in grove.agents:
                if a.name not in blocked and phases[a.name] == "Pending" and any(
                        phases.get(d) == FAILED or d in blocked for d in a.depends_on):
                    blocked.add(a.name)
                    changed = True
        if all(p in (SUCCEEDED, FAILED) or n in blocked for n, p in phases.items()):
            return phases
        if time.monotonic() > deadline:
            return phases
        time.sleep(poll)
