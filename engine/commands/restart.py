"""`engine restart AGENT`: start one agent again in its workspace, whatever it is doing
(running, failed, succeeded or stopped), resuming its harness's session when the harness
knows how (`resume:`). Retrying a failed agent is a restart. The pass is
`_agent.restart_one`'s, which `engine start` and `engine resume` run too.
"""

from __future__ import annotations

import argparse
from typing import Any

from engine.commands import _agent


def register(sub: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(
        "restart", help="start an agent again in its workspace (resuming its session)",
        description="Start one agent again in its workspace and on its branch, whether it "
        "runs, failed, succeeded or was stopped; the harness resumes its previous session "
        "when it has a resume flag (its home is kept). A stopped agent is no longer "
        "stopped afterwards.")
    _agent.add_args(p)
    return p


def run(args: argparse.Namespace) -> int:
    return _agent.restart_one(args, "restart")
