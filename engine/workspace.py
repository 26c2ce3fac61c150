"""Workspaces: each agent's branch and working copy, and the archive that keeps work safe.

Called by `executor` (ensure before start, archive+remove on delete), `observe`
(dirty/ahead counts for plans and status) and the review commands (diff, merge, restore).
Branches are `engine/<grove>/<agent>`. A working copy is `.engine/worktrees/<grove>/<agent>`,
a repository the agent owns (see `engine.trust.exchange`): it is made whole in a private
directory and renamed into place, so a crash never leaves a half-made one to reuse. Nothing
is removed before its uncommitted changes and unmerged commits are saved under
`refs/engine/archive/<grove>/<agent>/<n>`; when they cannot be saved, nothing is removed.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from engine import archive as archive_mod
from engine import fsutil, instructions, paths
from engine.desired import DesiredAgent
from engine.errors import EngineError
from engine.fsutil import failpoint, flock
from engine.trust import exchange
from engine.trust.git import GitFailed, call, ok
from engine.trust.git import run as git

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
    return paths.state(root) / "worktrees" / grove / agent


def base_commit(root: Path, base_ref: str) -> tuple[str, str]:
    """(ref name, commit) of the grove's base; the current branch when `base_ref` is ""."""
    if call(root, "rev-parse", "--git-dir").returncode != 0:
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


def agent_of_branch(branch: str) -> tuple[str, str] | None:
    """(grove, agent) of an agent branch `engine/<grove>/<agent>`."""
    return paths.agent_of_branch(branch)


def start_point(root: Path, base: str, inputs: tuple[str, ...], who: str) -> str:
    """Where a new agent branch starts: the base, with the branches of the agent's
    dependencies merged in (so a dependent sees its dependencies' work)."""
    start = base
    for branch in inputs:
        owner = agent_of_branch(branch)
        if owner is not None and path_for(root, *owner).is_dir():
            exchange.sync(root, *owner, path_for(root, *owner), branch)
        tip = git(root, "rev-parse", "-q", "--verify", f"refs/heads/{branch}", check=False)
        if not tip or archive_mod.is_ancestor(root, tip, start):
            continue
        if archive_mod.is_ancestor(root, start, tip):
            start = tip
            continue
        p = call(root, "merge-tree", "--write-tree", "--name-only", start, tip)
        lines = p.stdout.strip().splitlines()
        if p.returncode != 0:
            raise EngineError(f"agent {who}: the work of its dependencies conflicts "
                              f"({branch}: {', '.join(lines[1:4])})")
        start = git(root, "commit-tree", lines[0], "-p", start, "-p", tip, "-m",
                    f"engine: start {who} from {branch}")
    return start


def common_dir(root: Path) -> Path:
    """The trusted repository's git directory (shared by its worktrees)."""
    return exchange.objects_dir(root).parent


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
    mounts = ((exchange.objects_dir(root), True),)
    who = f"agent {agent.grove}/{agent.name}"
    if os.path.lexists(path):
        if (path / ".git").is_file() and not (path / ".git").is_symlink():
            raise EngineError(f"{who}: {path} is a git worktree made by an earlier engine "
                              "version; `engine destroy` it (its work is archived) and "
                              "apply again")
        if not _is_agent_repo(path):
            raise EngineError(f"{who}: {path} already exists and is not this agent's "
                              "workspace; move it away")
        _hide(root, agent)
        return Workspace(path, branch, sha, mounts)
    ref = f"refs/heads/{branch}"
    tip = git(root, "rev-parse", "-q", "--verify", ref, check=False)
    if not tip:  # created only if still absent (a concurrent maker wins, not both)
        tip = start_point(root, sha, inputs, who)
        git(root, "update-ref", ref, tip, "")
    try:
        make(root, path, branch, tip, agent.name, agent.grove,
             hide=instructions.relative(agent) if agent.instructions_file else "")
    except GitFailed as e:
        raise EngineError(f"{who}: cannot create its workspace: {e.summary}") from None
    _hide(root, agent)
    return Workspace(path, branch, sha, mounts)


def _hide(root: Path, agent: DesiredAgent) -> None:
    if agent.instructions_file:
        exchange.hide(root, agent.grove, agent.name, instructions.relative(agent))


def _is_agent_repo(path: Path) -> bool:
    """A directory (not a symlink) holding a `.git` directory: what `make` leaves."""
    return path.is_dir() and not path.is_symlink() and (path / ".git").is_dir() and \
        not (path / ".git").is_symlink()


def make(root: Path, path: Path, branch: str, tip: str, name: str, grove: str,
         overlay: str = "", hide: str = "") -> None:
    """Make the agent's repository at `path`, checked out at `tip` on `branch` (with the
    files of commit `overlay` on top, uncommitted, when restoring an archive). Built in
    a private directory and renamed into place: it is there whole or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for old in path.parent.glob(f".{path.name}.new-*"):
        shutil.rmtree(old, ignore_errors=True)  # an earlier attempt that died: never used
    tmp = path.parent / f".{path.name}.new-{secrets.token_hex(4)}"
    try:
        _init(tmp / ".git", exchange.objects_dir(root), name, grove)
        dotgit = tmp / ".git"
        ref = dotgit / "refs" / "heads" / branch
        ref.parent.mkdir(parents=True, exist_ok=True)
        ref.write_text(tip + "\n")
        (dotgit / "HEAD").write_text(f"ref: refs/heads/{branch}\n")
        failpoint("workspace-half-made")
        git(tmp, "reset", "-q", "--hard")
        if hide:  # the engine's instructions file never reaches the agent's commits
            if git(tmp, "ls-files", "--", hide):
                git(tmp, "update-index", "--skip-worktree", "--", hide)
            else:
                instructions.exclude(tmp / ".git" / "info" / "exclude", hide)
        if overlay:
            git(tmp, "checkout", overlay, "--", ".")
            git(tmp, "reset", "-q")
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _init(dotgit: Path, objects: Path, name: str, grove: str) -> None:
    """What `git init` makes, written directly (the directory is fresh and private): the
    object store borrowing the repository's objects, and the agent's identity."""
    for d in ("objects/info", "objects/pack", "refs/heads", "refs/tags"):
        (dotgit / d).mkdir(parents=True)
    (dotgit / "objects" / "info" / "alternates").write_text(f"{objects}\n")
    (dotgit / "config").write_text(
        "[core]\n\trepositoryformatversion = 0\n\tfilemode = true\n\tbare = false\n"
        f"\tlogallrefupdates = true\n[user]\n\tname = {name} ({grove})\n"
        f"\temail = {name}@{grove}.agents.invalid\n[gc]\n\tauto = 0\n")


def sync(root: Path, grove: str, agent: str, fresh: bool = True) -> None:
    """Bring an agent's commits into the repository (its branch moves forward); `fresh`
    off checks only the agent's side for movement (observation)."""
    path = path_for(root, grove, agent)
    if _is_agent_repo(path):
        exchange.sync(root, grove, agent, path, paths.branch(grove, agent), fresh)


def orphan(root: Path, grove: str, agent: str) -> tuple[str, Path, str] | None:
    """A working copy the engine made for an agent but never recorded (it died in
    between): (mode, path, branch) when the usual path holds this agent's repository,
    else None. Anything else at that path is not the engine's and is left alone."""
    path = path_for(root, grove, agent)
    if not _is_agent_repo(path):
        return None
    return "worktree", path, paths.branch(grove, agent)


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
    """Forget git worktrees whose directories are gone (from earlier engine versions)."""
    git(root, "worktree", "prune", check=False)


def work_state(root: Path, grove: str, agent: str, workdir: Path, branch: str, base: str,
               tip: str = "") -> WorkState:
    """Uncommitted files and commits not on `base` (the commit the agent started from)
    nor on `tip` (the base's current commit: work merged into it is not counted); the
    agent's commits are brought over first (so its branch here is current)."""
    if not workdir.is_dir() or not branch:
        return WorkState(0, 0)
    if workdir.resolve() == root.resolve():
        lines = [(ln[:2], ln[3:]) for ln in git(
            root, "status", "--porcelain", "--untracked-files=all", "--ignored=matching",
            "--ignore-submodules=all", check=False).splitlines() if ln.strip()]
        head = git(root, "rev-parse", "-q", "--verify", "HEAD", check=False)
    else:
        imp = exchange.sync(root, grove, agent, workdir, branch, fresh=False)
        head = imp.head or imp.branch
        lines = exchange.status(root, grove, agent, workdir, head)
    ignored = sum(1 for code, p in lines if code == "!!" and p.rstrip("/") != paths.STATE_DIR)
    dirty = sum(1 for code, _ in lines if code != "!!")
    ahead = 0
    if head and (base or tip):
        ahead = int(git(root, "rev-list", "--count", head, "--not",
                        *[c for c in (base, tip) if c], check=False) or 0)
    return WorkState(dirty, ahead, ignored)


def _archive_base(root: Path, base: str, tip: str) -> str:
    """What the archive compares the work with: the base's current commit when it has
    moved on from the agent's start (so work merged into it is not archived again),
    else the start."""
    if tip and (not base or archive_mod.is_ancestor(root, base, tip)):
        return tip
    return base


def remove(root: Path, grove: str, agent: str, workspace_mode: str, workdir: Path,
           branch: str, base: str, tip: str = "", keep_branch: bool = False) -> str | None:
    """Archive, then remove the working copy and the branch (`keep_branch`: not the
    branch; `engine prune --finished` leaves a finished agent's branch for review).
    Returns the archive ref (None when nothing is uncommitted and every commit is on the
    base: `tip`, its current commit, counts). Raises (and removes nothing) when the work
    cannot be saved."""
    if workspace_mode == "shared":
        return None
    ref = archive_mod.archive(root, grove, agent, workdir, branch,
                              _archive_base(root, base, tip))
    if os.path.lexists(workdir):
        if workdir.is_symlink() or not workdir.is_dir():
            os.unlink(workdir)
        else:
            _rmtree(workdir)
    with _admin(root):
        git(root, "worktree", "prune", check=False)
    exchange.forget(root, grove, agent)
    if branch and not keep_branch and _branch_exists(root, branch):
        git(root, "branch", "-D", branch)
    return ref


def remove_branch(root: Path, grove: str, agent: str, branch: str, base: str,
                  tip: str = "") -> str | None:
    """Archive what only `branch` holds, then delete it: for an agent without a working
    copy whose branch stayed (pruned, then deleted or destroyed). Returns the archive ref
    (None when nothing needed saving); raises, having deleted nothing, when it cannot
    be saved."""
    if not branch or not _branch_exists(root, branch):
        return None
    ref = archive_mod.archive_branch(root, grove, agent, branch,
                                     _archive_base(root, base, tip))
    git(root, "branch", "-D", branch)
    return ref


def _rmtree(path: Path) -> None:
    """Remove a workspace the agent shaped (fsutil.remove_tree); one error if it cannot."""
    try:
        fsutil.remove_tree(path, missing_ok=False)
    except OSError as e:
        raise EngineError(f"{path}: cannot remove ({e})") from None


@contextlib.contextmanager
def _admin(root: Path) -> Iterator[None]:
    """Worktree administration takes turns (pruning worktrees of earlier versions)."""
    with _WT_LOCK, flock(paths.state(root) / "locks" / "worktrees.lock"):
        yield


def restore(root: Path, grove: str, agent: str, number: int | None = None,
            mode: str = "worktree") -> tuple[str, Path]:
    """Bring an archive back: the branch at the archived commits, the uncommitted changes
    as uncommitted files in a new working copy. Returns (archive ref, working copy)."""
    refs = archive_mod.archives(root, grove, agent)
    if not refs:
        raise EngineError(f"agent {grove}/{agent}: no archived work to restore")
    ref = f"{archive_mod.ARCHIVE_PREFIX}/{grove}/{agent}/{number}" if number else refs[-1]
    if ref not in refs:
        raise EngineError(f"agent {grove}/{agent}: no archive #{number} (have "
                          f"{', '.join(r.rsplit('/', 1)[1] for r in refs)})")
    snapshot = git(root, "rev-parse", ref)
    tip = git(root, "rev-parse", f"{snapshot}^")
    branch = paths.branch(grove, agent)
    path = path_for(root, grove, agent)
    if os.path.lexists(path):
        raise EngineError(f"agent {grove}/{agent}: its workspace {path} exists; restore "
                          "makes a new one (destroy the agent or move the directory away)")
    if _branch_exists(root, branch) and not ok(
            root, "merge-base", "--is-ancestor", git(root, "rev-parse", branch), tip):
        raise EngineError(f"agent {grove}/{agent}: branch {branch} has moved on; "
                          f"restore into it by hand: git checkout {ref} -- .")
    git(root, "branch", "-f", branch, tip)
    make(root, path, branch, tip, agent, grove, overlay=snapshot)
    return ref, path
