"""`engine destroy`: remove everything a grove owns; each agent's work is archived first.

A thin caller of the converge spine with an empty desired state."""

from __future__ import annotations

import argparse
from typing import Any

from engine import converge, manifest, plan, ui
from engine.commands import _common, _converge
from engine.commands._progress import Progress
from engine.errors import EngineError
from engine.observe import Runtimes
from engine.schema import did_you_mean


def register(sub: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(
        "destroy", help="stop and remove every agent of the grove (work is archived)",
        description="Stop and remove every agent the grove owns, after showing the plan "
        "and asking. Each agent's uncommitted changes and unmerged commits are archived "
        "first (engine restore brings them back); an agent whose work cannot be saved is "
        "not removed.")
    _common.add_grove_arg(p)
    p.add_argument("--auto-approve", action="store_true",
                   help="do not show the plan and ask for confirmation")
    p.add_argument("--lock-timeout", type=float, default=_converge.LOCK_WAIT,
                   metavar="SECONDS", help="wait this long for another operation's pass "
                   f"(a controller's) to end (default {_converge.LOCK_WAIT:g})")
    return p


def run(args: argparse.Namespace) -> int:
    r = _common.repo()
    if not args.auto_approve and not ui.is_tty():
        raise EngineError("destroy needs --auto-approve when not run from a terminal")
    known = {d.name for d in manifest.grove_dirs(r.root)}
    state = r.state_dir / "state"
    if state.is_dir():  # a grove whose directory is gone may still own agents
        known |= {p.stem for p in state.glob("*.json") if "." not in p.stem}  # inventories
    names = args.groves or sorted(known)
    if not names:
        raise EngineError("no groves to destroy")
    unknown = [n for n in names if n not in known]
    if unknown:
        raise EngineError(f"grove {unknown[0]!r} not found (groves: "
                          f"{', '.join(sorted(known)) or 'none'})"
                          f"{did_you_mean(unknown[0], known)}")
    rts = Runtimes(r.root)
    progress = Progress()
    opts = _common.options(r, args, resolve_secrets=False)
    failed = 0
    for name in names:
        ask = converge.Ask(name, destroy=True, take_requests=False, hooks=progress,
                           confirm=None if args.auto_approve else _confirm)
        res = _converge.locked_pass(r.root, ask, rts, opts, "destroy", progress.note,
                                    args.lock_timeout)
        if res.cancelled:
            ui.err("destroy cancelled: nothing changed")
            return 1
        if not res.plan.has_changes:
            ui.out(f"grove {name}: nothing to destroy")
            continue
        failed += len(res.failed)
        ui.out(f"grove {name}: destroyed {len(res.outcomes) - len(res.failed)} agents"
               + (f", {len(res.failed)} failed" if res.failed else ""))
    return 1 if failed else 0


def _confirm(the_plan: plan.GrovePlan) -> bool:
    ui.console().print(plan.render_text([the_plan], color=ui.use_color()))
    return input("\nDestroy these agents? Only 'yes' will be accepted: ").strip() == "yes"
