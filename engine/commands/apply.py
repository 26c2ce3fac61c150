"""`engine apply [PLANFILE]`: converge the running agents onto the manifests.

A thin caller of the converge spine: one confirmed pass per grove (under the grove's lock,
waiting for a controller's pass in progress), and with --wait the controller in the
foreground until every agent has finished, its agents' phases shown as they change (a
live table on a terminal, `_progress.Progress.watch`).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from engine import controller, converge, manifest, paths, plan, ui
from engine.commands import _common, _converge
from engine.commands._progress import Progress
from engine.errors import EngineError, UsageError
from engine.executor import Settings
from engine.observe import Runtimes


def register(sub: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(
        "apply", help="converge agents onto the manifests",
        description="Create, replace, restart and delete agents so that what runs matches "
        "the manifests in the working tree, after showing the plan and asking. Pending "
        "spawn requests are part of the plan and taken in only once it is confirmed. With "
        "PLANFILE, apply exactly that saved plan.")
    p.add_argument("planfile", nargs="?", metavar="PLANFILE",
                   help="a plan saved by `engine plan --out FILE` (refused when stale)")
    _common.add_grove_arg(p)
    _common.add_set_arg(p)
    p.add_argument("--auto-approve", action="store_true", help="do not ask for confirmation")
    p.add_argument("-target", "--target", action="append", default=[], metavar="AGENT",
                   dest="targets", help="act only on this agent and what it needs (its "
                   "parent and dependencies); repeatable")
    p.add_argument("-replace", "--replace", action="append", default=[], metavar="AGENT",
                   dest="replace", help="give this agent a new runtime object even if "
                   "nothing changed (its workspace and branch are kept); repeatable")
    p.add_argument("--parallelism", type=int, default=8, metavar="N",
                   help="agents started at once (default 8)")
    p.add_argument("--wait", action="store_true", help="then run the controller in the "
                   "foreground: answer spawns, start dependents as their dependencies "
                   "succeed, restart per policy, and return when every agent has finished")
    p.add_argument("--timeout", type=float, default=3600, metavar="SECONDS",
                   help="with --wait: give up after this long (default 3600)")
    p.add_argument("--lock-timeout", type=float, default=_converge.LOCK_WAIT,
                   metavar="SECONDS", help="wait this long for another operation's pass "
                   f"(a controller's) to end (default {_converge.LOCK_WAIT:g})")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--json-stream", action="store_true",
                   help="print one JSON event per line as agents change")
    return p


def run(args: argparse.Namespace) -> int:
    if args.parallelism < 1:
        raise UsageError("--parallelism must be at least 1")
    if args.timeout <= 0 or args.lock_timeout < 0:
        raise UsageError("--timeout must be positive and --lock-timeout not negative")
    r = _common.repo()
    saved: dict[str, plan.GrovePlan] = {}
    if args.planfile:
        if args.targets or args.replace:
            raise UsageError("a saved plan is applied as it is: -target and -replace go "
                             "with engine plan")
        path = Path(args.planfile)
        try:
            text = path.read_text()
        except OSError as e:
            raise EngineError(f"{args.planfile}: cannot read plan file: {e.strerror}") from None
        saved = {p.grove: p for p in plan.load_document(text, args.planfile)}
        args.groves = sorted(saved)
    elif not args.auto_approve and not ui.is_tty():
        raise EngineError("apply needs --auto-approve or a saved plan file when not run "
                          "from a terminal")
    groves = _common.load(r, args, create_key=True, orphans_ok=True)
    opts = _common.options(r, args, create_key=True)
    rts = Runtimes(r.root)
    progress = Progress(args.json_stream, args.json)
    settings = Settings(parallelism=args.parallelism)
    results: list[converge.Result] = []
    for g in groves:
        ask = converge.Ask(
            g.name, saved=saved.get(g.name), targets=frozenset(args.targets),
            replace=frozenset(args.replace), loaded=g, hooks=progress, settings=settings,
            confirm=_notes(r.root, g, progress) if args.auto_approve or g.name in saved
            else _confirm(r.root, g))
        res = _converge.locked_pass(r.root, ask, rts, opts, "apply", progress.note,
                                    args.lock_timeout)
        if res.cancelled:
            ui.err("apply cancelled: nothing changed")
            return 1
        for rid, why in res.rejected:
            progress.note(f"grove {g.name}: request {rid} rejected: {why}")
        results.append(res)
    _orphaned_groves(r.root, [g.name for g in groves], progress)
    phases: dict[str, dict[str, str]] = {}
    timed_out = False
    if args.wait:
        ctl = controller.Controller(
            r.root, [g.name for g in groves], opts, controller.Options(
                interval=2.0, parallelism=args.parallelism, revision=None, until_done=True,
                timeout=args.timeout), progress.note, hooks=progress)
        with progress.watch(lambda: ctl.phases):  # the live view ends before any exit
            ctl.run()
        if ctl.stop.is_set():  # Ctrl-C: the pass is unwound and the lock released
            ui.err("apply interrupted: nothing new was started")
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(130)
        phases, timed_out = ctl.phases, ctl.timed_out
        results.extend(converge.Result(g, plan.GrovePlan(g, "", "", 0, ()), [o])
                       for g, o in ctl.outcomes)
        if ctl.lost:
            raise EngineError(ctl.lost)
    return _report(results, phases, timed_out, args)


def _confirm(root: Path, g: Any) -> Any:
    def ask(the_plan: plan.GrovePlan) -> bool:
        c = ui.console()
        c.print(plan.render_text([the_plan], color=ui.use_color()))
        for line in _converge.source_notes(root, the_plan, g.base_ref):
            ui.err(line)
        answer = input("\nApply these changes? Only 'yes' will be accepted: ")
        return answer.strip() == "yes"
    return ask


def _notes(root: Path, g: Any, progress: Progress) -> Any:
    """No question asked: the notes a person confirming would have read, then go."""
    def go(the_plan: plan.GrovePlan) -> bool:
        for line in _converge.source_notes(root, the_plan, g.base_ref):
            progress.note(line)
        return True
    return go


def _orphaned_groves(root: Path, names: list[str], progress: Progress) -> None:
    """Groves whose directory is gone but whose agents still run: said, never deleted
    (engine destroy -g G deletes them)."""
    state = paths.state(root) / "state"
    present = {d.name for d in manifest.grove_dirs(root)}
    if not state.is_dir():
        return
    for p in sorted(state.glob("*.json")):
        if p.stem not in present and p.stem not in names and "." not in p.stem:
            progress.note(f"grove {p.stem}: its directory groves/{p.stem}/ is gone; its "
                          f"agents are orphans (engine destroy -g {p.stem} removes them)")


def _report(results: list[converge.Result], phases: dict[str, dict[str, str]],
            timed_out: bool, args: argparse.Namespace) -> int:
    # each agent's last outcome (one pending at first and started later is created)
    last = {(res.grove, o.agent): o for res in results for o in res.outcomes}
    failed = [o for o in last.values() if not o.ok]
    bad_phase = [(g, n) for g, ps in phases.items() for n, p in ps.items()
                 if p != "Succeeded"]
    if args.json:
        merged: dict[str, list[dict[str, Any]]] = {}
        for res in results:
            merged.setdefault(res.grove, []).extend(
                {"agent": o.agent, "action": o.action.word, "status": o.status,
                 "message": o.message, "archive": o.archive, "seconds": o.seconds}
                for o in res.outcomes)
        ui.print_json({"apiVersion": "engine/v1alpha1", "kind": "ApplyResult",
                       "formatVersion": 1, "ok": not failed and not bad_phase
                       and not timed_out, "groves": [
            {"grove": g, "outcomes": outs, "phases": phases.get(g, {})}
            for g, outs in merged.items()]})
    elif not args.json_stream:
        counts: dict[str, int] = {}
        for o in last.values():
            counts[o.status] = counts.get(o.status, 0) + 1
        summary = ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) or "no changes"
        ui.out(f"Apply complete: {summary}.")
        for g, ps in sorted(phases.items()):
            ui.out(f"grove {g}: " + ", ".join(f"{n} {p}" for n, p in sorted(ps.items())))
    if timed_out:
        waiting = sorted(f"{g}/{n} ({p})" for g, ps in phases.items() for n, p in ps.items()
                         if p not in controller.DONE)
        ui.err(f"apply --wait timed out after {args.timeout:g}s; still waiting for: "
               + (", ".join(waiting[:10]) or "pending requests"))
    return 1 if failed or bad_phase or timed_out else 0
