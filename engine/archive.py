"""Archive: an agent's uncommitted changes and unmerged commits, kept under
`refs/engine/archive/<grove>/<agent>/<n>` before its working copy goes.

Called by `workspace` (remove, restore) and so by the executor on every delete, replace of
a working copy and destroy. The archive is a commit whose tree is the working copy as git
would commit it (ignored paths are not kept) and whose parents are every tip of the
agent's branch, so nothing reachable before is unreachable after.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from engine.proc import git, run

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
    when there is nothing that is not already on the base."""
    if not workdir.is_dir() or not branch:
        return None
    head = git(workdir, "rev-parse", "-q", "--verify", "HEAD", check=False)
    if not head:
        return None
    fd, index = tempfile.mkstemp(prefix="engine-index-")
    os.close(fd)
    try:
        env = {**os.environ, "GIT_INDEX_FILE": index}
        git(workdir, "read-tree", "HEAD", env=env)
        git(workdir, "add", "-A", env=env)
        tree = git(workdir, "write-tree", env=env)
    finally:
        os.unlink(index)
    head_tree = git(workdir, "rev-parse", f"{head}^{{tree}}")
    ahead = int(git(workdir, "rev-list", "--count", f"{base}..{head}", check=False) or 0)
    # the branch may be elsewhere than HEAD (a detached checkout, a reviewer's commit on the
    # repository's copy of the branch): those tips become extra parents of the archive
    tips: list[str] = []
    for where in (workdir, root):
        t = git(where, "rev-parse", "-q", "--verify", f"refs/heads/{branch}", check=False)
        if t and t != head and t not in tips and not is_ancestor(workdir, t, head) \
                and not is_ancestor(workdir, t, base):
            tips.append(t)
    clone = (workdir / ".git").is_dir()
    extras = _clone_extras(workdir, branch, base) if clone else []
    if tree == head_tree and not ahead and not tips and not extras:
        return None
    ref, n = _next_archive(root, grove, agent)
    msg = (f"engine archive {grove}/{agent} #{n}\n\nBranch: {branch}\nBase: {base}\n"
           f"Dirty: {'yes' if tree != head_tree else 'no'}\n")
    parents = [a for t in [head, *tips] for a in ("-p", t)]
    commit = git(workdir, "commit-tree", tree, *parents, "-m", msg)
    if clone:  # a clone: its objects live there, fetch them over (and its other refs)
        git(workdir, "update-ref", "refs/engine/archive-pending", commit)
        specs = [f"+refs/engine/archive-pending:{ref}"]
        specs += [f"+{r}:{ref}-refs/{r.removeprefix('refs/')}" for r in extras]
        git(root, "fetch", "-q", str(workdir), *specs)
    else:
        git(root, "update-ref", ref, commit)  # its parents are the tips: commits kept
    return ref


def _clone_extras(clone: Path, branch: str, base: str) -> list[str]:
    """A clone's other branches and its stash, when they hold commits not on the base."""
    out = []
    refs = git(clone, "for-each-ref", "--format=%(refname)", "refs/heads/", "refs/stash")
    for r in refs.splitlines():
        if r == f"refs/heads/{branch}":
            continue
        tip = git(clone, "rev-parse", r)
        if not is_ancestor(clone, tip, base):
            out.append(r)
    return out


def archives(root: Path, grove: str, agent: str) -> list[str]:
    refs = git(root, "for-each-ref", "--format=%(refname)",
               f"{ARCHIVE_PREFIX}/{grove}/{agent}/").splitlines()
    nums = sorted(int(r.rsplit("/", 1)[1]) for r in refs if r.rsplit("/", 1)[1].isdigit())
    return [f"{ARCHIVE_PREFIX}/{grove}/{agent}/{n}" for n in nums]


def is_ancestor(root: Path, a: str, b: str) -> bool:
    return run(["git", "merge-base", "--is-ancestor", a, b], cwd=root, check=False
               ).returncode == 0
