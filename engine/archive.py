"""Archive: an agent's uncommitted changes and unmerged commits, kept under
`refs/engine/archive/<grove>/<agent>/<n>` before its working copy goes.

Called by `workspace` (remove, restore) and so by the executor on every delete, replace of
a working copy and destroy. The archive is a commit whose tree is the working copy as git
would commit it (ignored paths are not kept) and whose parents are every tip of the
agent's work (HEAD, its branches and stash, the repository's copy of its branch), so
nothing reachable before is unreachable after. It fails closed: when the agent's HEAD
cannot be resolved or brought over (damaged or replaced git metadata), the files are
snapshot as they are on top of the base; when even that fails, it raises and the caller
removes nothing.
"""

from __future__ import annotations

from pathlib import Path

from engine.trust import exchange
from engine.trust.git import call
from engine.trust.git import run as git

ARCHIVE_PREFIX = "refs/engine/archive"


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


def archives(root: Path, grove: str, agent: str) -> list[str]:
    refs = git(root, "for-each-ref", "--format=%(refname)",
               f"{ARCHIVE_PREFIX}/{grove}/{agent}/").splitlines()
    nums = sorted(int(r.rsplit("/", 1)[1]) for r in refs if r.rsplit("/", 1)[1].isdigit())
    return [f"{ARCHIVE_PREFIX}/{grove}/{agent}/{n}" for n in nums]


def is_ancestor(root: Path, a: str, b: str) -> bool:
    return call(root, "merge-base", "--is-ancestor", a, b).returncode == 0
