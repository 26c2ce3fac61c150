"""The single-agent operations' shared part (`engine restart`, `start`, `resume`, `stop`):
the AGENT argument, finding the agent and its record, and the restart pass they run.

`restart_one` is a thin caller of the converge spine: one pass over the agent's grove with
the agent as target and as restart (under the grove's lock, waiting for a controller's
pass), no spawn requests taken.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from engine import budget, converge, inventory, ui
from engine.commands import _common, _converge
from engine.commands._progress import Progress
from engine.desired import DesiredAgent, DesiredGrove
from engine.errors import EngineError, UsageError
from engine.executor import Settings
from engine.inventory import Record
from engine.observe import Runtimes


def add_args(p: argparse.ArgumentParser) -> None:
    _common.add_agent_arg(p)
    p.add_argument("--lock-timeout", type=float, default=_converge.LOCK_WAIT,
                   metavar="SECONDS", help="wait this long for another operation's pass "
                   f"(a controller's) to end (default {_converge.LOCK_WAIT:g})")


def target(r: _common.Repo, args: argparse.Namespace
           ) -> tuple[DesiredGrove, DesiredAgent, Record | None]:
    """The agent AGENT names in the manifests (GROVE/NAME, -g, or the only grove that has
    it) and its inventory record (None: never started)."""
    if args.lock_timeout < 0:
        raise UsageError("--lock-timeout must not be negative")
    gname, _, _ = str(args.agent).rpartition("/")
    if gname and not args.groves:
        args.groves = [gname]  # the other groves' manifests need not load
    g, a = _common.find_agent(_common.load(r, args, create_key=True), args.agent)
    return g, a, inventory.load(r.state_dir, g.name).agents.get(a.name)


def restart_one(args: argparse.Namespace, operation: str, task: str | None = None,
                check: Callable[[DesiredAgent, Record], None] | None = None) -> int:
    """Restart AGENT through one converge pass; `task` is the next message in place of
    its task (`engine resume --task`), `check(agent, record)` may refuse first."""
    r = _common.repo()
    g, a, rec = target(r, args)
    if rec is None or rec.pending:
        raise EngineError(f"agent {g.name}/{a.name}: not started yet (engine apply starts "
                          "it)")
    budget.check_start(g, a.name, inventory.load(r.state_dir, g.name))  # a crossed
    # budget would stop it again on the next pass
    if check is not None:
        check(a, rec)
    progress = Progress()
    ask = converge.Ask(g.name, targets=frozenset({a.name}), restart=frozenset({a.name}),
                       loaded=g, hooks=progress, take_requests=False,
                       settings=Settings(tasks={} if task is None else {a.name: task}))
    res = _converge.locked_pass(r.root, ask, Runtimes(r.root),
                                _common.options(r, args, create_key=True), operation,
                                progress.note, args.lock_timeout)
    if not any(o.agent == a.name for o in res.outcomes):
        ui.err(f"agent {g.name}/{a.name}: not restarted")
        return 1
    return 1 if res.failed else 0
