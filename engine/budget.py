"""Budgets: each agent's `limits` against what it and its spawn subtree reported using.

Called by `converge` (stage 7, right after requests are taken in: `enforce`, then `hold`
on the plan), by the spawn gate (`policy.Gate.check`: `spawn_problems`), by `engine
start` (`check_start`) and by `engine cost` and `engine status` (`subtree_usage`, `left`).

An agent's usage is what its harness reported (`engine.usage`, kept in its inventory
record); its subtree's is its own plus every descendant's, following `Record.parent`, so
whatever an agent spawns counts against its budget. `maxCostUSD` and `maxTokens` (input
plus output) are measured over the subtree, `maxTurns` over the agent's own turns. A limit
is crossed once the usage has reached it. A field nobody in the subtree reported is
unknown and crosses nothing.

`enforce` stops an agent whose limit is crossed together with its whole subtree, the way
`engine stop` does (`agentops.stop`), with its work archived and its workspace kept; a
stopped agent is never stopped again, so a second pass does nothing. The usage is what the
agent says from inside its sandbox: a budget stops a runaway agent, not a hostile one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from engine import agentops, events
from engine.desired import DesiredAgent, DesiredGrove, Limits
from engine.errors import EngineError
from engine.inventory import Inventory
from engine.plan import Action, GrovePlan
from engine.usage import Usage, of_record

if TYPE_CHECKING:
    from engine.actual import Actual
    from engine.observe import Runtimes

SUBTREE_FIELDS = ("maxCostUSD", "maxTokens")  # summed over the spawn subtree
STARTS = (Action.CREATE, Action.REPLACE, Action.RESTART)


@dataclass(frozen=True)
class Breach:
    """A crossed limit: `agent`'s `limit` (a manifest field) of `maximum`, `used` so far."""

    agent: str
    limit: str
    maximum: float | int
    used: float | int

    @property
    def detail(self) -> str:
        return f"{self.limit} {show_limit(self.limit, self.maximum)}, used " \
               f"{show_used(self.limit, self.used)}"

    @property
    def reason(self) -> str:
        return f"budget exceeded: {self.detail}"


def money(value: float) -> str:
    """Dollars with two decimals, more (up to six) when two would hide the difference."""
    text = f"{value:.6f}".rstrip("0")
    whole, _, frac = text.partition(".")
    return f"{whole}.{frac.ljust(2, '0')}"


def show_limit(key: str, value: float | int) -> str:
    return money(float(value)) if key == "maxCostUSD" else str(value)


def show_used(key: str, value: float | int) -> str:
    return f"${money(float(value))}" if key == "maxCostUSD" else str(value)


# -- the spawn subtree -----------------------------------------------------------------

def descendants(inv: Inventory, name: str) -> list[str]:
    """Every recorded agent below `name` (children first, each level sorted)."""
    kids: dict[str, list[str]] = {}
    for n, rec in sorted(inv.agents.items()):
        if rec.parent:
            kids.setdefault(rec.parent, []).append(n)
    out: list[str] = []
    seen = {name}
    level = [name]
    while level:
        nxt = [k for n in level for k in kids.get(n, []) if k not in seen]
        seen.update(nxt)
        out += nxt
        level = nxt
    return out


def own_usage(inv: Inventory, name: str) -> Usage:
    rec = inv.agents.get(name)
    return of_record(rec.usage, rec.run_usage) if rec is not None else Usage()


def subtree_usage(inv: Inventory, name: str) -> Usage:
    """The agent's usage plus every descendant's; a field stays unknown (None) only when
    nobody in the subtree reported it."""
    total = own_usage(inv, name)
    for n in descendants(inv, name):
        total = total + own_usage(inv, n)
    return total


def _field(u: Usage, key: str) -> float | int | None:
    if key == "maxCostUSD":
        return u.cost_usd
    return u.tokens


def children(inv: Inventory) -> dict[str, list[str]]:
    """Each recorded agent's children, by Record.parent."""
    kids: dict[str, list[str]] = {}
    for n, rec in sorted(inv.agents.items()):
        if rec.parent:
            kids.setdefault(rec.parent, []).append(n)
    return kids


def used(inv: Inventory, name: str, key: str, caps: Mapping[str, Limits] | None = None,
         kids: Mapping[str, list[str]] | None = None) -> float | int | None:
    """What counts against limit `key` of agent `name` (None: nothing reported). With
    `caps` (each agent's limits), a descendant counts for at most its own limit: a child
    that reports more than it was granted crosses its own budget, not its ancestors'."""
    if key == "maxTurns":
        return own_usage(inv, name).turns
    if caps is None:
        value = _field(subtree_usage(inv, name), key)
    else:
        value = _counted(inv, name, key, caps, children(inv) if kids is None else kids,
                         {name})
    if key == "maxCostUSD" and value is not None:
        return round(value, 6)
    return value


def _counted(inv: Inventory, name: str, key: str, caps: Mapping[str, Limits],
             kids: Mapping[str, list[str]], seen: set[str]) -> float | int | None:
    """`name`'s own figure plus each child's subtree, a child counted at most up to its
    own limit; iterative (a long chain of agents is no recursion limit)."""
    order: list[str] = []
    stack = [name]
    while stack:  # every agent below `name` once, parents before children
        n = stack.pop()
        order.append(n)
        for kid in kids.get(n, []):
            if kid not in seen:
                seen.add(kid)
                stack.append(kid)
    total: dict[str, float | int | None] = {}
    for n in reversed(order):  # children before parents
        value = _field(own_usage(inv, n), key)
        for kid in kids.get(n, []):
            part = total.get(kid)
            cap = dict(caps[kid].items()).get(key) if kid in caps else None
            if part is not None and cap is not None:
                part = min(part, cap)
            if part is not None:
                value = part if value is None else value + part
        total[n] = value
    return total[name]


def left(limits: Limits, inv: Inventory, name: str) -> dict[str, float | int]:
    """What is left of each set limit (never below 0; all of it when nothing was
    reported)."""
    out: dict[str, float | int] = {}
    for key, maximum in limits.items():
        spent = used(inv, name, key) or 0
        rest = max(maximum - spent, 0)
        out[key] = round(rest, 6) if key == "maxCostUSD" else int(rest)
    return out


def crossed(limits: Limits, inv: Inventory, name: str,
            caps: Mapping[str, Limits] | None = None,
            kids: Mapping[str, list[str]] | None = None) -> Breach | None:
    """The first of the agent's limits its usage has reached (cost, tokens, turns)."""
    for key, maximum in limits.items():
        spent = used(inv, name, key, caps, kids)
        if spent is not None and spent >= maximum:
            return Breach(name, key, maximum, spent)
    return None


def exceeded(grove: DesiredGrove, inv: Inventory) -> list[Breach]:
    """Every agent of the grove whose own limits its usage has crossed, deepest first (a
    child over its own budget is stopped for its own reason before its parent's)."""
    out = []
    caps = {a.name: a.limits for a in grove.agents}
    kids = children(inv)
    for a in sorted(grove.agents, key=lambda a: (-a.depth, a.name)):
        if a.limits.items() and a.name in inv.agents and \
                (b := crossed(a.limits, inv, a.name, caps, kids)) is not None:
            out.append(b)
    return out


def _ancestors(grove: DesiredGrove, name: str) -> list[DesiredAgent]:
    """The agent's parent, its parent's parent, ... (as the manifests say)."""
    out: list[DesiredAgent] = []
    a = grove.by_name.get(name)
    while a is not None and a.spawned_by and len(out) < 100:
        a = grove.by_name.get(a.spawned_by)
        if a is not None:
            out.append(a)
    return out


# -- start and spawn ---------------------------------------------------------------------

def check_start(grove: DesiredGrove, name: str, inv: Inventory) -> None:
    """Refuse (EngineError, one line) to start an agent while its own budget, or that of an
    agent above it, is crossed: the next pass would stop it again."""
    who = f"agent {grove.name}/{name}"
    a = grove.by_name.get(name)
    if a is not None and (b := crossed(a.limits, inv, name)) is not None:
        raise EngineError(f"{who}: {b.reason}; raise limits.{b.limit} in the manifests "
                          "first")
    for up in _ancestors(grove, name):
        if (b := crossed(up.limits, inv, up.name)) is not None:
            raise EngineError(f"{who}: the budget of {up.name}, which it counts against, "
                              f"is exceeded: {b.detail}; raise limits.{b.limit} of "
                              f"{up.name} in the manifests first")


def spawn_problems(grove: DesiredGrove, parent: DesiredAgent, child: DesiredAgent,
                   inv: Inventory) -> list[str]:
    """Why `child` may not be spawned under `parent` for budget reasons ([] = it may):
    the parent (or an agent above it) has crossed a limit, or the child's own maxCostUSD
    or maxTokens is more than what is left of it. A child without limits is fine: its
    usage counts against the parent's anyway."""
    out = []
    mine = dict(child.limits.items())
    for up in [parent, *_ancestors(grove, parent.name)]:
        whose = up.name if up is parent else f"{up.name} (above {parent.name})"
        b = crossed(up.limits, inv, up.name)
        if b is not None:
            out.append(f"limits.{b.limit}: {whose} has used its budget ({b.detail})")
            continue
        rest = left(up.limits, inv, up.name)
        for key in SUBTREE_FIELDS:
            if key in mine and key in rest and mine[key] > rest[key]:
                out.append(f"limits.{key}: would get {show_limit(key, mine[key])}; {whose} "
                           f"has {show_limit(key, rest[key])} left of its "
                           f"{show_limit(key, dict(up.limits.items())[key])}")
    return out


def check_spawn(grove: DesiredGrove, parent: DesiredAgent, child: DesiredAgent,
                inv: Inventory) -> None:
    """`spawn_problems` as one EngineError (one line), or nothing."""
    problems = spawn_problems(grove, parent, child, inv)
    if problems:
        raise EngineError(f"child {child.name} would get more than its parent "
                          f"{parent.name}: " + "; ".join(problems))


# -- enforcement (effects) ---------------------------------------------------------------

def enforce(root: Path, grove: DesiredGrove, actual: Actual, rts: Runtimes,
            log: Callable[[str], None] = lambda _: None) -> list[str]:
    """Stop every agent whose budget is crossed, and its subtree; returns the names of the
    agents stopped now (`hold` takes them out of the plan about to be executed).

    Works on the pass's inventory, `actual.inventory` (the usage agents reported in this
    pass already taken into it), which the executor goes on saving: each agent is stopped
    through `agentops.stop` (marked stopped with its `stopped_reason` and saved first),
    then its work is archived with its workspace kept. One `BudgetExceeded` event per
    crossed budget that stopped something. A failure to stop or archive one agent is
    logged and does not keep the others from being stopped."""
    inv = actual.inventory
    out: list[str] = []
    for b in exceeded(grove, inv):
        # never started (pending) is left as `engine stop` leaves it: once it runs, the
        # next pass stops it
        todo = [n for n in (b.agent, *descendants(inv, b.agent))
                if n in inv.agents and not inv.agents[n].stopped
                and not inv.agents[n].pending]
        if not todo:
            continue  # acted on before (or stopped by a person)
        refs = []
        for n in todo:
            why = b.reason if n == b.agent else f"budget of {b.agent} exceeded: {b.detail}"
            ref = _stop_one(root, inv, n, why, rts, log)
            refs += [ref] if ref else []
            out.append(n)
        events.record(root, {"grove": grove.name, "agent": b.agent,
                             "event": "BudgetExceeded", "limit": b.limit,
                             "maximum": b.maximum, "used": b.used, "reason": b.reason,
                             "stopped": todo, "archives": refs})
        log(f"{grove.name}/{b.agent}: {b.reason}; stopped {', '.join(todo)}")
    return out


def _stop_one(root: Path, inv: Inventory, name: str, reason: str, rts: Runtimes,
              log: Callable[[str], None]) -> str:
    """Stop one agent and archive its work; the archive ref ("" when none)."""
    rec = inv.agents[name]
    try:
        agentops.stop(root, inv, name, rts.get(rec.runtime, rec.host or None), reason)
    except EngineError as e:  # marked stopped already: nothing starts it again
        log(f"{inv.grove}/{name}: could not be stopped: {e.summary}")
    try:
        return agentops.keep_work(root, inv.grove, name, rec) or ""
    except EngineError as e:
        log(f"{inv.grove}/{name}: work not archived (its workspace is kept): {e.summary}")
        return ""



def blocked(grove: DesiredGrove, inv: Inventory) -> list[str]:
    """Agents of the manifests below an agent the engine stopped over a budget: their
    usage would count against the crossed budget, so none of them starts (a child still
    pending when its parent was stopped included)."""
    over = {n for n, rec in inv.agents.items()
            if rec.stopped and rec.stopped_reason.startswith("budget")}
    if not over:
        return []
    return sorted(a.name for a in grove.agents
                  if any(up.name in over for up in _ancestors(grove, a.name)))


def hold(p: GrovePlan, stopped: list[str]) -> GrovePlan:
    """The plan with every change that would start one of the agents `enforce` just
    stopped (create, replace, restart: planned before it was stopped) made a no-op."""
    if not stopped:
        return p
    return dataclasses.replace(p, changes=tuple(
        dataclasses.replace(c, action=Action.NOOP, reason="stopped: budget exceeded")
        if c.agent in stopped and c.action in STARTS else c for c in p.changes))
