"""`engine apply [PLANFILE]`: converge the running agents onto the manifests."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from engine import ingest, inventory, plan, reconcile, ui
from engine.commands import _common
from engine.desired import DesiredGrove
from engine.errors import EngineError, UsageError
from engine.executor import Outcome, Settings
from engine.observe import Runtimes, observe, status_rows
from engine.plan import Change
from engine.trust.reader import for_terminal


def register(sub: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(
        "apply", help="converge agents onto the manifests",
        description="Create, replace, restart and delete agents so that what runs matches "
        "the manifests. With PLANFILE, apply exactly that saved plan.")
    p.add_argument("planfile", nargs="?", metavar="PLANFILE")
    _common.add_grove_arg(p)
    _common.add_set_arg(p)
    p.add_argument("--auto-approve", action="store_true", help="do not ask for confirmation")
    p.add_argument("--parallelism", type=int, default=8, metavar="N",
                   help="agents started at once within a generation (default 8)")
    p.add_argument("--wait", action="store_true", help="start dependents as their "
                   "dependencies succeed, and return when every agent has finished")
    p.add_argument("--timeout", type=float, default=3600, metavar="SECONDS",
                   help="with --wait: give up after this long (default 3600)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--json-stream", action="store_true",
                   help="print one JSON event per line as agents change")
    return p


class Progress:
    """Apply progress: plain lines (or JSON lines), coloured on a TTY."""

    def __init__(self, stream_json: bool, quiet: bool) -> None:
        self.stream_json = stream_json
        self.quiet = quiet
        self.console = ui.console()

    def _emit(self, event: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(event, sort_keys=True) + "\n")
        sys.stdout.flush()

    def started(self, grove: str, change: Change) -> None:
        if self.stream_json:
            self._emit({"event": "started", "grove": grove, "agent": change.agent,
                        "action": change.action.word, "time": inventory.now()})
        elif not self.quiet:
            self.console.print(f"{grove}/{change.agent}: {change.action.word}...")

    def finished(self, grove: str, o: Outcome) -> None:
        if self.stream_json:
            self._emit({"event": "finished", "grove": grove, "agent": o.agent,
                        "action": o.action.word, "status": o.status, "message": o.message,
                        "archive": o.archive, "seconds": o.seconds,
                        "time": inventory.now()})
            return
        if self.quiet:
            return
        style = "red" if not o.ok else "green"
        extra = f" - {o.message}" if o.status in ("failed", "skipped") else ""
        if o.archive:
            extra += f" (work archived at {o.archive})"
        # a message can carry an agent's text (a file name, a git error about its files)
        text = for_terminal(f"{grove}/{o.agent}: {o.status} ({o.seconds:.1f}s){extra}")
        if ui.use_color():
            self.console.print(f"[{style}]{text.replace('[', chr(92) + '[')}[/]")
        else:
            self.console.print(text)


def run(args: argparse.Namespace) -> int:
    if args.parallelism < 1:
        raise UsageError("--parallelism must be at least 1")
    r = _common.repo()
    saved: dict[str, plan.GrovePlan] = {}
    if args.planfile:
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
    groves = _common.load(r, args, create_key=True)
    rts = Runtimes(r.root)
    progress = Progress(args.json_stream, args.json)
    settings = Settings(parallelism=args.parallelism, wait=args.wait, timeout=args.timeout)
    results = []
    for g in groves:
        with inventory.locked(r.state_dir, g.name, "apply"):
            if g.name in saved:
                reconcile.check_fresh(r.root, g, saved[g.name])
                the_plan = saved[g.name]
            else:
                g = _ingest(r, g, args, rts)
                the_plan = reconcile.make_plan(r.root, g, rts)
                if not the_plan.has_changes:
                    results.append(reconcile.Result(g.name, the_plan, []))
                    continue
                if not args.auto_approve and not _confirm(the_plan):
                    ui.err("apply cancelled")
                    return 1
            results.append(reconcile.execute(r.root, g, rts, the_plan, progress, settings))
    phases: dict[str, dict[str, str]] = {}
    if args.wait:
        for g, res in zip(groves, results, strict=False):
            # an agent whose start failed in this run never appears: it is done waiting
            failed = {o.agent for o in res.outcomes if o.status in ("failed", "skipped")}
            phases[g.name] = reconcile.wait_terminal(r.root, g, rts, args.timeout, failed)
    return _report(results, phases, args)


def _ingest(r: _common.Repo, g: DesiredGrove, args: argparse.Namespace, rts: Runtimes
            ) -> DesiredGrove:
    """Answer agents' pending requests first; accepted spawns join this apply."""
    opts = _common.options(r, args, create_key=True)
    rep = ingest.process(r.root, g, opts, rts,
                         lambda gr: status_rows(gr, observe(r.root, gr.name, gr, rts)))
    for rid, why in rep.rejected:
        ui.err(f"grove {g.name}: request {rid} rejected: {why}")
    if not rep.wrote_manifests:
        return g
    return reconcile.load_desired(r.root, g.directory, opts)


def _confirm(the_plan: plan.GrovePlan) -> bool:
    c = ui.console()
    c.print(plan.render_text([the_plan], color=ui.use_color()))
    answer = input("\nApply these changes? Only 'yes' will be accepted: ")
    return answer.strip() == "yes"


def _report(results: list[reconcile.Result], phases: dict[str, dict[str, str]],
            args: argparse.Namespace) -> int:
    failed = [(res.grove, o) for res in results for o in res.failed]
    bad_phase = [(g, n) for g, ps in phases.items() for n, p in ps.items() if p != "Succeeded"]
    if args.json:
        ui.print_json({"apiVersion": "engine/v1alpha1", "kind": "ApplyResult",
                       "formatVersion": 1, "ok": not failed and not bad_phase, "groves": [
            {"grove": res.grove, "outcomes": [
                {"agent": o.agent, "action": o.action.word, "status": o.status,
                 "message": o.message, "archive": o.archive, "seconds": o.seconds}
                for o in res.outcomes],
             "phases": phases.get(res.grove, {})} for res in results]})
    elif not args.json_stream:
        counts: dict[str, int] = {}
        for res in results:
            for o in res.outcomes:
                counts[o.status] = counts.get(o.status, 0) + 1
        summary = ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) or "no changes"
        ui.out(f"Apply complete: {summary}.")
        for g, ps in sorted(phases.items()):
            ui.out(f"grove {g}: " + ", ".join(f"{n} {p}" for n, p in sorted(ps.items())))
    return 1 if failed or bad_phase else 0


