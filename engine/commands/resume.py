"""`engine resume AGENT [--task TEXT]`: continue the harness's own session: the agent is
started again with the harness's resume arguments and, with --task, TEXT as the next
message in place of its task. A harness without `resume:` cannot, and says so. An
interactive agent that is still running gets TEXT in its live conversation instead.

The pass is `_agent.restart_one`'s; the text travels to the runtime as `Launch.task`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from engine import runtimes, signals, ui
from engine.commands import _agent, _common
from engine.desired import DesiredAgent
from engine.errors import EngineError, UsageError
from engine.inventory import Record
from engine.runtimes import RUNNING


def register(sub: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(
        "resume", help="continue an agent's harness session, optionally with a new message",
        description="Start an agent again with its harness's resume arguments, so the "
        "harness continues its previous session (kept in the agent's home). With --task, "
        "TEXT is passed where the task goes: the next message of that session.")
    _agent.add_args(p)
    p.add_argument("--task", metavar="TEXT", help="the next message, in place of the "
                   "agent's task; '-' reads it from stdin")
    return p


def run(args: argparse.Namespace) -> int:
    task = args.task
    if task == "-":
        task = sys.stdin.read()
    if task is not None and not task.strip():
        raise UsageError("resume: --task is empty")

    def check(a: DesiredAgent, rec: Record) -> None:
        if not a.resume_command:
            raise EngineError(f"harness {a.harness} cannot resume a session (it has no "
                              "resume: arguments); engine restart starts it afresh")
        if task is not None and a.task_form[0] == "none":
            raise EngineError(f"harness {a.harness} takes no task on its command line "
                              "(taskArg: none): --task cannot be passed")

    if task is not None and _told_live(args, task):
        return 0
    return _agent.restart_one(args, "resume", task, check)


def _told_live(args: argparse.Namespace, task: str) -> bool:
    """An interactive agent still running takes TEXT as its next message, in its live
    conversation: nothing is restarted."""
    r = _common.repo()
    g, a, rec = _agent.target(r, args)
    if a.mode != "interactive" or rec is None or rec.pending:
        return False
    rt = runtimes.get(a.runtime, r.root, a.host)
    obs = rt.observe(g.name).get(a.name)
    if obs is None or obs.phase != RUNNING:
        return False
    rt.send(g.name, a.name, task)
    signals.answered(r.root, g.name, a.name)
    ui.out(f"{g.name}/{a.name}: running; the message was sent to its conversation")
    return True
