"""`engine watch`: the controller (engine.controller) until stopped: converge a revision
on every new commit, inbox request and agent ending.

Log lines can carry agent-provided text (reasons): they go through `reader.for_terminal`.
SIGINT/SIGTERM end it within a second (see engine.controller), with exit status 0."""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

from engine import controller, converge, manifest
from engine.commands import _common
from engine.errors import UsageError
from engine.trust import reader


def register(sub: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(
        "watch", help="keep the grove converged (spawns, dependents, restarts, drift)",
        description="Run the controller: converge the grove from a git revision (the "
        "branch checked out, by default) on every new commit, answer agents' requests "
        "(spawns are written back and committed), start dependents as dependencies "
        "succeed, restart per policy, repair drift (spec.sync.selfHeal) and delete agents "
        "that left the manifests only with spec.sync.prune. Uncommitted edits never act. "
        "The grove's lock is held for one pass at a time, so apply and destroy run "
        "between passes. SIGINT or SIGTERM stops it within a second, cutting a running "
        "pass short (the next one resumes it), with exit status 0.")
    _common.add_grove_arg(p)
    _common.add_set_arg(p)
    p.add_argument("--interval", type=float, default=10.0, metavar="SECONDS",
                   help="periodic resync to catch runtime drift (default 10, jittered)")
    p.add_argument("--parallelism", type=int, default=8, metavar="N",
                   help="agents started at once (default 8)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--revision", metavar="REF", default="",
                     help="converge this branch, tag or commit (default: the branch "
                     "checked out, resolved again on every pass)")
    src.add_argument("--working-tree", action="store_true",
                     help="development mode: converge the manifests as they are on disk, "
                     "uncommitted edits included")
    p.add_argument("--once", action="store_true",
                   help="one pass, then exit (status 1 when the pass failed)")
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
    if args.parallelism < 1:
        raise UsageError("--parallelism must be at least 1")
    revision: str | None = None if args.working_tree else args.revision
    if revision is not None:  # a bad ref, or a grove not committed: one error, up front
        ref = revision or converge.current_branch(r.root)
        commit = converge.resolve_revision(r.root, ref)
        for name in names:
            converge.load_source(r.root, name, commit)
    ctl = controller.Controller(r.root, names, opts, controller.Options(
        interval=args.interval, parallelism=args.parallelism, once=args.once,
        revision=revision), _log)
    ctl.run()
    if ctl.lost or (args.once and ctl.had_errors):
        return 1  # (a long-running controller logs failed passes and goes on)
    if ctl.stop.is_set():
        # stopped by a signal, locks released: worker threads of a pass cut short must not
        # keep the process (interpreter exit would join them)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0
