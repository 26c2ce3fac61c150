"""`engine cost [AGENT] [-g G] [--json]`: tokens, cost and turns each agent's harness
reported, its budgets (`limits`) and what is left of them, and each grove's total; with
AGENT, that agent's spawn subtree as a tree with subtotals.

Read-only: the manifests (for limits, no secrets resolved) and the inventory (usage, as
`engine.usage` parsed it). A figure nobody reported is "unknown" (null in JSON by being
absent), never 0; a total over agents some of which reported nothing says "at least".
Agents that never started show "-" (JSON `started: false`). The JSON shape is
schemas/cost.json.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from engine import budget, inventory, ui
from engine.commands import _common
from engine.desired import DesiredGrove, Limits
from engine.errors import EngineError
from engine.inventory import Inventory
from engine.trust.reader import for_terminal
from engine.usage import Usage, show_cost, show_tokens

API = {"apiVersion": "engine/v1alpha1", "kind": "Cost", "formatVersion": 1}


def register(sub: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(
        "cost", help="tokens, cost and turns per agent, with budgets and what is left",
        description="Show what each agent's harness reported using (input and output "
        "tokens, cost in US dollars, turns), its limits and what is left of them (limits "
        "count the agent's whole spawn subtree), and each grove's total. With AGENT: the "
        "agent's spawn subtree as a tree with subtotals. A figure nothing reported is "
        "unknown, never 0.")
    p.add_argument("agent", nargs="?", metavar="AGENT", help="NAME or GROVE/NAME")
    _common.add_grove_arg(p)
    p.add_argument("--json", action="store_true", help="print JSON (schemas/cost.json)")
    return p


def run(args: argparse.Namespace) -> int:
    r = _common.repo()
    if args.agent:
        gname, _, _ = str(args.agent).rpartition("/")
        if gname and not args.groves:
            args.groves = [gname]
    groves = _common.load(r, args, resolve_secrets=False)
    if args.agent:
        g, a = _common.find_agent(groves, args.agent)
        view = View(g, inventory.load(r.state_dir, g.name))
        if view.inv.agents.get(a.name) is None:
            raise EngineError(f"agent {g.name}/{a.name}: not started yet, nothing used")
        node = view.tree(a.name)
        if args.json:
            ui.print_json({**API, "grove": g.name, "tree": node})
        else:
            _print_tree(g.name, node)
        return 0
    doc = [View(g, inventory.load(r.state_dir, g.name)).grove() for g in groves]
    if args.json:
        ui.print_json({**API, "groves": doc})
    else:
        for entry in doc:
            _print_grove(entry)
    return 0


# -- the figures ---------------------------------------------------------------------------

@dataclass(frozen=True)
class View:
    """One grove's figures: its desired agents (limits) and its inventory (usage)."""

    g: DesiredGrove
    inv: Inventory

    def names(self) -> list[str]:
        return sorted(set(self.g.by_name) | set(self.inv.agents))

    def started(self, name: str) -> bool:
        rec = self.inv.agents.get(name)
        return rec is not None and not rec.pending

    def limits(self, name: str) -> Limits:
        a = self.g.by_name.get(name)
        return a.limits if a is not None else Limits()

    def agent(self, name: str) -> dict[str, Any]:
        """One agent's entry: its own usage, its subtree's, limits, what is left."""
        rec = self.inv.agents.get(name)
        a = self.g.by_name.get(name)
        lim = self.limits(name)
        sub = [name, *budget.descendants(self.inv, name)]
        return {
            "name": name,
            "parent": (a.spawned_by if a else rec.parent if rec else "") or "",
            "started": self.started(name),
            "usage": budget.own_usage(self.inv, name).to_json(),
            "subtree": self.total(sub),
            "limits": dict(lim.items()),
            "left": budget.left(lim, self.inv, name) if rec is not None else
            dict(lim.items()),
            "stoppedReason": rec.stopped_reason if rec is not None and rec.stopped else "",
        }

    def total(self, names: list[str]) -> dict[str, Any]:
        """The sum over the started agents of `names` and, per field, how many of them
        reported nothing (an agent that never started used nothing)."""
        total = Usage()
        unknown = {"costUSD": 0, "tokens": 0, "turns": 0}
        for n in names:
            if not self.started(n):
                continue
            u = budget.own_usage(self.inv, n)
            total = total + u
            for key, value in (("costUSD", u.cost_usd), ("tokens", u.tokens),
                               ("turns", u.turns)):
                unknown[key] += value is None
        return {"agents": sum(1 for n in names if self.started(n)),
                "usage": total.to_json(), "unknown": unknown}

    def grove(self) -> dict[str, Any]:
        names = self.names()
        return {"grove": self.g.name, "agents": [self.agent(n) for n in names],
                "total": self.total(names)}

    def tree(self, name: str, depth: int = 0) -> dict[str, Any]:
        kids = sorted(n for n, rec in self.inv.agents.items() if rec.parent == name)
        node = self.agent(name)
        node["children"] = [self.tree(k, depth + 1) for k in kids] if depth < 64 else []
        return node


# -- text ----------------------------------------------------------------------------------

def _usage(data: dict[str, Any]) -> Usage:
    return Usage(data.get("inputTokens"), data.get("outputTokens"), data.get("costUSD"),
                 data.get("turns"))


def _count(n: int) -> str:
    return f"{n} agent{'s' if n != 1 else ''} unknown"


def show_total(total: dict[str, Any]) -> str:
    """"$X, N tokens, T turns", each "at least ... (N agents unknown)" when some agents
    reported nothing, or "unknown" when none did."""
    u = _usage(total["usage"])
    if not u.known:
        return "unknown"
    parts = []
    for key, text, known in (("costUSD", show_cost(u), u.cost_usd is not None),
                             ("tokens", f"{show_tokens(u)} tokens", u.tokens is not None),
                             ("turns", f"{u.turns} turns", u.turns is not None)):
        missing = total["unknown"][key]
        if not known:
            parts.append(f"{key if key != 'costUSD' else 'cost'} unknown")
        elif missing:
            parts.append(f"at least {text} ({_count(missing)})")
        else:
            parts.append(text)
    return ", ".join(parts)


def _limits(values: dict[str, Any]) -> str:
    out = []
    for key, value in values.items():
        if key == "maxCostUSD":
            out.append(f"${budget.money(float(value))}")
        else:
            out.append(f"{value} {'tokens' if key == 'maxTokens' else 'turns'}")
    return ", ".join(out) or "-"


def _num(v: int | None) -> str:
    return "unknown" if v is None else str(v)


def _row(x: dict[str, Any]) -> list[str]:
    if not x["started"]:
        return [x["name"], "-", "-", "-", "-", _limits(x["limits"]), "-"]
    u = _usage(x["usage"])
    return [x["name"], _num(u.input_tokens), _num(u.output_tokens), show_cost(u),
            _num(u.turns), _limits(x["limits"]), _limits(x["left"]) if x["limits"] else "-"]


def _print_grove(entry: dict[str, Any]) -> None:
    ui.out(f"grove {entry['grove']}")
    cols = ["AGENT", "TOKENS IN", "TOKENS OUT", "COST", "TURNS", "LIMITS", "LEFT"]
    table = [_row(x) for x in entry["agents"]]
    widths = [max([len(c)] + [len(row[i]) for row in table]) for i, c in enumerate(cols)]
    ui.out("  " + "  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)).rstrip())
    for row, x in zip(table, entry["agents"], strict=True):
        line = "  " + "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True))
        why = for_terminal(x["stoppedReason"])
        ui.out(line.rstrip() + (f"  ({why})" if why else ""))
    ui.out(f"  total: {show_total(entry['total'])}")


def _print_tree(grove: str, node: dict[str, Any], prefix: str = "", last: bool = True,
                top: bool = True) -> None:
    own = "-" if not node["started"] else show_total(
        {"usage": node["usage"], "unknown": {"costUSD": 0, "tokens": 0, "turns": 0}})
    line = f"{grove}/{node['name']}" if top else node["name"]
    text = f"{line}: subtree {show_total(node['subtree'])}; own {own}"
    if node["limits"]:
        text += f"; limits {_limits(node['limits'])}, left {_limits(node['left'])}"
    if node["stoppedReason"]:
        text += f" ({for_terminal(node['stoppedReason'])})"
    ui.out(("" if top else prefix + ("└─ " if last else "├─ ")) + text)
    kids = node["children"]
    inner = "" if top else prefix + ("   " if last else "│  ")
    for i, k in enumerate(kids):
        _print_tree(grove, k, inner, i == len(kids) - 1, False)
