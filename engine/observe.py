"""Stage 3, observation: runtimes + workspaces + inventory -> `Actual` state of a grove.

Called by `plan` callers (plan, apply, status, watch). Each runtime a grove uses (and each
Docker host or cluster context) is asked once, in one batched call, for what carries the
grove's owner labels. Workspace state (uncommitted files, commits ahead of base) is read
only for agents that may lose their working copy, or for `status`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from engine import inventory, paths, runtimes, workspace
from engine.actual import Actual, RuntimeKey
from engine.desired import DesiredAgent, DesiredGrove
from engine.errors import EngineError
from engine.inventory import Inventory, Record
from engine.runtimes import FAILED, Observed, Runtime


class Runtimes:
    """Runtime clients by (name, host), created on first use and reused for a whole run."""

    def __init__(self, root: Path, factory: Callable[[str, Path, str | None], Runtime]
                 | None = None) -> None:
        self.root = root
        self._factory = factory or (lambda n, r, h: runtimes.get(n, r, h))
        self._cache: dict[RuntimeKey, Runtime] = {}

    def get(self, name: str, host: str | None = None) -> Runtime:
        key = (name, host or "")
        if key not in self._cache:
            self._cache[key] = self._factory(name, self.root, host or None)
        return self._cache[key]


def runtime_keys(grove: DesiredGrove | None, inv: Inventory) -> list[RuntimeKey]:
    keys = {(r.runtime, r.host) for r in inv.agents.values()} | {("local", "")}
    if grove is not None:
        keys |= {(a.runtime, a.host or "") for a in grove.agents}
    return sorted(keys)


def observe(root: Path, grove_name: str, grove: DesiredGrove | None, rts: Runtimes,
            with_work: bool = False, tolerate: bool = False) -> Actual:
    """Observe one grove. `with_work`: workspace state for every inventoried agent (status);
    otherwise only for agents about to be pruned. `tolerate`: record runtime errors
    instead of raising (status keeps working when one Docker host is down)."""
    inv = inventory.load(paths.state(root), grove_name)
    observed: dict[str, Observed] = {}
    errors: dict[RuntimeKey, str] = {}
    for key in runtime_keys(grove, inv):
        try:
            found = rts.get(*key).observe(grove_name)
        except EngineError as e:
            if not tolerate:
                raise
            errors[key] = e.summary
            continue
        for name, obs in found.items():
            # the same agent seen on two runtimes (moved between profiles): keep the one
            # the inventory says the engine created last
            rec = inv.agents.get(name)
            if name in observed and rec and (rec.runtime, rec.host) != key:
                continue
            observed[name] = obs
    for name, rec in sorted(inv.agents.items()):
        seen = observed.get(name)
        if rec.workspace != "shared" and rec.workdir and seen and seen.phase != "Running":
            # an ended agent's commits reach its branch here (dependents start from it)
            workspace.sync(root, grove_name, name, fresh=False)
    wanted = set(grove.by_name) if grove else set()
    work = {}
    tip = _base_tip(root, grove) if any(
        r.workdir and (with_work or n not in wanted) for n, r in inv.agents.items()) else ""
    for name, rec in sorted(inv.agents.items()):
        if rec.workdir and (with_work or name not in wanted):
            work[name] = workspace.work_state(root, grove_name, name, root / rec.workdir,
                                              rec.branch, rec.base_commit, tip)
    for name in sorted(set(observed) - set(inv.agents) - wanted):
        orphan = workspace.orphan(root, grove_name, name)  # running, never recorded
        if orphan is not None and grove is not None:
            base = workspace.base_commit(root, grove.base_ref)[1]
            work[name] = workspace.work_state(root, grove_name, name, orphan[1],
                                              orphan[2], base)
    return Actual(grove_name, inv, observed, work, errors)


def work_of(root: Path, grove: DesiredGrove, name: str) -> workspace.WorkState | None:
    """One agent's workspace state, as `with_work` reads it for every agent (the web UI's
    agent page); None when it has no workspace recorded."""
    rec = inventory.load(paths.state(root), grove.name).agents.get(name)
    if rec is None or not rec.workdir:
        return None
    return workspace.work_state(root, grove.name, name, root / rec.workdir, rec.branch,
                                rec.base_commit, _base_tip(root, grove))


def _base_tip(root: Path, grove: DesiredGrove | None) -> str:
    """The grove's base commit now ("" when unknown): work merged into it is not ahead."""
    if grove is None:
        return ""
    try:
        return workspace.base_commit(root, grove.base_ref)[1]
    except EngineError:
        return ""


def _phase(a: DesiredAgent | None, rec: Record | None, obs: Observed | None
           ) -> tuple[str, str]:
    """(phase, reason) of one agent: what the runtime reports, except that an agent
    stopped on purpose is Stopped, and one whose create failed (nothing runs) is Failed
    with the engine's error as the reason."""
    if rec is not None and rec.stopped:
        return runtimes.STOPPED, f"stopped (engine start {a.name})" if a else "stopped"
    if obs is not None:
        return obs.phase, obs.reason or (rec.error if rec and obs.phase == FAILED else "")
    if rec is not None and rec.error:
        return FAILED, rec.error
    if rec is not None and (ended := rec.pruned_phase()):
        return ended, f"pruned {rec.pruned_at}"
    if a is None:
        return "Orphaned", ""
    return runtimes.PENDING, ("waiting for " + ", ".join(a.depends_on) if a.depends_on
                              else "")


def status_rows(grove: DesiredGrove, actual: Actual) -> list[dict[str, Any]]:
    """One row per agent for `engine status` (and agents' StatusRequests)."""
    out = []
    names = sorted(set(grove.by_name) | set(actual.inventory.agents) | set(actual.observed))
    for n in names:
        a = grove.by_name.get(n)
        rec = actual.inventory.agents.get(n)
        obs = actual.observed.get(n)
        work = actual.work.get(n)
        phase, reason = _phase(a, rec, obs)
        out.append({
            "name": n,
            "phase": phase,
            "reason": reason,
            "runtime": (a.runtime if a else rec.runtime if rec else obs.runtime if obs
                        else ""),
            "branch": rec.branch if rec else (a.branch if a else ""),
            "parent": (a.spawned_by if a else rec.parent if rec else "") or "",
            "workspace": rec.workdir if rec else "",
            "dirty": work.dirty if work else 0,
            "ahead": work.ahead if work else 0,
            "exitCode": obs.exit_code if obs else None,
            "inManifest": a is not None,
            "upToDate": bool(obs and a and obs.spec_hash == a.spec_hash),
            "conditions": _conditions(rec, phase),
        })
        if out[-1]["conditions"] and not reason:
            out[-1]["reason"] = f"needs input: {rec.waiting}" if rec else ""
    _waiting_reasons(grove, out)
    return out


def _conditions(rec: Record | None, phase: str) -> list[dict[str, str]]:
    """WaitingForInput while a running agent's harness says it waits for a person."""
    if rec is None or not rec.waiting or phase != runtimes.RUNNING:
        return []
    return [{"type": "WaitingForInput", "message": rec.waiting, "since": rec.waiting_since}]


def _waiting_reasons(grove: DesiredGrove, rows: list[dict[str, Any]]) -> None:
    """A Pending agent says what it waits for: a failed dependency (however far up) blocks
    it; otherwise the dependencies not Succeeded yet, or a parent not started yet."""
    by_name = {r["name"]: r for r in rows}
    blocked: dict[str, str] = {}
    changed = True
    while changed:  # behind a failed dependency, however many levels up
        changed = False
        for a in grove.agents:
            row = by_name.get(a.name)
            if row is None or row["phase"] != runtimes.PENDING or a.name in blocked:
                continue
            for d in a.depends_on:
                dep = by_name.get(d)
                if dep is not None and (dep["phase"] == FAILED or d in blocked):
                    blocked[a.name] = blocked.get(d, d)
                    changed = True
                    break
    for a in grove.agents:
        row = by_name.get(a.name)
        if row is None or row["phase"] != runtimes.PENDING or row["reason"].startswith(
                "pruned"):
            continue
        unmet = [d for d in a.depends_on
                 if by_name.get(d, {}).get("phase") != runtimes.SUCCEEDED]
        parent = by_name.get(a.spawned_by or "")
        if a.name in blocked:
            row["reason"] = f"blocked: dependency {blocked[a.name]} failed"
        elif unmet:
            row["reason"] = f"waiting for {', '.join(unmet)} to succeed"
        elif parent is not None and parent["phase"] == runtimes.PENDING:
            row["reason"] = f"waiting for its parent {parent['name']} to start"
        elif not row["reason"]:
            row["reason"] = "not started yet (engine apply, or a running engine watch)"
