"""Review: an agent's branch against its base (`engine diff`) and landing it (`engine merge`).

Called by the diff and merge commands. Merging never leaves a half-merged tree: when the
base branch is checked out, a conflicting merge is aborted; otherwise the merge is computed
with `git merge-tree` and the branch ref moves only when it is clean.
"""

from __future__ import annotations

from pathlib import Path

from engine import paths, workspace
from engine.errors import EngineError
from engine.trust.git import call
from engine.trust.git import run as git
from engine.trust.reader import for_terminal
from engine.workspace import base_commit


def diff(root: Path, branch: str, base_ref: str, workdir: Path | None, stat: bool) -> str:
    ref, _ = base_commit(root, base_ref)
    if not git(root, "rev-parse", "-q", "--verify", f"refs/heads/{branch}", check=False):
        raise EngineError(f"branch {branch} does not exist (was the agent applied?)")
    args = ["diff", "--no-ext-diff", "--no-textconv", *(["--stat"] if stat else [])]
    out = git(root, *args, f"{ref}...{branch}")
    owner = workspace.agent_of_branch(branch)
    if workdir is not None and workdir.is_dir() and owner is not None:
        _, sha = base_commit(root, base_ref)
        state = workspace.work_state(root, *owner, workdir, branch, sha)
        if state.dirty:
            out += (f"\n\n# uncommitted in the agent's workspace: {state.dirty} "
                    f"file{'s' if state.dirty != 1 else ''}")
    return out


def _no_engine_paths(root: Path, ref: str, branch: str) -> None:
    """Refuse a branch that touches `.engine/` (in any case): git treats that ignored
    directory as expendable, so a merge would write the agent's files over the engine's
    state (shadow repositories, other agents' workspaces, the secret key)."""
    changed = git(root, "diff", "--no-ext-diff", "--no-textconv", "--name-only", "-z",
                  f"{ref}...{branch}").split("\0")
    bad = sorted({p for p in changed if p.split("/", 1)[0].casefold() == paths.STATE_DIR})
    if bad:
        raise EngineError(f"branch {branch} writes into .engine/ ({for_terminal(bad[0])}"
                          f"{' and more' if len(bad) > 1 else ''}), the engine's own state; "
                          "refusing to merge it")


def merge(root: Path, branch: str, base_ref: str, message: str) -> str:
    """Merge `branch` into the base branch; returns the new base commit."""
    ref, _ = base_commit(root, base_ref)
    if not git(root, "rev-parse", "-q", "--verify", f"refs/heads/{ref}", check=False):
        raise EngineError(f"base {ref!r} is not a branch; cannot merge into it")
    if not git(root, "rev-parse", "-q", "--verify", f"refs/heads/{branch}", check=False):
        raise EngineError(f"branch {branch} does not exist")
    _no_engine_paths(root, ref, branch)
    current = git(root, "symbolic-ref", "--short", "-q", "HEAD", check=False)
    if current == ref:
        if git(root, "status", "--porcelain", "--untracked-files=no",
               "--ignore-submodules=all"):
            raise EngineError(f"{root}: uncommitted changes on {ref}; commit or stash them "
                              "before merging")
        # no timeout: a merge killed half-way would leave a half-merged checkout
        p = call(root, "merge", "--no-ff", "--no-edit", "-m", message, branch, timeout=None)
        if p.returncode != 0:
            files = git(root, "diff", "--name-only", "--diff-filter=U", check=False)
            git(root, "merge", "--abort", check=False)
            raise EngineError(f"merge of {branch} into {ref} conflicts in: "
                              f"{', '.join(files.split()) or 'unknown files'}; nothing changed")
        return git(root, "rev-parse", "HEAD")
    p = call(root, "merge-tree", "--write-tree", "--name-only", ref, branch)
    lines = p.stdout.strip().splitlines()
    if p.returncode != 0:
        names = [ln for ln in lines[1:] if ln and not ln.startswith(("Auto-merging",
                                                                    "CONFLICT"))]
        raise EngineError(f"merge of {branch} into {ref} conflicts in: "
                          f"{', '.join(sorted(set(names))) or 'unknown files'}; nothing changed")
    tree = lines[0]
    commit = git(root, "commit-tree", tree, "-p", ref, "-p", branch, "-m", message)
    git(root, "update-ref", f"refs/heads/{ref}", commit)
    return commit
