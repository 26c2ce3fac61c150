"""Ingest: requests agents left in their inboxes -> policy gate -> write-back and answers.

Called by `watch` (on every inbox event) and at the start of every `apply`, with the grove's
lock held. An agent's identity is its inbox directory, never what the request claims. Each
request ends exactly once, accepted or rejected: a spawn's id is written into spawned.yaml
before its answer (`res-<id>.json`) is written and the request is marked done, so a crash
at any point is resumed without a duplicate or a lost request. Every outcome goes to the
event log `.engine/events.jsonl`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine import desired, events, inventory, manifest, writeback
from engine.desired import DesiredGrove
from engine.errors import EngineError, InvalidManifests
from engine.fsutil import atomic_write

MAX_REQUEST_BYTES = 64 * 1024
NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$")
TEMPLATE = re.compile(r"\{\{|\{%|\{#")
ACCESS_RANK = {"read-only": 0, "read-write": 1}
KINDS = {"SpawnRequest", "MessageRequest", "StatusRequest", "DoneReport"}


@dataclass(frozen=True)
class Request:
    agent: str  # whose inbox it was found in
    path: Path
    id: str
    kind: str
    spec: dict[str, Any]


@dataclass
class Answer:
    request: Request
    status: str  # accepted, rejected, delivered, ok
    reason: str = ""
    child: str = ""
    data: dict[str, Any] = field(default_factory=dict)


def inbox_dir(root: Path, grove: str, agent: str) -> Path:
    return root / ".engine" / "inbox" / grove / agent


def scan(root: Path, grove: str) -> tuple[list[Request], list[Answer]]:
    """Pending requests, oldest first; unreadable ones come back as rejections."""
    base = root / ".engine" / "inbox" / grove
    reqs: list[Request] = []
    bad: list[Answer] = []
    if not base.is_dir():
        return reqs, bad
    for d in sorted(p for p in base.iterdir() if p.is_dir()):
        for f in sorted(d.glob("req-*.json")):
            rid = f.name[4:-5]
            try:
                reqs.append(_parse(d.name, f, rid))
            except ValueError as e:
                bad.append(Answer(Request(d.name, f, rid, "Invalid", {}), "rejected", str(e)))
    return reqs, bad


def _parse(agent: str, f: Path, rid: str) -> Request:
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,80}", rid):
        raise ValueError("bad request id")
    if f.stat().st_size > MAX_REQUEST_BYTES:
        raise ValueError(f"request is larger than {MAX_REQUEST_BYTES} bytes")
    try:
        doc = json.loads(f.read_bytes().decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"request is not valid JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("kind") not in KINDS or \
            not isinstance(doc.get("spec"), dict):
        raise ValueError("request must be a JSON object with kind "
                         f"({', '.join(sorted(KINDS))}) and spec")
    return Request(agent, f, rid, str(doc["kind"]), doc["spec"])


def answer(root: Path, grove: str, ans: Answer) -> None:
    """Write the answer next to the request, then mark the request done (in that order)."""
    req = ans.request
    doc = {"id": req.id, "status": ans.status, "reason": ans.reason, "child": ans.child,
           "data": ans.data}
    atomic_write(req.path.with_name(f"res-{req.id}.json"), json.dumps(doc).encode())
    with contextlib.suppress(FileNotFoundError):
        os.replace(req.path, req.path.with_name(f"done-{req.id}.json"))
    events.record(root, {"grove": grove, "event": f"{req.kind}", "id": req.id,
                         "from": req.agent, "status": ans.status, "reason": ans.reason,
                         "child": ans.child})


# -- the spawn policy gate --------------------------------------------------------------

class Gate:
    """Checks spawn requests against the grove's policy, counting earlier accepted ones."""

    def __init__(self, root: Path, grove: DesiredGrove, opts: desired.Options) -> None:
        self.root = root
        self.grove = grove
        self.opts = opts
        self.accepted: list[writeback.Spawn] = []
        self._src: manifest.GroveSource | None = None

    def check(self, req: Request) -> writeback.Spawn:
        g, spec = self.grove, req.spec
        parent = g.by_name.get(req.agent)
        if parent is None:
            raise EngineError(f"{req.agent} is not an agent of grove {g.name}")
        unknown = set(spec) - {"name", "task", "profile", "harness", "dependsOn"}
        if unknown:
            raise EngineError(f"unknown field {sorted(unknown)[0]!r} in spawn request")
        name, task = spec.get("name"), spec.get("task")
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise EngineError(f"child name {name!r} is not valid (lower-case letters, digits "
                              "and '-', at most 40 characters)")
        if not isinstance(task, str) or not task.strip():
            raise EngineError("the task must be a non-empty string")
        deps = spec.get("dependsOn") or []
        values = [name, task, str(spec.get("profile", "")), str(spec.get("harness", "")),
                  *map(str, deps)]
        if any(TEMPLATE.search(v) for v in values):
            raise EngineError("template syntax ({{ }}, {% %}) is not allowed in spawn requests")
        taken = set(g.by_name) | {s.name for s in self.accepted}
        if name in taken:
            raise EngineError(f"an agent named {name} already exists in grove {g.name}")
        pol = g.policy
        if len(taken) + 1 > pol.max_agents:
            raise EngineError(f"grove {g.name} is at policy.maxAgents {pol.max_agents}")
        if parent.depth + 1 > pol.max_depth:
            raise EngineError(f"spawn depth {parent.depth + 1} would exceed policy.maxDepth "
                              f"{pol.max_depth}")
        kids = sum(1 for a in g.agents if a.spawned_by == parent.name) + sum(
            1 for s in self.accepted if s.parent == parent.name)
        if kids + 1 > pol.max_children:
            raise EngineError(f"{parent.name} already has {kids} children "
                              f"(policy.maxChildren {pol.max_children})")
        profile = str(spec.get("profile") or parent.profile)
        if profile not in parent.allow_profiles:
            allowed = ", ".join(parent.allow_profiles) or "none"
            raise EngineError(f"profile {profile} is not allowed for children of "
                              f"{parent.name} (spawn.allowProfiles: {allowed})")
        harness = str(spec.get("harness") or parent.harness)
        if parent.allow_harnesses is not None and harness not in parent.allow_harnesses:
            raise EngineError(f"harness {harness} is not allowed for children of "
                              f"{parent.name}")
        for d in deps:
            if d not in taken:
                raise EngineError(f"dependsOn names unknown agent {d!r}")
        # the profile checked here is the one written: a child never falls back to a
        # grove default its parent may not hand out
        spawn = writeback.Spawn(name, task, parent.name, req.id, inventory.now(), profile,
                                str(spec.get("harness", "")), tuple(deps))
        try:
            self._no_escalation(parent, spawn)
        except EngineError:
            self.forget(spawn.name)
            raise
        self.accepted.append(spawn)
        return spawn

    def _no_escalation(self, parent: desired.DesiredAgent, spawn: writeback.Spawn) -> None:
        """Resolve the child as it would run and compare it with its parent."""
        if self._src is None:
            self._src = manifest.load_grove(self.grove.directory, self.root)
        src = self._src
        doc = spawn.document()
        src.agents[spawn.name] = manifest.Entry(spawn.name, doc["spec"], src.grove.doc,
                                                ("spec",))
        try:
            child = desired.build(src, self.opts).by_name[spawn.name]
        except InvalidManifests as e:
            del src.agents[spawn.name]
            raise EngineError(e.diagnostics[0].message) from None
        if ACCESS_RANK.get(child.access, 1) > ACCESS_RANK.get(parent.access, 1):
            raise EngineError(f"child would get {child.access} access; parent has "
                              f"{parent.access}")
        if _net_rank(child.network) > _net_rank(parent.network) or (
                _net_rank(child.network) == 1 and child.network != parent.network):
            raise EngineError(f"child would get network {child.network}; parent has "
                              f"{parent.network}")
        extra = {c.name for c in child.credentials} - {c.name for c in parent.credentials}
        if extra:
            raise EngineError(f"child would get credentials its parent does not have: "
                              f"{', '.join(sorted(extra))}")
        if child.privileged and not parent.privileged:
            raise EngineError("child would be privileged; parent is not")
        if child.runtime == "local" and parent.runtime != "local":
            raise EngineError(f"child would run unsandboxed (runtime local); parent runs on "
                              f"{parent.runtime}")

    def forget(self, name: str) -> None:
        """Drop a child that failed the escalation check from the cached sources."""
        if self._src is not None:
            self._src.agents.pop(name, None)


def _net_rank(network: str) -> int:
    return 0 if network == "none" else 2 if network == "host" else 1
