"""Stage 4, planning: desired x actual -> `GrovePlan`, a value that can be saved and applied.

A pure function (`plan_grove`) of the desired grove, the observed agents, the inventory
and the work state of agents about to be pruned. Every change carries a reason for display
only. Plans serialize to a documented JSON shape (schemas/plan.json); a saved plan records
the manifest digest and the inventory lineage/serial so `apply` can refuse it when stale.
"""

from __future__ import annotations

import datetime as dt
import enum
import json
from dataclasses import dataclass, field
from typing import Any

from engine import __version__, graph
from engine.actual import FAILED, RUNNING, SUCCEEDED, Actual, Observed
from engine.desired import IN_PLACE, DesiredAgent, DesiredGrove
from engine.errors import EngineError
from engine.inventory import Inventory, Record

FORMAT = 1


class Action(enum.Enum):
    CREATE = ("create", "+")
    REPLACE = ("replace", "-/+")
    RESTART = ("restart", "~>")
    UPDATE = ("update", "~")
    DELETE = ("delete", "-")
    ORPHAN = ("orphan", "?")  # left the manifests; the sync policy keeps it (no prune)
    WAIT = ("wait", ".")
    NOOP = ("no-op", " ")

    def __init__(self, word: str, symbol: str) -> None:
        self.word = word
        self.symbol = symbol

    @property
    def is_change(self) -> bool:
        return self not in (Action.NOOP, Action.WAIT, Action.ORPHAN)

    @classmethod
    def parse(cls, word: str) -> Action:
        for a in cls:
            if a.word == word:
                return a
        raise ValueError(word)


@dataclass(frozen=True)
class Change:
    agent: str
    action: Action
    reason: str
    runtime: str
    host: str = ""
    fields: tuple[str, ...] = ()
    archive: str = ""  # what work a delete will archive ("" when nothing)
    spec_hash: str = ""  # desired hash the change converges to ("" for delete)
    waits_for: tuple[str, ...] = ()  # dependencies that must succeed first
    adopt: bool = False  # running with owner labels but not in the inventory

    def to_json(self) -> dict[str, Any]:
        return {"agent": self.agent, "action": self.action.word, "reason": self.reason,
                "runtime": self.runtime, "host": self.host, "fields": list(self.fields),
                "archive": self.archive, "specHash": self.spec_hash,
                "waitsFor": list(self.waits_for), "adopt": self.adopt}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Change:
        return cls(d["agent"], Action.parse(d["action"]), d["reason"], d["runtime"],
                   d.get("host", ""), tuple(d.get("fields", ())), d.get("archive", ""),
                   d.get("specHash", ""), tuple(d.get("waitsFor", ())),
                   bool(d.get("adopt", False)))


@dataclass(frozen=True)
class Awaiting:
    """A spawn request waiting for a person: the child it asks for, as judged. Everything
    the digest covers that a person decides on is here, so what is shown is what is
    approved."""

    request: str
    child: str
    parent: str
    digest: str  # approval.short of the child's document
    task: str
    profile: str = ""
    harness: str = ""
    depends_on: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"request": self.request, "agent": self.child,
                             "parent": self.parent, "approval": "pending",
                             "digest": self.digest, "task": self.task}
        if self.profile:
            d["profile"] = self.profile
        if self.harness:
            d["harness"] = self.harness
        if self.depends_on:
            d["dependsOn"] = list(self.depends_on)
        return d

    @classmethod
    def from_json(cls, r: dict[str, Any]) -> Awaiting:
        return cls(str(r["request"]), str(r["agent"]), str(r["parent"]),
                   str(r.get("digest", "")), str(r.get("task", "")),
                   str(r.get("profile", "")), str(r.get("harness", "")),
                   tuple(str(x) for x in r.get("dependsOn", ())))


@dataclass(frozen=True)
class GrovePlan:
    grove: str
    manifest_digest: str
    lineage: str
    serial: int
    changes: tuple[Change, ...]  # sorted: deletes first (reverse graph order), then the rest
    created_at: str = field(default_factory=lambda: dt.datetime.now(dt.UTC).strftime(
        "%Y-%m-%dT%H:%M:%SZ"))
    # spawn requests this plan takes in once confirmed: (request id, child, parent)
    requested: tuple[tuple[str, str, str], ...] = ()
    # spawn requests waiting for a person (engine approve), shown only: never taken in
    awaiting: tuple[Awaiting, ...] = ()

    @property
    def spawns(self) -> frozenset[str]:
        return frozenset(r for r, _, _ in self.requested)

    @property
    def spawn_agents(self) -> frozenset[str]:
        return frozenset(c for _, c, _ in self.requested)

    def counts(self) -> dict[str, int]:
        out = {a.word: 0 for a in Action if a.is_change or a in (Action.WAIT, Action.ORPHAN)}
        for c in self.changes:
            if c.action.word in out:
                out[c.action.word] += 1
        return out

    @property
    def has_changes(self) -> bool:
        return any(c.action.is_change or c.adopt for c in self.changes)

    def to_json(self) -> dict[str, Any]:
        return {"grove": self.grove, "manifestDigest": self.manifest_digest,
                "inventory": {"lineage": self.lineage, "serial": self.serial},
                "createdAt": self.created_at, "summary": self.counts(),
                "changes": [c.to_json() for c in self.changes],
                "spawnRequests": [{"request": r, "agent": c, "parent": p}
                                  for r, c, p in self.requested] + [
                    a.to_json() for a in self.awaiting]}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> GrovePlan:
        reqs = list(d.get("spawnRequests", ()))
        return cls(d["grove"], d["manifestDigest"], d["inventory"]["lineage"],
                   int(d["inventory"]["serial"]),
                   tuple(Change.from_json(c) for c in d["changes"]), d["createdAt"],
                   tuple((str(r["request"]), str(r["agent"]), str(r["parent"]))
                         for r in reqs if r.get("approval") != "pending"),
                   tuple(Awaiting.from_json(r) for r in reqs
                         if r.get("approval") == "pending"))


def document(plans: list[GrovePlan]) -> dict[str, Any]:
    """The JSON plan document (schemas/plan.json)."""
    total: dict[str, int] = {}
    for p in plans:
        for k, v in p.counts().items():
            total[k] = total.get(k, 0) + v
    return {"apiVersion": "engine/v1alpha1", "kind": "Plan", "formatVersion": FORMAT,
            "engineVersion": __version__,
            "changes": any(p.has_changes for p in plans), "summary": total,
            "groves": [p.to_json() for p in plans]}


def load_document(text: str, source: str) -> list[GrovePlan]:
    try:
        d = json.loads(text)
        if d.get("kind") != "Plan" or d.get("formatVersion") != FORMAT:
            raise EngineError(f"{source}: unsupported plan format {d.get('formatVersion')!r}")
        return [GrovePlan.from_json(g) for g in d["groves"]]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise EngineError(f"{source}: not a plan file saved by engine plan --out ({e})") \
            from None


# -- the decision -----------------------------------------------------------------------

def _changed_fields(old_settings: str, agent: DesiredAgent, in_place: bool) -> list[str]:
    try:
        old = json.loads(old_settings) if old_settings else {}
    except ValueError:
        old = {}
    new = agent.settings_map()
    keys = sorted(set(old) | set(new))
    return [k for k in keys if old.get(k) != new.get(k) and ((k in IN_PLACE) == in_place)]


def pruned_phase(rec: Record | None) -> str | None:
    """The phase a pruned agent ended in (`Record.pruned_phase`); None for any other."""
    return rec.pruned_phase() if rec is not None else None


def _decide(a: DesiredAgent, obs: Observed | None, inv: Inventory,
            phase_of: dict[str, str], creating: set[str], spawned: str = "") -> Change:
    rec = inv.agents.get(a.name)
    def mk(action: Action, reason: str, **kw: Any) -> Change:
        return Change(a.name, action, reason, a.runtime, a.host or "",
                      spec_hash=a.spec_hash, **kw)

    if rec is not None and rec.stopped:
        return mk(Action.NOOP, f"stopped (engine start {a.name})")
    if obs is None:
        if rec is not None and rec.pruned_at and rec.spec_hash == a.spec_hash:
            return mk(Action.NOOP, f"pruned {rec.pruned_at} "
                      f"({(pruned_phase(rec) or 'ended').lower()})")  # done: not again
        ended = {d: pruned_phase(inv.agents.get(d)) for d in a.depends_on}
        unmet = tuple(d for d in a.depends_on if (phase_of.get(d) or ended[d]) != SUCCEEDED)
        failed = [d for d in unmet if (phase_of.get(d) or ended[d]) == FAILED]
        if failed:
            return mk(Action.WAIT, f"blocked: dependency {failed[0]} failed", waits_for=unmet)
        parent = a.spawned_by
        if parent and phase_of.get(parent) is None \
                and pruned_phase(inv.agents.get(parent)) is None:
            # a child starts once its parent has (the parent waits on its dependencies)
            if rec is not None and rec.pending and parent not in creating:
                return mk(Action.WAIT, f"pending: waits for its parent {parent} to start",
                          waits_for=(*unmet, parent))
            return mk(Action.CREATE, (spawned or "new agent") + f"; starts after its "
                      f"parent {parent} starts", waits_for=(*unmet, parent))
        if unmet and rec is not None and rec.pending and not (set(unmet) & creating):
            return mk(Action.WAIT, f"pending: waits for {', '.join(unmet)} to succeed",
                      waits_for=unmet)
        if rec is not None and rec.error:
            why = f"its last start failed: {rec.error}"
        elif rec is not None and rec.pruned_at:
            fields = _changed_fields(rec.settings, a, False)
            why = "spec changed since it was pruned" + (f": {', '.join(fields)}" if fields
                                                        else "")
        elif rec is not None and not rec.pending:
            why = "missing from the runtime (removed outside the engine)"
        elif rec is not None:
            why = "dependencies succeeded"
        else:
            why = spawned or "new agent"
        if unmet:
            why += f"; starts after {' and '.join(unmet)} succeed{'s' if len(unmet) == 1 else ''}"
        return mk(Action.CREATE, why, waits_for=unmet)
    if obs.spec_hash != a.spec_hash:
        fields = _changed_fields(rec.settings, a, False) if rec else []
        why = f"spec changed: {', '.join(fields)}" if fields else "spec changed"
        if not fields and rec and rec.spec_hash == a.spec_hash:
            why = "runtime object differs from the applied spec"
        elif not fields:
            why = "spec changed (credentials or settings not shown)"
        return mk(Action.REPLACE, why, fields=tuple(fields))
    in_place = _changed_fields(rec.settings, a, True) if rec else []
    if in_place:
        return mk(Action.UPDATE, f"changed in place: {', '.join(in_place)}", fields=tuple(in_place))
    if obs.phase == FAILED and a.restart in ("on-failure", "always"):
        return mk(Action.RESTART, f"{obs.reason or 'failed'}, restart: {a.restart}")
    if obs.phase == SUCCEEDED and a.restart == "always":
        return mk(Action.RESTART, "succeeded, restart: always")
    if rec is None:
        return mk(Action.NOOP, "found running with the grove's owner labels: adopted", adopt=True)
    if obs.phase == FAILED:
        return mk(Action.NOOP, "failed" + (f": {obs.reason}" if obs.reason and
                                            not obs.reason.startswith("failed") else ""))
    return mk(Action.NOOP, obs.reason or obs.phase.lower())


def plan_grove(grove: DesiredGrove, actual: Actual, spawned: dict[str, str] | None = None,
               requested: tuple[tuple[str, str, str], ...] = (),
               awaiting: tuple[Awaiting, ...] = ()) -> GrovePlan:
    """Decide what to do for every agent. Pure: same inputs, same plan. `spawned`: the
    reason of each agent that a pending spawn request adds (`spawn requested by X`);
    `requested`: those requests, taken in when the plan is applied; `awaiting`: requests
    waiting for a person's approval (shown, not acted on)."""
    inv, observed = actual.inventory, actual.observed
    phase_of = {n: o.phase for n, o in observed.items()}
    g = graph.build(grove.by_name, {a.name: a.spawned_by for a in grove.agents},
                    {a.name: a.depends_on for a in grove.agents})
    order = [n for gen in graph.generations(g) for n in gen]
    creating: set[str] = set()
    changes: list[Change] = []
    for name in order:
        c = _decide(grove.by_name[name], observed.get(name), inv, phase_of, creating,
                    (spawned or {}).get(name, ""))
        if c.action in (Action.CREATE, Action.REPLACE, Action.RESTART):
            creating.add(name)
            if not c.waits_for:  # started now (a create with waits_for is only recorded)
                phase_of[name] = RUNNING
        changes.append(c)
    changes = _deletes(grove, actual) + changes
    return GrovePlan(grove.name, grove.manifest_digest, inv.lineage, inv.serial,
                     tuple(changes), requested=requested, awaiting=awaiting)


def _deletes(grove: DesiredGrove, actual: Actual) -> list[Change]:
    inv, observed = actual.inventory, actual.observed
    gone = sorted((set(inv.agents) | set(observed)) - set(grove.by_name))
    if not gone:
        return []
    parents = {n: inv.agents[n].parent if n in inv.agents else None for n in gone}
    g = graph.build(gone, parents, {})
    order = [n for gen in reversed(graph.generations(g)) for n in gen]
    out = []
    for name in order:
        rec, obs = inv.agents.get(name), observed.get(name)
        work = actual.work.get(name)
        why = "no longer in manifest"
        renamed = _renamed_to(grove, rec.settings if rec else "")
        if renamed:
            why += f" (renamed to {renamed}?)"
        out.append(Change(name, Action.DELETE, why, rec.runtime if rec else obs.runtime
                          if obs else "", rec.host if rec else "",
                          archive=work.describe() if work else ""))
    return out


def _renamed_to(grove: DesiredGrove, settings: str) -> str:
    if not settings:
        return ""
    try:
        task = json.loads(settings).get("task")
    except ValueError:
        return ""
    hits = [a.name for a in grove.agents if a.task == task]
    return hits[0] if len(hits) == 1 else ""


# -- the human view ---------------------------------------------------------------------

def render_text(plans: list[GrovePlan], color: bool = False) -> str:
    styles = {Action.CREATE: "green", Action.REPLACE: "yellow", Action.RESTART: "yellow",
              Action.UPDATE: "yellow", Action.DELETE: "red", Action.WAIT: "dim",
              Action.ORPHAN: "magenta"}
    lines: list[str] = []
    total = {"create": 0, "replace": 0, "restart": 0, "update": 0, "delete": 0}
    for p in plans:
        shown = [c for c in p.changes if c.action is not Action.NOOP or c.adopt]
        ended = [c.agent for c in p.changes if c.action is Action.NOOP and not c.adopt
                 and c.reason.startswith("failed")]
        acting = sum(1 for c in shown if c.action.is_change or c.adopt)
        lines.append(f"grove {p.grove}: {acting} of {len(p.changes)} agents to act on"
                     if acting else f"grove {p.grove}: up to date" + (
                         f" ({len(shown)} waiting or orphaned)" if shown else ""))
        for c in shown:
            text = f"  {c.action.symbol:>3} {c.agent}  ({c.action.word}: {_clean(c.reason)})"
            if c.archive:
                text += f"\n        work archived first: {c.archive}"
            if color and c.action in styles:
                text = f"[{styles[c.action]}]{_esc(text)}[/]"
            elif color:
                text = _esc(text)
            lines.append(text)
            if c.action.word in total:
                total[c.action.word] += 1
        if ended:
            lines.append(f"  failed, not restarted by policy: {', '.join(ended)} "
                         f"(engine restart AGENT runs one again)")
        lines += _awaiting_lines(p, len(plans) > 1)
    lines.append("")
    if not any(p.has_changes for p in plans):
        lines.append("No changes. The running agents match the manifests.")
    else:
        lines.append(f"Plan: {total['create']} to create, {total['replace']} to replace, "
                     f"{total['restart']} to restart, {total['update']} to update, "
                     f"{total['delete']} to delete.")
    return "\n".join(lines)


def _awaiting_lines(p: GrovePlan, several: bool) -> list[str]:
    """One line per spawn request waiting for a person, with the command that approves
    it (PARENT/ID when two parents chose the same id; -g when several groves show)."""
    ids = [a.request for a in p.awaiting]
    out = []
    for a in sorted(p.awaiting, key=lambda a: (a.parent, a.request)):
        r = a.request
        ref = f"{a.parent}/{r}" if ids.count(r) > 1 else r
        grove = f" -g {p.grove}" if several else ""
        out.append(_clean(f"  \u23f8 spawn {a.parent}/{a.child} (request {r}) awaits approval: "
                          f"engine approve {ref}{grove} --digest {a.digest}"))
        what = [f"profile {a.profile}" if a.profile else "",
                f"harness {a.harness}" if a.harness else "",
                f"after {', '.join(a.depends_on)}" if a.depends_on else ""]
        if any(what):
            out.append(_clean("      (" + "; ".join(w for w in what if w) + ")"))
        # all of the task, every line (characters one cannot see shown escaped): what is
        # approved is what is read here
        out += [_clean(f"      | {line}") for line in a.task.split("\n")]
    return out


def _clean(text: str) -> str:
    """A reason as one line without control characters (it can quote an agent's error)."""
    return "".join(ch if ch.isprintable() else " " for ch in text)


def _esc(text: str) -> str:
    return text.replace("[", "\\[")
