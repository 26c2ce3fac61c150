"""What agents' harnesses say about themselves: usage, and "needs input".

Called by the converge pass (stage 7, before spawn requests are taken in) with the grove's
lock held and the pass's inventory, and by `status` without saving (reports no pass has
taken yet are shown as if taken). The agent-side client turns the harness's own signals
(Claude Code's hooks and stream-json result, codex's `notify` program and `--json` turns)
into `AgentReport` requests in the agent's inbox; here each becomes state on the agent's
inventory record:

- `usage`: the run's cumulative tokens, cost and turns (engine.usage), which never go
  down within a run; a new run (restart, resume, replacement) starts from the totals;
- `state: waiting` (with the harness's message) sets the WaitingForInput condition and
  records a `NeedsInput` event once per wait; `state: working` clears it.

An interactive agent that has reported done (`engine done`) and then waits is ended by
typing its harness's exit text (`/exit`), so it ends Succeeded as a headless one would.

A report is the agent's word: every field is checked (engine.usage, one line, capped), an
agent can only report about itself (its inbox is its identity), and reports are removed
once taken, never answered.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from pathlib import Path

from engine import events, inbox, inventory, paths, usage
from engine.desired import DesiredGrove
from engine.errors import EngineError
from engine.inventory import Inventory, Record
from engine.observe import Runtimes
from engine.runtimes import RUNNING
from engine.trust import reader

MAX_MESSAGE = 500  # characters of a WaitingForInput message kept
TELL_EVERY = 30.0  # seconds: at most one NeedsInput event (a notification) per agent
WAITING = "WaitingForInput"


def run_mark(rec: Record) -> str:
    """Which run of the agent is current: a restart, resume or replacement starts another."""
    return f"{rec.restarts}:{rec.created_at}"


def pending(root: Path, grove: str) -> list[inbox.Request]:
    """The reports (and done reports) waiting in the grove's inboxes. A reader that does
    not hold the lock scans them before it loads the inventory: a pass saves the
    inventory before it removes what it took, so the reader sees one or the other."""
    return inbox.scan(root, grove, reports=True)[0]


def take(root: Path, grove: DesiredGrove, inv: Inventory, rts: Runtimes | None = None,
         phases: dict[str, str] | None = None, save: bool = True,
         reqs: list[inbox.Request] | None = None) -> int:
    """Apply every pending AgentReport of `grove` (`reqs`: as `pending` found them) to
    `inv` (and remove them when `save`); end interactive agents that are done and waiting
    (`rts` and their `phases` given). Returns how many reports were taken."""
    if reqs is None:
        reqs = pending(root, grove.name)
    taken = 0
    changed = False
    done: list[inbox.Request] = []
    for req in sorted(reqs, key=lambda r: r.id):
        rec = inv.agents.get(req.agent)
        if req.kind == "DoneReport" and rec is not None:
            if not rec.done_mark.startswith(run_mark(rec)):
                rec.done_mark, changed = run_mark(rec), True
            continue
        if req.kind != inbox.REPORT:
            continue
        taken += 1
        if rec is not None:
            # one agent's report never stops the pass: a broken one is dropped
            with contextlib.suppress(Exception):
                _apply(root, grove.name, req.agent, rec, req.spec, record=save)
        done.append(req)
    if save and rts is not None:
        changed = _end_done(grove, inv, rts, phases or {}) or changed
    if (taken or changed) and save:
        inventory.save(paths.state(root), inv, bump=False)
    if save:  # only once their effect is saved: a reader never sees neither
        for req in done:
            inbox.consume(root, grove.name, req)
    return taken


def _apply(root: Path, grove: str, agent: str, rec: Record, spec: dict[str, object],
           record: bool) -> None:
    mark = run_mark(rec)
    if rec.run_mark != mark:  # a new run: what the last one used joins the totals
        rec.usage = usage.of_record(rec.usage, rec.run_usage).to_json()
        rec.run_usage, rec.run_mark = {}, mark
    new = usage.parse(spec.get("usage"))
    if new.known:
        rec.run_usage = usage.monotonic(usage.parse(rec.run_usage), new).to_json()
    state = spec.get("state")
    if state == "working":
        rec.waiting = rec.waiting_since = ""
    elif state == "waiting":
        message = reader.one_line(reader.for_terminal(str(spec.get("message") or "")),
                                  MAX_MESSAGE) or "waiting for input"
        if not rec.waiting and record and _may_tell(rec):
            rec.needs_input_told = inventory.now()
            events.record(root, {"grove": grove, "agent": agent, "event": "NeedsInput",
                                 "message": message})
        if not rec.waiting:
            rec.waiting_since = inventory.now()
        rec.waiting = message


def _may_tell(rec: Record) -> bool:
    """Whether a new wait may be told: an agent toggling between working and waiting
    cannot flood people with notifications (one per TELL_EVERY seconds)."""
    if not rec.needs_input_told:
        return True
    try:
        last = dt.datetime.strptime(rec.needs_input_told, "%Y-%m-%dT%H:%M:%SZ").replace(
            tzinfo=dt.UTC)
    except ValueError:
        return True
    return (dt.datetime.now(dt.UTC) - last).total_seconds() >= TELL_EVERY


def _end_done(grove: DesiredGrove, inv: Inventory, rts: Runtimes,
              phases: dict[str, str]) -> bool:
    """Type the exit text into each interactive agent that reported done and now waits."""
    ended = False
    for name, rec in inv.agents.items():
        a = grove.by_name.get(name)
        if a is None or a.mode != "interactive" or not a.exit_text or not rec.waiting:
            continue
        if rec.done_mark != run_mark(rec) or phases.get(name) != RUNNING:
            continue
        try:
            rts.get(a.runtime, a.host).send(grove.name, name, a.exit_text)
        except Exception:  # tried again on the next pass
            continue
        rec.done_mark = f"{run_mark(rec)}:exit"
        ended = True
    return ended


def answered(root: Path, grove: str, agent: str, wait: float = 5.0) -> None:
    """A person answered (engine message / resume): the agent works again. Its harness
    says so too where it can (Claude Code's UserPromptSubmit); this covers those that do
    not. Best effort: a lock held longer than `wait` leaves it to the harness's report."""
    state = paths.state(root)
    try:
        with inventory.locked(state, grove, "message", wait=wait):
            inv = inventory.load(state, grove)
            rec = inv.agents.get(agent)
            if rec is None:
                return
            # reports no pass has taken yet were made before this answer: taken now, so
            # a later pass does not set the wait again (their usage still counts)
            mine = sorted((q for q in pending(root, grove)
                           if q.agent == agent and q.kind == inbox.REPORT),
                          key=lambda q: q.id)
            for q in mine:
                with contextlib.suppress(Exception):
                    _apply(root, grove, agent, rec, q.spec, record=False)
            if not rec.waiting and not mine:
                return
            rec.waiting = rec.waiting_since = ""
            inventory.save(state, inv, bump=False)
            for q in mine:
                inbox.consume(root, grove, q)
    except EngineError:
        return
