"""Ingest: requests agents left in their inboxes -> policy gate -> write-back and answers.

Called by `watch` (on every inbox event) and at the start of every `apply`, with the grove's
lock held. An agent's identity is its inbox directory, never what the request claims. Each
request ends exactly once, accepted or rejected: a spawn's id is written into spawned.yaml
before its answer (`res-<id>.json`) is written and the request is marked done, so a crash
at any point is resumed without a duplicate or a lost request. Every outcome goes to the
event log `.engine/events.jsonl`. Answered requests expire: `clean` removes an answer and
the request moved aside once they are old (the controller each pass, `engine prune`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine import events, paths
from engine.policy import NAME as NAME  # NAME and Gate moved to engine.policy; re-exported
from engine.policy import Gate as Gate  # for callers not moved yet (commands/spawn)
from engine.trust import reader

MAX_REQUEST_BYTES = 64 * 1024
KINDS = {"SpawnRequest", "MessageRequest", "StatusRequest", "DoneReport", "AgentReport"}
REPORT = "AgentReport"  # what the harness says about itself (engine.signals takes these)
REQUEST_ID = re.compile(r"[A-Za-z0-9_.-]{1,80}")
MAX_REQUESTS = 256  # read per agent and pass; the rest wait for the next pass
MAX_REASON = 300  # characters of an answer's reason
# the spec fields that must be strings (or absent) for each kind
STRING_FIELDS = {"SpawnRequest": ("name", "task", "profile", "harness"),
                 "MessageRequest": ("to", "text"), "DoneReport": ("result",),
                 "AgentReport": ("state", "message")}


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
    """The host directory of `agent`'s inbox (mounted into its sandbox: agent-writable)."""
    return paths.state(root) / "inbox" / grove / agent


def scan(root: Path, grove: str, reports: bool = False
         ) -> tuple[list[Request], list[Answer]]:
    """Pending requests, oldest first; ones that cannot be read come back as rejections.
    AgentReports (engine.signals takes them, unanswered) only with `reports`.

    Only real (not symlinked) directories named like agents are looked in, and every
    entry named `req-*.json` is read through the trust reader: a symlink, FIFO, device,
    directory, oversized or undecodable one is refused without being followed or blocked
    on, and comes back as a rejection (its answer names why)."""
    base = paths.state(root) / "inbox" / grove
    reqs: list[Request] = []
    bad: list[Answer] = []
    for agent in reader.subdirs(base):
        if not NAME.fullmatch(agent):
            continue
        names = [n for n in reader.entries(base, agent)
                 if n.startswith("req-") and n.endswith(".json")]
        for name in names[:MAX_REQUESTS]:
            try:
                req = _parse(base, agent, name)
            except reader.Untrusted as e:
                req = Request(agent, base / agent / name, _safe_id(name), "Invalid", {})
                bad.append(Answer(req, "rejected", e.summary))
                continue
            if reports or req.kind != REPORT:
                reqs.append(req)
    return reqs, bad


def consume(root: Path, grove: str, req: Request) -> None:
    """Remove a request that needs no answer (an AgentReport, taken in), never following
    a link: the entry itself goes, whatever it is."""
    base = paths.state(root) / "inbox" / grove
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        top = os.open(base, flags)
        try:
            d = os.open(req.agent, flags, dir_fd=top)
        finally:
            os.close(top)
        try:
            os.unlink(req.path.name, dir_fd=d)
        finally:
            os.close(d)
    except OSError:
        pass


def _safe_id(name: str) -> str:
    """The request id in `req-<id>.json`, or a stand-in derived from a name whose id is
    not valid (so nothing an agent chose reaches a path or a terminal unchecked)."""
    rid = name[4:-5]
    if REQUEST_ID.fullmatch(rid):
        return rid
    raw = name.encode("utf-8", errors="surrogateescape")
    return "invalid-" + hashlib.sha256(raw).hexdigest()[:12]


def _parse(base: Path, agent: str, name: str) -> Request:
    """The request in `base/agent/name`; Untrusted with a one-line reason naming it."""
    rid = name[4:-5]
    if not REQUEST_ID.fullmatch(rid):
        raise reader.Untrusted(f"{name[:100]!r}: bad request id (letters, digits, '.', "
                               "'_' and '-', at most 80)")
    try:
        doc = reader.read_json(base, f"{agent}/{name}", MAX_REQUEST_BYTES)
    except reader.Untrusted as e:  # name the file, not the host directory it is in
        raise reader.Untrusted(e.summary.replace(f"{base / agent}/", "", 1)) from None
    if not isinstance(doc, dict) or doc.get("kind") not in KINDS or \
            not isinstance(doc.get("spec"), dict):
        raise reader.Untrusted(f"{name}: a request must be a JSON object with kind "
                               f"({', '.join(sorted(KINDS))}) and spec (an object)")
    kind, spec = str(doc["kind"]), doc["spec"]
    for key in STRING_FIELDS.get(kind, ()):
        if spec.get(key) is not None and not isinstance(spec[key], str):
            raise reader.Untrusted(f"{name}: spec.{key} must be a string")
    deps = spec.get("dependsOn")
    if deps is not None and (not isinstance(deps, list) or
                             not all(isinstance(d, str) for d in deps)):
        raise reader.Untrusted(f"{name}: spec.dependsOn must be a list of agent names")
    return Request(agent, base / agent / name, rid, kind, spec)


def answer(root: Path, grove: str, ans: Answer) -> None:
    """Write the answer next to the request, then move the request aside (`done-<id>.json`,
    or `bad-<id>.json` for one that could not be read), in that order. Neither step follows
    a symlink, and neither failing stops the pass: a request is never read twice."""
    req = ans.request
    base = paths.state(root) / "inbox" / grove
    reason = reader.one_line(ans.reason, MAX_REASON)
    doc = {"id": req.id, "status": ans.status, "reason": reason, "child": ans.child,
           "data": ans.data}
    try:
        reader.replace_file(base, f"{req.agent}/res-{req.id}.json", json.dumps(doc).encode())
    except (OSError, reader.Untrusted) as e:
        reason = reader.one_line(f"{reason} (the answer could not be written: "
                                 f"{getattr(e, 'strerror', None) or e})", MAX_REASON)
    _move_aside(base, req)
    events.record(root, {"grove": grove, "event": f"{req.kind}", "id": req.id,
                         "from": req.agent, "status": ans.status, "reason": reason,
                         "child": ans.child})


def _move_aside(base: Path, req: Request) -> None:
    """Rename the request entry itself (file, directory, FIFO or symlink) out of `req-*`;
    under a fresh name when the usual one is taken (e.g. by a directory)."""
    prefix = "bad" if req.kind == "Invalid" else "done"
    for new in (f"{prefix}-{req.id}.json", f"{prefix}-{req.id}-{uuid.uuid4().hex[:8]}.json"):
        try:
            reader.rename(base, req.agent, req.path.name, new)
            return
        except FileNotFoundError:
            return  # gone already (the agent removed it)
        except (OSError, reader.Untrusted):
            continue


# -- expiry of what was answered --------------------------------------------------------
# An answered request leaves two entries behind: the answer (`res-<id>.json`, which a
# waiting `engine spawn --wait` reads) and the request moved aside (`done-<id>.json`,
# `bad-<id>.json`, or either with a `-<hex>` suffix). Pending requests (`req-*`), the
# client's half-written ones (`.req-*.tmp`) and notes to the agent (`notify-*`) are not
# answered requests and are never touched here.

ANSWERED = re.compile(r"(?:res|done|bad)-[A-Za-z0-9_.-]{1,100}\.json")
ANSWER_TTL = 86400.0  # seconds an answer stays for a client still waiting on it


def clean(root: Path, grove: str, agent: str | None, older_than: float = ANSWER_TTL) -> int:
    """Remove the answered-request entries (ANSWERED) of `agent`'s inbox (every agent's
    when None) that were last changed more than `older_than` seconds ago; returns how
    many went.

    Every inbox is agent-writable, so: each inbox is opened beneath the grove's inbox
    directory with O_NOFOLLOW (an inbox that is a symlink is skipped); entries are looked
    at with lstat through that directory's fd and removed as entries (`unlinkat`), so a
    symlink is removed itself and its target is never touched; a directory an agent left
    under such a name is removed through descriptors opened with O_NOFOLLOW and
    O_NONBLOCK at every level (`_remove_tree`), so nothing it links to is followed and
    no FIFO is waited on. The age is the entry's change time (ctime), which an agent cannot
    set back, or its mtime if later. Anything that cannot be removed is left for the next
    time."""
    base = paths.state(root) / "inbox" / grove
    names = [agent] if agent is not None else reader.subdirs(base)
    cutoff = time.time() - older_than
    removed = 0
    for name in names:
        if not NAME.fullmatch(name):
            continue
        try:
            with reader.opendir(base, (name,)) as d:
                removed += _clean_dir(d, cutoff)
        except (OSError, reader.Untrusted):
            continue  # no inbox, or not a real directory: nothing of the engine's to clean
    return removed


def clean_answered(root: Path, grove: str, older_than: float = ANSWER_TTL) -> int:
    """`clean` for every agent of `grove` (the controller calls it once per pass)."""
    return clean(root, grove, None, older_than)


def _clean_dir(d: int, cutoff: float) -> int:
    with os.scandir(d) as it:
        names = sorted(e.name for e in it if ANSWERED.fullmatch(e.name))
    removed = 0
    for name in names:
        try:
            st = os.stat(name, dir_fd=d, follow_symlinks=False)
            if max(st.st_ctime, st.st_mtime) > cutoff:
                continue
            if stat.S_ISDIR(st.st_mode):
                _remove_tree(d, name, MAX_TREE_DEPTH)
            else:
                os.unlink(name, dir_fd=d)
        except OSError:
            continue  # changed under us, or too deep: left as it is for the next time
        removed += 1
    return removed


MAX_TREE_DEPTH = 16  # levels of a directory an agent left under an answered name


def _remove_tree(parent: int, name: str, depth: int) -> None:
    """Remove the directory `name` in the directory fd `parent`, and what is in it. Each
    level is opened with O_NOFOLLOW | O_DIRECTORY | O_NONBLOCK, so an entry swapped for
    a symlink or a FIFO meanwhile stops the removal (OSError) instead of being followed
    or blocking; other entries are unlinked as entries."""
    if depth <= 0:
        raise OSError(f"{name}: deeper than {MAX_TREE_DEPTH} levels")
    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NONBLOCK |
                 os.O_CLOEXEC, dir_fd=parent)
    try:
        with os.scandir(fd) as it:
            entries = [(e.name, e.is_dir(follow_symlinks=False)) for e in it]
        for entry, is_dir in entries:
            if is_dir:
                _remove_tree(fd, entry, depth - 1)
            else:
                os.unlink(entry, dir_fd=fd)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=parent)


def remove_if_empty(root: Path, grove: str, agent: str) -> bool:
    """Remove `agent`'s inbox directory when nothing is left in it (a pruned agent's; a
    new run makes it again). Never follows a symlink; True when it went."""
    if not NAME.fullmatch(agent):
        return False
    try:
        with reader.opendir(paths.state(root) / "inbox", (grove,)) as d:
            st = os.stat(agent, dir_fd=d, follow_symlinks=False)
            if not stat.S_ISDIR(st.st_mode):
                return False
            os.rmdir(agent, dir_fd=d)  # fails unless empty
    except (OSError, reader.Untrusted):
        return False
    return True
