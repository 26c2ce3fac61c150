"""Ingest pass: every pending inbox request of a grove, answered exactly once; and
notifications to parents whose children have ended.

Called by `watch` on each event and by `apply` before it plans, with the grove's lock
held. Spawns are gated (`inbox.Gate`), written back in one durable batch, then answered.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from engine import desired, events, inbox, inventory, writeback
from engine.desired import DesiredGrove
from engine.errors import EngineError
from engine.fsutil import atomic_write, failpoint
from engine.inbox import Answer, Request
from engine.observe import Actual, Runtimes
from engine.runtimes import FAILED, SUCCEEDED


@dataclass
class Report:
    accepted: list[str] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)
    other: int = 0

    @property
    def wrote_manifests(self) -> bool:
        return bool(self.accepted)


def process(root: Path, grove: DesiredGrove, opts: desired.Options, rts: Runtimes,
            status_rows: object = None) -> Report:
    """Answer every pending request of `grove`. `status_rows(grove) -> list[dict]`
    answers StatusRequests (the caller has the observation at hand)."""
    reqs, bad = inbox.scan(root, grove.name)
    report = Report()
    for ans in bad:
        inbox.answer(root, grove.name, ans)
        report.rejected.append((ans.request.id, ans.reason))
    if not reqs:
        return report
    recorded = writeback.recorded_requests(root, grove.name)
    gate = inbox.Gate(root, grove, opts)
    answers: list[Answer] = []
    for req in reqs:
        if req.path.with_name(f"res-{req.id}.json").exists():
            answers.append(_replay(req))  # answered before a crash; finish marking it
            continue
        if req.kind == "SpawnRequest":
            answers.append(_spawn(gate, req, recorded))
        elif req.kind == "MessageRequest":
            answers.append(_message(root, grove, rts, req))
        elif req.kind == "StatusRequest":
            rows = status_rows(grove) if callable(status_rows) else []
            answers.append(Answer(req, "ok", data={"grove": grove.name, "agents": rows}))
        else:
            answers.append(_done(root, grove, req))
    fresh = [s for s in gate.accepted if s.request not in recorded]
    writeback.append(root, grove.name, fresh, grove.commit_spawns)
    failpoint("ingest-written")
    for ans in answers:
        inbox.answer(root, grove.name, ans)
        failpoint("ingest-answered")
        if ans.request.kind == "SpawnRequest":
            if ans.status == "accepted":
                report.accepted.append(ans.child)
            else:
                report.rejected.append((ans.request.id, ans.reason))
        else:
            report.other += 1
    return report


def _replay(req: Request) -> Answer:
    try:
        old = json.loads(req.path.with_name(f"res-{req.id}.json").read_text())
    except (OSError, ValueError):
        old = {}
    return Answer(req, str(old.get("status", "rejected")), str(old.get("reason", "")),
                  str(old.get("child", "")))


def _spawn(gate: inbox.Gate, req: Request, recorded: set[str]) -> Answer:
    if req.id in recorded:  # written back before a crash: accepted exactly once
        return Answer(req, "accepted", child=str(req.spec.get("name", "")))
    try:
        spawn = gate.check(req)
    except EngineError as e:
        return Answer(req, "rejected", e.summary)
    return Answer(req, "accepted", child=spawn.name)


def _message(root: Path, grove: DesiredGrove, rts: Runtimes, req: Request) -> Answer:
    to, text = req.spec.get("to"), req.spec.get("text")
    if not isinstance(to, str) or to not in grove.by_name:
        return Answer(req, "rejected", f"no agent {to!r} in grove {grove.name}")
    if not isinstance(text, str) or not text.strip():
        return Answer(req, "rejected", "empty message")
    a = grove.by_name[to]
    try:
        rts.get(a.runtime, a.host).send(grove.name, to, f"[message from {req.agent}] {text}")
    except EngineError as e:
        return Answer(req, "rejected", e.summary)
    return Answer(req, "delivered")


def _done(root: Path, grove: DesiredGrove, req: Request) -> Answer:
    result = str(req.spec.get("result", ""))[:65536]
    atomic_write(result_path(root, grove.name, req.agent), result.encode())
    return Answer(req, "ok")


def result_path(root: Path, grove: str, agent: str) -> Path:
    return root / ".engine" / "results" / grove / f"{agent}.txt"


def notify_parents(root: Path, grove: DesiredGrove, actual: Actual) -> int:
    """Tell each parent, once per ending, that a child Succeeded or Failed."""
    inv = actual.inventory
    sent = 0
    for name, rec in sorted(inv.agents.items()):
        obs = actual.observed.get(name)
        if not rec.parent or obs is None or obs.phase not in (SUCCEEDED, FAILED):
            continue
        mark = f"{obs.phase}:{rec.restarts}"
        if rec.notified == mark:
            continue
        box = inbox.inbox_dir(root, grove.name, rec.parent)
        box.mkdir(parents=True, exist_ok=True)
        res = result_path(root, grove.name, name)
        note = {"kind": "ChildEnded", "child": name, "phase": obs.phase,
                "exitCode": obs.exit_code, "reason": obs.reason,
                "result": res.read_text() if res.exists() else ""}
        nid = f"{inventory.now().replace(':', '')}-{uuid.uuid4().hex[:6]}"
        atomic_write(box / f"notify-{nid}-{name}.json", json.dumps(note).encode())
        events.record(root, {"grove": grove.name, "event": "ChildEnded", "from": name,
                             "to": rec.parent, "status": obs.phase})
        rec.notified = mark
        sent += 1
    if sent:
        inventory.save(root / ".engine", inv)
    return sent
