"""`engine logs AGENT [-f] [--tail N] [--previous]`: the agent's output, with escape
sequences and control characters removed (`reader.for_terminal`): an agent's output never
drives the terminal.

`--tail N`: its last N lines, found from the end of the log (a long log is never read
whole), then with -f what comes. `--previous`: the output of its run before this one
(the runtimes keep one generation: `runtimes.logfile`; Kubernetes: the API's previous
container). An agent that has printed nothing gets a note on stderr, so that stdout stays
what the agent printed.
"""

from __future__ import annotations

import argparse
import os
import stat
import sys
import time
from typing import Any

from engine import paths, runtimes, ui
from engine.commands import _common
from engine.errors import EngineError, UsageError
from engine.trust import reader

TAIL_MAX = 10_000_000  # lines; more is the whole log (and no deque that large)


def register(sub: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser("logs", help="print an agent's output")
    _common.add_agent_arg(p)
    p.add_argument("-f", "--follow", action="store_true", help="keep printing until it ends")
    p.add_argument("--tail", type=int, metavar="N",
                   help="only the last N lines (with -f: then what comes)")
    p.add_argument("-p", "--previous", action="store_true",
                   help="the output of the agent's run before this one (before its last "
                   "restart)")
    return p


def run(args: argparse.Namespace) -> int:
    if args.tail is not None and not 0 <= args.tail <= TAIL_MAX:
        raise UsageError(f"--tail: give a number of lines, 0 to {TAIL_MAX}")
    r = _common.repo()
    loc = _common.locate(r, args)
    rt = runtimes.get(loc.runtime, r.root, loc.host or None)
    follow = args.follow and not args.previous
    noted = args.tail == 0  # nothing asked for: no note
    if follow and not noted and not any(True for _ in rt.logs(loc.grove, loc.agent, tail=1)):
        ui.err(_silent(r, loc, rt, False))  # said before following: it may print later
        noted = True
    printed = 0
    for line in rt.logs(loc.grove, loc.agent, follow=follow, tail=args.tail,
                        previous=args.previous):
        sys.stdout.write(reader.for_terminal(line) + "\n")
        printed += 1
        if follow:
            sys.stdout.flush()
            if ui.reader_gone():  # `logs -f | head -1`: nobody reads what comes
                break
    if not printed and not noted:
        ui.err(_silent(r, loc, rt, args.previous))
    return 0


def _silent(r: _common.Repo, loc: _common.Located, rt: runtimes.Runtime,
            previous: bool) -> str:
    """The note for an agent whose log (of this run, or of the one before) is empty."""
    who = f"{loc.grove}/{loc.agent}"
    if previous:
        return f"engine: {who} printed nothing in its previous run"
    if loc.record is None or loc.record.pending:
        return f"engine: {who} has printed nothing (not started yet)"
    try:
        obs = rt.observe(loc.grove).get(loc.agent)
    except EngineError:
        obs = None
    phase = obs.phase if obs is not None else "unknown"
    since = ""
    try:  # an empty log was last written when it was made, as its run started
        st = os.stat(paths.log_file(r.root, loc.grove, loc.agent), follow_symlinks=False)
        if stat.S_ISREG(st.st_mode) and st.st_size == 0:
            since = f", started {_ago(time.time() - st.st_mtime)} ago"
    except OSError:
        pass
    yet = " yet" if phase in (runtimes.RUNNING, runtimes.PENDING) else ""
    return f"engine: {who} has printed nothing{yet} (phase {phase}{since})"


def _ago(seconds: float) -> str:
    s = max(int(seconds), 0)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= 2 * size:
            return f"{s // size}{unit}"
    return f"{s}s"
