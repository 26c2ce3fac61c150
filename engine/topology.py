"""Topology diff: two desired states of a grove -> `TopologyDiff` (agents and spawn edges).

Called by the `graph --base` command, by `plan --base` (through `plan_markdown`) and by
tests. Pure over `DesiredGrove`s: either side may be None (the grove is new or gone).
`diff_revisions` loads both sides from git (`revisions`) and returns a `Report`; `render`
turns a report into text, JSON (schemas/topology-diff.json) or Markdown for a pull request.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine import graph, revisions, topology_render
from engine.desired import DesiredAgent, DesiredGrove, Options
from engine.errors import EngineError, UsageError
from engine.revisions import Side

FORMATS = ("text", "json", "markdown")


@dataclass(frozen=True, order=True)
class AgentInfo:
    """What a reader needs to place an agent: its parent and where it runs."""

    name: str
    parent: str | None
    profile: str
    harness: str
    runtime: str

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "spawnedBy": self.parent, "profile": self.profile,
                "harness": self.harness, "runtime": self.runtime}


@dataclass(frozen=True, order=True)
class AgentChange:
    """An agent on both sides whose resolved settings differ; `fields` are dotted paths."""

    info: AgentInfo
    fields: tuple[str, ...]

    @property
    def name(self) -> str:
        return self.info.name


@dataclass(frozen=True, order=True)
class Edge:
    source: str
    target: str
    kind: str  # graph.PARENT ("spawned") or graph.DEPENDS ("dependsOn")

    def to_json(self) -> dict[str, str]:
        return {"from": self.source, "to": self.target, "kind": self.kind}


@dataclass(frozen=True)
class TopologyDiff:
    """How one grove's topology differs between two sides."""

    grove: str
    status: str  # added | removed | changed | unchanged
    added: tuple[AgentInfo, ...]
    removed: tuple[AgentInfo, ...]
    changed: tuple[AgentChange, ...]
    unchanged: tuple[str, ...]
    edges_added: tuple[Edge, ...]
    edges_removed: tuple[Edge, ...]
    nodes: tuple[AgentInfo, ...]  # every agent of either side (head's view when on both)
    edges: tuple[Edge, ...]  # every edge of either side

    @property
    def has_changes(self) -> bool:
        return bool(self.added or self.removed or self.changed or self.edges_added
                    or self.edges_removed or self.status in ("added", "removed"))

    def counts(self) -> dict[str, int]:
        return {"added": len(self.added), "removed": len(self.removed),
                "changed": len(self.changed), "unchanged": len(self.unchanged),
                "edgesAdded": len(self.edges_added), "edgesRemoved": len(self.edges_removed)}


@dataclass(frozen=True)
class Report:
    """The topology diffs of every grove compared between a base and a head."""

    base: Side
    head: Side
    groves: tuple[TopologyDiff, ...]

    @property
    def has_changes(self) -> bool:
        return any(d.has_changes for d in self.groves)

    def counts(self) -> dict[str, int]:
        total = dict.fromkeys(("added", "removed", "changed", "unchanged", "edgesAdded",
                               "edgesRemoved"), 0)
        for d in self.groves:
            for k, v in d.counts().items():
                total[k] += v
        return total


def _info(a: DesiredAgent) -> AgentInfo:
    return AgentInfo(a.name, a.spawned_by, a.profile, a.harness, a.runtime)


def changed_fields(before: Mapping[str, Any], after: Mapping[str, Any],
                   prefix: str = "") -> list[str]:
    """Dotted paths of the settings that differ; maps are compared key by key, other
    values (lists included) as a whole."""
    out: list[str] = []
    for key in sorted(set(before) | set(after)):
        a, b = before.get(key), after.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(changed_fields(a, b, f"{prefix}{key}."))
        else:
            out.append(prefix + key)
    return out


def edges_of(g: DesiredGrove | None) -> set[Edge]:
    """The spawn graph's edges by the rule of `graph.build` (parent -> child, then
    dependency -> dependent unless that pair is already linked), without importing a
    graph library: a diff of 1,000 agents must start fast."""
    if g is None:
        return set()
    out: dict[tuple[str, str], str] = {}
    for a in g.agents:
        if a.spawned_by and a.spawned_by in g.by_name:
            out[(a.spawned_by, a.name)] = graph.PARENT
        for d in sorted(a.depends_on):
            if d in g.by_name:
                out.setdefault((d, a.name), graph.DEPENDS)
    return {Edge(u, v, k) for (u, v), k in out.items()}


def compare(base: DesiredGrove | None, head: DesiredGrove | None) -> TopologyDiff:
    """The topology diff of one grove; None for a side where the grove does not exist."""
    either = head if head is not None else base
    if either is None:
        raise ValueError("compare needs at least one side")
    name = either.name
    b = base.by_name if base else {}
    h = head.by_name if head else {}
    added = tuple(_info(h[n]) for n in sorted(set(h) - set(b)))
    removed = tuple(_info(b[n]) for n in sorted(set(b) - set(h)))
    changed, unchanged = [], []
    for n in sorted(set(b) & set(h)):
        if b[n].settings == h[n].settings:
            unchanged.append(n)
        else:
            fields = changed_fields(b[n].settings_map(), h[n].settings_map())
            changed.append(AgentChange(_info(h[n]), tuple(fields)))
    eb, eh = edges_of(base), edges_of(head)
    nodes = {**{n: _info(a) for n, a in b.items()}, **{n: _info(a) for n, a in h.items()}}
    status = "added" if base is None else "removed" if head is None else "unchanged"
    diff = TopologyDiff(name, status, added, removed, tuple(changed), tuple(unchanged),
                        tuple(sorted(eh - eb)), tuple(sorted(eb - eh)),
                        tuple(nodes[n] for n in sorted(nodes)), tuple(sorted(eb | eh)))
    if status == "unchanged" and diff.has_changes:
        return dataclasses.replace(diff, status="changed")
    return diff


def diff_revisions(root: Path, groves: list[str] | None, base: str, head: str | None = None,
                   opts: Options | None = None) -> Report:
    """Compare the groves at git revision `base` with revision `head` (None: the working
    tree). A grove missing on one side is all added or all removed."""
    base_side, old = revisions.load_revision(root, base, "base", groves, opts)
    if head is None:
        head_side, new = revisions.load_worktree(root, groves, opts, known=old)
    else:
        head_side, new = revisions.load_revision(root, head, "head", groves, opts, known=old)
    names = sorted(set(old) | set(new))
    for n in groves or []:
        if n not in names:
            raise EngineError(f"grove {n}: not found at {base_side.describe()} nor at "
                              f"{head_side.describe()}")
    if not names:
        raise EngineError(f"no groves found under groves/ at {base_side.describe()} nor at "
                          f"{head_side.describe()}")
    return Report(base_side, head_side, tuple(compare(old.get(n), new.get(n)) for n in names))


def render(report: Report, fmt: str, limit: int = topology_render.MARKDOWN_LIMIT) -> str:
    """One report as `text`, `json` or `markdown` (at most `limit` characters)."""
    if fmt == "json":
        return topology_render.to_json(report)
    if fmt == "markdown":
        return topology_render.to_markdown(report, limit)
    if fmt == "text":
        return topology_render.to_text(report)
    raise UsageError(f"unknown format {fmt!r} (formats: {', '.join(FORMATS)})")


def plan_between(root: Path, groves: list[str] | None, base: str, head: str | None = None,
                 fmt: str = "markdown", opts: Options | None = None) -> tuple[str, bool]:
    """For `engine plan --base REF [--head REF] --format markdown|json|text`: the rendered
    topology diff and whether anything changed (for --detailed-exitcode)."""
    report = diff_revisions(root, groves, base, head, opts)
    return render(report, fmt), report.has_changes


plan_markdown = plan_between  # the name the GitOps issue uses
