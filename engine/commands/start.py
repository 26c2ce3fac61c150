"""`engine start AGENT`: run a stopped agent again, resuming its harness's session.

The agent is no longer stopped: `engine apply` and the controller look after it again. An
agent that ended without being stopped is started again as well (as `engine restart`
would); one that is running is left alone. The pass is `_agent.restart_one`'s. An agent
whose budget (or that of an agent above it) is crossed is refused until the limit is
raised in the manifests (`budget.check_start`).
"""

from __future__ import annotations

import argparse
from typing import Any

from engine import budget, inventory, runtimes, ui
from engine.commands import _agent, _common
from engine.errors import EngineError


def register(sub: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(
        "start", help="run a stopped agent again (resuming its session)",
        description="Run an agent stopped by `engine stop` again in its workspace, "
        "resuming its harness's session when the harness has a resume flag; from then on "
        "engine apply and the controller look after it again. An agent that is running "
        "is left alone.")
    _agent.add_args(p)
    return p


def run(args: argparse.Namespace) -> int:
    r = _common.repo()
    g, a, rec = _agent.target(r, args)
    if rec is not None:  # stopped over its budget: the next pass would stop it again
        budget.check_start(g, a.name, inventory.load(r.state_dir, g.name))
    if rec is not None and not rec.stopped:
        try:
            obs = runtimes.get(rec.runtime, r.root, rec.host or None).observe(g.name)
        except EngineError:
            obs = {}
        o = obs.get(a.name)
        if o is not None and o.phase in (runtimes.RUNNING, runtimes.PENDING):
            ui.out(f"{g.name}/{a.name}: already running (engine restart {a.name} starts it "
                   "again)")
            return 0
    return _agent.restart_one(args, "start")
