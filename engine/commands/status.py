"""`engine status`: each agent's phase, runtime, branch, parent, workspace and work."""

from __future__ import annotations

import argparse
from typing import Any

from engine import ui
from engine.commands import _common
from engine.observe import Runtimes, observe, status_rows


def register(sub: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser("status", help="show the grove's agents")
    _common.add_grove_arg(p)
    p.add_argument("--json", action="store_true")
    return p


def run(args: argparse.Namespace) -> int:
    r = _common.repo()
    groves = _common.load(r, args, resolve_secrets=False)
    rts = Runtimes(r.root)
    doc: list[dict[str, Any]] = []
    for g in groves:
        actual = observe(r.root, g.name, g, rts, with_work=True, tolerate=True)
        doc.append({"grove": g.name, "agents": status_rows(g, actual),
                    "errors": [f"{k[0]}{' ' + k[1] if k[1] else ''}: {v}"
                               for k, v in sorted(actual.errors.items())]})
    if args.json:
        ui.print_json({"apiVersion": "engine/v1alpha1", "kind": "Status", "formatVersion": 1,
                       "groves": doc})
        return 0
    cols = ["name", "phase", "runtime", "branch", "parent", "dirty", "ahead", "exitCode"]
    for entry in doc:
        ui.out(f"grove {entry['grove']}")
        table = [[str(x[c] if x[c] is not None else "-") or "-" for c in cols]
                 for x in entry["agents"]]
        widths = [max([len(c)] + [len(row[i]) for row in table]) for i, c in enumerate(cols)]
        ui.out("  " + "  ".join(c.upper().ljust(w) for c, w in zip(cols, widths, strict=True)))
        for row, x in zip(table, entry["agents"], strict=True):
            line = "  " + "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True))
            ui.out(line.rstrip() + (f"  ({x['reason']})" if x["reason"] else ""))
        for e in entry["errors"]:
            ui.err(f"warning: {e}")
    return 0
