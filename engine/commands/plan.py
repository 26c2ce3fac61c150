"""`engine plan`: what apply would do, Terraform style; or, with --base, what a change to
the manifests between two git revisions does to the topology (no live state needed)."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from engine import plan, ui
from engine.commands import _common
from engine.errors import EngineError, UsageError
from engine.fsutil import atomic_write
from engine.observe import Runtimes
from engine.reconcile import make_plan


def register(sub: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(
        "plan", help="show what apply would change",
        description="Compare the manifests with the running agents and show the changes.")
    _common.add_grove_arg(p)
    _common.add_set_arg(p)
    p.add_argument("--out", metavar="FILE", help="save the plan for `engine apply FILE`")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--detailed-exitcode", action="store_true",
                   help="exit 0 when nothing changes, 2 when there are changes, 1 on error")
    p.add_argument("--base", metavar="REF", help="compare manifests at REF with --head "
                   "(default: the working tree) instead of with the running agents")
    p.add_argument("--head", metavar="REF", help="with --base: the revision to compare")
    p.add_argument("--format", choices=["text", "json", "markdown"], default=None,
                   help="with --base: output format (default text)")
    return p


def run(args: argparse.Namespace) -> int:
    r = _common.repo()
    if args.base or args.head or args.format:
        return _topology(r.root, args)
    groves = _common.load(r, args, create_key=True)
    rts = Runtimes(r.root)
    plans = [make_plan(r.root, g, rts) for g in groves]
    doc = plan.document(plans)
    if args.out:
        atomic_write(Path(args.out), (json.dumps(doc, indent=1, sort_keys=True) + "\n")
                     .encode(), 0o600)
    if args.json:
        ui.print_json(doc)
    else:
        c = ui.console()
        c.print(plan.render_text(plans, color=ui.use_color()))
        if args.out:
            c.print(f"\nSaved the plan to {args.out}. Apply exactly it with: "
                    f"engine apply {args.out}")
    if args.detailed_exitcode and doc["changes"]:
        return 2
    return 0


def _topology(root: Path, args: argparse.Namespace) -> int:
    if not args.base:
        raise UsageError("engine plan: --head and --format need --base REF")
    if args.out:
        raise UsageError("engine plan: --out saves a plan of the running agents; it does not "
                         "go with --base")
    if args.json:
        args.format = args.format or "json"
    try:
        from engine import revisions, topology
    except ImportError:
        raise EngineError("comparing revisions is not available in this build") from None
    # the manifests compared may come from a pull request: their templates see no
    # environment value (and no secret is resolved)
    opts = dataclasses.replace(revisions.default_options(root), host_env=False)
    text, changed = topology.plan_between(root, args.groves, args.base, args.head,
                                          args.format or "text", opts)
    ui.out(text.rstrip("\n"))
    return 2 if args.detailed_exitcode and changed else 0
