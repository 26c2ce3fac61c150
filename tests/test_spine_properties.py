"""Property tests of the converge spine's decisions (stage 5: `plan.plan_grove` then
`converge.shape` with the controller's sync policy), driven through generated groves and
generated orders of events: agents ending (Succeeded or Failed), agents vanishing from the
runtime (drift), agents leaving the manifests. The world the decisions act on is the
inventory and the observed phases as data; the real runtimes are covered by
test_controller.py and test_reconcile_local.py.

Properties: the controller reaches a pass with nothing left to do (plan-empty) in a bounded
number of passes, whatever the order of events; and it never deletes while
`spec.sync.prune` is false."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import converge
from engine.actual import Actual
from engine.desired import DesiredGrove
from engine.inventory import Inventory, Record
from engine.plan import Action, GrovePlan, plan_grove
from engine.runtimes import FAILED, RUNNING, SUCCEEDED, Observed
from tests.test_plan_properties import build, groves

EVENTS = st.lists(st.tuples(st.sampled_from(["succeed", "fail", "vanish", "leave"]),
                            st.integers(0, 50)), max_size=25)


class World:
    """What runs and what the inventory says, changed only by executing a plan."""

    def __init__(self, grove: str) -> None:
        self.inv = Inventory(grove, "lineage", 1)
        self.observed: dict[str, Observed] = {}
        self.deleted: list[str] = []

    def actual(self) -> Actual:
        return Actual(self.inv.grove, self.inv, dict(self.observed))

    def execute(self, g: DesiredGrove, p: GrovePlan) -> None:
        for c in p.changes:
            a = g.by_name.get(c.agent)
            if c.action is Action.DELETE:
                self.inv.agents.pop(c.agent, None)
                self.observed.pop(c.agent, None)
                self.deleted.append(c.agent)
            elif c.action in (Action.CREATE, Action.REPLACE, Action.RESTART) and a:
                pending = c.action is Action.CREATE and bool(c.waits_for)
                self.inv.agents[c.agent] = Record(a.spec_hash, a.settings, a.runtime,
                                                  pending=pending, parent=a.spawned_by or "")
                if pending:
                    self.observed.pop(c.agent, None)
                else:
                    self.observed[c.agent] = Observed(g.name, c.agent, a.runtime, a.spec_hash,
                                                      RUNNING)
            elif (c.adopt or c.action is Action.UPDATE) and a:
                old = self.inv.agents.get(c.agent)
                self.inv.agents[c.agent] = Record(a.spec_hash, a.settings, a.runtime,
                                                  parent=a.spawned_by or "",
                                                  pending=bool(old and old.pending))

    def event(self, kind: str, i: int) -> None:
        names = sorted(self.observed)
        if not names:
            return
        n = names[i % len(names)]
        o = self.observed[n]
        if kind == "succeed" and o.phase == RUNNING:
            self.observed[n] = dataclasses.replace(o, phase=SUCCEEDED, exit_code=0)
        elif kind == "fail" and o.phase == RUNNING:
            self.observed[n] = dataclasses.replace(o, phase=FAILED, exit_code=1)
        elif kind == "vanish":
            del self.observed[n]

    def settle(self) -> None:
        """Every running agent ends well (time passes)."""
        for n, o in list(self.observed.items()):
            if o.phase == RUNNING:
                self.observed[n] = dataclasses.replace(o, phase=SUCCEEDED, exit_code=0)


def controller_pass(g: DesiredGrove, w: World) -> GrovePlan:
    actual = w.actual()
    p = converge.shape(plan_grove(g, actual), g, actual,
                       converge.Ask(g.name, controller=True))
    w.execute(g, p)
    return p


def without(g: DesiredGrove, gone: set[str], tmp: Path, agents: list[dict],
            prune: bool) -> DesiredGrove:
    kept = [dict(a) for a in agents if a["name"] not in gone]
    names = {a["name"] for a in kept}
    for a in kept:  # an edge to a removed agent goes with it
        if a.get("spawnedBy") not in names:
            a.pop("spawnedBy", None)
        if "dependsOn" in a:
            a["dependsOn"] = [d for d in a["dependsOn"] if d in names]
    if not kept:
        kept = [{"name": "keeper", "task": "true"}]
    new = build(tmp, kept)
    return dataclasses.replace(new, sync_prune=prune)


@settings(max_examples=80, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(agents=groves(), events=EVENTS, prune=st.booleans())
def test_the_controller_converges_and_never_prunes_unless_asked(
        tmp_path: Path, agents: list[dict], events: list[tuple[str, int]],
        prune: bool) -> None:
    g = dataclasses.replace(build(tmp_path, agents), sync_prune=prune)
    w = World(g.name)
    controller_pass(g, w)
    gone: set[str] = set()
    for kind, i in events:
        if kind == "leave":
            names = sorted(g.by_name)
            gone.add(names[i % len(names)])
            g = without(g, gone, tmp_path, agents, prune)
        else:
            w.event(kind, i)
        p = controller_pass(g, w)
        if not prune:
            assert not [c for c in p.changes if c.action is Action.DELETE]
    # whatever happened, the passes reach one with nothing to do
    for _ in range(2 * len(agents) + 4):
        w.settle()
        p = controller_pass(g, w)
        if not p.has_changes:
            break
    else:
        raise AssertionError(f"no plan-empty pass: {[(c.agent, c.action.word) for c in p.changes]}")
    if not prune:
        assert w.deleted == []
        assert {c.agent for c in p.changes if c.action is Action.ORPHAN} == \
            {n for n in w.inv.agents if n not in g.by_name}
    else:
        assert not set(w.inv.agents) - set(g.by_name)
