"""`engine watch`: the controller loop (re-converge on manifest, inbox and runtime changes).

Log lines can carry agent-provided text (reasons): they go through `reader.for_terminal`.
SIGINT/SIGTERM end it within a second (see engine.watch), with exit status 0."""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

from engine import manifest, watch
from engine.commands import _common
from engine.errors import UsageError
from engine.trust import reader


def register(sub: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(
        "watch", help="keep the grove converged (spawns, dependents, restarts, drift)",
        description="Run the controller: ingest agents' requests, converge on every "
        "manifest change, start dependents as dependencies succeed, restart per policy. "
        "SIGINT or SIGTERM stops it within a second, cutting a running pass short (the "
        "next one resumes it), with exit status 0.")
    _common.add_grove_arg(p)
    _common.add_set_arg(p)
    p.add_argument("--interval", type=float, default=10.0, metavar="SECONDS",
                   help="periodic resync to catch runtime drift (default 10, jittered)")
    p.add_argument("--parallelism", type=int, default=8, metavar="N")
    p.add_argument("--once", action="store_true", help="one pass, then exit")
    return p


def _log(text: str) -> None:
    line = " ".join(reader.for_terminal(text).splitlines())  # one log line per entry
    sys.stderr.write(time.strftime("%H:%M:%S ") + line + "\n")
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
    if ctl.stop.is_set():
        # stopped by a signal, locks released: worker threads of a pass cut short must not
        # keep the process (interpreter exit would join them)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0
