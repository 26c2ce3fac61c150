"""Generate docs/commands.md, the command reference, from the CLI's argparse parsers.

    python docs/gen_commands.py          # rewrite docs/commands.md
    python docs/gen_commands.py --check  # exit 1 if docs/commands.md is stale

One section per command, in the order `engine --help` lists them: what it does, its usage
line, and a table of its arguments (flag, value, default, help).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "commands.md"
sys.path.insert(0, str(ROOT))

INTRO = """\
Every command works on the repository that holds the current directory (`-C DIR` to run
elsewhere) and on every grove in it unless `-g GROVE` names some. Commands that report
have `--json` with a stable shape. Nothing prompts when standard input is not a terminal.

**Colour** is used only when the output is a terminal, and never when `NO_COLOR` is set to
a non-empty value ([no-color.org](https://no-color.org): `NO_COLOR=` with an empty value
is as if unset). `FORCE_COLOR` and `TERM` do not change it.

**Mistakes** on the command line name the closest command or option:
`error: engine: unknown command 'statsu' (did you mean 'status'?)`.

**Shell completion** for bash, zsh and fish (commands, options, grove names after `-g`,
agent names) comes from `engine completion SHELL`: add `eval "$(engine completion bash)"`
to `~/.bashrc` (or `zsh` in `~/.zshrc`, after `compinit`), or run
`engine completion fish > ~/.config/fish/completions/engine.fish`.

**Output errors**: when standard output cannot be written (a full disk) the command says
`error: cannot write output: No space left on device` and exits 1; when its reader stops
early (`engine status --json | head -1`) it ends quietly with 0.

**Exit codes**, for every command:

| code | meaning |
|---|---|
| 0 | success (for `plan --detailed-exitcode`: no changes) |
| 1 | an error you can fix: one line saying what and where, then detail; also output that cannot be written |
| 2 | a usage error on the command line; or, with `plan --detailed-exitcode`, changes are present |
| 3 | a bug in grove-engine: the message names a log file with the traceback |
| 130 | interrupted (Ctrl-C) |
"""


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _helps(parser: argparse.ArgumentParser) -> dict[str, str]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return {a.dest: a.help or "" for a in action._choices_actions}
    return {}


def _cell(text: object) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _row(a: argparse.Action) -> str:
    name = ", ".join(f"`{o}`" for o in a.option_strings) or f"`{a.metavar or a.dest}`"
    if a.choices and not isinstance(a, argparse._SubParsersAction):
        value = " \\| ".join(f"`{c}`" for c in a.choices)
    elif a.nargs == 0:
        value = ""
    else:
        value = f"`{a.metavar or a.dest.upper()}`"
        value += " ..." if a.nargs in ("*", "+") or isinstance(a, argparse._AppendAction) \
            else ""
    default = "" if a.default in (None, False, [], argparse.SUPPRESS) or a.nargs == 0 \
        else f"`{a.default}`"
    return f"| {name} | {value} | {default} | {_cell(a.help or '')} |"


def _usage(p: argparse.ArgumentParser) -> str:
    first, *rest = p.format_usage().strip().splitlines()
    pad = len("usage: ")
    return "\n".join([first[pad:], *(line[pad:] for line in rest)])


def render() -> str:
    os.environ["COLUMNS"] = "100"  # argparse wraps usage lines to the terminal's width
    from engine.cli import build_parser

    parser = build_parser()
    helps = _helps(parser)
    out = ["# Commands", "",
           "<!-- Generated from the argparse parsers by docs/gen_commands.py: do not edit by "
           "hand; run `python docs/gen_commands.py`. -->", "", INTRO,
           "| command | what it does |", "|---|---|"]
    subs = _subparsers(parser)
    out += [f"| [`engine {n}`](#engine-{n}) | {_cell(helps.get(n, ''))} |" for n in subs]
    out.append("")
    for name, p in subs.items():
        out += [f"## engine {name}", "", _cell(p.description or helps.get(name, "")), "",
                "```text", _usage(p), "```", ""]
        actions = [a for a in p._actions if not isinstance(a, argparse._HelpAction)]
        if actions:
            out += ["| argument | value | default | what it does |", "|---|---|---|---|"]
            out += [_row(a) for a in actions]
            out.append("")
    return "\n".join(out)


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT.relative_to(ROOT)} is stale: run python docs/gen_commands.py",
                  file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
