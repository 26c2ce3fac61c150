"""`engine status`: each agent's phase, runtime, branch, parent, workspace and work, and
what each agent's harness reported using (tokens, cost) and its budgets, and
per grove whether it was ever applied, the commit it was last converged from and whether
its manifests differ from that of HEAD (uncommitted edits `apply` would act on).

The document is built by `status_doc` (the web UI shows the same one); a reason can come
from a file the agent wrote, so everything printed as text goes through
`reader.for_terminal`."""

from __future__ import annotations

import argparse
from typing import Any

from engine import converge, status_doc, ui, usage
from engine.commands import _common
from engine.observe import Runtimes
from engine.trust import reader


def register(sub: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser("status", help="show the grove's agents")
    _common.add_grove_arg(p)
    p.add_argument("--json", action="store_true", help="print JSON (schemas/status.json)")
    return p


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
        doc.append(status_doc.grove_entry(r.root, g, rts))
    if not args.groves:  # a grove whose directory is gone: its agents still run
        for name in _common.orphaned_groves(r):
            entry = status_doc.grove_entry(r.root, converge.empty(r.root, name), rts)
            entry["orphaned"] = True
            doc.append(entry)
    if args.json:
        ui.print_json(status_doc.document(doc))
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
