"""`engine stop AGENT`: end an agent's process or container and keep it stopped.

Under the grove's lock (waiting for a controller's pass), `agentops.stop` marks the
agent's record stopped, then its runtime's `stop` ends it (the engine stops an agent over
its budget the same way). Its workspace, branch, home and record stay; `engine status`
shows it Stopped, and neither `engine apply` nor the controller starts it again until
`engine start AGENT`.
"""

from __future__ import annotations

import argparse
from typing import Any

from engine import agentops, events, inventory, runtimes, ui
from engine.commands import _agent, _common
from engine.errors import EngineError, UsageError


def register(sub: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(
        "stop", help="stop an agent and keep it stopped (engine start runs it again)",
        description="End an agent's process or container, keeping its workspace, branch, "
        "home and record. It stays stopped across engine apply and the controller until "
        "engine start AGENT.")
    _agent.add_args(p)
    return p


def run(args: argparse.Namespace) -> int:
    r = _common.repo()
    if args.lock_timeout < 0:
        raise UsageError("--lock-timeout must not be negative")
    loc = _common.locate(r, args)  # its record, else the manifests (to say it never ran)
    who = f"agent {loc.grove}/{loc.agent}"
    held = inventory.read_lock(r.state_dir, loc.grove)
    if held is not None and args.lock_timeout > 0:
        ui.err(f"grove {loc.grove}: waiting up to {args.lock_timeout:g}s for "
               f"{held.operation} (pid {held.pid}) to finish its pass")
    with inventory.locked(r.state_dir, loc.grove, "stop", wait=args.lock_timeout):
        inv = inventory.load(r.state_dir, loc.grove)
        rec = inv.agents.get(loc.agent)
        if rec is None or rec.pending:
            raise EngineError(f"{who}: not started yet, nothing to stop")
        agentops.stop(r.root, inv, loc.agent, runtimes.get(rec.runtime, r.root,
                                                          rec.host or None))
    events.record(r.root, {"grove": loc.grove, "agent": loc.agent, "event": "AgentStopped",
                           "reason": "engine stop"})
    ui.out(f"{loc.grove}/{loc.agent}: stopped (engine start {loc.agent} runs it again)")
    return 0
