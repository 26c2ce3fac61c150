"""`engine destroy`: remove everything a grove owns; each agent's work is archived first."""

from __future__ import annotations

import argparse
from typing import Any

from engine import inventory, manifest, plan, reconcile, ui
from engine.commands import _common
from engine.commands.apply import Progress
from engine.errors import EngineError
from engine.executor import Settings
from engine.observe import Runtimes


def register(sub: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(
        "destroy", help="stop and remove every agent of the grove (work is archived)")
    _common.add_grove_arg(p)
    p.add_argument("--auto-approve", action="store_true")
    return p


def run(args: argparse.Namespace) -> int:
    r = _common.repo()
    if not args.auto_approve and not ui.is_tty():
        raise EngineError("destroy needs --auto-approve when not run from a terminal")
    known = {d.name for d in manifest.grove_dirs(r.root)}
    state = r.state_dir / "state"
    if state.is_dir():  # a grove whose directory is gone may still own agents
        known |= {p.stem for p in state.glob("*.json")}
    names = args.groves or sorted(known)
    if not names:
        raise EngineError("no groves to destroy")
    unknown = [n for n in names if n not in known]
    if unknown:
        raise EngineError(f"grove {unknown[0]!r} not found (groves: "
                          f"{', '.join(sorted(known)) or 'none'})")
    rts = Runtimes(r.root)
    failed = 0
    for name in names:
        with inventory.locked(r.state_dir, name, "destroy"):
            empty, the_plan = reconcile.destroy_plan(r.root, name, rts)
            if not the_plan.has_changes:
                ui.out(f"grove {name}: nothing to destroy")
                continue
            if not args.auto_approve:
                ui.console().print(plan.render_text([the_plan], color=ui.use_color()))
                if input("\nDestroy these agents? Only 'yes' will be accepted: ") != "yes":
                    ui.err("destroy cancelled")
                    return 1
            res = reconcile.execute(r.root, empty, rts, the_plan, Progress(False, False),
                                    Settings())
            failed += len(res.failed)
            ui.out(f"grove {name}: destroyed {len(res.outcomes) - len(res.failed)} agents"
                   + (f", {len(res.failed)} failed" if res.failed else ""))
    return 1 if failed else 0
