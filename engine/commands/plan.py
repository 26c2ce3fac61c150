"""`engine plan`: what apply would do, Terraform style; or, with --base, what a change to
the manifests between two git revisions does to the topology (no live state needed)."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from engine import converge, manifest, paths, plan, ui
from engine.commands import _common, _converge
from engine.errors import EngineError, UsageError
from engine.fsutil import atomic_write
from engine.observe import Runtimes


def register(sub: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(
        "plan", help="show what apply would change",
        description="Compare the manifests with the running agents and show the changes.")
    _common.add_grove_arg(p)
    _common.add_set_arg(p)
    p.add_argument("-target", "--target", action="append", default=[], metavar="AGENT",
                   dest="targets", help="plan only this agent and what it needs (its "
                   "parent and dependencies); repeatable")
    p.add_argument("-replace", "--replace", action="append", default=[], metavar="AGENT",
                   dest="replace", help="plan a new runtime object for this agent even if "
                   "nothing changed; repeatable")
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
    groves = _common.load(r, args, create_key=True, orphans_ok=True)
    opts = _common.options(r, args, create_key=True)
    rts = Runtimes(r.root)
    plans, notes = [], []
    for g in groves:
        res = converge.run(r.root, converge.Ask(
            g.name, loaded=g, execute=False, targets=frozenset(args.targets),
            replace=frozenset(args.replace)), rts, opts)
        plans.append(res.plan)
        notes += _converge.source_notes(r.root, res.plan, g.base_ref)
    if not args.groves:
        plans += _orphaned(r.root, {g.name for g in groves}, rts, opts)
    doc = plan.document(plans)
    if args.out:
        atomic_write(Path(args.out), (json.dumps(doc, indent=1, sort_keys=True) + "\n")
                     .encode(), 0o600)
    if args.json:
        ui.print_json(doc)
    else:
        c = ui.console()
        c.print(plan.render_text(plans, color=ui.use_color()))
        for line in notes:
            ui.err(line)
        if args.out:
            c.print(f"\nSaved the plan to {args.out}. Apply exactly it with: "
                    f"engine apply {args.out}")
    if args.detailed_exitcode and doc["changes"]:
        return 2
    return 0


def _orphaned(root: Path, present: set[str], rts: Runtimes, opts: object
              ) -> list[plan.GrovePlan]:
    """Groves whose directory is gone but which still own agents: their agents show as
    orphans (apply keeps them; `engine destroy -g G` removes them)."""
    state = paths.state(root) / "state"
    if not state.is_dir():
        return []
    have = {d.name for d in manifest.grove_dirs(root)}
    out = []
    for p in sorted(state.glob("*.json")):
        if p.stem in have or p.stem in present or "." in p.stem:  # <grove>.approvals.json
            continue
        res = converge.run(root, converge.Ask(p.stem, destroy=True, execute=False,
                                              take_requests=False), rts, opts)  # type: ignore[arg-type]
        changes = tuple(dataclasses.replace(
            c, action=plan.Action.ORPHAN, reason=f"grove directory groves/{p.stem}/ is "
            f"gone; engine destroy -g {p.stem} removes it") for c in res.plan.changes)
        if changes:
            out.append(dataclasses.replace(res.plan, changes=changes))
    return out


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
