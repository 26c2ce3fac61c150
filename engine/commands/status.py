"""`engine status`: each agent's phase, runtime, branch, parent, workspace and work, and
what each agent's harness reported using (tokens, cost) and its budgets, and
per grove whether it was ever applied, the commit it was last converged from and whether
its manifests differ from that of HEAD (uncommitted edits `apply` would act on).

A reason can come from a file the agent wrote (e.g. the Docker runtime's `ctl/reason`): in
both outputs it is one line of at most REASON_CHARS characters without control
characters, and everything printed as text goes through `reader.for_terminal`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from engine import budget, converge, signals, ui, usage
from engine.commands import _common
from engine.desired import DesiredGrove
from engine.inventory import Inventory
from engine.observe import Runtimes, observe, status_rows
from engine.trust import reader

REASON_CHARS = 200


def register(sub: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser("status", help="show the grove's agents")
    _common.add_grove_arg(p)
    p.add_argument("--json", action="store_true")
    return p


def _grove(root: Path, g: DesiredGrove, rts: Runtimes) -> dict[str, Any]:
    """One grove's entry of the status document, reasons and errors bounded."""
    reports = signals.pending(root, g.name)  # before the inventory is read (`pending`)
    actual = observe(root, g.name, g, rts, with_work=True, tolerate=True)
    signals.take(root, g, actual.inventory, save=False, reqs=reports)  # not taken yet
    rows = status_rows(g, actual)
    for row in rows:
        row["reason"] = reader.one_line(str(row["reason"] or ""), REASON_CHARS)
    _cost(g, actual.inventory, rows)
    errors = [reader.one_line(f"{k[0]}{' ' + k[1] if k[1] else ''}: {v}", 500)
              for k, v in sorted(actual.errors.items())]
    inv = actual.inventory
    return {"grove": g.name, "applied": bool(inv.lineage or inv.agents or actual.observed),
            "revision": inv.revision,
            "manifestsModified": converge.manifests_modified(root, g.name),
            "agents": rows, "errors": errors}


def _cost(g: DesiredGrove, inv: Inventory, rows: list[dict[str, Any]]) -> None:
    """Each row's `usage` (what its harness reported; null: never started) and `limits`;
    an agent the engine stopped over a budget gets a Budget condition, and its reason
    says which limit."""
    for row in rows:
        name = row["name"]
        rec, a = inv.agents.get(name), g.by_name.get(name)
        started = rec is not None and not rec.pending
        row["usage"] = budget.own_usage(inv, name).to_json() if started else None
        row["limits"] = dict(a.limits.items()) if a is not None else {}
        if rec is not None and rec.stopped and rec.stopped_reason.startswith("budget"):
            why = reader.one_line(rec.stopped_reason, REASON_CHARS)
            row.setdefault("conditions", []).append({"type": "Budget", "message": why})
            row["reason"] = reader.one_line(f"{why}; raise the limit, then engine start "
                                            f"{name}", REASON_CHARS)


def _cell(x: dict[str, Any], col: str) -> str:
    if col in ("tokens", "cost"):
        if x.get("usage") is None:
            return "-"
        u = usage.parse(x["usage"])
        return usage.show_tokens(u) if col == "tokens" else usage.show_cost(u)
    return reader.one_line(str(x[col] if x[col] is not None else "-")) or "-"


def _heading(entry: dict[str, Any]) -> str:
    name = entry["grove"]
    if entry.get("orphaned"):
        return (f"grove {name}: its directory groves/{name}/ is gone; its agents are "
                f"orphans (engine destroy -g {name} removes them)")
    if not entry["applied"]:
        return f"grove {name}: never applied (run engine apply -g {name})"
    rev = entry["revision"]
    line = f"grove {name}: " + (f"synced to {rev[:12]}" if rev else
                               "applied from the working tree")
    return line + (" (manifests modified, not committed)" if entry["manifestsModified"]
                   else "")


def run(args: argparse.Namespace) -> int:
    r = _common.repo()
    groves = _common.load(r, args, resolve_secrets=False, orphans_ok=True)
    rts = Runtimes(r.root)
    doc: list[dict[str, Any]] = []
    for g in groves:
        doc.append(_grove(r.root, g, rts))
    if not args.groves:  # a grove whose directory is gone: its agents still run
        for name in _common.orphaned_groves(r):
            entry = _grove(r.root, converge.empty(r.root, name), rts)
            entry["orphaned"] = True
            doc.append(entry)
    if args.json:
        ui.print_json({"apiVersion": "engine/v1alpha1", "kind": "Status", "formatVersion": 1,
                       "groves": doc})
        return 0
    cols = ["name", "phase", "runtime", "branch", "parent", "dirty", "ahead", "exitCode",
            "tokens", "cost"]
    for entry in doc:
        ui.out(_heading(entry))
        if not entry["agents"]:
            continue
        table = [[_cell(x, c) for c in cols] for x in entry["agents"]]
        widths = [max([len(c)] + [len(row[i]) for row in table]) for i, c in enumerate(cols)]
        ui.out(("  " + "  ".join(c.upper().ljust(w) for c, w in zip(cols, widths, strict=True))
                ).rstrip())
        for row, x in zip(table, entry["agents"], strict=True):
            line = "  " + "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True))
            ui.out(line.rstrip() + (f"  ({x['reason']})" if x["reason"] else ""))
        for e in entry["errors"]:
            ui.err(f"warning: {e}")
    return 0
