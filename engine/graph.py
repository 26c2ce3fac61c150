"""The spawn graph: agents as nodes, an edge u -> v when u converges before v.

Called by `plan` and `executor` (order, descendants of a failure) and the `graph` command
(rendering); `desired` and `checks` use only `depth_of`, a walk up the parent chain that
needs no graph. `build` returns a networkx `DiGraph` whose edges are parent -> child (edge
attribute kind="spawned") and dependency -> dependent (kind="dependsOn"); the walks are
networkx's own (`topological_generations`, `descendants`, `find_cycle`), wrapped here so
their results are sorted and deterministic. networkx is imported inside the functions,
never at module top, so only a command that builds a graph pays its import (about a
quarter of a second); `validate` and `status` never do (validation finds cycles with the
standard library's graphlib, in `checks`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import networkx as nx

PARENT = "spawned"
DEPENDS = "dependsOn"


def build(nodes: Iterable[str], parents: Mapping[str, str | None],
          depends: Mapping[str, Iterable[str]]) -> nx.DiGraph:
    """The spawn graph of `nodes`; parents and dependencies outside `nodes` are left out.
    Nodes and edges go in sorted, so every walk over the graph is deterministic."""
    import networkx as nx

    g = nx.DiGraph()
    names = sorted(nodes)
    g.add_nodes_from(names)
    for n in names:
        p = parents.get(n)
        if p and p in g:
            g.add_edge(p, n, kind=PARENT)
        for d in sorted(depends.get(n, ())):
            if d in g and not g.has_edge(d, n):
                g.add_edge(d, n, kind=DEPENDS)
    return g


def find_cycle(g: nx.DiGraph) -> list[str] | None:
    """One cycle as a closed path [a, b, ..., a] following edges, or None."""
    import networkx as nx

    try:
        edges = nx.find_cycle(g)
    except nx.NetworkXNoCycle:
        return None
    return [u for u, _ in edges] + [edges[-1][1]]


def generations(g: nx.DiGraph) -> list[list[str]]:
    """Creation order: each generation (sorted) depends only on earlier ones. Raises
    ValueError on a cycle (validation rejects cycles before anything gets here)."""
    import networkx as nx

    try:
        return [sorted(gen) for gen in nx.topological_generations(g)]
    except nx.NetworkXUnfeasible:
        raise ValueError("the spawn graph has a cycle") from None


def descendants(g: nx.DiGraph, node: str) -> set[str]:
    """Everything downstream of `node` (empty for a node not in the graph)."""
    import networkx as nx

    return set(nx.descendants(g, node)) if node in g else set()


def depth_of(parents: Mapping[str, str | None], name: str) -> int:
    """Spawn depth: 0 for a seed agent, parent's depth + 1 for a child."""
    depth, seen, cur = 0, {name}, parents.get(name)
    while cur and cur not in seen:
        seen.add(cur)
        depth += 1
        cur = parents.get(cur)
    return depth


def _node_id(name: str) -> str:
    return "n_" + name.replace("-", "_")


def to_mermaid(g: nx.DiGraph, labels: Mapping[str, str] | None = None,
               classes: Mapping[str, str] | None = None,
               edge_classes: Mapping[tuple[str, str], str] | None = None) -> str:
    """Mermaid flowchart; `classes` marks nodes (added/removed/changed), `edge_classes`
    marks edges (added/removed) with dashed or thick links."""
    lines = ["flowchart TD"]
    for n in sorted(g.nodes):
        text = (labels or {}).get(n, n)
        lines.append(f'  {_node_id(n)}["{text}"]')
    arrows = {"added": "==>", "removed": "-.->"}
    for u, v in sorted(g.edges):
        kind = g.edges[u, v].get("kind", PARENT)
        arrow = arrows.get((edge_classes or {}).get((u, v), ""), "-->")
        label = "|dependsOn|" if kind == DEPENDS else ""
        lines.append(f"  {_node_id(u)} {arrow}{label} {_node_id(v)}")
    styles = {"added": "fill:#d4f8d4,stroke:#2a2", "removed": "fill:#f8d4d4,stroke:#a22,"
              "stroke-dasharray: 4 2", "changed": "fill:#fff3c4,stroke:#b80"}
    used = sorted(set((classes or {}).values()))
    for c in used:
        lines.append(f"  classDef {c} {styles.get(c, '')}")
    for n, c in sorted((classes or {}).items()):
        if n in g:
            lines.append(f"  class {_node_id(n)} {c}")
    return "\n".join(lines) + "\n"


def to_dot(g: nx.DiGraph, name: str = "grove") -> str:
    lines = [f'digraph "{name}" {{', "  rankdir=TB;"]
    for n in sorted(g.nodes):
        lines.append(f'  "{n}";')
    for u, v in sorted(g.edges):
        style = ' [style=dashed, label="dependsOn"]' if g.edges[u, v].get("kind") == DEPENDS \
            else ""
        lines.append(f'  "{u}" -> "{v}"{style};')
    lines.append("}")
    return "\n".join(lines) + "\n"


def to_json(g: nx.DiGraph, grove: str) -> str:
    doc = {
        "grove": grove,
        "nodes": sorted(g.nodes),
        "edges": [{"from": u, "to": v, "kind": g.edges[u, v].get("kind", PARENT)}
                  for u, v in sorted(g.edges)],
        "generations": generations(g) if find_cycle(g) is None else [],
    }
    return json.dumps(doc, indent=2, sort_keys=True) + "\n"
