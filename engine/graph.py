"""The spawn graph: agents as nodes, an edge u -> v when u converges before v.

Called by `desired` (cycle check), `plan` and `executor` (order), and the `graph` command
(rendering). Edges are parent -> child (`spawnedBy`) and dependency -> dependent
(`dependsOn`). Everything here is sorted, so output is deterministic. networkx is imported
only by the functions that build or walk a graph: `validate` needs just `wait_cycle`.
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
    import networkx as nx

    g: nx.DiGraph = nx.DiGraph()
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
    """One cycle as a closed path [a, b, ..., a], or None."""
    import networkx as nx

    try:
        edges = nx.find_cycle(g)
    except nx.NetworkXNoCycle:
        return None
    path = [u for u, _ in edges]
    return [*path, path[0]]


def generations(g: nx.DiGraph) -> list[list[str]]:
    """Creation order: each generation depends only on earlier ones."""
    import networkx as nx

    return [sorted(gen) for gen in nx.topological_generations(g)]


def descendants(g: nx.DiGraph, node: str) -> set[str]:
    import networkx as nx

    return set(nx.descendants(g, node)) if node in g else set()


def wait_cycle(waits: Mapping[str, Iterable[str]]) -> list[str] | None:
    """A cycle in "waits for" edges (an agent waits for its dependencies and its parent), as
    a closed path [a, b, ..., a] where each waits for the next; None when there is none.
    Iterative, so a chain of 10,000 agents does not hit the recursion limit."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(waits):
        if state.get(start):
            continue
        path = [start]
        todo = [iter(sorted(waits[start]))]
        state[start] = 1
        while todo:
            nxt = next(todo[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                todo.pop()
            elif nxt in waits and state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            elif nxt in waits and not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                todo.append(iter(sorted(waits[nxt])))
    return None


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
