"""The spawn graph: agents as nodes, an edge u -> v when u converges before v.

Called by `desired` (cycle check), `plan` and `executor` (order), and the `graph` command
(rendering). Edges are parent -> child (`spawnedBy`) and dependency -> dependent
(`dependsOn`). Everything here is sorted, so output is deterministic. The walks
are done here (networkx's import costs more than a whole plan of 1,000 agents);
`SpawnGraph.to_networkx()` gives networkx the same graph for analysis.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import networkx as nx

PARENT = "spawned"
DEPENDS = "dependsOn"


class _Edges:
    """networkx-style edge view: iterate (u, v) pairs, index [u, v] for attributes."""

    def __init__(self, succ: dict[str, dict[str, dict[str, Any]]]) -> None:
        self._succ = succ

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return ((u, v) for u, vs in self._succ.items() for v in vs)

    def __len__(self) -> int:
        return sum(len(vs) for vs in self._succ.values())

    def __getitem__(self, uv: tuple[str, str]) -> dict[str, Any]:
        return self._succ[uv[0]][uv[1]]


class SpawnGraph:
    """The spawn graph. A small directed graph with the subset of networkx.DiGraph's API
    the engine uses, so that commands do not pay networkx's import on every run;
    `to_networkx()` hands the same graph to networkx for analysis."""

    def __init__(self) -> None:
        self.succ: dict[str, dict[str, dict[str, Any]]] = {}
        self.pred: dict[str, set[str]] = {}

    @property
    def nodes(self) -> list[str]:
        return list(self.succ)

    @property
    def edges(self) -> _Edges:
        return _Edges(self.succ)

    def __contains__(self, n: object) -> bool:
        return n in self.succ

    def __len__(self) -> int:
        return len(self.succ)

    def add_node(self, n: str) -> None:
        self.succ.setdefault(n, {})
        self.pred.setdefault(n, set())

    def add_edge(self, u: str, v: str, **attrs: Any) -> None:
        self.add_node(u)
        self.add_node(v)
        self.succ[u][v] = dict(attrs)
        self.pred[v].add(u)

    def has_edge(self, u: str, v: str) -> bool:
        return v in self.succ.get(u, {})

    def to_networkx(self) -> nx.DiGraph:
        import networkx as nx

        g: nx.DiGraph = nx.DiGraph()
        g.add_nodes_from(self.succ)
        g.add_edges_from((u, v, a) for u, vs in self.succ.items() for v, a in vs.items())
        return g


def build(nodes: Iterable[str], parents: Mapping[str, str | None],
          depends: Mapping[str, Iterable[str]]) -> SpawnGraph:
    g = SpawnGraph()
    names = sorted(nodes)
    for n in names:
        g.add_node(n)
    for n in names:
        p = parents.get(n)
        if p and p in g:
            g.add_edge(p, n, kind=PARENT)
        for d in sorted(depends.get(n, ())):
            if d in g and not g.has_edge(d, n):
                g.add_edge(d, n, kind=DEPENDS)
    return g


def find_cycle(g: SpawnGraph) -> list[str] | None:
    """One cycle as a closed path [a, b, ..., a] following edges, or None."""
    return wait_cycle({n: list(vs) for n, vs in g.succ.items()})


def generations(g: SpawnGraph) -> list[list[str]]:
    """Creation order (Kahn): each generation depends only on earlier ones. Raises
    ValueError on a cycle (validation rejects cycles before anything gets here)."""
    indeg = {n: len(g.pred[n]) for n in g.succ}
    gen = sorted(n for n, d in indeg.items() if d == 0)
    out: list[list[str]] = []
    seen = 0
    while gen:
        out.append(gen)
        seen += len(gen)
        nxt = []
        for u in gen:
            for v in g.succ[u]:
                indeg[v] -= 1
                if indeg[v] == 0:
                    nxt.append(v)
        gen = sorted(nxt)
    if seen != len(indeg):
        raise ValueError("the spawn graph has a cycle")
    return out


def descendants(g: SpawnGraph, node: str) -> set[str]:
    if node not in g:
        return set()
    out: set[str] = set()
    todo = list(g.succ[node])
    while todo:
        n = todo.pop()
        if n not in out:
            out.add(n)
            todo.extend(g.succ[n])
    return out


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


def to_mermaid(g: SpawnGraph, labels: Mapping[str, str] | None = None,
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


def to_dot(g: SpawnGraph, name: str = "grove") -> str:
    lines = [f'digraph "{name}" {{', "  rankdir=TB;"]
    for n in sorted(g.nodes):
        lines.append(f'  "{n}";')
    for u, v in sorted(g.edges):
        style = ' [style=dashed, label="dependsOn"]' if g.edges[u, v].get("kind") == DEPENDS \
            else ""
        lines.append(f'  "{u}" -> "{v}"{style};')
    lines.append("}")
    return "\n".join(lines) + "\n"


def to_json(g: SpawnGraph, grove: str) -> str:
    doc = {
        "grove": grove,
        "nodes": sorted(g.nodes),
        "edges": [{"from": u, "to": v, "kind": g.edges[u, v].get("kind", PARENT)}
                  for u, v in sorted(g.edges)],
        "generations": generations(g) if find_cycle(g) is None else [],
    }
    return json.dumps(doc, indent=2, sort_keys=True) + "\n"
