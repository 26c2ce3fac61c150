"""Views of a topology `Report`: text, JSON, Markdown for a pull request, Mermaid and DOT.

Called by `topology.render` and the `graph` command. Pure functions from the report to a
string. Large groves stay readable: graphs show only changed agents, the unchanged
ancestors needed to place them, and one "+N unchanged" box per collapsed subtree; a chart
still over mermaid's limits (or, in a comment, over MAX_GRAPH_NODES boxes) is summarised
by `graph.mermaid` with a note. Markdown is capped below GitHub's 65,536-character
comment limit, and every note says what was left out and why. Text that reaches the
Markdown (setting paths come from manifests a pull request may write) is shown in code
spans only, escaped so it cannot end the span, the table cell or the line.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from engine import graph

if TYPE_CHECKING:
    from engine.revisions import Side
    from engine.topology import AgentInfo, Report, TopologyDiff

MARKDOWN_LIMIT = 60_000
MAX_GRAPH_NODES = 300  # a Mermaid chart bigger than this is unreadable in a comment
MARKER = "<!-- grove-engine topology diff -->"
STYLES = graph.MERMAID_STYLES
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


def _plain(text: str) -> str:
    """`text` with every unprintable character shown as an escape (`\\u001b`)."""
    return "".join(ch if ch.isprintable() else f"\\u{ord(ch):04x}" for ch in text)


def to_text(report: Report) -> str:
    lines = [f"Topology: base {report.base.describe()} -> head {report.head.describe()}"]
    for d in report.groves:
        lines += ["", f"grove {d.grove} ({d.status})"]
        lines += [f"  + {a.name}{_parent(a)}" for a in d.added]
        lines += [f"  - {a.name}{_parent(a)}" for a in d.removed]
        lines += [f"  ~ {c.name}: {', '.join(_plain(f) for f in c.fields)}" for c in d.changed]
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


Chart = graph.Chart


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
    parents = {n.name: n.parent for n in d.nodes}
    under: dict[str, str | None] = {n: parents.get(n) for n in shown}
    weight: dict[str, int] = {}
    for anchor, n in folded.items():
        labels[_fold_name(anchor)] = f"+{n} unchanged"
        under[_fold_name(anchor)] = anchor
        weight[_fold_name(anchor)] = n
        if anchor:
            edges[(anchor, _fold_name(anchor))] = graph.PARENT
    edge_classes = {(e.source, e.target): "added" for e in d.edges_added}
    edge_classes |= {(e.source, e.target): "removed" for e in d.edges_removed}
    return Chart(tuple(sorted(labels)), tuple(sorted((u, v, k) for (u, v), k in edges.items())),
                 labels, classes, edge_classes, under, weight)


def mermaid(d: TopologyDiff, max_boxes: int | None = None) -> tuple[str, str | None]:
    """The Mermaid flowchart of the collapsed diff and, when it had to be summarised to stay
    within mermaid's limits (or `max_boxes`), the note saying how."""
    return graph.mermaid(chart(d), max_boxes,
                         whole=f"engine graph -g {d.grove} --base REF --format dot")


def to_mermaid(d: TopologyDiff) -> str:
    """Mermaid flowchart of the collapsed diff, in engine.graph.to_mermaid's style: added
    nodes green, removed red and dashed, changed yellow; new edges thick, removed dotted.
    Summarised with a `%%` note when over mermaid's limits."""
    return graph.mermaid_document(*mermaid(d))


def to_dot(d: TopologyDiff) -> str:
    """Graphviz DOT of the collapsed diff, coloured as the Mermaid chart (6-digit colours:
    Graphviz ignores 3-digit ones). DOT has no size limit: nothing is summarised."""
    c = chart(d)
    q = graph.dot_str
    lines = [f"digraph {q(d.grove)} {{", "  rankdir=TB;"]
    for n in c.nodes:
        k = c.classes.get(n)
        styles = (["filled"] if k else []) + (["dashed"] if k == "removed" or n[:1].isupper()
                                               else [])
        attrs = [f"label={q(c.labels[n])}"]
        attrs += [f'color="{graph.COLORS[k]}"', f'fillcolor="{graph.FILLS[k]}"',
                  "penwidth=2"] if k else []
        attrs += [f'style="{",".join(styles)}"'] if styles else []
        lines.append(f"  {q(n)} [{', '.join(attrs)}];")
    for u, v, kind in c.edges:
        k = c.edge_classes.get((u, v))
        attrs = [f'color="{graph.COLORS[k]}"', "penwidth=2"] if k else []
        attrs += ["style=dashed"] if k == "removed" else []
        attrs += ['label="dependsOn"'] if kind == graph.DEPENDS else []
        lines.append(f"  {q(u)} -> {q(v)}" + (f" [{', '.join(attrs)}]" if attrs else "") + ";")
    return "\n".join([*lines, "}"]) + "\n"


# -- Markdown -----------------------------------------------------------------------------

def _code(text: str, cell: bool = False) -> str:
    """`text` as a code span: nothing in it is markup, a link or an @mention. Backticks
    cannot end it, unprintable characters show as escapes, and in a table cell a `|`
    cannot end the cell."""
    clean = _plain(text).replace("`", "'")
    return "`" + (clean.replace("|", "\\|") if cell else clean) + "`"


def _rows(d: TopologyDiff) -> list[str]:
    def row(change: str, a: AgentInfo, what: str) -> str:
        parent = _code(a.parent, True) if a.parent else ""
        # profile and harness are validated names, runtime one of three words
        return (f"| {change} | {_code(a.name, True)} | {parent} | {a.profile} | {a.harness} | "
                f"{a.runtime} | {what} |")

    rows = [row("added", a, "new agent") for a in d.added]
    rows += [row("removed", a, "no longer in the manifests") for a in d.removed]
    rows += [row("changed", c.info, ", ".join(_code(f, True) for f in c.fields))
             for c in d.changed]
    return rows


def _grove_md(d: TopologyDiff, rows_cap: int, graphs: bool,
              notes: list[str]) -> list[str]:
    out = [f"### Grove {_code(d.grove)}: {d.status}", ""]
    if not d.has_changes:
        return [*out, f"No topology changes ({len(d.unchanged)} agents unchanged).", ""]
    out += [_summary(d.counts()) + f"; spawn edges: {len(d.edges_added)} added, "
            f"{len(d.edges_removed)} removed.", ""]
    left: list[str] = []
    rows = _rows(d)
    if rows:
        out += ["| change | agent | spawned by | profile | harness | runtime | what changed |",
                "|---|---|---|---|---|---|---|", *rows[:rows_cap]]
        if len(rows) > rows_cap:
            out.append(f"| ... | {len(rows) - rows_cap} more not shown | | | | | |")
            left.append(f"{len(rows) - rows_cap} of {len(rows)} table rows")
        out.append("")
    # every edge the summary line counts, those of new and gone agents included
    edges = [f"- added edge {_code(e.source)} → {_code(e.target)} ({e.kind})"
             for e in d.edges_added]
    edges += [f"- removed edge {_code(e.source)} → {_code(e.target)} ({e.kind})"
              for e in d.edges_removed]
    out += edges[:rows_cap]
    if len(edges) > rows_cap:
        out.append(f"- ... {len(edges) - rows_cap} more edge changes not shown")
        left.append(f"{len(edges) - rows_cap} of {len(edges)} edge changes")
    out += [""] if edges else []
    if left:
        notes.append(f"grove {_code(d.grove)}: {', '.join(left)} (at most {rows_cap} of each "
                     "per grove)")
    if graphs:
        text, note = mermaid(d, MAX_GRAPH_NODES)
        out += [f"_{note}_", ""] if note else []
        out += ["```mermaid", text.rstrip("\n"), "```", ""]
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


def _left_out(report: Report, notes: list[str], graphs: bool, limit: int | None) -> str:
    """The note under a comment that says what it leaves out and why; "" for nothing."""
    charted = sum(1 for d in report.groves if d.has_changes)
    parts = ([f"the graph{'s' if charted != 1 else ''} of {charted} "
              f"grove{'s' if charted != 1 else ''}"] if not graphs and charted else [])
    parts += notes
    if not parts:
        return ""
    why = (f"Left out to keep this comment under {limit:,} characters (GitHub's limit is "
           "65,536)" if limit is not None else "Left out")
    return (f"\n> {why}: {'; '.join(parts)}. Run `engine graph --base REF --format json` "
            "for the full diff.\n")


def to_markdown(report: Report, limit: int = MARKDOWN_LIMIT) -> str:
    """Markdown for a pull-request comment, never longer than `limit` characters: over it,
    graphs go first, then table rows and edge lines, and a note says what was left out."""
    text, notes = _markdown(report, _ROW_STEPS[0][0], True)
    note = _left_out(report, notes, True, None)
    if len(text) + len(note) <= limit:
        return text + note
    for rows_cap, graphs in _ROW_STEPS[1:]:
        text, notes = _markdown(report, rows_cap, graphs)
        note = _left_out(report, notes, graphs, limit)
        if len(text) + len(note) <= limit or rows_cap == 0:
            return _cut(text, limit - len(note)) + note
    return _cut(text, limit)  # not reached: the last step always returns


def _cut(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    cut = text[:max(limit - 60, 0)].rsplit("\n", 1)[0]
    if cut.count("```") % 2:
        cut += "\n```"
    return cut + f"\n\n(cut here: the rest would pass {limit:,} characters)\n"
