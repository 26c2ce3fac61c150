"""`engine status`: each agent's phase, runtime, branch, parent, workspace and work."""

from __future__ import annotations

import argparse
from typing import Any

from engine import ui
from engine.commands import _common
from engine.desired import DesiredGrove
from engine.observe import Actual, Runtimes, observe


def register(sub: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser("status", help="show the grove's agents")
    _common.add_grove_arg(p)
    p.add_argument("--json", action="store_true")
    return p


def rows(grove: DesiredGrove, actual: Actual) -> list[dict[str, Any]]:
    out = []
    names = sorted(set(grove.by_name) | set(actual.inventory.agents) | set(actual.observed))
    for n in names:
        a = grove.by_name.get(n)
        rec = actual.inventory.agents.get(n)
        obs = actual.observed.get(n)
        work = actual.work.get(n)
        phase = obs.phase if obs else "Pending" if a else "Orphaned"
        out.append({
            "name": n,
            "phase": phase,
            "reason": obs.reason if obs else ("waiting for " + ", ".join(a.depends_on)
                                              if a and a.depends_on else ""),
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
        })
    return out


def run(args: argparse.Namespace) -> int:
    r = _common.repo()
    groves = _common.load(r, args, resolve_secrets=False)
    rts = Runtimes(r.root)
    doc = []
    for g in groves:
        actual = observe(r.root, g.name, g, rts, with_work=True, tolerate=True)
        doc.append({"grove": g.name, "agents": rows(g, actual),
                    "errors": [f"{k[0]}{' ' + k[1] if k[1] else ''}: {v}"
                               for k, v in sorted(actual.errors.items())]})
    if args.json:
        ui.print_json({"formatVersion": 1, "groves": doc})
        return 0
    cols = ["name", "phase", "runtime", "branch", "parent", "dirty", "ahead", "exitCode"]
    for g in doc:
        ui.out(f"grove {g['grove']}")
        table = [[str(x[c] if x[c] is not None else "-") or "-" for c in cols]
                 for x in g["agents"]]
        widths = [max([len(c)] + [len(row[i]) for row in table]) for i, c in enumerate(cols)]
        ui.out("  " + "  ".join(c.upper().ljust(w) for c, w in zip(cols, widths, strict=True)))
        for row, x in zip(table, g["agents"], strict=True):
            line = "  " + "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True))
            ui.out(line.rstrip() + (f"  ({x['reason']})" if x["reason"] else ""))
        for e in g["errors"]:
            ui.err(f"warning: {e}")
    return 0
