"""Workspaces: each agent's branch and working copy, and the archive that keeps work safe.

Called by `executor` (ensure before start, archive+remove on delete), `observe`
(dirty/ahead counts for plans and status) and the review commands (diff, merge, restore).
Branches are `engine/<grove>/<agent>`; worktrees and clones live under
`.engine/worktrees/<grove>/<agent>`. Nothing is removed before its uncommitted changes and
unmerged commits are saved under `refs/engine/archive/<grove>/<agent>/<n>`.
"""

from __future__ import annotations

import contextlib
import functools
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from engine import archive as archive_mod
from engine.desired import DesiredAgent
from engine.errors import EngineError
from engine.fsutil import flock
from engine.proc import CommandFailed, git, run

_WT_LOCK = threading.Lock()
EMPTY = "4b825dc642cb6eb9a060e54bf8d69288fbee4904"


@dataclass(frozen=True)
class Workspace:
    workdir: Path
    branch: str  # "" in shared mode
    base_commit: str
    git_paths: tuple[tuple[Path, bool], ...]


@dataclass(frozen=True)
class WorkState:
    """What would be lost without the archive: uncommitted files, commits not on base."""

    dirty: int
    ahead: int
    ignored: int = 0  # paths .gitignore hides: the archive (like git) does not keep them

    def describe(self) -> str:
        parts = []
        if self.dirty:
            parts.append(f"{self.dirty} uncommitted file{'s' if self.dirty != 1 else ''}")
        if self.ahead:
            parts.append(f"{self.ahead} commit{'s' if self.ahead != 1 else ''} not on base")
        if self.ignored:
            parts.append(f"not kept: {self.ignored} ignored path"
                         f"{'s' if self.ignored != 1 else ''} (.gitignore)")
        return ", ".join(parts)


def path_for(root: Path, grove: str, agent: str) -> Path:
    return root / ".engine" / "worktrees" / grove / agent


def base_commit(root: Path, base_ref: str) -> tuple[str, str]:
    """(ref name, commit) of the grove's base; the current branch when `base_ref` is ""."""
    if run(["git", "rev-parse", "--git-dir"], cwd=root, check=False).returncode != 0:
        raise EngineError(f"{root} is not a git repository: agents need one for their "
                          "branches (git init, then commit once)")
    ref = base_ref or git(root, "symbolic-ref", "--short", "-q", "HEAD", check=False) or "HEAD"
    sha = git(root, "rev-parse", "-q", "--verify", f"{ref}^{{commit}}", check=False)
    if not sha and not git(root, "rev-parse", "-q", "--verify", "HEAD", check=False):
        raise EngineError(f"{root}: the repository has no commits yet; agent branches start "
                          "from one (commit once)")
    if not sha:
        raise EngineError(f"base ref {ref!r} not found in {root} (set spec.baseRef to an "
                          "existing branch or commit)")
    return ref, sha


def _branch_exists(root: Path, branch: str) -> bool:
    return bool(git(root, "rev-parse", "-q", "--verify", f"refs/heads/{branch}", check=False))


def _registered_worktrees(root: Path) -> dict[Path, str]:
    out: dict[Path, str] = {}
    cur: Path | None = None
    for line in git(root, "worktree", "list", "--porcelain").splitlines():
        if line.startswith("worktree "):
            cur = Path(line[9:])
            out[cur] = ""
        elif line.startswith("branch ") and cur is not None:
            out[cur] = line[7:].removeprefix("refs/heads/")
    return out


def start_point(root: Path, base: str, inputs: tuple[str, ...], who: str) -> str:
    """Where a new agent branch starts: the base, with the branches of the agent's
    dependencies merged in (so a dependent sees its dependencies' work)."""
    start = base
    for branch in inputs:
        tip = git(root, "rev-parse", "-q", "--verify", f"refs/heads/{branch}", check=False)
        if not tip or archive_mod.is_ancestor(root, tip, start):
            continue
        if archive_mod.is_ancestor(root, start, tip):
            start = tip
            continue
        p = run(["git", "merge-tree", "--write-tree", "--name-only", start, tip], cwd=root,
                check=False)
        lines = p.stdout.strip().splitlines()
        if p.returncode != 0:
            raise EngineError(f"agent {who}: the work of its dependencies conflicts "
                              f"({branch}: {', '.join(lines[1:4])})")
        start = git(root, "commit-tree", lines[0], "-p", start, "-p", tip, "-m",
                    f"engine: start {who} from {branch}")
    return start


@functools.cache
def common_dir(root: Path) -> Path:
    return Path(git(root, "rev-parse", "--path-format=absolute", "--git-common-dir"))


def ensure(root: Path, agent: DesiredAgent, base_ref: str,
           inputs: tuple[str, ...] = (), base: tuple[str, str] | None = None) -> Workspace:
    """The agent's working copy, created if missing; reused when it is already ours.
    A new branch starts from the base plus the `inputs` branches (its dependencies).
    `base` is the already resolved (ref, commit) when the caller has it."""
    _, sha = base or base_commit(root, base_ref)
    if agent.workspace == "shared":
        return Workspace(root, "", sha, ())
    path = path_for(root, agent.grove, agent.name)
    branch = agent.branch
    if agent.workspace == "clone":
        if not _branch_exists(root, branch):
            git(root, "branch", "--no-track", branch,
                start_point(root, sha, inputs, f"{agent.grove}/{agent.name}"))
        return _ensure_clone(root, path, branch, sha)
    mounts = ((common_dir(root), False),)
    if path.exists():
        owner = _registered_worktrees(root).get(path.resolve())
        if owner != branch:
            raise EngineError(f"agent {agent.grove}/{agent.name}: {path} already exists and "
                              "is not this agent's worktree; move it away")
        return Workspace(path, branch, sha, mounts)
    path.parent.mkdir(parents=True, exist_ok=True)
    if _branch_exists(root, branch):
        args = ["worktree", "add", "-q", "--no-checkout", str(path), branch]
    else:  # one git call creates the branch and its worktree
        start = start_point(root, sha, inputs, f"{agent.grove}/{agent.name}")
        args = ["worktree", "add", "-q", "--no-checkout", "--no-track", "-b", branch,
                str(path), start]
    try:
        with _admin(root):  # only the admin entry is made in turn; files come after
            git(root, *args)
        git(path, "reset", "-q", "--hard")
    except CommandFailed as e:
        raise EngineError(f"agent {agent.grove}/{agent.name}: cannot create worktree: "
                          f"{e.stderr.strip().splitlines()[-1]}") from None
    return Workspace(path, branch, sha, mounts)


def _ensure_clone(root: Path, path: Path, branch: str, base: str) -> Workspace:
    objects = Path(git(root, "rev-parse", "--path-format=absolute", "--git-path", "objects"))
    if not (path / ".git").is_dir():
        if path.exists():
            raise EngineError(f"{path} already exists and is not an engine clone; move it away")
        path.parent.mkdir(parents=True, exist_ok=True)
        git(root, "clone", "-q", "--shared", "--no-checkout", str(root), str(path))
        git(path, "checkout", "-q", "-B", branch, f"origin/{branch}")
    return Workspace(path, branch, base, ((objects, True),))


def fetch_back(root: Path, path: Path, branch: str) -> str:
    """Clone mode: bring the clone's branch back into the repository's agent branch. When
    that branch has moved on its own (not a fast-forward), the clone's tip goes to
    `refs/engine/clone/<branch>` instead, so neither side loses commits. Returns the ref
    updated, or "" when there is no clone."""
    if not (path / ".git").is_dir():
        return ""
    if run(["git", "fetch", "-q", str(path), f"{branch}:{branch}"], cwd=root,
           check=False).returncode == 0:
        return f"refs/heads/{branch}"
    side = f"refs/engine/clone/{branch.removeprefix('engine/')}"
    git(root, "fetch", "-q", str(path), f"+{branch}:{side}")
    return side


def orphan(root: Path, grove: str, agent: str) -> tuple[str, Path, str] | None:
    """A working copy the engine made for an agent but never recorded (it died in
    between): (mode, path, branch) when the usual path holds this agent's worktree or
    clone, else None. Anything else at that path is not the engine's and is left alone."""
    path = path_for(root, grove, agent)
    branch = f"engine/{grove}/{agent}"
    if not path.is_dir():
        return None
    if (path / ".git").is_dir():
        return "clone", path, branch
    if _registered_worktrees(root).get(path.resolve()) == branch:
        return "worktree", path, branch
    return None


def exclude_state_dir(root: Path) -> None:
    """Keep `.engine/` (worktrees, secrets' key, state) out of `git add -A` even in a
    repository whose .gitignore does not name it: the repository-local exclude file."""
    path = common_dir(root) / "info" / "exclude"
    try:
        lines = path.read_text().splitlines() if path.exists() else []
    except OSError:
        return
    if "/.engine/" in lines or ".engine/" in lines or ".engine" in lines:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(("\n" if lines and lines[-1] else "") + "# grove-engine state\n/.engine/\n")


def prune(root: Path) -> None:
    """Forget worktrees whose directories are gone (never while adding concurrently)."""
    git(root, "worktree", "prune", check=False)


def work_state(root: Path, workdir: Path, branch: str, base: str) -> WorkState:
    if not workdir.is_dir() or not branch:
        return WorkState(0, 0)
    status = git(workdir, "status", "--porcelain", "--untracked-files=all",
                 "--ignored=matching", check=False)
    lines = [ln for ln in status.splitlines() if ln.strip()]
    ignored = sum(1 for ln in lines if ln.startswith("!!") and ln[3:].rstrip("/") not in
                  {".engine"})
    dirty = sum(1 for ln in lines if not ln.startswith("!!"))
    head = git(workdir, "rev-parse", "-q", "--verify", "HEAD", check=False)
    ahead = 0
    if head and base:
        ahead = int(git(workdir, "rev-list", "--count", f"{base}..{head}", check=False) or 0)
    return WorkState(dirty, ahead, ignored)


def remove(root: Path, grove: str, agent: str, workspace_mode: str, workdir: Path,
           branch: str, base: str) -> str | None:
    """Archive, then remove the working copy and the branch. Returns the archive ref."""
    if workspace_mode == "shared":
        return None
    if workspace_mode == "clone":
        fetch_back(root, workdir, branch)
    # raises rather than lose work
    ref = archive_mod.archive(root, grove, agent, workdir, branch, base)
    if workspace_mode == "clone" and workdir.exists():
        shutil.rmtree(workdir)
    with _admin(root):
        if workdir.exists():
            git(root, "worktree", "remove", "--force", str(workdir), check=False)
            if workdir.exists():
                shutil.rmtree(workdir)
                git(root, "worktree", "prune", check=False)
    if branch and _branch_exists(root, branch):
        git(root, "branch", "-D", branch)
    return ref


@contextlib.contextmanager
def _admin(root: Path) -> Iterator[None]:
    """Worktree administration takes turns: git reads every worktree's admin entry while
    adding or pruning one, and parallel changes can see each other half-written."""
    with _WT_LOCK, flock(root / ".engine" / "locks" / "worktrees.lock"):
        yield


def restore(root: Path, grove: str, agent: str, number: int | None = None,
            mode: str = "worktree") -> tuple[str, Path]:
    """Bring an archive back: the branch at the archived commits, the uncommitted changes
    as uncommitted files in the agent's worktree. Returns (archive ref, worktree)."""
    refs = archive_mod.archives(root, grove, agent)
    if not refs:
        raise EngineError(f"agent {grove}/{agent}: no archived work to restore")
    ref = f"{archive_mod.ARCHIVE_PREFIX}/{grove}/{agent}/{number}" if number else refs[-1]
    if ref not in refs:
        raise EngineError(f"agent {grove}/{agent}: no archive #{number} (have "
                          f"{', '.join(r.rsplit('/', 1)[1] for r in refs)})")
    snapshot = git(root, "rev-parse", ref)
    tip = git(root, "rev-parse", f"{snapshot}^")
    branch = f"engine/{grove}/{agent}"
    path = path_for(root, grove, agent)
    if path.exists():
        state = git(path, "status", "--porcelain", check=False)
        if state:
            raise EngineError(f"agent {grove}/{agent}: worktree {path} has uncommitted "
                              "changes; commit or archive them before restoring")
        git(path, "merge", "-q", "--ff-only", tip)
    else:
        if _branch_exists(root, branch) and not archive_mod.is_ancestor(
                root, git(root, "rev-parse", branch), tip):
            raise EngineError(f"agent {grove}/{agent}: branch {branch} has moved on; "
                              f"restore into it by hand: git checkout {ref} -- .")
        git(root, "branch", "-f", branch, tip)
        path.parent.mkdir(parents=True, exist_ok=True)
        if mode == "clone":  # the grove's agents work in clones: restore into one
            _ensure_clone(root, path, branch, tip)
        else:
            with _admin(root):
                git(root, "worktree", "add", "-q", str(path), branch)
    git(path, "checkout", snapshot, "--", ".")
    git(path, "reset", "-q")
    return ref, path
