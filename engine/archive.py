"""Archive: an agent's uncommitted changes and unmerged commits, kept under
`refs/engine/archive/<grove>/<agent>/<n>` before its working copy goes.

Called by `workspace` (remove, restore) and so by the executor on every delete, replace of
a working copy and destroy; by `engine prune --finished`; and by `engine archive list`
and `engine archive prune` (`listing`, `measure`, `expired`, `delete`), which read every
archive with one `git for-each-ref` and count with one call per kind of count, never one
per archive. The archive is a commit whose tree is the working copy as git
would commit it (ignored paths are not kept) and whose parents are every tip of the
agent's work (HEAD, its branches and stash, the repository's copy of its branch), so
nothing reachable before is unreachable after. It fails closed: when the agent's HEAD
cannot be resolved or brought over (damaged or replaced git metadata), the files are
snapshot as they are on top of the base; when even that fails, it raises and the caller
removes nothing.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from engine.trust import exchange
from engine.trust.git import call, raw
from engine.trust.git import run as git

ARCHIVE_PREFIX = "refs/engine/archive"


def _newest(root: Path, grove: str, agent: str) -> str | None:
    """The agent's newest archive ref (the highest number), or None."""
    refs = git(root, "for-each-ref", "--format=%(refname)",
               f"{ARCHIVE_PREFIX}/{grove}/{agent}/").splitlines()
    numbered = [(int(r.rsplit("/", 1)[1]), r) for r in refs if r.rsplit("/", 1)[1].isdigit()]
    return max(numbered)[1] if numbered else None


def _next_archive(root: Path, grove: str, agent: str) -> tuple[str, int]:
    refs = git(root, "for-each-ref", "--format=%(refname)",
               f"{ARCHIVE_PREFIX}/{grove}/{agent}/").splitlines()
    n = max((int(r.rsplit("/", 1)[1]) for r in refs if r.rsplit("/", 1)[1].isdigit()),
            default=0) + 1
    return f"{ARCHIVE_PREFIX}/{grove}/{agent}/{n}", n


def archive(root: Path, grove: str, agent: str, workdir: Path, branch: str, base: str
            ) -> str | None:
    """Save uncommitted changes and unmerged commits; returns the archive ref, or None
    when there is nothing that is not already on the base. Raises EngineError when the
    work exists and cannot be saved."""
    if not workdir.is_dir() or workdir.is_symlink() or not branch:
        return None
    imp = exchange.sync(root, grove, agent, workdir, branch)
    head = imp.head
    tree, lost = exchange.snapshot(root, grove, agent, workdir, head)
    first = head or base
    first_tree = git(root, "rev-parse", f"{first}^{{tree}}")
    ahead = int(git(root, "rev-list", "--count", f"{base}..{head}", check=False) or 0) \
        if head else 0
    here = git(root, "rev-parse", "-q", "--verify", f"refs/heads/{branch}", check=False)
    tips: list[str] = []
    for t in (*imp.tips, here):
        if t and t != first and t not in tips and not is_ancestor(root, t, first) \
                and not is_ancestor(root, t, base):
            tips.append(t)
    if tree == first_tree and not ahead and not tips:
        return None
    ref, n = _next_archive(root, grove, agent)
    msg = (f"engine archive {grove}/{agent} #{n}\n\nBranch: {branch}\nBase: {base}\n"
           f"Dirty: {'yes' if tree != first_tree else 'no'}\n")
    if not head:
        msg += "Head: unresolvable; the files are kept as they were, on top of the base\n"
    for p in (*imp.problems, *lost):
        msg += f"Problem: {p}\n"
    parents = [a for t in [first, *tips] for a in ("-p", t)]
    commit = git(root, "commit-tree", tree, *parents, "-m", msg)
    git(root, "update-ref", ref, commit, "")  # its parents are the tips: commits kept
    return ref


def archive_branch(root: Path, grove: str, agent: str, branch: str, base: str) -> str | None:
    """Save the commits of a branch that has no working copy any more (an agent that
    `engine prune --finished` left its branch), before the branch is deleted: an archive
    whose tree is the branch tip's and whose parent is the tip. None when the tip is on
    `base` or already in the agent's newest archive (the one `archive prune` keeps)."""
    tip = git(root, "rev-parse", "-q", "--verify", f"refs/heads/{branch}^{{commit}}",
              check=False)
    if not tip or (base and is_ancestor(root, tip, base)):
        return None
    holding = git(root, "for-each-ref", "--format=%(refname)", "--contains", tip,
                  f"{ARCHIVE_PREFIX}/{grove}/{agent}/").split()
    newest = _newest(root, grove, agent)
    if newest is not None and newest in holding:
        return None  # archived when its working copy went, and not moved since (the
        # newest archive is the one `archive prune` always keeps)
    ref, n = _next_archive(root, grove, agent)
    msg = (f"engine archive {grove}/{agent} #{n}\n\nBranch: {branch}\nBase: {base}\n"
           "Dirty: no\n")
    commit = git(root, "commit-tree", f"{tip}^{{tree}}", "-p", tip, "-m", msg)
    git(root, "update-ref", ref, commit, "")
    return ref


def archives(root: Path, grove: str, agent: str) -> list[str]:
    refs = git(root, "for-each-ref", "--format=%(refname)",
               f"{ARCHIVE_PREFIX}/{grove}/{agent}/").splitlines()
    nums = sorted(int(r.rsplit("/", 1)[1]) for r in refs if r.rsplit("/", 1)[1].isdigit())
    return [f"{ARCHIVE_PREFIX}/{grove}/{agent}/{n}" for n in nums]


def is_ancestor(root: Path, a: str, b: str) -> bool:
    return call(root, "merge-base", "--is-ancestor", a, b).returncode == 0


# -- listing and expiry ------------------------------------------------------------------

_SHA = re.compile(r"[0-9a-f]{40}(?:[0-9a-f]{24})?")


@dataclass(frozen=True)
class Archived:
    """One archive, as `engine archive list` shows it."""

    ref: str
    grove: str
    agent: str
    number: int
    commit: str
    date: int  # when it was made (the archive commit's committer date, Unix seconds)
    base: str  # the commit the agent started from (its `Base:` line; "" when unreadable)
    dirty: bool  # it holds uncommitted files
    commits: int = -1  # commits in it not on the grove's base branch now (-1: not counted)
    files: int = -1  # files it changes against `base`, uncommitted ones included


def listing(root: Path, grove: str | None = None, agent: str | None = None
            ) -> list[Archived]:
    """Every archive (of `grove`, of `agent` in it), by grove, agent and number: one
    `git for-each-ref`. Refs that are not `<grove>/<agent>/<n>` commits are left out."""
    prefix = ARCHIVE_PREFIX + "/"
    if grove:
        prefix += f"{grove}/" + (f"{agent}/" if agent else "")
    fmt = "%(refname)%00%(objectname)%00%(objecttype)%00%(committerdate:unix)%00" \
          "%(contents:body)%00"
    out = raw(root, "for-each-ref", f"--format={fmt}", prefix).decode(errors="replace")
    found = []
    for record in out.split("\0\n"):
        fields = record.split("\0")
        if len(fields) < 5 or fields[2] != "commit":
            continue
        ref, commit, _, date, body = fields[:5]
        parts = ref[len(ARCHIVE_PREFIX) + 1:].split("/")
        if len(parts) != 3 or not parts[2].isdigit() or (agent and parts[1] != agent):
            continue
        meta = dict(ln.split(": ", 1) for ln in body.splitlines() if ": " in ln)
        base = meta.get("Base", "").strip()
        found.append(Archived(ref, parts[0], parts[1], int(parts[2]), commit,
                              int(date) if date.isdigit() else 0,
                              base if _SHA.fullmatch(base) else "",
                              meta.get("Dirty", "").strip() == "yes"))
    return sorted(found, key=lambda a: (a.grove, a.agent, a.number))


def measure(root: Path, archived: list[Archived], base_tips: Mapping[str, str]
            ) -> list[Archived]:
    """`archived` with `commits` (not on `base_tips[grove]`, the grove's base branch now;
    the archive commit itself is not counted) and `files` (changed against the agent's
    start) filled in: one `git rev-list` per distinct base tip, one `git diff-tree`."""
    commits = _count_commits(root, archived, base_tips)
    files = _count_files(root, archived)
    return [replace(a, commits=commits.get(a.ref, -1), files=files.get(a.commit, -1))
            for a in archived]


def _count_commits(root: Path, archived: list[Archived], base_tips: Mapping[str, str]
                   ) -> dict[str, int]:
    by_tip: dict[str, list[Archived]] = {}
    for a in archived:
        by_tip.setdefault(base_tips.get(a.grove, ""), []).append(a)
    counts: dict[str, int] = {}
    for tip, group in sorted(by_tip.items()):
        # the base branch unknown (its grove is gone): not on the commits they started from
        nots = [tip] if tip else sorted({a.base for a in group if a.base})
        if not nots:
            continue
        # the part of the history not on the base: each line is a commit and its parents
        stdin = "".join(f"{a.commit}\n" for a in group) + "".join(f"^{n}\n" for n in nots)
        text = raw(root, "rev-list", "--parents", "--stdin", input=stdin.encode()).decode()
        parents = {ln.split()[0]: ln.split()[1:] for ln in text.splitlines() if ln.strip()}
        for a in group:
            counts[a.ref] = _reachable(a.commit, parents) - 1
    return counts


def _reachable(start: str, parents: Mapping[str, list[str]]) -> int:
    seen, todo = {start}, [start]
    while todo:
        for p in parents.get(todo.pop(), ()):
            if p in parents and p not in seen:
                seen.add(p)
                todo.append(p)
    return len(seen)


def _count_files(root: Path, archived: list[Archived]) -> dict[str, int]:
    pairs = {a.commit: a.base for a in archived if a.base}
    if not pairs:
        return {}
    known = raw(root, "cat-file", "--batch-check=%(objectname) %(objecttype)",
                input="".join(f"{b}\n" for b in sorted(set(pairs.values()))).encode())
    commits = {ln.split()[0] for ln in known.decode().splitlines() if ln.endswith(" commit")}
    pairs = {c: b for c, b in pairs.items() if b in commits}
    # each differing pair prints its first id, then the paths; an equal pair prints nothing
    out = raw(root, "diff-tree", "--stdin", "-r", "--name-only", "-z",
              input="".join(f"{c} {b}\n" for c, b in sorted(pairs.items())).encode())
    counts = dict.fromkeys(pairs, 0)
    current = ""
    for token in out.decode(errors="replace").split("\0"):
        if token in pairs:
            current = token
        elif token and current:
            counts[current] += 1
    return counts


def expired(archived: Iterable[Archived], now: float, older_than: float,
            has_workspace: Callable[[str, str], bool]) -> tuple[list[Archived], list[Archived]]:
    """(to delete, kept): archives made more than `older_than` seconds before `now`,
    except the newest of an agent without a working copy (`has_workspace(grove, agent)`
    false): that one is the last copy of its work `engine restore` can bring back, and
    is kept whatever its age."""
    archived = list(archived)
    newest: dict[tuple[str, str], int] = {}
    for a in archived:
        key = (a.grove, a.agent)
        newest[key] = max(newest.get(key, 0), a.number)
    drop: list[Archived] = []
    keep: list[Archived] = []
    for a in archived:
        if now - a.date <= older_than:
            continue
        last = a.number == newest[(a.grove, a.agent)]
        (keep if last and not has_workspace(a.grove, a.agent) else drop).append(a)
    return drop, keep


def delete(root: Path, archived: Iterable[Archived]) -> None:
    """Delete the archive refs, all or none (one `git update-ref --stdin` transaction);
    a ref that moved since it was listed fails the whole deletion."""
    lines = "".join(f"delete {a.ref} {a.commit}\n" for a in archived)
    if lines:
        git(root, "update-ref", "--stdin", input=lines)
