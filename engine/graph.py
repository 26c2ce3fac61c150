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

Drawing: `Chart` is a graph ready to draw (also built by `topology_render` for a diff);
`mermaid` keeps a chart within mermaid's limits, summarising it with a note when it must;
`to_dot` and `to_json` draw the whole graph. Labels are escaped for each format.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
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


# -- drawing ------------------------------------------------------------------------------

MERMAID_MAX_EDGES = 500  # mermaid's default maxEdges: a flowchart with one more fails to render
MERMAID_MAX_TEXT = 50_000  # mermaid's default maxTextSize: longer text draws an error box
NOTE_ROOM = 1_000  # characters kept free for the note of a summarised chart
COLORS = {"added": "#22aa22", "removed": "#aa2222", "changed": "#bb8800"}  # Graphviz: 6 digits
FILLS = {"added": "#d4f8d4", "removed": "#f8d4d4", "changed": "#fff3c4"}
MERMAID_STYLES = {k: f"fill:{FILLS[k]},stroke:{COLORS[k]}"
                  + (",stroke-dasharray: 4 2" if k == "removed" else "") for k in COLORS}
_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 +-~_.,:()/")


@dataclass(frozen=True)
class Chart:
    """A graph ready to draw: boxes with labels, edges (source, target, kind), box classes
    (added/removed/changed), edge classes (added/removed), the box each box hangs under
    (its spawn parent, or the agent a "+N" box belongs to) and how many agents each box
    stands for (1 for an agent, N for a "+N" box)."""

    nodes: tuple[str, ...]
    edges: tuple[tuple[str, str, str], ...]
    labels: Mapping[str, str]
    classes: Mapping[str, str] = field(default_factory=dict)
    edge_classes: Mapping[tuple[str, str], str] = field(default_factory=dict)
    under: Mapping[str, str | None] = field(default_factory=dict)
    weight: Mapping[str, int] = field(default_factory=dict)


def chart_of(g: nx.DiGraph) -> Chart:
    """The whole spawn graph as a chart: every agent a box, every edge drawn."""
    nodes = tuple(sorted(g.nodes))
    edges = tuple((u, v, g.edges[u, v].get("kind", PARENT)) for u, v in sorted(g.edges))
    under = {v: u for u, v, k in edges if k == PARENT}
    return Chart(nodes, edges, {n: n for n in nodes}, under=under)


def _node_id(name: str) -> str:
    return "n_" + name.replace("-", "_")


def mermaid_label(text: str) -> str:
    """`text` as the inside of a quoted Mermaid label: every character outside a small safe
    set becomes a numeric entity (`#60;`), so no text can end the label, add markup or
    start a link."""
    return "".join(ch if ch in _SAFE else f"#{ord(ch)};" for ch in text)


def mermaid_text(c: Chart) -> str:
    """The Mermaid flowchart of the whole of `c` (no limits applied)."""
    lines = ["flowchart TD"]
    lines += [f'  {_node_id(n)}["{mermaid_label(c.labels[n])}"]' for n in c.nodes]
    arrows = {"added": "==>", "removed": "-.->"}
    for u, v, kind in c.edges:
        arrow = arrows.get(c.edge_classes.get((u, v), ""), "-->")
        label = "|dependsOn|" if kind == DEPENDS else ""
        lines.append(f"  {_node_id(u)} {arrow}{label} {_node_id(v)}")
    drawn = set(c.nodes)
    used = sorted({k for n, k in c.classes.items() if n in drawn})
    lines += [f"  classDef {k} {MERMAID_STYLES[k]}" for k in used]
    lines += [f"  class {_node_id(n)} {k}" for n, k in sorted(c.classes.items()) if n in drawn]
    return "\n".join(lines) + "\n"


def _breadth_first(c: Chart) -> list[str]:
    """Boxes top level first, then their children, and so on; among siblings, marked
    (added/removed/changed) agents first, then agents, then "+N" boxes, each by name."""
    kids: dict[str | None, list[str]] = {}
    for n in c.nodes:
        p = c.under.get(n)
        kids.setdefault(p if p in c.labels else None, []).append(n)

    def key(n: str) -> tuple[bool, bool, str]:
        return n not in c.classes, n[:1].isupper(), n

    order: list[str] = []
    seen: set[str] = set()
    queue = deque(sorted(kids.get(None, []), key=key))
    while queue:
        n = queue.popleft()
        if n in seen:
            continue
        seen.add(n)
        order.append(n)
        queue.extend(sorted(kids.get(n, []), key=key))
    return order + [n for n in c.nodes if n not in seen]  # only under a cycle


def _rest_name(anchor: str | None) -> str:
    # upper case never appears in agent names, so these ids cannot collide with an agent's
    return f"REST-{anchor}" if anchor else "REST"


def summarise(c: Chart, keep: set[str]) -> tuple[Chart, int, int]:
    """`c` with only the boxes `keep` (each with the box it hangs under); every other box
    is counted in a "+N more agents" box under its nearest kept ancestor (which also says
    how many of them are added, removed or changed). Returns the
    chart, how many agents were folded and how many edges are no longer drawn."""
    rest: dict[str | None, int] = {}
    marked: dict[str | None, int] = {}  # of those, agents added, removed or changed
    for n in c.nodes:
        if n in keep:
            continue
        anchor, seen = c.under.get(n), {n}
        while anchor is not None and anchor not in keep and anchor not in seen:
            seen.add(anchor)
            anchor = c.under.get(anchor)
        anchor = anchor if anchor in keep else None
        rest[anchor] = rest.get(anchor, 0) + c.weight.get(n, 1)
        marked[anchor] = marked.get(anchor, 0) + (n in c.classes)
    labels = {n: c.labels[n] for n in c.nodes if n in keep}
    edges = [e for e in c.edges if e[0] in keep and e[1] in keep]
    hidden_edges = len(c.edges) - len(edges)
    for anchor, count in rest.items():
        labels[_rest_name(anchor)] = f"+{count} more agent{'s' if count != 1 else ''}" + (
            f" ({marked[anchor]} with changes)" if marked[anchor] else "")
        if anchor:
            edges.append((anchor, _rest_name(anchor), PARENT))
    under = {**{n: c.under.get(n) for n in labels if n in keep},
             **{_rest_name(a): a for a in rest}}
    out = Chart(tuple(sorted(labels)), tuple(sorted(edges)), labels, c.classes,
                c.edge_classes, under, {**c.weight, **{_rest_name(a): k for a, k in rest.items()}})
    return out, sum(rest.values()), hidden_edges


def mermaid(c: Chart, max_boxes: int | None = None,
            whole: str = "engine graph --format dot") -> tuple[str, str | None]:
    """The Mermaid flowchart of `c` within mermaid's limits (MERMAID_MAX_EDGES edges and
    MERMAID_MAX_TEXT characters per diagram) and at most `max_boxes` boxes, and a note
    saying what was summarised and why (None when everything is drawn). Over a limit, the
    first boxes in breadth-first order are drawn, as many as fit, and the rest are counted
    in "+N more agents" boxes; `whole` is the command that shows everything."""
    text = mermaid_text(c)
    reasons = []
    if len(c.edges) > MERMAID_MAX_EDGES:
        reasons.append(f"{len(c.edges)} edges (Mermaid draws at most {MERMAID_MAX_EDGES})")
    if len(text) > MERMAID_MAX_TEXT:
        reasons.append(f"{len(text):,} characters of Mermaid text (Mermaid reads at most "
                       f"{MERMAID_MAX_TEXT:,})")
    if max_boxes is not None and len(c.nodes) > max_boxes:
        reasons.append(f"{len(c.nodes)} boxes (a readable chart holds {max_boxes})")
    if not reasons:
        return text, None
    order = _breadth_first(c)

    def fits(n: int) -> tuple[Chart, int, int, str] | None:
        s, folded, hidden = summarise(c, set(order[:n]))
        t = mermaid_text(s)
        ok = (len(s.edges) <= MERMAID_MAX_EDGES and len(t) + NOTE_ROOM <= MERMAID_MAX_TEXT
              and (max_boxes is None or len(s.nodes) <= max_boxes))
        return (s, folded, hidden, t) if ok else None

    lo, hi = 0, len(order)
    best = fits(0)
    assert best is not None  # one "+N more agents" box always fits
    while lo < hi:  # the largest prefix that fits (adding a box adds at most two edges)
        mid = (lo + hi + 1) // 2
        got = fits(mid)
        if got:
            lo, best = mid, got
        else:
            hi = mid - 1
    _, folded, hidden, t = best
    note = (f"Summarised: the whole chart has {' and '.join(reasons)}. Drawn: the first {lo} "
            f"of its {len(c.nodes)} boxes in breadth-first order (top-level agents, then "
            f"their children, and so on); the other {folded} agents are counted in "
            f"'+N more agents' boxes under their nearest drawn ancestor, and {hidden} "
            f"edges are not drawn. Run `{whole}` to see everything.")
    return t, note


def mermaid_document(text: str, note: str | None) -> str:
    """A flowchart with its note as a `%%` comment under the first line."""
    if note is None:
        return text
    first, _, rest = text.partition("\n")
    return f"{first}\n%% {note}\n{rest}"


def to_mermaid(g: nx.DiGraph) -> str:
    """Mermaid flowchart of the spawn graph, summarised to stay within mermaid's limits."""
    return mermaid_document(*mermaid(chart_of(g)))


def dot_str(text: str) -> str:
    """`text` as a quoted DOT string: quotes and backslashes escaped, line breaks and other
    control characters dropped, so no text can end the string."""
    clean = "".join(ch for ch in text if ch.isprintable())
    return '"' + clean.replace("\\", "\\\\").replace('"', '\\"') + '"'


def to_dot(g: nx.DiGraph, name: str = "grove") -> str:
    lines = [f"digraph {dot_str(name)} {{", "  rankdir=TB;"]
    for n in sorted(g.nodes):
        lines.append(f"  {dot_str(n)};")
    for u, v in sorted(g.edges):
        style = ' [style=dashed, label="dependsOn"]' if g.edges[u, v].get("kind") == DEPENDS \
            else ""
        lines.append(f"  {dot_str(u)} -> {dot_str(v)}{style};")
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
