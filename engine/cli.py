# PYTHON_ARGCOMPLETE_OK  (argcomplete's global completion looks for this mark)
"""The command line: parse arguments, run one command module, map errors to exit codes.

Exit codes: 0 success; 1 a user-fixable error (one line, then detail), also when the output
cannot be written (a full disk); 2 usage errors (and "changes present" for
`plan --detailed-exitcode`); 3 a bug (a log file has the traceback); 130 interrupted.
A reader that stops early (`engine status | head -1`) ends the command quietly.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import os
import sys
import tempfile
import traceback
from collections.abc import Sequence
from typing import Any

from engine import __version__
from engine.errors import EngineError, InvalidManifests, UsageError

# One module per subcommand under engine.commands; each has `register(sub)` and `run(args)`.
COMMANDS = [
    "init", "validate", "plan", "apply", "status", "graph", "destroy", "watch", "spawn",
    "logs", "look", "attach", "message", "diff", "merge", "restore", "archive", "prune",
    "explain", "restart", "stop", "start", "resume", "cost",
    "force_unlock", "image", "history", "harness", "egress", "events", "approve", "ui",
    "render",
    "completion",
]
# commands registered by another command's module: `engine deny` by approve's
MODULE_OF = {"deny": "approve"}


def _did_you_mean(word: str, known: Sequence[str]) -> str:
    import difflib

    close = difflib.get_close_matches(word, known, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}")

    def _check_value(self, action: argparse.Action, value: Any) -> None:
        if isinstance(action, argparse._SubParsersAction) and value not in action.choices:
            raise UsageError(f"{self.prog}: unknown command {value!r}"
                             + _did_you_mean(str(value), list(action.choices)))
        super()._check_value(action, value)


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """`parser.parse_args(argv)`, with a closest option suggested for an unknown one."""
    args, extras = parser.parse_known_args(argv)
    if not extras:
        return args
    p = parser  # the (sub)command the extras were given to
    while subs := [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]:
        chosen = getattr(args, subs[0].dest, None)
        if chosen not in subs[0].choices:
            break
        p = subs[0].choices[chosen]
    options = [o for a in p._actions for o in a.option_strings]
    hint = next((h for x in extras if x.startswith("-")
                 if (h := _did_you_mean(x.split("=", 1)[0], options))), "")
    raise UsageError(f"{p.prog}: unrecognized arguments: {' '.join(extras)}{hint}")


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


def _complete() -> None:
    """Answer the shell's completion request (argcomplete's protocol: `_ARGCOMPLETE` and
    `COMP_LINE` in the environment) and exit. A line that already names its command needs
    only that command's parser; a command name being typed needs them all."""
    from engine.commands import completion

    line = os.environ.get("COMP_LINE", "")
    with contextlib.suppress(ValueError):
        line = line[:int(os.environ.get("COMP_POINT", len(line)))]
    words = line.split()
    if words and not line[-1:].isspace():
        words.pop()  # the word being completed
    completion.complete(build_parser(_command_in(words[1:])))


class _Stdout(io.TextIOWrapper):
    """Standard output that never cuts a command short: a write error (a reader gone, a
    full disk) points file descriptor 1 at /dev/null, is remembered, and the command goes
    on, so an `apply | head -1` still converges every agent. `main` reports it at the end:
    a reader gone is quiet, any other error is `cannot write output` with exit 1."""

    failed: OSError | None = None

    def _lost(self, e: OSError) -> None:
        if self.failed is None:
            self.failed = e
        _drop_stdout()

    def write(self, s: str) -> int:
        try:
            return super().write(s)
        except OSError as e:
            self._lost(e)
        with contextlib.suppress(OSError):
            super().flush()  # what was buffered goes to /dev/null now
        return len(s)

    def flush(self) -> None:
        try:
            super().flush()
        except OSError as e:
            self._lost(e)
            with contextlib.suppress(OSError):
                super().flush()


def _own_stdout() -> _Stdout | None:
    """A `_Stdout` over file descriptor 1 like `sys.stdout`, or None when `sys.stdout` is
    not the process's own (a test's capture)."""
    real = sys.stdout
    if type(real) is not io.TextIOWrapper:
        return None
    try:
        raw = open(real.fileno(), "wb", closefd=False)  # noqa: SIM115 (closed by main)
    except (OSError, ValueError):
        return None
    return _Stdout(raw, encoding=real.encoding, errors=real.errors,
                   line_buffering=real.line_buffering, write_through=real.write_through)


def _drop_stdout() -> None:
    """Point file descriptor 1 at /dev/null, so that what is still buffered for a reader
    that has gone (or a full disk) is discarded without another error at exit (the Python
    documentation's advice for EPIPE)."""
    try:
        fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, sys.__stdout__.fileno() if sys.__stdout__ else 1)
        os.close(fd)
    except (OSError, ValueError):
        pass


def main(argv: Sequence[str] | None = None) -> int:
    if "_ARGCOMPLETE" in os.environ:
        _complete()
    real, out = sys.stdout, _own_stdout()
    if out is not None:
        sys.stdout = out
    try:
        code = _main(argv)
        if out is not None:
            out.flush()
            failed = out.failed
            if failed is not None and not isinstance(failed, BrokenPipeError):
                print(f"error: cannot write output: {failed.strerror or failed}",
                      file=sys.stderr)
                return 1 if code in (0, 2) else code  # 2: plan's "changes", never seen
        return code
    finally:
        if out is not None:
            sys.stdout = real
            try:
                out.close()  # flushed by _main, unless a command failed after printing
            except (OSError, EngineError):
                _drop_stdout()
                with contextlib.suppress(OSError, EngineError):
                    out.close()


def _main(argv: Sequence[str] | None) -> int:
    try:
        argv = list(sys.argv[1:] if argv is None else argv)
        if argv == ["--version"]:  # without importing every command module
            print(f"grove-engine {__version__}")
            sys.stdout.flush()
            return 0
        only = _command_in(argv)
        try:
            args = _parse(build_parser(only), argv)
        except UsageError:
            if only is None:
                raise
            args = _parse(build_parser(), argv)  # let the full parser word the error
        if args.chdir:
            try:
                os.chdir(args.chdir)
            except OSError as e:
                raise EngineError(f"-C {args.chdir}: {e.strerror}") from None
        if not getattr(args, "_run", None):
            build_parser().print_help()
            sys.stdout.flush()
            return 2
        code: int = args._run(args)
        sys.stdout.flush()  # a write error shows here, not in the interpreter's exit
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
    except BrokenPipeError:  # output not through _Stdout: the command was cut short
        _drop_stdout()
        return 141
    except Exception:
        fd, path = tempfile.mkstemp(prefix="engine-crash-", suffix=".log")
        with os.fdopen(fd, "w") as f:
            f.write(f"grove-engine {__version__}\nargv: {sys.argv}\n\n")
            traceback.print_exc(file=f)
        print(f"error: internal error (a bug in grove-engine); details in {path}",
              file=sys.stderr)
        return 3
