"""`engine history [-g G] [--agent NAME] [--json] [--reverse]`: how each grove's topology
changed commit by commit, read from git (agents added, removed or changed, who spawned
whom, and the Spawned-By / Spawn-Request trailers), newest commit first.

Reads manifests at every commit that touched `groves/` without checking anything out;
commits whose manifests do not parse are reported as such and skipped over. With the
default `--rev HEAD`, spawns written to a working copy of spawned.yaml but not committed
are listed last, marked uncommitted. Who approved a child (policy.approval: manual) is read
from its commit's Spawn-Approved-By trailer; spawn requests people denied, which leave
nothing in git, are listed after the commits, from the event log.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any

from engine import history_scan as scan
from engine import ui
from engine.commands import _common
from engine.errors import EngineError
from engine.schema import did_you_mean
from engine.trust.reader import for_terminal


def register(sub: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(
        "history", help="how the groves' topology changed, commit by commit",
        description="List, from git, every commit that added, removed or changed agents: "
        "commit, author, date, who spawned whom and the Spawned-By / Spawn-Request "
        "trailers (Spawn-Approved-By: who approved a child). Newest commit first (--reverse: "
        "oldest first), then the spawn requests people denied (from the event log). With "
        "--agent, explain one agent: when and by whom it was added, its chain of parents, "
        "and what happened to it since.")
    _common.add_grove_arg(p)
    p.add_argument("--agent", metavar="NAME", help="focus on one agent (NAME or GROVE/NAME)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--reverse", action="store_true", help="oldest commit first")
    p.add_argument("--rev", default="HEAD", metavar="REF",
                   help="history leading to this revision (default: HEAD)")
    return p


def run(args: argparse.Namespace) -> int:
    r = _common.repo()
    found = scan.scan(r.root, args.rev, args.groves)
    if args.rev == "HEAD":
        scan.add_uncommitted(r.root, found, args.groves)
    events = found.events
    seen = {e.grove for e in events} | set(found.final)
    for g in args.groves or []:
        if g not in seen:
            raise EngineError(f"grove {g}: not found in the git history of groves/"
                              f"{did_you_mean(g, seen)}")
    denied = scan.denials(r.root, args.groves)
    if not args.reverse:
        denied.reverse()
    if args.agent:
        gname, _, name = args.agent.rpartition("/")
        mine = [d for d in denied if name in (d.parent, d.child) and gname in ("", d.grove)]
        try:
            story = explain(found, args.agent, args.groves)
        except EngineError:
            if len({d.grove for d in mine}) != 1:
                raise
            story = Story(mine[0].grove, name, [], None)  # a child only ever denied
        story.denials = [d for d in mine if d.grove == story.grove]
        if args.json:
            ui.print_json(story.to_json(args.reverse))
        else:
            ui.out(for_terminal(story.text(args.reverse).rstrip("\n")))
        return 0
    ordered = events if args.reverse else list(reversed(events))
    if args.json:
        ui.print_json({"order": "oldest-first" if args.reverse else "newest-first",
                       "commits": [e.to_json() for e in ordered],
                       "denials": [d.to_json() for d in denied]})
        return 0
    if not ordered:
        ui.out("no topology changes in the git history of groves/")
    for e in ordered:
        ui.out(for_terminal(e.text()))
    if denied:
        ui.out("spawn requests denied (from the event log):")
    for d in denied:
        ui.out(for_terminal(f"  x {d.line()}"))
    return 0


@dataclass
class Story:
    """Everything the history says about one agent."""

    grove: str
    name: str
    events: list[scan.Event]
    current: scan.AgentRec | None
    lineage: list[tuple[str, scan.Event | None]] = field(default_factory=list)
    uncommitted: scan.AgentRec | None = None  # written to spawned.yaml, not committed
    denials: list[scan.Denial] = field(default_factory=list)  # it asked, or was asked for

    def origin(self) -> scan.Event | None:
        adds = [e for e in self.events if self.name in e.added_names()]
        return adds[-1] if adds else None

    def to_json(self, reverse: bool) -> dict[str, Any]:
        origin = self.origin()
        rec = self.current or self.uncommitted
        return {
            "grove": self.grove, "agent": self.name, "exists": rec is not None,
            "committed": self.current is not None,
            "spawnedBy": rec.parent if rec else None,
            "addedIn": origin.commit.to_json() if origin else None,
            "lineage": [{"agent": n, "addedIn": e.commit.to_json() if e else None}
                        for n, e in self.lineage],
            "order": "oldest-first" if reverse else "newest-first",
            "commits": [e.to_json() for e in (self.events if reverse
                                              else reversed(self.events))],
            "denials": [d.to_json() for d in self.denials],
        }

    def _now(self) -> str:
        rec = self.current or self.uncommitted
        if rec is None:
            return "not in the manifests at HEAD"
        where = "exists at HEAD" if self.current else \
            "written to spawned.yaml but not committed"
        return f"{where}, spawned by {rec.parent}" if rec.parent else \
            f"{where}, a seed agent (no parent)"

    def text(self, reverse: bool) -> str:
        lines = [f"agent {self.grove}/{self.name}: {self._now()}"]
        origin = self.origin()
        if origin:
            lines.append(f"  added in {origin.commit.line()}")
            lines += [f"    {k}: {v}" for k, vs in sorted(origin.commit.trailers.items())
                      for v in vs if k in scan.TRAILERS]
        if len(self.lineage) > 1:
            lines.append("  lineage (seed first): " + " -> ".join(n for n, _ in self.lineage))
            for n, e in self.lineage[:-1]:
                lines.append(f"    {n}: added in " + (e.commit.line() if e else "unknown"))
        lines.append("  commits:" if self.events else "  no commit in the history names it")
        for e in (self.events if reverse else reversed(self.events)):
            lines.append("    " + e.text().replace("\n", "\n    "))
        if self.denials:
            lines.append("  spawn requests denied:")
        lines += [f"    x {d.line()}" for d in self.denials]
        return "\n".join(lines) + "\n"


def explain(found: scan.History, agent: str, groves: list[str] | None) -> Story:
    """The story of `agent` (NAME or GROVE/NAME) across the scanned history."""
    events = found.events
    known: dict[str, set[str]] = {g: set() for g in groves or []}
    for g, names in [*((e.grove, e.names()) for e in events), *found.final.items(),
                     *found.uncommitted.items()]:
        if not groves or g in known:
            known.setdefault(g, set()).update(names)
    grove, name = _common.pick_agent(agent, known, "never appears in the git history of")
    mine = [e for e in events if e.grove == grove]
    final = {**found.uncommitted.get(grove, {}), **found.final.get(grove, {})}
    story = Story(grove, name, [e for e in mine if name in e.names()],
                  found.final.get(grove, {}).get(name),
                  uncommitted=found.uncommitted.get(grove, {}).get(name))
    chain: list[str] = []
    cur: str | None = name
    hops = 0
    while cur and hops < 100:
        chain.append(cur)
        rec = final.get(cur) or _last_known(mine, cur)
        cur = rec.parent if rec else None
        hops += 1
    for n in reversed(chain):
        adds = [e for e in mine if n in e.added_names()]
        story.lineage.append((n, adds[-1] if adds else None))
    return story


def _last_known(events: list[scan.Event], name: str) -> scan.AgentRec | None:
    for e in reversed(events):
        for n, rec in e.removed:
            if n == name:
                return rec
    return None

