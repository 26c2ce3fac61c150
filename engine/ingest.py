"""Ingest pass: every pending inbox request of a grove, answered exactly once; and
notifications to parents whose children have ended.

Called by `watch` on each event and by `apply` before it plans, with the grove's lock
held. Spawns are gated (`policy.Gate`), written back in one durable batch, then answered.
Every file an agent could have written (its earlier answers, results) is read through
`engine.trust.reader`, and one bad request never stops the pass: whatever goes wrong with
it becomes its rejection, and the other requests are still answered.

Approval (`policy.approval: manual`): a spawn the gate accepts whose child needs a person
is neither written back nor answered; it waits, pending approval, until `engine approve`
or `engine deny` (`decide`, called by those commands with the grove's lock held) records
a decision in `engine.approval`'s file and answers it. An approval holds only for the
child that was judged (its digest); a denial recorded before a crash is answered by the
next pass.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from engine import approval, desired, events, inbox, inventory, paths, writeback
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
PENDING = "pending"  # a Judged's approval, an Answer's status: waits for a person


@dataclass
class Report:
    accepted: list[str] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)
    other: int = 0
    waiting: list[str] = field(default_factory=list)  # `parent/id` pending approval

    @property
    def wrote_manifests(self) -> bool:
        return bool(self.accepted)


@dataclass(frozen=True)
class Judged:
    """A pending spawn request the gate accepts: what the plan shows before it is taken in."""

    request: str
    spawn: writeback.Spawn
    approval: str = ""  # "" no person needed; "approved" by one; PENDING: waits for one

    @property
    def key(self) -> str:
        return f"{self.spawn.parent}/{self.request}"


def judge(root: Path, grove: DesiredGrove, opts: desired.Options,
          source: Callable[[], GroveSource] | None = None) -> list[Judged]:
    """The spawns that pending requests would add (`review`'s first list)."""
    return review(root, grove, opts, source)[0]


def review(root: Path, grove: DesiredGrove, opts: desired.Options,
           source: Callable[[], GroveSource] | None = None
           ) -> tuple[list[Judged], list[Judged]]:
    """(the spawns that pending requests would add, the ones waiting for a person's
    approval), judged by the gate as `process` would, with nothing written or answered
    (`plan` shows them; a cancelled apply leaves them). A child waiting for approval does
    not count against the policy's limits for the others."""
    reqs, _ = inbox.scan(root, grove.name)
    spawns = [r for r in reqs if r.kind == "SpawnRequest"]
    if not spawns:
        return [], []
    recorded = writeback.recorded_keys(root, grove.name)
    decisions = approval.load(root, grove.name)
    from engine import policy

    gate = policy.Gate(root, grove, opts, source)
    out, waiting = [], []
    for req in spawns:
        if _key(req) in recorded or _answered(root, grove.name, req) \
                or _denial(decisions, req) is not None:
            continue  # taken in, answered or denied before: `process` answers it
        try:
            spawn = gate.check(req)
        except EngineError:
            continue  # rejected when taken in, with its reason
        except Exception:  # one agent's request never stops the plan
            continue
        state = _approval(grove, spawn, decisions)
        if state == PENDING:
            _set_aside(gate, spawn)
            if len(spawn.task) <= approval.MAX_TASK:  # longer: refused when taken in
                waiting.append(Judged(req.id, spawn, PENDING))
        else:
            out.append(Judged(req.id, spawn, state))
    return out, waiting


def process(root: Path, grove: DesiredGrove, opts: desired.Options, rts: Runtimes,
            status_rows: object = None, only: Mapping[str, writeback.Spawn] | None = None,
            commit: bool | None = None,
            source: Callable[[], GroveSource] | None = None) -> Report:
    """Answer every pending request of `grove`. `status_rows(grove) -> list[dict]`
    answers StatusRequests (the caller has the observation at hand). `only`: the spawn
    requests to take in, each with the child a confirmed plan showed; a request the gate
    would accept otherwise (not shown, or rewritten since: another child) stays pending
    for the next plan, so nothing is written that was not confirmed. `commit`: commit the
    write-back (default: the grove's `writeBack.commit`). A spawn waiting for a person's
    approval is left pending (announced once: `SpawnPendingApproval`); a denied one is
    answered with its denial."""
    reqs, bad = inbox.scan(root, grove.name)
    decisions = _decisions(root, grove.name)
    if only is not None:
        recorded_keys = writeback.recorded_keys(root, grove.name)
        reqs = [r for r in reqs if r.kind != "SpawnRequest" or _key(r) in only
                or _key(r) in recorded_keys or _answered(root, grove.name, r)
                or _denial(decisions, r) is not None
                or not _waits_for_plan(root, grove, opts, r, source, decisions)]
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
        answers.append(_guarded(root, grove, rts, req, status_rows, gate, recorded,
                                decisions))
    waiting = [a for a in answers if a.status == PENDING]  # neither written nor answered
    answers = [a for a in answers if a.status != PENDING]
    waiting, refused = _bounded(grove, waiting)
    answers += refused
    report.waiting = [_key(a.request) for a in waiting]
    _announce(root, grove.name, waiting)
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


def _waits_for_plan(root: Path, grove: DesiredGrove, opts: desired.Options, req: Request,
                    source: Callable[[], GroveSource] | None,
                    decisions: Mapping[str, approval.Entry]) -> bool:
    """Whether `req`, which a plan did not show yet, waits for the next plan: the gate
    accepts it now and it needs no person (or one approved it). One the gate refuses is
    answered now; one waiting for approval goes through the pass to be announced."""
    from engine import policy

    entry = decisions.get(_key(req))
    if policy.needs_approval(grove, req.agent) and (
            entry is None or entry.decision != approval.APPROVED):
        return False  # waits for a person (or is refused): the pass says which
    try:
        spawn = policy.Gate(root, grove, opts, source).check(req)
    except Exception:  # refused: answer it now
        return False
    return _approval(grove, spawn, decisions) != PENDING


# -- approval by a person ---------------------------------------------------------------

def _decisions(root: Path, grove: str) -> dict[str, approval.Entry]:
    """The recorded decisions; none when the file cannot be read (then every child that
    needs a person keeps waiting: nothing is taken in without one)."""
    try:
        return approval.load(root, grove)
    except EngineError:
        return {}


def _approval(grove: DesiredGrove, spawn: writeback.Spawn,
              decisions: Mapping[str, approval.Entry]) -> str:
    """"" when `spawn` needs no person, "approved" when one approved exactly this child,
    PENDING otherwise."""
    from engine import policy

    if not policy.needs_approval(grove, spawn.parent):
        return ""
    entry = decisions.get(approval.key(spawn.parent, spawn.request))
    if entry is not None and entry.approves(approval.digest(spawn.document())):
        return approval.APPROVED
    return PENDING


def _denial(decisions: Mapping[str, approval.Entry], req: Request) -> str | None:
    """The answer's reason when a person denied `req`, else None."""
    entry = decisions.get(_key(req))
    if entry is None or entry.decision != approval.DENIED:
        return None
    return f"denied by {entry.by}: {entry.reason}"


def _set_aside(gate: policy.Gate, spawn: writeback.Spawn) -> None:
    """Take a child waiting for a person out of what the gate counts and has resolved."""
    gate.accepted.remove(spawn)
    gate.forget(spawn.name)


def _bounded(grove: DesiredGrove, waiting: list[Answer]) -> tuple[list[Answer],
                                                                   list[Answer]]:
    """At most policy.maxChildren requests of one parent wait for a person; the newer
    ones are refused (an agent cannot bury people, or the decisions file, in requests)."""
    kept: list[Answer] = []
    refused: list[Answer] = []
    per: dict[str, int] = {}
    for ans in sorted(waiting, key=lambda a: a.request.id):
        n = per[ans.request.agent] = per.get(ans.request.agent, 0) + 1
        if n > max(grove.policy.max_children, 1):
            refused.append(Answer(ans.request, "rejected", (
                f"too many spawn requests wait for approval ({n - 1}, policy maxChildren "
                f"{grove.policy.max_children}): wait for a decision")))
        else:
            kept.append(ans)
    return kept, refused


def _announce(root: Path, grove: str, waiting: list[Answer]) -> None:
    """Record `SpawnPendingApproval` once per request, with what it asks for and the
    digest of that child (an approval must be of exactly what was announced). Entries of
    requests no longer waiting, never decided, are dropped. Remembered in the approvals
    file; when that cannot be written, the next pass tries again."""
    try:
        with approval.update(root, grove) as entries:
            live = {_key(a.request) for a in waiting}
            for key in [k for k, e in entries.items() if not e.decision and k not in live]:
                del entries[key]
            for ans in waiting:
                key = _key(ans.request)
                entry = entries.get(key) or approval.Entry(child=ans.child)
                seen = str(ans.data.get("digest", ""))
                if entry.announced and entry.seen == seen:
                    continue
                entries[key] = dataclasses.replace(entry, announced=True, seen=seen,
                                                   child=ans.child)
                events.record(root, {"grove": grove, "event": "SpawnPendingApproval",
                                     "from": ans.request.agent, "id": ans.request.id,
                                     "child": ans.child, "digest": approval.short(seen),
                                     "changed": bool(entry.seen and entry.seen != seen),
                                     **{k: ans.data.get(k, "") for k in
                                        ("task", "profile", "harness")}})
    except (EngineError, OSError):
        return


@dataclass(frozen=True)
class Decided:
    """What `decide` did with one request."""

    key: str  # parent/request id
    child: str
    status: str  # accepted (approved and taken in), rejected (denied, or the gate refused)
    reason: str = ""  # the rejection's reason, as answered
    note: str = ""  # why the write-back was not committed ("" when it was or not asked)


def _same_as_announced(root: Path, grove: str, req: Request, digest: str,
                       given: str | None) -> None:
    """Refuse to approve a child other than one people were shown: with `given` (approve
    --digest, as the plan and the notification show it), exactly that child; without it,
    the child as its SpawnPendingApproval announced it. A request a pass has not
    announced in its present form is not approved blind."""
    key = _key(req)
    hexed = digest.removeprefix("sha256:")
    if given is not None:
        want = given.strip().lower().removeprefix("sha256:")
        if len(want) < approval.SHOWN or any(c not in "0123456789abcdef" for c in want):
            raise EngineError(f"--digest: give the {approval.SHOWN} hex digits engine plan "
                              "shows for the request")
        if not hexed.startswith(want):
            raise EngineError(f"request {key} in grove {grove}: asks for another child now "
                              f"(digest {approval.short(digest)}, not {want[:32]}); check "
                              "it with engine plan")
        return
    entry = approval.load(root, grove).get(key)
    if entry is None or not entry.seen:
        raise EngineError(f"request {key} in grove {grove}: not announced yet; the next pass "
                          "(engine apply, or the controller) announces it, or approve what "
                          "engine plan shows with --digest")
    if entry.seen != digest:
        raise EngineError(f"request {key} in grove {grove}: changed since it was announced "
                          "(the agent rewrote it); the next pass (engine apply, or the "
                          "controller) announces it as it is now: check it, then approve")


def decide(root: Path, grove: DesiredGrove, opts: desired.Options, ref: str, by: str,
           deny: str | None = None, seen: str | None = None) -> Decided:
    """Approve (`deny` None) or deny (`deny`: the reason) the spawn request `ref` (its id,
    or `parent/id`) that waits for a person, then answer it: an approved child is judged
    by the gate again (the policy may have changed) and, accepted, written back; a denied
    one is rejected with "denied by WHO: REASON". The decision is recorded first, so a
    crash leaves the rest to the next pass. A request that is unknown, decided already or
    not waiting for approval is an EngineError, with nothing changed. The caller holds
    the grove's lock."""
    req = _waiting_request(root, grove, ref)
    from engine import policy

    spawn, refused = None, ""
    try:
        spawn = policy.Gate(root, grove, opts).check(req)
    except EngineError as e:
        refused = e.summary
    child = spawn.name if spawn else reader.one_line(str(req.spec.get("name", "")), 64)
    if deny is None and spawn is not None:
        _same_as_announced(root, grove.name, req, approval.digest(spawn.document()), seen)
    _record(root, grove.name, req, child,
            approval.digest(spawn.document()) if spawn else "", by, deny)
    failpoint("approval-recorded")
    if deny is not None or spawn is None:
        why = f"denied by {by}: {deny}" if deny is not None else refused
        inbox.answer(root, grove.name, Answer(req, "rejected", why))
        return Decided(_key(req), child, "rejected", reader.one_line(why, inbox.MAX_REASON))
    note = writeback.append(root, grove.name, [spawn], grove.commit_spawns)
    failpoint("approval-written")
    inbox.answer(root, grove.name, Answer(req, "accepted", child=spawn.name))
    return Decided(_key(req), child, "accepted", note=note)


def _waiting_request(root: Path, grove: DesiredGrove, ref: str) -> Request:
    """The request `ref` names, when it waits for a person's decision; EngineError
    saying why not otherwise."""
    from engine import policy

    parent, _, rid = ref.rpartition("/")
    if not inbox.REQUEST_ID.fullmatch(rid) or (parent and not inbox.NAME.fullmatch(parent)):
        raise EngineError(f"request {ref!r}: not a request id (ID or PARENT/ID)")
    where = f"in grove {grove.name}"
    reqs = [r for r in inbox.scan(root, grove.name)[0]
            if r.kind == "SpawnRequest" and r.id == rid and parent in ("", r.agent)]
    if not reqs:
        raise EngineError(_gone(root, grove.name, parent, rid) or f"request {ref} {where}: "
                          "no spawn request with this id waits for approval (engine plan "
                          "lists those that do)")
    if len(reqs) > 1:
        raise EngineError(f"request {rid} {where}: sent by several agents "
                          f"({', '.join(sorted(r.agent for r in reqs))}); say PARENT/{rid}")
    req, pol = reqs[0], grove.policy
    if _key(req) in writeback.recorded_keys(root, grove.name) \
            or _answered(root, grove.name, req):
        raise EngineError(f"request {_key(req)} {where}: already answered")
    if not policy.needs_approval(grove, req.agent):
        why = "policy.approval is auto" if pol.approval != "manual" else \
            f"{req.agent} is not an agent of the grove" if req.agent not in grove.by_name \
            else (f"its child would be at depth {grove.by_name[req.agent].depth + 1}, "
                  f"below policy.approvalFromDepth {pol.approval_from_depth}")
        raise EngineError(f"request {_key(req)} {where}: does not wait for approval "
                          f"({why}); engine apply answers it")
    return req


def _gone(root: Path, grove: str, parent: str, rid: str) -> str:
    """Why a request no longer in an inbox is not waiting: decided, taken in or answered
    ("" when nothing is known of it)."""
    def mine(key: str) -> bool:
        who, _, ident = key.rpartition("/")
        return ident == rid and parent in ("", who)

    where = f"in grove {grove}"
    done = sorted((k, e) for k, e in approval.load(root, grove).items() if e.decision
                  and mine(k))
    if done:
        key, e = done[0]
        return f"request {key} {where}: already {e.decision} by {e.by} at {e.at}"
    base = paths.inbox(root, grove)
    taken = sorted(k for k in writeback.recorded_keys(root, grove) if mine(k))
    answered = [f"{a}/{rid}" for a in reader.subdirs(base) if inbox.NAME.fullmatch(a)
                and mine(f"{a}/{rid}") and f"res-{rid}.json" in reader.entries(base, a)]
    if taken or answered:
        return f"request {(taken or answered)[0]} {where}: already answered"
    return ""


def _record(root: Path, grove: str, req: Request, child: str, digest: str, by: str,
            deny: str | None) -> None:
    """Record the decision on `req` (refused when one stands for this child already),
    then its event."""
    key = _key(req)
    with approval.update(root, grove) as entries:
        old = entries.get(key) or approval.Entry()
        if old.decision == approval.DENIED or old.approves(digest):
            raise EngineError(f"request {key} in grove {grove}: already {old.decision} by "
                              f"{old.by} at {old.at} (engine apply answers it)")
        entries[key] = approval.Entry(approval.APPROVED if deny is None else approval.DENIED,
                                      by, inventory.now(), deny or "", child, digest,
                                      old.announced)
    events.record(root, {"grove": grove, "event": "SpawnApproved" if deny is None
                         else "SpawnDenied", "from": req.agent, "id": req.id,
                         "child": child, "by": by, "reason": deny or ""})


def _guarded(root: Path, grove: DesiredGrove, rts: Runtimes, req: Request,
             status_rows: object, gate: policy.Gate, recorded: set[str],
             decisions: Mapping[str, approval.Entry]) -> Answer:
    """The answer to one request; an error while handling it is its rejection."""
    try:
        old = _replay(root, grove.name, req, recorded)
        if old is not None:  # answered before a crash; finish marking it
            return old
        return _handle(root, grove, rts, req, status_rows, gate, recorded, decisions)
    except EngineError as e:
        return Answer(req, "rejected", e.summary)
    except Exception as e:  # a bug must not let one agent's request stop everyone's
        return Answer(req, "rejected", f"request {req.id}: internal error "
                                       f"({type(e).__name__})")


def _handle(root: Path, grove: DesiredGrove, rts: Runtimes, req: Request,
            status_rows: object, gate: policy.Gate, recorded: set[str],
            decisions: Mapping[str, approval.Entry]) -> Answer:
    if req.kind == "SpawnRequest":
        return _spawn(grove, gate, req, recorded, decisions)
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


def _spawn(grove: DesiredGrove, gate: policy.Gate, req: Request, recorded: set[str],
           decisions: Mapping[str, approval.Entry]) -> Answer:
    if _key(req) in recorded:  # written back before a crash: accepted exactly once
        return Answer(req, "accepted", child=reader.one_line(str(req.spec.get("name", "")),
                                                              64))
    denied = _denial(decisions, req)
    if denied is not None:  # denied before a crash: answered now
        return Answer(req, "rejected", denied)
    try:
        spawn = gate.check(req)
    except EngineError as e:
        return Answer(req, "rejected", e.summary)
    if _approval(grove, spawn, decisions) == PENDING:
        _set_aside(gate, spawn)
        if len(spawn.task) > approval.MAX_TASK:
            return Answer(req, "rejected", (
                f"a spawn that waits for approval must have a task of at most "
                f"{approval.MAX_TASK} characters (all of it is shown to who approves)"))
        return Answer(req, PENDING, child=spawn.name, data={
            "digest": approval.digest(spawn.document()),
            "task": reader.visible(spawn.task), "profile": spawn.profile,
            "harness": spawn.harness})
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
