"""Ingest pass: every pending inbox request of a grove, answered exactly once; and
notifications to parents whose children have ended.

Called by `watch` on each event and by `apply` before it plans, with the grove's lock
held. Spawns are gated (`policy.Gate`), written back in one durable batch, then answered.
Every file an agent could have written (its earlier answers, results) is read through
`engine.trust.reader`, and one bad request never stops the pass: whatever goes wrong with
it becomes its rejection, and the other requests are still answered.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from engine import desired, events, inbox, inventory, paths, writeback
from engine.actual import Actual
from engine.desired import DesiredGrove
from engine.errors import EngineError
from engine.fsutil import atomic_write, failpoint
from engine.inbox import Answer, Request
from engine.manifest import GroveSource
from engine.observe import Runtimes
from engine.runtimes import FAILED, SUCCEEDED
from engine.trust import reader

if TYPE_CHECKING:
    from engine import policy

RESULT_BYTES = 64 * 1024  # an agent's result text (DoneReport), as written and as read
REPLAY_STATUSES = ("rejected", "delivered", "ok")


@dataclass
class Report:
    accepted: list[str] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)
    other: int = 0

    @property
    def wrote_manifests(self) -> bool:
        return bool(self.accepted)


@dataclass(frozen=True)
class Judged:
    """A pending spawn request the gate accepts: what the plan shows before it is taken in."""

    request: str
    spawn: writeback.Spawn

    @property
    def key(self) -> str:
        return f"{self.spawn.parent}/{self.request}"


def judge(root: Path, grove: DesiredGrove, opts: desired.Options,
          source: Callable[[], GroveSource] | None = None) -> list[Judged]:
    """The spawns that pending requests would add, judged by the gate as `process` would,
    with nothing written or answered (`plan` shows them; a cancelled apply leaves them)."""
    reqs, _ = inbox.scan(root, grove.name)
    spawns = [r for r in reqs if r.kind == "SpawnRequest"]
    if not spawns:
        return []
    recorded = writeback.recorded_keys(root, grove.name)
    from engine import policy

    gate = policy.Gate(root, grove, opts, source)
    out = []
    for req in spawns:
        if _key(req) in recorded or _answered(root, grove.name, req):
            continue  # taken in before, or answered: `process` replays its answer
        try:
            out.append(Judged(req.id, gate.check(req)))
        except EngineError:
            continue  # rejected when taken in, with its reason
        except Exception:  # one agent's request never stops the plan
            continue
    return out


def process(root: Path, grove: DesiredGrove, opts: desired.Options, rts: Runtimes,
            status_rows: object = None, only: Mapping[str, writeback.Spawn] | None = None,
            commit: bool | None = None,
            source: Callable[[], GroveSource] | None = None) -> Report:
    """Answer every pending request of `grove`. `status_rows(grove) -> list[dict]`
    answers StatusRequests (the caller has the observation at hand). `only`: the spawn
    requests to take in, each with the child a confirmed plan showed; a request the gate
    would accept otherwise (not shown, or rewritten since: another child) stays pending
    for the next plan, so nothing is written that was not confirmed. `commit`: commit the
    write-back (default: the grove's `writeBack.commit`)."""
    reqs, bad = inbox.scan(root, grove.name)
    if only is not None:
        recorded_keys = writeback.recorded_keys(root, grove.name)
        reqs = [r for r in reqs if r.kind != "SpawnRequest" or _key(r) in only
                or _key(r) in recorded_keys or _answered(root, grove.name, r)
                or not _acceptable(root, grove, opts, r, source)]
    report = Report()
    for ans in bad:
        inbox.answer(root, grove.name, ans)
        report.rejected.append((ans.request.id, reader.one_line(ans.reason, inbox.MAX_REASON)))
    if not reqs:
        return report
    recorded = writeback.recorded_keys(root, grove.name)
    from engine import policy  # only a pass with requests needs the gate

    gate = policy.Gate(root, grove, opts, source)
    answers: list[Answer] = []
    for req in reqs:
        answers.append(_guarded(root, grove, rts, req, status_rows, gate, recorded))
    fresh = [s for s in gate.accepted if f"{s.parent}/{s.request}" not in recorded]
    if only is not None:
        unconfirmed = {s.request for s in fresh if f"{s.parent}/{s.request}" not in only
                       or not _same_child(s, only[f"{s.parent}/{s.request}"])}
        fresh = [s for s in fresh if s.request not in unconfirmed]
        answers = [a for a in answers if a.request.id not in unconfirmed]
    writeback.append(root, grove.name, fresh,
                     grove.commit_spawns if commit is None else commit)
    failpoint("ingest-written")
    for ans in answers:
        inbox.answer(root, grove.name, ans)
        failpoint("ingest-answered")
        if ans.request.kind == "SpawnRequest":
            if ans.status == "accepted":
                report.accepted.append(ans.child)
            else:
                report.rejected.append((ans.request.id,
                                        reader.one_line(ans.reason, inbox.MAX_REASON)))
        else:
            report.other += 1
    return report


def _key(req: Request) -> str:
    """A spawn request's identity: the requesting agent and its own request id."""
    return f"{req.agent}/{req.id}"


def _same_child(a: writeback.Spawn, b: writeback.Spawn) -> bool:
    """The same child, whenever it was judged (the time it was judged aside)."""
    return dataclasses.replace(a, at="") == dataclasses.replace(b, at="")


def _answered(root: Path, grove: str, req: Request) -> bool:
    """Whether an answer sits beside the request that `process` would replay (written
    before a crash, or planted by the agent): then nothing is taken in for it. An answer
    that is not a regular file is not one (`_replay` ignores it too)."""
    if f"res-{req.id}.json" not in reader.entries(paths.inbox(root, grove), req.agent):
        return False
    try:
        reader.read_json(paths.inbox(root, grove), f"{req.agent}/res-{req.id}.json",
                         inbox.MAX_REQUEST_BYTES)
    except reader.Untrusted:
        return False
    return True


def _acceptable(root: Path, grove: DesiredGrove, opts: desired.Options, req: Request,
                source: Callable[[], GroveSource] | None = None) -> bool:
    """Whether the gate would accept `req` now (a request a plan did not show yet: it
    waits for the next plan, unless it is refused anyway, which is answered now)."""
    from engine import policy

    try:
        policy.Gate(root, grove, opts, source).check(req)
    except Exception:  # refused: answer it now
        return False
    return True


def _guarded(root: Path, grove: DesiredGrove, rts: Runtimes, req: Request,
             status_rows: object, gate: policy.Gate, recorded: set[str]) -> Answer:
    """The answer to one request; an error while handling it is its rejection."""
    try:
        old = _replay(root, grove.name, req, recorded)
        if old is not None:  # answered before a crash; finish marking it
            return old
        return _handle(root, grove, rts, req, status_rows, gate, recorded)
    except EngineError as e:
        return Answer(req, "rejected", e.summary)
    except Exception as e:  # a bug must not let one agent's request stop everyone's
        return Answer(req, "rejected", f"request {req.id}: internal error "
                                       f"({type(e).__name__})")


def _handle(root: Path, grove: DesiredGrove, rts: Runtimes, req: Request,
            status_rows: object, gate: policy.Gate, recorded: set[str]) -> Answer:
    if req.kind == "SpawnRequest":
        return _spawn(gate, req, recorded)
    if req.kind == "MessageRequest":
        return _message(root, grove, rts, req)
    if req.kind == "StatusRequest":
        rows = status_rows(grove) if callable(status_rows) else []
        return Answer(req, "ok", data={"grove": grove.name, "agents": rows})
    return _done(root, grove, req)


def _replay(root: Path, grove: str, req: Request, recorded: set[str]) -> Answer | None:
    """The answer already written for `req` (the engine stopped before moving the request
    aside), or None. The file is in the agent's inbox, so only its reason is taken from it:
    a spawn was accepted exactly when spawned.yaml records it."""
    try:
        old = reader.read_json(paths.state(root) / "inbox" / grove,
                               f"{req.agent}/res-{req.id}.json", inbox.MAX_REQUEST_BYTES)
    except reader.Untrusted:  # none (or not a file the engine wrote): answer afresh
        return None
    if not isinstance(old, dict):
        return None
    status = str(old.get("status", ""))
    if req.kind == "SpawnRequest":
        status = "accepted" if _key(req) in recorded else "rejected"
    elif status not in REPLAY_STATUSES:
        status = "rejected"
    child = reader.one_line(str(req.spec.get("name", "")), 64) if status == "accepted" \
        else ""
    return Answer(req, status, reader.one_line(str(old.get("reason", "")),
                                               inbox.MAX_REASON), child)


def _spawn(gate: policy.Gate, req: Request, recorded: set[str]) -> Answer:
    if _key(req) in recorded:  # written back before a crash: accepted exactly once
        return Answer(req, "accepted", child=reader.one_line(str(req.spec.get("name", "")),
                                                              64))
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
    text = reader.for_terminal(text)  # typed into a terminal: no escape sequences
    try:
        rts.get(a.runtime, a.host).send(grove.name, to, f"[message from {req.agent}] {text}")
    except EngineError as e:
        return Answer(req, "rejected", e.summary)
    return Answer(req, "delivered")


def _done(root: Path, grove: DesiredGrove, req: Request) -> Answer:
    result = str(req.spec.get("result") or "").encode()[:RESULT_BYTES]
    result = result.decode(errors="ignore").encode()  # no character cut in half
    atomic_write(result_path(root, grove.name, req.agent), result)
    return Answer(req, "ok")


def result_path(root: Path, grove: str, agent: str) -> Path:
    return paths.state(root) / "results" / grove / f"{agent}.txt"


def read_result(root: Path, grove: str, agent: str) -> str:
    """The result `agent` reported, read as untrusted text ("" when there is none)."""
    try:
        return reader.read_text(paths.state(root) / "results" / grove, f"{agent}.txt",
                                RESULT_BYTES)
    except reader.NotFound:
        return ""
    except reader.Untrusted:
        return "(the result file could not be read)"


def notify_parents(root: Path, grove: DesiredGrove, actual: Actual) -> int:
    """Tell each parent, once per ending, that a child Succeeded or Failed."""
    inv = actual.inventory
    sent = 0
    for name, rec in sorted(inv.agents.items()):
        obs = actual.observed.get(name)
        if not rec.parent or obs is None or obs.phase not in (SUCCEEDED, FAILED):
            continue
        mark = f"{obs.phase}:{rec.restarts}"
        if rec.notified == mark or _pending(root, grove.name, name):
            continue  # told already, or its last requests (a DoneReport) come first
        note = {"kind": "ChildEnded", "child": name, "phase": obs.phase,
                "exitCode": obs.exit_code, "reason": reader.one_line(obs.reason),
                "result": read_result(root, grove.name, name)}
        if not _deliver(root, grove.name, rec.parent, note):
            continue  # the parent's inbox cannot take it now: tried again next pass
        events.record(root, {"grove": grove.name, "event": "ChildEnded", "from": name,
                             "to": rec.parent, "status": obs.phase})
        rec.notified = mark
        sent += 1
    if sent:
        inventory.save(paths.state(root), inv)
    return sent


def _pending(root: Path, grove: str, agent: str) -> bool:
    """Whether `agent` left requests not ingested yet (the next pass takes them)."""
    return any(n.startswith("req-") and n.endswith(".json")
               for n in reader.entries(paths.state(root) / "inbox" / grove, agent))


def _deliver(root: Path, grove: str, parent: str, note: Mapping[str, object]) -> bool:
    """Write `note` into `parent`'s inbox, never through a symlink an agent left there."""
    box = inbox.inbox_dir(root, grove, parent)
    nid = f"{inventory.now().replace(':', '')}-{uuid.uuid4().hex[:6]}"
    try:
        if not box.is_symlink():
            box.mkdir(parents=True, exist_ok=True)
        reader.replace_file(box.parent, f"{parent}/notify-{nid}-{note['child']}.json",
                            json.dumps(note).encode())
    except (OSError, reader.Untrusted):
        return False
    return True
