"""Views of a topology `Report`: text, JSON, Markdown for a pull request, Mermaid and DOT.

Called by `topology.render` and the `graph` command. Pure functions from the report to a
string. Large groves stay readable: graphs show only changed agents, the unchanged
ancestors needed to place them, and one "+N unchanged" box per collapsed subtree;
Markdown is capped below GitHub's 65,536-character comment limit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from engine import graph

if TYPE_CHECKING:
    from engine.revisions import Side
    from engine.topology import AgentInfo, Report, TopologyDiff

MARKDOWN_LIMIT = 60_000
MAX_GRAPH_NODES = 300  # a Mermaid chart bigger than this is unreadable in a comment
MAX_GRAPH_EDGES = 450  # GitHub's Mermaid refuses charts over 500 edges
MARKER = "<!-- grove-engine topology diff -->"
STYLES = {"added": "fill:#d4f8d4,stroke:#2a2",
          "removed": "fill:#f8d4d4,stroke:#a22,stroke-dasharray: 4 2",
          "changed": "fill:#fff3c4,stroke:#b80"}
_ROW_STEPS = ((200, True), (200, False), (100, False), (40, False), (10, False), (0, False))


def _summary(c: dict[str, int]) -> str:
    return (f"{c['added']} added, {c['removed']} removed, {c['changed']} changed, "
            f"{c['unchanged']} unchanged")


def _side_json(s: Side) -> dict[str, Any]:
    return {"label": s.label, "ref": s.ref, "commit": s.commit,
            "workingTree": s.commit is None}


def to_json(report: Report) -> str:
    doc = {
        "apiVersion": "engine/v1alpha1", "kind": "TopologyDiff",
        "base": _side_json(report.base), "head": _side_json(report.head),
        "changes": report.has_changes, "summary": report.counts(),
        "groves": [{
            "name": d.grove, "status": d.status, "summary": d.counts(),
            "added": [a.to_json() for a in d.added],
            "removed": [a.to_json() for a in d.removed],
            "changed": [{**c.info.to_json(), "fields": list(c.fields)} for c in d.changed],
            "edgesAdded": [e.to_json() for e in d.edges_added],
            "edgesRemoved": [e.to_json() for e in d.edges_removed],
        } for d in report.groves],
    }
    return json.dumps(doc, indent=2, sort_keys=True) + "\n"


def to_text(report: Report) -> str:
    lines = [f"Topology: base {report.base.describe()} -> head {report.head.describe()}"]
    for d in report.groves:
        lines += ["", f"grove {d.grove} ({d.status})"]
        lines += [f"  + {a.name}{_parent(a)}" for a in d.added]
        lines += [f"  - {a.name}{_parent(a)}" for a in d.removed]
        lines += [f"  ~ {c.name}: {', '.join(c.fields)}" for c in d.changed]
        for sign, edges in (("+", d.edges_added), ("-", d.edges_removed)):
            lines += [f"  {sign} edge {e.source} -> {e.target} ({e.kind})" for e in edges]
        if not d.has_changes:
            lines.append("  no changes")
    c = report.counts()
    lines += ["", f"Topology: {_summary(c)}; edges: {c['edgesAdded']} added, "
                  f"{c['edgesRemoved']} removed."]
    return "\n".join(lines) + "\n"


def _parent(a: AgentInfo) -> str:
    return f" (spawned by {a.parent})" if a.parent else ""


# -- collapsed graph ----------------------------------------------------------------------

def visible(d: TopologyDiff) -> tuple[set[str], dict[str | None, int]]:
    """Agents to draw (changed ones and their ancestors) and, per drawn agent (None: the
    top level), how many unchanged agents are folded under it."""
    parents = {n.name: n.parent for n in d.nodes}
    focus = {a.name for a in (*d.added, *d.removed)} | {c.name for c in d.changed}
    for e in (*d.edges_added, *d.edges_removed):
        focus |= {e.source, e.target}
    shown: set[str] = set()
    for n in sorted(focus):
        cur: str | None = n
        while cur is not None and cur in parents and cur not in shown:
            shown.add(cur)
            cur = parents[cur]
    folded: dict[str | None, int] = {}
    memo: dict[str, str | None] = {}
    for n in parents:
        if n not in shown:
            anchor = _anchor(n, parents, shown, memo)
            folded[anchor] = folded.get(anchor, 0) + 1
    return shown, folded


def _anchor(n: str, parents: dict[str, str | None], shown: set[str],
            memo: dict[str, str | None]) -> str | None:
    path: list[str] = []
    cur, res = n, None
    while len(path) <= len(parents):
        if cur in memo:
            res = memo[cur]
            break
        path.append(cur)
        p = parents.get(cur)
        if p is None or p not in parents or p in shown:
            res = p if p in shown else None
            break
        cur = p
    for x in path:
        memo[x] = res
    return res


def _fold_name(anchor: str | None) -> str:
    # upper case never appears in agent names, so these ids cannot collide with an agent's
    return f"MORE-{anchor}" if anchor else "MORE"


@dataclass(frozen=True)
class Chart:
    """A collapsed diff graph ready to draw: nodes, edges (source, target, kind), labels,
    node classes (added/removed/changed) and edge classes (added/removed)."""

    nodes: tuple[str, ...]
    edges: tuple[tuple[str, str, str], ...]
    labels: dict[str, str]
    classes: dict[str, str]
    edge_classes: dict[tuple[str, str], str]


def chart(d: TopologyDiff) -> Chart:
    """The collapsed graph of one diff (pure Python: no graph library needed to draw it)."""
    shown, folded = visible(d)
    edges: dict[tuple[str, str], str] = {}
    for e in d.edges:
        if e.source in shown and e.target in shown:
            edges.setdefault((e.source, e.target), e.kind)
    classes = {a.name: "added" for a in d.added}
    classes |= {a.name: "removed" for a in d.removed}
    classes |= {c.name: "changed" for c in d.changed}
    marks = {"added": "+ ", "removed": "- ", "changed": "~ "}
    labels = {n: marks.get(classes.get(n, ""), "") + n for n in shown}
    for anchor, n in folded.items():
        labels[_fold_name(anchor)] = f"+{n} unchanged"
        if anchor:
            edges[(anchor, _fold_name(anchor))] = graph.PARENT
    edge_classes = {(e.source, e.target): "added" for e in d.edges_added}
    edge_classes |= {(e.source, e.target): "removed" for e in d.edges_removed}
    return Chart(tuple(sorted(labels)), tuple(sorted((u, v, k) for (u, v), k in edges.items())),
                 labels, classes, edge_classes)


def _node_id(name: str) -> str:
    return "n_" + name.replace("-", "_")  # as engine.graph.to_mermaid names nodes


def to_mermaid(d: TopologyDiff) -> str:
    """Mermaid flowchart of the collapsed diff, in engine.graph.to_mermaid's style: added
    nodes green, removed red and dashed, changed yellow; new edges thick, removed dotted."""
    c = chart(d)
    lines = ["flowchart TD"] + [f'  {_node_id(n)}["{c.labels[n]}"]' for n in c.nodes]
    arrows = {"added": "==>", "removed": "-.->"}
    for u, v, kind in c.edges:
        arrow = arrows.get(c.edge_classes.get((u, v), ""), "-->")
        label = "|dependsOn|" if kind == graph.DEPENDS else ""
        lines.append(f"  {_node_id(u)} {arrow}{label} {_node_id(v)}")
    lines += [f"  classDef {k} {STYLES[k]}" for k in sorted(set(c.classes.values()))]
    lines += [f"  class {_node_id(n)} {k}" for n, k in sorted(c.classes.items())]
    return "\n".join(lines) + "\n"


def to_dot(d: TopologyDiff) -> str:
    c = chart(d)
    colors = {"added": "#2a2", "removed": "#a22", "changed": "#b80"}
    lines = [f'digraph "{d.grove}" {{', "  rankdir=TB;"]
    for n in c.nodes:
        k = c.classes.get(n)
        style = f', color="{colors[k]}", penwidth=2' if k else ""
        style += ", style=dashed" if k == "removed" or n.startswith("MORE") else ""
        lines.append(f'  "{n}" [label="{c.labels[n]}"{style}];')
    for u, v, kind in c.edges:
        k = c.edge_classes.get((u, v))
        attrs = [f'color="{colors[k]}"'] if k else []
        attrs += ["style=dashed"] if k == "removed" else []
        attrs += ['label="dependsOn"'] if kind == graph.DEPENDS else []
        lines.append(f'  "{u}" -> "{v}"' + (f" [{', '.join(attrs)}]" if attrs else "") + ";")
    return "\n".join([*lines, "}"]) + "\n"


# -- Markdown -----------------------------------------------------------------------------

def _code(text: str) -> str:
    return "`" + text.replace("`", "'") + "`"


def _rows(d: TopologyDiff) -> list[str]:
    rows = [f"| added | {_code(a.name)} | {_code(a.parent) if a.parent else ''} | "
            f"{a.profile} | {a.harness} | {a.runtime} | new agent |" for a in d.added]
    rows += [f"| removed | {_code(a.name)} | {_code(a.parent) if a.parent else ''} | "
             f"{a.profile} | {a.harness} | {a.runtime} | no longer in the manifests |"
             for a in d.removed]
    rows += [f"| changed | {_code(c.name)} | {_code(c.info.parent) if c.info.parent else ''}"
             f" | {c.info.profile} | {c.info.harness} | {c.info.runtime} | "
             f"{', '.join(_code(f) for f in c.fields)} |" for c in d.changed]
    return rows


def _grove_md(d: TopologyDiff, rows_cap: int, graphs: bool, notes: list[str]) -> list[str]:
    out = [f"### Grove {_code(d.grove)}: {d.status}", ""]
    if not d.has_changes:
        return [*out, f"No topology changes ({len(d.unchanged)} agents unchanged).", ""]
    out += [_summary(d.counts()) + f"; spawn edges: {len(d.edges_added)} added, "
            f"{len(d.edges_removed)} removed.", ""]
    rows = _rows(d)
    if rows:
        out += ["| change | agent | spawned by | profile | harness | runtime | what changed |",
                "|---|---|---|---|---|---|---|", *rows[:rows_cap]]
        if len(rows) > rows_cap:
            out.append(f"| ... | {len(rows) - rows_cap} more not shown | | | | | |")
            notes.append(f"grove {d.grove}: {len(rows) - rows_cap} rows left out")
        out.append("")
    # an edge from a new (or gone) agent's parent to it is already in the table
    implied = {(a.parent, a.name) for a in (*d.added, *d.removed)}
    edges = [f"- added edge {_code(e.source)} → {_code(e.target)} ({e.kind})"
             for e in d.edges_added if (e.source, e.target) not in implied]
    edges += [f"- removed edge {_code(e.source)} → {_code(e.target)} ({e.kind})"
              for e in d.edges_removed if (e.source, e.target) not in implied]
    out += [*edges[:rows_cap], *([f"- ... {len(edges) - rows_cap} more edge changes"]
                                 if len(edges) > rows_cap else []), *([""] if edges else [])]
    if graphs:
        c = chart(d)
        if len(c.nodes) > MAX_GRAPH_NODES or len(c.edges) > MAX_GRAPH_EDGES:
            out += [f"_Graph left out: {len(c.nodes)} boxes to draw, over the "
                    f"{MAX_GRAPH_NODES} a readable chart holds. Run "
                    f"`engine graph -g {d.grove} --base REF --format dot` to see it._", ""]
        else:
            out += ["```mermaid", to_mermaid(d).rstrip("\n"), "```", ""]
    return out


def _markdown(report: Report, rows_cap: int, graphs: bool) -> tuple[str, list[str]]:
    notes: list[str] = []
    c = report.counts()
    out = [MARKER, f"## Grove topology: {_summary(c)}", "",
           f"Base {_code(report.base.describe())} → head {_code(report.head.describe())}; "
           f"spawn edges: {c['edgesAdded']} added, {c['edgesRemoved']} removed.", ""]
    for d in report.groves:
        out += _grove_md(d, rows_cap, graphs, notes)
    if graphs and any(d.has_changes for d in report.groves):
        out += ["<sub>Graph: green = added, red dashed = removed, yellow = changed; thick "
                "arrows are new edges, dotted arrows removed ones; `+N unchanged` boxes fold "
                "agents that did not change.</sub>", ""]
    return "\n".join(out), notes


def to_markdown(report: Report, limit: int = MARKDOWN_LIMIT) -> str:
    """Markdown for a pull-request comment, never longer than `limit` characters: over it,
    graphs go first, then table rows, and a note says so."""
    text, _ = _markdown(report, _ROW_STEPS[0][0], True)
    if len(text) <= limit:
        return text
    for rows_cap, graphs in _ROW_STEPS[1:]:
        text, notes = _markdown(report, rows_cap, graphs)
        note = (f"\n> Shortened to stay under {limit:,} characters (graphs left out"
                + "".join(f"; {n}" for n in notes) + "). Run `engine graph --base REF "
                "--format json` for the full diff.\n")
        if len(text) + len(note) <= limit or rows_cap == 0:
            return _cut(text, limit - len(note)) + note
    return _cut(text, limit)  # not reached: the last step always returns


def _cut(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    cut = text[:max(limit - 40, 0)].rsplit("\n", 1)[0]
    if cut.count("```") % 2:
        cut += "\n```"
    return cut + "\n\n(cut here: too long)\n"
