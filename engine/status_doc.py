"""The status document (schemas/status.json): one entry per grove with a row per agent.

Built here for `engine status --json` and for the web UI (`engine ui`), so both show the
same result objects. A reason can come from a file the agent wrote (e.g. the Docker
runtime's `ctl/reason`): it is one line of at most REASON_CHARS characters without control
characters.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine import budget, converge, signals
from engine.desired import DesiredGrove
from engine.inventory import Inventory
from engine.observe import Runtimes, observe, status_rows
from engine.trust import reader

REASON_CHARS = 200
API = {"apiVersion": "engine/v1alpha1", "kind": "Status", "formatVersion": 1}


def grove_entry(root: Path, g: DesiredGrove, rts: Runtimes, with_work: bool = True
                ) -> dict[str, Any]:
    """One grove's entry of the status document, reasons and errors bounded.
    `with_work=False` leaves out each workspace's dirty/ahead counts (0), which cost a git
    call per agent."""
    reports = signals.pending(root, g.name)  # before the inventory is read (`pending`)
    actual = observe(root, g.name, g, rts, with_work=with_work, tolerate=True)
    signals.take(root, g, actual.inventory, save=False, reqs=reports)  # not taken yet
    rows = status_rows(g, actual)
    for row in rows:
        row["reason"] = reader.one_line(str(row["reason"] or ""), REASON_CHARS)
        a = g.by_name.get(row["name"])
        row["dependsOn"] = sorted(a.depends_on) if a is not None else []
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


def document(groves: list[dict[str, Any]]) -> dict[str, Any]:
    return {**API, "groves": groves}
