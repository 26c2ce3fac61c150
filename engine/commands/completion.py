"""`engine completion {bash,zsh,fish}`: print the shell's completion script, and answer the
shell's completion requests.

The scripts come from argcomplete, generated from the same argparse parsers the commands
run on, so completion never drifts from the command line. The shell asks by running
`engine` with `_ARGCOMPLETE` set (engine.cli hands such a run to `complete`); grove and
agent names are read from the repository's grove directories, their manifests and the
engine's state files, never by running anything.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
from pathlib import Path
from typing import Any

from engine.commands._common import _GROVE_NAME as _NAME  # grove and agent names

SHELLS = ("bash", "zsh", "fish")

INSTALL = {
    "bash": 'add `eval "$(engine completion bash)"` to ~/.bashrc',
    "zsh": 'add `eval "$(engine completion zsh)"` to ~/.zshrc, after compinit',
    "fish": "run `engine completion fish > ~/.config/fish/completions/engine.fish`",
}


def register(sub: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(
        "completion", help="print the shell completion script for bash, zsh or fish",
        description="Print the script that makes SHELL complete engine's commands, options, "
        "grove names (-g) and agent names. To install it, for "
        + "; for ".join(f"{s}: {INSTALL[s]}" for s in SHELLS)
        + ". A new shell then completes `engine <TAB>`.")
    p.add_argument("shell", choices=SHELLS, metavar="SHELL",
                   help="the shell to print the script for: bash, zsh or fish")
    return p


def run(args: argparse.Namespace) -> int:
    from argcomplete.shell_integration import shellcode

    text = shellcode(["engine"], shell=args.shell)
    print(text if text.endswith("\n") else text + "\n", end="")
    return 0


def complete(parser: argparse.ArgumentParser) -> None:
    """Answer a completion request for `parser` (argcomplete exits when done)."""
    import argcomplete

    _attach(parser)
    signal.signal(signal.SIGALRM, _give_up)
    signal.setitimer(signal.ITIMER_REAL, BUDGET)
    argcomplete.autocomplete(parser)


BUDGET = 2.0  # seconds a TAB may take; then nothing is offered rather than a stuck shell


def _give_up(signum: int, frame: Any) -> None:
    os._exit(1)  # argcomplete's own way out: no completions, the shell carries on


def _attach(parser: argparse.ArgumentParser) -> None:
    """Grove and agent completers on every argument that takes one, by name."""
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for p in a.choices.values():
                _attach(p)
        elif a.dest == "groves" or a.metavar == "GROVE":
            a.completer = groves  # type: ignore[attr-defined]
        elif a.metavar == "AGENT" or a.dest in ("agent", "parent", "depends_on"):
            a.completer = agents  # type: ignore[attr-defined]


class _NoNames(Exception):
    """No names to offer here (inside an agent's workspace, where every file is the
    agent's to write)."""


def _root(parsed_args: argparse.Namespace | None) -> Path:
    from engine import manifest
    from engine.commands._common import inside_agent

    where = Path(getattr(parsed_args, "chdir", None) or ".")
    if inside_agent(where.resolve()):
        raise _NoNames
    return manifest.find_repo_root(where)


def _grove_names(root: Path) -> list[str]:
    """Grove directories, and groves the state still records (a removed directory's agents
    run on until `engine destroy -g NAME`)."""
    from engine import inventory, manifest, paths

    names = {d.name for d in manifest.grove_dirs(root)}
    state = inventory.path_for(paths.state(root), "x").parent
    if state.is_dir():
        names |= {p.stem for p in state.glob("*.json")}
    return sorted(n for n in names if _NAME.fullmatch(n))


def _agent_names(root: Path, grove: str) -> set[str]:
    """The agents grove `grove` declares (its manifests, read as data: regular files only,
    size-capped) and those its state records."""
    from engine import inventory, manifest, paths
    from engine.errors import EngineError
    from engine.yamlio import YamlError, load_file

    names: set[str] = set()
    directory = root / manifest.GROVES_DIR / grove
    for f in sorted(directory.glob("*.yaml")) if directory.is_dir() else []:
        try:
            docs = load_file(f, follow_symlinks=False)
        except YamlError:
            continue
        for doc in docs:
            names |= _declared(doc.data)
    with contextlib.suppress(EngineError):  # a damaged state file: the manifests' names
        names |= set(inventory.load(paths.state(root), grove).agents)
    return {n for n in names if _NAME.fullmatch(n)}


def _declared(data: Any) -> set[str]:
    if not isinstance(data, dict):
        return set()
    if data.get("kind") == "Agent":
        meta = data.get("metadata")
        return {meta["name"]} if isinstance(meta, dict) and \
            isinstance(meta.get("name"), str) else set()
    if data.get("kind") == "Grove":
        spec = data.get("spec")
        agents = spec.get("agents") if isinstance(spec, dict) else None
        return {a["name"] for a in agents or [] if isinstance(a, dict)
                and isinstance(a.get("name"), str)} if isinstance(agents, list) else set()
    return set()


def groves(prefix: str, parsed_args: argparse.Namespace | None = None,
           **_: Any) -> list[str]:
    """Completer: the repository's grove names."""
    try:
        return [n for n in _grove_names(_root(parsed_args)) if n.startswith(prefix)]
    except _NoNames:
        return []


def agents(prefix: str, parsed_args: argparse.Namespace | None = None,
           **_: Any) -> list[str]:
    """Completer: agent names of the selected groves (-g), as NAME, or GROVE/NAME when
    the prefix has a slash or the name is in several groves."""
    try:
        root = _root(parsed_args)
    except _NoNames:
        return []
    chosen = getattr(parsed_args, "groves", None) or _grove_names(root)
    by_grove = {g: _agent_names(root, g) for g in chosen if _NAME.fullmatch(g)}
    if "/" in prefix:
        out = {f"{g}/{n}" for g, names in by_grove.items() for n in names}
    else:
        seen: dict[str, list[str]] = {}
        for g, names in by_grove.items():
            for n in names:
                seen.setdefault(n, []).append(g)
        out = {n for n in seen} | {f"{g}/{n}" for n, gs in seen.items() if len(gs) > 1
                                   for g in gs}
    return sorted(n for n in out if n.startswith(prefix))
