"""`engine graph [-g G] [--format F] [--base REF] [--head REF]`: the spawn graph, or how
it changed between two revisions (no live state: it runs in any CI job)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from engine import desired, graph, topology, topology_render, ui
from engine.commands import _common
from engine.errors import EngineError, UsageError

if TYPE_CHECKING:
    import networkx as nx

FORMATS = ("mermaid", "dot", "json", "markdown", "text")
SINGLE = ("mermaid", "dot")  # one chart per output: these need a single grove


def register(sub: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(
        "graph", help="show the spawn graph, or what changed since a revision",
        description="Show the spawn graph of the manifests (parent -> child and dependency "
        "-> dependent). With --base REF, show what changed since REF instead: agents added, "
        "removed and changed, and the edges between them; --head REF compares two "
        "revisions instead of REF and the working tree. Reads manifests only.")
    _common.add_grove_arg(p)
    p.add_argument("--format", choices=FORMATS, default="mermaid",
                   help="output format (default: mermaid); markdown is ready for a "
                   "pull-request comment")
    p.add_argument("--base", metavar="REF", help="git revision to compare against")
    p.add_argument("--head", metavar="REF",
                   help="git revision to compare (default: the working tree; needs --base)")
    return p


def run(args: argparse.Namespace) -> int:
    r = _common.repo()
    if args.head and not args.base:
        raise UsageError("engine graph: --head needs --base")
    if args.base:
        opts = _common.options(r, args, resolve_secrets=False)
        report = topology.diff_revisions(r.root, args.groves, args.base, args.head, opts)
        _print(_diff(report, args.format))
        return 0
    groves = _common.load(r, args, resolve_secrets=False)
    _print(_current(groves, args.format))
    return 0


def _print(text: str) -> None:
    ui.out(text.rstrip("\n"))


def _one(names: list[str], fmt: str) -> None:
    if len(names) > 1:
        others = "markdown or text" if fmt == "json" else "markdown, text or json"
        raise EngineError(f"several groves here ({', '.join(names)}): name one with -g GROVE "
                          f"for --format {fmt}, or use --format {others}")


def _diff(report: topology.Report, fmt: str) -> str:
    if fmt in SINGLE:
        _one([d.grove for d in report.groves], fmt)
        d = report.groves[0]
        if fmt == "dot":
            return topology_render.to_dot(d)
        return _noted(*topology_render.mermaid(d))
    return topology.render(report, fmt)


def _noted(text: str, note: str | None) -> str:
    """A flowchart with its note (if it was summarised) as a comment, and on stderr."""
    if note:
        ui.err(f"note: {note}")
    return graph.mermaid_document(text, note)


def _mermaid(g: desired.DesiredGrove) -> tuple[str, str | None]:
    return graph.mermaid(graph.chart_of(spawn_graph(g)),
                         whole=f"engine graph -g {g.name} --format dot")


def spawn_graph(g: desired.DesiredGrove) -> nx.DiGraph:
    return graph.build([a.name for a in g.agents], {a.name: a.spawned_by for a in g.agents},
                       {a.name: a.depends_on for a in g.agents})


def _current(groves: list[desired.DesiredGrove], fmt: str) -> str:
    if fmt in SINGLE or fmt == "json":
        _one([g.name for g in groves], fmt)
        g = groves[0]
        if fmt == "mermaid":
            return _noted(*_mermaid(g))
        return graph.to_dot(spawn_graph(g), g.name) if fmt == "dot" \
            else graph.to_json(spawn_graph(g), g.name)
    if fmt == "markdown":
        parts = []
        for g in groves:
            text, note = _mermaid(g)
            parts.append(f"### Grove `{g.name}`\n\n" + (f"_{note}_\n\n" if note else "")
                         + f"```mermaid\n{text.rstrip()}\n```\n")
        return "\n".join(parts)
    return "\n".join(_tree(g) for g in groves)


def _tree(g: desired.DesiredGrove) -> str:
    """Agents indented under the agent that spawned them, with what each waits for."""
    children: dict[str | None, list[str]] = {}
    for a in g.agents:
        children.setdefault(a.spawned_by, []).append(a.name)
    lines = [f"grove {g.name} ({len(g.agents)} agents)"]
    stack = [(n, 1) for n in reversed(children.get(None, []))]
    while stack:
        name, depth = stack.pop()
        deps = g.by_name[name].depends_on
        lines.append("  " * depth + name + (f"  (after {', '.join(deps)})" if deps else ""))
        stack.extend((c, depth + 1) for c in reversed(children.get(name, [])))
    return "\n".join(lines) + "\n"
