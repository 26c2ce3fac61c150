"""The command line: parse arguments, run one command module, map errors to exit codes.

Exit codes: 0 success; 1 a user-fixable error (one line, then detail); 2 usage errors
(and "changes present" for `plan --detailed-exitcode`); 3 a bug (a log file has the
traceback); 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile
import traceback
from collections.abc import Sequence

from engine import __version__
from engine.errors import EngineError, InvalidManifests, UsageError

# One module per subcommand under engine.commands; each has `register(sub)` and `run(args)`.
COMMANDS = [
    "init", "validate", "plan", "apply", "status", "graph", "destroy", "watch", "spawn",
    "logs", "look", "attach", "message", "diff", "merge", "restore", "archive", "prune",
    "explain", "restart", "stop", "start", "resume", "cost",
    "force_unlock", "image", "history", "harness", "egress", "events", "approve", "ui",
]
# commands registered by another command's module: `engine deny` by approve's
MODULE_OF = {"deny": "approve"}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}")


def _command_in(argv: Sequence[str]) -> str | None:
    """The command module `argv` names, if it names one plainly (`engine -C d validate`)."""
    args = list(argv)
    while args and args[0] == "-C":
        args = args[2:]
    if args and not args[0].startswith("-"):
        name = args[0].replace("-", "_")
        name = MODULE_OF.get(name, name)
        return name if name in COMMANDS else None
    return None


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command, or of command `only` (importing one command module
    keeps `engine validate` from paying for the runtimes' imports)."""
    parser = _Parser(prog="engine", description="Run teams of isolated AI coding agents "
                     "from grove manifests, GitOps style.")
    parser.add_argument("--version", action="version", version=f"grove-engine {__version__}")
    parser.add_argument("-C", dest="chdir", metavar="DIR", help="run as if started in DIR")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in [only] if only else COMMANDS:
        try:
            mod = importlib.import_module(f"engine.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"engine.commands.{name}":
                continue  # not built yet in this version
            raise
        p = mod.register(sub)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        argv = list(sys.argv[1:] if argv is None else argv)
        if argv == ["--version"]:  # without importing every command module
            print(f"grove-engine {__version__}")
            return 0
        only = _command_in(argv)
        try:
            args = build_parser(only).parse_args(argv)
        except UsageError:
            if only is None:
                raise
            args = build_parser().parse_args(argv)  # let the full parser word the error
        if args.chdir:
            try:
                os.chdir(args.chdir)
            except OSError as e:
                raise EngineError(f"-C {args.chdir}: {e.strerror}") from None
        if not getattr(args, "_run", None):
            build_parser().print_help()
            return 2
        code: int = args._run(args)
        return code
    except InvalidManifests as e:
        for d in e.diagnostics:
            print(f"error: {d}", file=sys.stderr)
        n = len(e.diagnostics)
        print(f"{n} problem{'s' if n != 1 else ''} found", file=sys.stderr)
        return 1
    except EngineError as e:
        # an error can quote what an agent wrote: never an escape sequence to the terminal
        from engine.trust.reader import for_terminal

        print(f"error: {for_terminal(e.summary)}", file=sys.stderr)
        if e.detail:
            print(for_terminal(e.detail), file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception:
        fd, path = tempfile.mkstemp(prefix="engine-crash-", suffix=".log")
        with os.fdopen(fd, "w") as f:
            f.write(f"grove-engine {__version__}\nargv: {sys.argv}\n\n")
            traceback.print_exc(file=f)
        print(f"error: internal error (a bug in grove-engine); details in {path}",
              file=sys.stderr)
        return 3
