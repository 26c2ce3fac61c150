"""`engine watch`: the controller loop (re-converge on manifest, inbox and runtime changes)."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from engine import manifest, watch
from engine.commands import _common
from engine.errors import UsageError


def register(sub: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(
        "watch", help="keep the grove converged (spawns, dependents, restarts, drift)",
        description="Run the controller: ingest agents' requests, converge on every "
        "manifest change, start dependents as dependencies succeed, restart per policy. "
        "SIGINT or SIGTERM stops it after the current pass, with exit status 0.")
    _common.add_grove_arg(p)
    _common.add_set_arg(p)
    p.add_argument("--interval", type=float, default=10.0, metavar="SECONDS",
                   help="periodic resync to catch runtime drift (default 10, jittered)")
    p.add_argument("--parallelism", type=int, default=8, metavar="N")
    p.add_argument("--once", action="store_true", help="one pass, then exit")
    return p


def _log(text: str) -> None:
    sys.stderr.write(time.strftime("%H:%M:%S ") + text + "\n")
    sys.stderr.flush()


def run(args: argparse.Namespace) -> int:
    if args.interval <= 0:
        raise UsageError("--interval must be positive")
    r = _common.repo()
    names = [d.name for d in manifest.select_groves(r.root, args.groves)]
    opts = _common.options(r, args, create_key=True)
    ctl = watch.Controller(r.root, names, opts, watch.Options(
        interval=args.interval, parallelism=args.parallelism, once=args.once), _log)
    ctl.run()
    return 0
