"""Audit trail: git history of `groves/` -> topology `Event`s, oldest first.

Called by the `history` command. Walks every commit that touched `groves/` (one
`git log`, one `git ls-tree` per commit, blobs through one long-lived
`git cat-file --batch`), reads the agents each grove declares at that commit (names,
spawnedBy, spawnRequest, spawnedAt, dependsOn; no schema or layering, so old or broken
commits still read), and reports what each commit changed. A merge only reports what
none of its parents had, so a change made on a branch is told once, by its own commit.
`add_uncommitted` adds, as an event with no commit, the spawns written to the working copy
of a grove's spawned.yaml that HEAD does not have (a write-back whose commit failed or was
not asked for), so no spawn is ever missing from the history. Who approved a child
(`policy.approval: manual`) comes from the write-back commit's `Spawn-Approved-By` trailer;
`denials` reads the requests people denied from the event log (a denial writes nothing to
git).
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from engine import events, manifest, revisions
from engine.topology import changed_fields
from engine.trust import git as trust_git
from engine.yamlio import MAX_FILE_BYTES, NotReadable, YamlError, load_text, read_regular

TRAILERS = ("Spawned-By", "Spawn-Request", "Spawn-Approved-By")
APPROVED_BY = re.compile(r"(.+) \(request ([A-Za-z0-9_.-]{1,80})\)")  # WHO (request ID)
_FMT = "%H%x1f%P%x1f%an%x1f%ae%x1f%aI%x1f%s%x1f%(trailers:only,unfold)%x1e"


@dataclass(frozen=True)
class AgentRec:
    """One agent as declared at a commit."""

    parent: str | None
    request: str | None
    spawned_at: str | None
    body: str  # canonical JSON of the raw entry, to tell changes

    def to_json(self, name: str) -> dict[str, Any]:
        return {"name": name, "spawnedBy": self.parent, "spawnRequest": self.request,
                "spawnedAt": self.spawned_at}


@dataclass(frozen=True)
class Commit:
    sha: str
    parents: tuple[str, ...]
    author: str
    email: str
    date: str
    subject: str
    trailers: dict[str, list[str]] = field(hash=False, compare=False)

    def line(self) -> str:
        if not self.sha:  # the working copy: see add_uncommitted
            return f"uncommitted {self.date}: {self.subject}"
        return f"{self.sha[:10]} {self.date} {self.author} <{self.email}>: {self.subject}"

    def approvals(self) -> dict[str, str]:
        """request id -> who approved it, from the `Spawn-Approved-By` trailers."""
        found = (APPROVED_BY.fullmatch(v) for v in self.trailers.get("Spawn-Approved-By", []))
        return {m.group(2): m.group(1) for m in found if m}

    def to_json(self) -> dict[str, Any]:
        return {"commit": self.sha or None, "uncommitted": not self.sha,
                "parents": list(self.parents), "author": self.author,
                "email": self.email, "date": self.date, "subject": self.subject,
                "trailers": {k: v for k, v in sorted(self.trailers.items())}}


@dataclass
class Event:
    """What one commit did to one grove's topology."""

    commit: Commit
    grove: str
    added: list[tuple[str, AgentRec]]
    removed: list[tuple[str, AgentRec]]
    changed: list[tuple[str, list[str]]]
    state: dict[str, AgentRec]  # the grove's agents after this commit
    invalid: str = ""  # the first problem when the manifests did not parse

    def added_names(self) -> set[str]:
        return {n for n, _ in self.added}

    def names(self) -> set[str]:
        """Agents this event concerns, parents of added agents included."""
        out = self.added_names() | {n for n, _ in self.removed} | {n for n, _ in self.changed}
        return out | {r.parent for _, r in self.added if r.parent}

    def to_json(self) -> dict[str, Any]:
        ok = self.commit.approvals()
        return {**self.commit.to_json(), "grove": self.grove,
                "added": [{**r.to_json(n), **({"approvedBy": ok[r.request]}
                                               if r.request in ok else {})}
                          for n, r in self.added],
                "removed": [r.to_json(n) for n, r in self.removed],
                "changed": [{"name": n, "fields": f} for n, f in self.changed],
                "invalid": self.invalid or None}

    def text(self) -> str:
        lines = [f"{self.commit.line()}  [grove {self.grove}]"]
        lines += [f"  {k}: {v}" for k, vs in sorted(self.commit.trailers.items())
                  for v in vs if k in TRAILERS]
        ok = self.commit.approvals()
        for n, r in self.added:
            via = [f"spawned by {r.parent}"] if r.parent else ["seed agent"]
            via += [f"request {r.request}"] if r.parent and r.request else []
            by = ok.get(r.request or "")
            via += [f"approved by {by}"] if by else []
            lines.append(f"  + {n} ({', '.join(via)})")
        lines += [f"  - {n}" for n, _ in self.removed]
        lines += [f"  ~ {n}: {', '.join(f)}" for n, f in self.changed]
        if self.invalid:
            lines.append(f"  ! manifests do not parse here: {self.invalid}")
        return "\n".join(lines)


class _Objects:
    """A long-lived `git cat-file --batch`: objects by hash or `rev:path`, on demand."""

    def __init__(self, root: Path) -> None:
        self.proc = trust_git.popen(root, "cat-file", "--batch")

    def read(self, spec: str) -> tuple[str, bytes]:
        """(type, content), or ("missing", b"")."""
        stdin: IO[bytes] = self.proc.stdin  # type: ignore[assignment]
        stdout: IO[bytes] = self.proc.stdout  # type: ignore[assignment]
        stdin.write(spec.encode() + b"\n")
        stdin.flush()
        head = stdout.readline().split()
        if len(head) != 3:
            return "missing", b""
        data = stdout.read(int(head[2]))
        stdout.read(1)
        return head[1].decode(), data

    def tree(self, spec: str) -> dict[str, tuple[str, str]]:
        """Entries of a tree object: name -> (mode, hex hash); {} when there is none."""
        kind, data = self.read(spec)
        out: dict[str, tuple[str, str]] = {}
        pos = 0
        while kind == "tree" and pos < len(data):
            nul = data.index(b"\0", pos)
            mode, _, name = data[pos:nul].decode("utf-8", errors="replace").partition(" ")
            out[name] = (mode, data[nul + 1:nul + 21].hex())
            pos = nul + 21
        return out

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait()
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe:
                pipe.close()


_MARKER = re.compile(r"^(?:---|\.\.\.)(?=\s|$)", re.MULTILINE)


def _chunks(text: str) -> list[str]:
    """The documents of a YAML stream, split at `---` / `...` lines (which YAML forbids
    inside content), so that an append-only file re-parses only its new documents."""
    cuts = [m.start() for m in _MARKER.finditer(text)]
    bounds = [0, *[c for c in cuts if c > 0], len(text)]
    return [text[a:b] for a, b in itertools.pairwise(bounds) if text[a:b].strip()]


def _agents_of(text: str, display: str, docs: dict[str, dict[str, AgentRec]]
               ) -> dict[str, AgentRec]:
    """Agents a file declares; `docs` caches them per document text across commits."""
    out: dict[str, AgentRec] = {}
    for chunk in _chunks(text):
        if chunk not in docs:
            try:
                docs[chunk] = _doc_agents(chunk, display)
            except YamlError:
                load_text(text, display)  # raises the error with the file's own line numbers
                raise
        out.update(docs[chunk])
    return out


def _doc_agents(text: str, display: str) -> dict[str, AgentRec]:
    out: dict[str, AgentRec] = {}
    for doc in load_text(text, display):
        data = doc.data if isinstance(doc.data, dict) else {}
        entries: list[tuple[Any, Any]] = []
        spec: dict[str, Any] = data["spec"] if isinstance(data.get("spec"), dict) else {}
        if data.get("kind") == "Grove":
            agents = spec.get("agents")
            entries = [(a.get("name"), a) for a in (agents if isinstance(agents, list) else [])
                       if isinstance(a, dict)]
        elif data.get("kind") == "Agent" and isinstance(data.get("metadata"), dict):
            entries = [(data["metadata"].get("name"), spec)]
        for name, body in entries:
            if isinstance(name, str):
                out[name] = AgentRec(_str(body.get("spawnedBy")), _str(body.get("spawnRequest")),
                                     _str(body.get("spawnedAt")),
                                     json.dumps(body, sort_keys=True, default=str))
    return out


def _str(v: Any) -> str | None:
    return None if v is None else str(v)


def commits(root: Path, rev: str) -> list[Commit]:
    """Commits that touched groves/ up to `rev`, parents before children."""
    sha = revisions.resolve(root, rev)
    raw = revisions.git(root, "log", "--topo-order", "--reverse", "--parents",
                        f"--format={_FMT}", sha, "--", manifest.GROVES_DIR + "/")
    out = []
    for rec in raw.decode("utf-8", errors="replace").split("\x1e"):
        parts = rec.strip("\n").split("\x1f")
        if len(parts) < 7:
            continue
        trailers: dict[str, list[str]] = {}
        for line in parts[6].splitlines():
            key, sep, value = line.partition(":")
            if sep and key.strip():
                trailers.setdefault(key.strip(), []).append(value.strip())
        out.append(Commit(parts[0], tuple(parts[1].split()), parts[2], parts[3], parts[4],
                          parts[5], trailers))
    return out


@dataclass
class History:
    events: list[Event]  # oldest first
    final: dict[str, dict[str, AgentRec]]  # grove -> agents at the revision scanned
    # grove -> spawns in the working copy of spawned.yaml that are not committed
    uncommitted: dict[str, dict[str, AgentRec]] = field(default_factory=dict)


def scan(root: Path, rev: str = "HEAD", groves: list[str] | None = None) -> History:
    """Every topology change of the selected groves in the history of `rev`, oldest first,
    and each grove's agents at `rev`."""
    history = commits(root, rev)
    prefix = revisions.git(root, "rev-parse", "--show-prefix").decode().strip()
    git = _Objects(root)
    files: dict[str, dict[str, AgentRec] | str] = {}  # blob -> agents, or a parse error
    docs: dict[str, dict[str, AgentRec]] = {}  # document text -> agents
    # commit -> grove -> (the grove directory's tree hash, its agents)
    states: dict[str, dict[str, tuple[str, dict[str, AgentRec]]]] = {}
    memo: dict[tuple[str, str], tuple[dict[str, AgentRec] | None, str]] = {}
    events: list[Event] = []
    try:
        for c in history:
            dirs = {n: sha for n, (mode, sha) in
                    git.tree(f"{c.sha}:{prefix}{manifest.GROVES_DIR}").items()
                    if mode == "40000" and not n.startswith(".")}  # a dot-directory: no grove
            parents = [states.get(p, {}) for p in c.parents] or [{}]
            mine = states[c.sha] = {}
            for grove in sorted(set(dirs) | {g for s in parents for g in s}):
                if groves and grove not in groves:
                    continue
                key = dirs.get(grove, "")
                before = [p.get(grove, ("", {})) for p in parents]
                if any(k == key for k, _ in before):
                    mine[grove] = next(b for b in before if b[0] == key)
                    continue  # this commit left the grove as one of its parents had it
                if (grove, key) not in memo:
                    memo[(grove, key)] = _grove_state(grove, key, git, files, docs)
                state, problem = memo[(grove, key)]
                now = state if state is not None else before[0][1]
                mine[grove] = (key, now)
                ev = _event(c, grove, [b[1] for b in before], now, problem)
                if ev:
                    events.append(ev)
    finally:
        git.close()
    last = states.get(history[-1].sha, {}) if history else {}
    return History(events, {g: agents for g, (_, agents) in last.items()})


def _grove_state(grove: str, tree: str, git: _Objects,
                 cache: dict[str, dict[str, AgentRec] | str],
                 docs: dict[str, dict[str, AgentRec]]
                 ) -> tuple[dict[str, AgentRec] | None, str]:
    state: dict[str, AgentRec] = {}
    entries = git.tree(tree) if tree else {}
    for name, (mode, sha) in sorted(entries.items()):
        if not name.endswith(".yaml") or mode not in ("100644", "100755"):
            continue
        if sha not in cache:
            display = f"{manifest.GROVES_DIR}/{grove}/{name}"
            try:
                cache[sha] = _agents_of(git.read(sha)[1].decode("utf-8"), display, docs)
            except YamlError as e:
                cache[sha] = str(e.diagnostic)
            except UnicodeDecodeError:
                cache[sha] = f"{display}: not UTF-8 text"
        got = cache[sha]
        if isinstance(got, str):
            return None, got
        state.update(got)
    return state, ""


def _event(c: Commit, grove: str, before: list[dict[str, AgentRec]],
           now: dict[str, AgentRec], problem: str) -> Event | None:
    if problem:
        return Event(c, grove, [], [], [], now, problem)
    added = [(n, now[n]) for n in sorted(now) if all(n not in b for b in before)]
    removed = [(n, before[0][n]) for n in sorted(before[0])
               if n not in now and all(n in b for b in before)]
    changed = []
    for n in sorted(now):
        if all(n in b and b[n].body != now[n].body for b in before):
            old = json.loads(before[0][n].body)
            changed.append((n, changed_fields(old, json.loads(now[n].body))))
    if added or removed or changed:
        return Event(c, grove, added, removed, changed, now)
    return None


def add_uncommitted(root: Path, found: History, groves: list[str] | None = None) -> None:
    """Add to `found` (scanned at HEAD) one last event per grove for the spawns written to
    the working copy of its spawned.yaml that HEAD lacks, and record them in
    `found.uncommitted`. A working copy that does not parse is reported as such."""
    for directory in manifest.grove_dirs(root):
        grove, path = directory.name, directory / manifest.SPAWNED_FILE
        if (groves and grove not in groves) or not path.is_file():
            continue
        display = f"{manifest.GROVES_DIR}/{grove}/{manifest.SPAWNED_FILE}"
        at_head = found.final.get(grove, {})
        problem, agents = _working_copy(path, display)
        added = [(n, r) for n, r in sorted(agents.items()) if n not in at_head and r.request]
        if not added and not problem:
            continue
        when = max((r.spawned_at or "" for _, r in added), default="")
        subject = f"{display}: " + ("does not parse" if problem else
                                    f"{len(added)} spawn(s) written, not committed")
        commit = Commit("", (), "", "", when, subject, {})
        found.events.append(Event(commit, grove, added, [], [], {**at_head, **dict(added)},
                                  problem))
        if added:
            found.uncommitted[grove] = dict(added)


def _working_copy(path: Path, display: str) -> tuple[str, dict[str, AgentRec]]:
    """("", agents) of a file on disk, or (the problem, {})."""
    try:
        raw = read_regular(path, MAX_FILE_BYTES, follow_symlinks=False)
        return "", _agents_of(raw.decode("utf-8"), display, {})
    except YamlError as e:
        return str(e.diagnostic), {}
    except NotReadable as e:
        return f"{display}: {e}", {}
    except (OSError, UnicodeDecodeError) as e:
        return f"{display}: cannot be read ({e.__class__.__name__})", {}


@dataclass(frozen=True)
class Denial:
    """A spawn request a person denied (`engine deny`), from the event log."""

    time: str
    grove: str
    parent: str
    request: str
    child: str
    by: str
    reason: str

    def line(self) -> str:
        return (f"{self.time} [grove {self.grove}] {self.parent} asked for {self.child or '?'} "
                f"(request {self.request}): denied by {self.by}: {self.reason}")

    def to_json(self) -> dict[str, Any]:
        return {"time": self.time, "grove": self.grove, "parent": self.parent,
                "request": self.request, "child": self.child, "by": self.by,
                "reason": self.reason}


def denials(root: Path, groves: list[str] | None = None) -> list[Denial]:
    """The `SpawnDenied` events of the selected groves, oldest first."""
    out = []
    for ev in events.read(root):
        if ev.get("event") != "SpawnDenied" or (groves and ev.get("grove") not in groves):
            continue
        out.append(Denial(*(str(ev.get(k) or "") for k in
                            ("time", "grove", "from", "id", "child", "by", "reason"))))
    return out
