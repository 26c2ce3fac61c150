"""Trust boundary, agent work: each agent's own repository, and how its work reaches the
trusted one without the host ever running git inside it.

Called by `workspace` (make, observe, archive and remove an agent's working copy) and so
by the executor, observe and the review commands. Returns commits, counts and trees of the
trusted repository; raises EngineError when work cannot be brought over.

The design (docs/security.md has the threat model):
- an agent works in `.engine/worktrees/<grove>/<agent>/`, a repository of its own whose
  `.git` it fully controls; its object store borrows the trusted repository's objects
  through `objects/info/alternates`, and the container mounts those read-only. Nothing
  host git reads as configuration or as a pointer is ever writable by the agent;
- the host never runs git with the agent's `.git` as the repository. It reads the agent's
  refs as data (regular files, no symlinks, hex object names only), copies the agent's
  new objects to a private staging repository (`tree.copy_*`, no symlink followed) and
  fetches from there with fsck on; the agent's files are read through a host-owned
  shadow repository (`GIT_DIR` the engine's, `GIT_WORK_TREE` the agent's directory),
  so no agent configuration, hook, attribute driver or fsmonitor can run;
- imported tips stay reachable under `refs/engine/work/<grove>/<agent>/<commit>`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from engine import paths
from engine.errors import EngineError
from engine.fsutil import atomic_write
from engine.trust import git, reader, tree
from engine.trust.reader import Untrusted

WORK_PREFIX = "refs/engine/work"
SHA = re.compile(r"[0-9a-f]{40}")
_REF = re.compile(r"refs/(?:heads/(?!.*(?:\.\.|//|/\.|\.lock(?:/|$)|@\{))"
                  r"[A-Za-z0-9._+-][A-Za-z0-9._+/-]{0,200}|stash)")
MAX_REFS = 256  # branches, the stash and HEAD of one agent, all told
MAX_REF_DEPTH = 12  # components of a ref name below refs/heads
REF_FILE_BYTES = 4096
PACKED_REFS_BYTES = 8 << 20
COPY_BYTES = 4 << 30
RETRY_SECONDS = 60.0  # observation retries a failed transfer at most this often


@dataclass(frozen=True)
class AgentRefs:
    """An agent repository's refs as read from its files: what HEAD names and each
    branch (and the stash) -> commit. `problems` says what could not be read."""

    head: str = ""
    refs: dict[str, str] = field(default_factory=dict)
    problems: tuple[str, ...] = ()

    def tips(self) -> list[str]:
        return sorted({self.head, *self.refs.values()} - {""})


def read_refs(workdir: Path) -> AgentRefs:
    """The agent's refs, from `<workdir>/.git` read as untrusted data."""
    problems: list[str] = []
    refs: dict[str, str] = {}
    try:
        packed = reader.read_text(workdir, ".git/packed-refs", PACKED_REFS_BYTES)
    except Untrusted as e:
        packed = ""
        if "not found" not in e.summary:
            problems.append(e.summary)
    for line in packed.splitlines():
        sha, _, name = line.partition(" ")
        if SHA.fullmatch(sha) and _REF.fullmatch(name):
            if len(refs) >= MAX_REFS:
                problems.append(f"{workdir}/.git: more than {MAX_REFS} refs; the rest "
                                "are not brought over")
                break
            refs[name] = sha
    _loose(workdir, ("refs", "heads"), refs, problems)
    _loose_one(workdir, "refs/stash", refs, problems)
    head = ""
    try:
        text = reader.read_text(workdir, ".git/HEAD", REF_FILE_BYTES).strip()
    except Untrusted as e:
        problems.append(e.summary)
        text = ""
    if SHA.fullmatch(text):
        head = text
    elif text.startswith("ref: "):
        head = refs.get(text[5:].strip(), "")
    if not head and text:
        problems.append(f"{workdir}/.git/HEAD: names no commit")
    return AgentRefs(head, refs, tuple(problems))


def _loose_one(workdir: Path, name: str, refs: dict[str, str], problems: list[str]
               ) -> None:
    try:
        sha = reader.read_text(workdir, f".git/{name}", REF_FILE_BYTES).strip()
    except Untrusted as e:
        if "not found" not in e.summary:
            problems.append(e.summary)
        return
    if SHA.fullmatch(sha) and _REF.fullmatch(name):
        refs[name] = sha


def _loose(workdir: Path, parts: tuple[str, ...], refs: dict[str, str],
           problems: list[str]) -> None:
    """Loose refs under .git/<parts>, no symlink followed, at most MAX_REFS."""
    stack = [parts]
    seen = 0
    while stack:
        cur = stack.pop()
        seen += 1
        if seen > MAX_REFS or len(cur) > MAX_REF_DEPTH + len(parts):
            problems.append(f"{workdir}/.git/refs: too many or too deep directories; the "
                            "rest are not brought over")
            return
        dirs, files = tree.listdir(workdir, (".git", *cur))
        for name in files:
            if len(refs) >= MAX_REFS:
                problems.append(f"{workdir}/.git: more than {MAX_REFS} refs")
                return
            _loose_one(workdir, "/".join((*cur, name)), refs, problems)
        stack.extend((*cur, d) for d in dirs)


# -- bringing commits over ------------------------------------------------------------------

@dataclass(frozen=True)
class Imported:
    """The agent's tips as commits of the trusted repository."""

    head: str  # "" when HEAD could not be resolved or brought over
    branch: str  # the agent branch's tip, "" when none
    tips: tuple[str, ...]  # every tip brought over (HEAD, branches, stash)
    problems: tuple[str, ...]


def work_ref_prefix(grove: str, agent: str) -> str:
    return f"{WORK_PREFIX}/{grove}/{agent}/"


def sync(root: Path, grove: str, agent: str, workdir: Path, branch: str,
         fresh: bool = True) -> Imported:
    """Bring the agent's commits into the trusted repository; its branch there is moved
    forward when the agent's branch is ahead of it (never moved back or sideways).
    Nothing is done again when neither side moved since the last sync; with `fresh` off
    (observation for status and plans) only the agent's side is checked, which costs no
    git call at all."""
    refs = read_refs(workdir)
    prefix = work_ref_prefix(grove, agent)
    cache = shadow_dir(root, grove, agent) / "synced.json"
    listing = _listing(root, branch, prefix) if fresh else None
    done = _cached(cache, _key(refs), listing)
    if done is not None:
        return done
    if listing is None:
        listing = _listing(root, branch, prefix)
    out = _sync(root, grove, agent, workdir, branch, refs, listing)
    # a failed transfer is tried again: by the next fresh sync (an archive), and by
    # observation after a minute (a transfer that fails slowly does not stall every status)
    failed = out.problems != refs.problems
    _remember(cache, _key(refs), _listing(root, branch, prefix), out,
              time.time() + RETRY_SECONDS if failed else None)
    return out


def _listing(root: Path, branch: str, prefix: str) -> str:
    """The trusted side of a sync in one call: the agent branch and its imported tips."""
    return git.run(root, "for-each-ref", "--format=%(refname) %(objectname)",
                   f"refs/heads/{branch}", prefix)


def _key(refs: AgentRefs) -> str:
    raw = json.dumps([refs.head, sorted(refs.refs.items()), list(refs.problems)])
    return hashlib.sha256(raw.encode()).hexdigest()


def _cached(path: Path, key: str, listing: str | None) -> Imported | None:
    """The last sync's result when the agent's refs (and, given, the trusted side's
    listing) are what they were then; a failed one only for observation, for a while."""
    try:
        doc = json.loads(path.read_text())
        if doc.get("key") != key or (listing is not None and doc.get("listing") != listing):
            return None
        retry = doc.get("retry")
        if retry is not None and (listing is not None or time.time() >= float(retry)):
            return None
        return Imported(str(doc["head"]), str(doc["branch"]), tuple(doc["tips"]),
                        tuple(doc["problems"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _remember(path: Path, key: str, listing: str, out: Imported, retry: float | None
              ) -> None:
    doc = {"key": key, "listing": listing, "head": out.head, "branch": out.branch,
           "tips": list(out.tips), "problems": list(out.problems), "retry": retry}
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    atomic_write(path, json.dumps(doc).encode(), 0o600)


def _sync(root: Path, grove: str, agent: str, workdir: Path, branch: str, refs: AgentRefs,
          listing: str) -> Imported:
    problems = list(refs.problems)
    prefix = work_ref_prefix(grove, agent)
    have = {line.split()[1] for line in listing.splitlines() if line.startswith(prefix)}
    wanted = refs.tips()
    known = _commits(root, [t for t in wanted if t not in have])
    missing = [t for t in wanted if t not in have and t not in known]
    if missing:
        try:
            _fetch(root, workdir, missing, prefix)
        except (EngineError, OSError) as e:
            problems.append(f"agent {grove}/{agent}: its commits cannot be brought over "
                            f"({getattr(e, 'summary', None) or e})")
    if missing:
        known |= _commits(root, missing)
    present = [t for t in wanted if t in have or t in known]
    _set_work_refs(root, prefix, have, present)
    tip = refs.refs.get(f"refs/heads/{branch}", "")
    tip = tip if tip in present else ""
    if tip:
        _advance(root, branch, tip)
    head = refs.head if refs.head in present else ""
    return Imported(head, tip, tuple(present), tuple(problems))


def _commits(root: Path, shas: list[str]) -> set[str]:
    """Which of `shas` are commits of the trusted repository (one git call)."""
    if not shas:
        return set()
    out = git.run(root, "cat-file", "--batch-check", input="".join(s + "\n" for s in shas))
    return {ln.split()[0] for ln in out.splitlines() if ln.split()[1:2] == ["commit"]}


def _set_work_refs(root: Path, prefix: str, have: set[str], present: list[str]) -> None:
    lines = [f"delete {prefix}{s}\n" for s in sorted(have - set(present))]
    lines += [f"update {prefix}{s} {s}\n" for s in present if s not in have]
    if lines:  # a concurrent sync may have done the same: its result is as good
        git.call(root, "update-ref", "--stdin", input="".join(lines))


def _advance(root: Path, branch: str, tip: str) -> None:
    ref = f"refs/heads/{branch}"
    cur = git.run(root, "rev-parse", "-q", "--verify", ref, check=False)
    if cur == tip:
        return
    # compare-and-swap; losing a race to another sync of the same agent is fine (it moved
    # the branch to the same place, or the next sync will)
    if not cur:
        git.call(root, "update-ref", ref, tip, "")
    elif git.ok(root, "merge-base", "--is-ancestor", cur, tip):
        git.call(root, "update-ref", ref, tip, cur)


def _fetch(root: Path, workdir: Path, shas: list[str], prefix: str) -> None:
    """Copy the agent's objects to a private staging repository, then fetch `shas`
    from it with fsck on: git validates every object before the trusted repository
    holds it."""
    staging = Path(tempfile.mkdtemp(prefix="import-", dir=_tmp(root)))
    try:
        git.run(root, "init", "-q", "--bare", "--template=", str(staging))
        main_objects = objects_dir(root)
        (staging / "objects" / "info").mkdir(parents=True, exist_ok=True)
        (staging / "objects" / "info" / "alternates").write_text(f"{main_objects}\n")
        _copy_objects(workdir, staging / "objects", main_objects)
        for sha in shas:
            p = staging / "refs" / "incoming" / sha
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(sha + "\n")
        git.run(root, "fetch", "-q", "--no-tags", "--no-write-fetch-head", "--no-auto-gc",
                str(staging), *(f"+refs/incoming/{s}:{prefix}{s}" for s in shas),
                timeout=600)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


_LOOSE_DIR = re.compile(r"[0-9a-f]{2}")
_LOOSE = re.compile(r"[0-9a-f]{38}")
_PACK = re.compile(r"pack-[0-9a-f]{40}\.(?:pack|idx)")


def _copy_objects(workdir: Path, dest: Path, main_objects: Path) -> None:
    """The agent's own objects (loose ones the trusted store lacks, and packs), copied
    without following a symlink anywhere from the workspace down."""
    budget = tree.Budget(COPY_BYTES)
    where = (".git", "objects")
    for sub in tree.listdir(workdir, where)[0]:
        files = tree.listdir(workdir, (*where, sub))[1]
        if _LOOSE_DIR.fullmatch(sub):
            names = [n for n in files if _LOOSE.fullmatch(n)
                     and not (main_objects / sub / n).exists()]
        elif sub == "pack":
            names = [n for n in files if _PACK.fullmatch(n)]
        else:
            continue
        if not names:
            continue
        (dest / sub).mkdir(parents=True, exist_ok=True)
        with reader.opendir(workdir, (*where, sub)) as d, reader.opendir(dest, (sub,)) as out:
            for n in names:
                tree.copy_file(d, n, out, n, budget, f"{workdir}/.git/objects/{sub}")


def _tmp(root: Path) -> Path:
    d = paths.state(root) / "exchange" / "tmp"
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    return d


@functools.cache
def objects_dir(root: Path) -> Path:
    """The trusted repository's object store (what agent repositories borrow), as
    GitPython's `Repo` of the trusted repository finds it."""
    repo = git.repository(root)
    try:
        return Path(repo.common_dir).resolve() / "objects"
    finally:
        repo.close()


def forget(root: Path, grove: str, agent: str) -> None:
    """Drop the agent's imported-tip refs and its shadow (after its work is archived)."""
    prefix = work_ref_prefix(grove, agent)
    refs = git.run(root, "for-each-ref", "--format=%(refname)", prefix).split()
    if refs:
        git.run(root, "update-ref", "--stdin", input="".join(f"delete {r}\n" for r in refs))
    shutil.rmtree(shadow_dir(root, grove, agent), ignore_errors=True)


# -- the agent's files, read through a shadow repository ------------------------------------

def shadow_dir(root: Path, grove: str, agent: str) -> Path:
    return paths.state(root) / "exchange" / grove / agent


def hide(root: Path, grove: str, agent: str, rel: str) -> None:
    """Keep `rel` (the engine's instructions file) out of the host's view of the agent's
    changes, as the agent's own repository does (workspace.make)."""
    s = shadow_dir(root, grove, agent)
    s.mkdir(parents=True, exist_ok=True, mode=0o700)
    f = s / "hidden"
    if not f.is_file() or f.read_text() != rel + "\n":
        f.write_text(rel + "\n")
        (s / "index-head").unlink(missing_ok=True)


def _shadow(root: Path, grove: str, agent: str, workdir: Path, head: str) -> dict[str, str]:
    """The environment that makes git read `workdir` as the work tree of the engine's own
    shadow repository, whose index holds `head` (or nothing)."""
    s = shadow_dir(root, grove, agent)
    gitdir = s / "git"
    if not (gitdir / "HEAD").is_file():
        s.mkdir(parents=True, exist_ok=True, mode=0o700)
        git.run(root, "init", "-q", "--bare", "--template=", str(gitdir))
        (gitdir / "objects" / "info").mkdir(parents=True, exist_ok=True)
    _own_files(gitdir, objects_dir(root))
    hidden = (s / "hidden").read_text().split("\n") if (s / "hidden").is_file() else []
    hidden = [h for h in hidden if h]
    (gitdir / "info").mkdir(exist_ok=True)
    want = "".join(f"/{x}\n" for x in hidden)
    exclude = gitdir / "info" / "exclude"
    if not exclude.is_file() or exclude.read_text() != want:
        exclude.write_text(want)
    env = {"GIT_DIR": str(gitdir), "GIT_WORK_TREE": str(workdir),
           "GIT_INDEX_FILE": str(s / "index"), "GIT_LITERAL_PATHSPECS": "1",
           "GIT_OPTIONAL_LOCKS": "0"}
    marker = s / "index-head"
    if not marker.is_file() or marker.read_text() != head:
        (gitdir / "HEAD").write_text((head or "ref: refs/heads/none") + "\n")
        if head:
            git.run(root, "read-tree", head, env=env)
        else:
            git.run(root, "read-tree", "--empty", env=env)
        for h in hidden:  # tracked: the agent's section is a local change, not work
            git.run(root, "update-index", "--skip-worktree", "--", h, env=env, check=False)
        marker.write_text(head)
    return env


SHADOW_CONFIG = "[core]\n\trepositoryformatversion = 0\n\tbare = true\n"


def _own_files(gitdir: Path, objects: Path) -> None:
    """The shadow's configuration, alternates and attributes are the engine's, whatever
    has happened under `.engine/` since: rewritten when they differ, and no attributes
    file at all (drivers and filters exist only where configuration defines them)."""
    for path, want in ((gitdir / "config", SHADOW_CONFIG),
                       (gitdir / "objects" / "info" / "alternates", f"{objects}\n")):
        try:
            same = not path.is_symlink() and path.read_text() == want
        except OSError:
            same = False
        if not same:
            path.unlink(missing_ok=True)
            atomic_write(path, want.encode(), 0o600)
    (gitdir / "info" / "attributes").unlink(missing_ok=True)


def status(root: Path, grove: str, agent: str, workdir: Path, head: str
           ) -> list[tuple[str, str]]:
    """(XY code, path) of every change in the agent's files against `head`, ignored paths
    as "!!" (git status --porcelain, read through the shadow)."""
    env = _shadow(root, grove, agent, workdir, head)
    raw = git.raw_env(root, env, "status", "--porcelain", "-z", "--untracked-files=all",
                      "--ignored=matching", "--no-renames", "--ignore-submodules=all")
    out = []
    for entry in raw.split(b"\0"):
        if len(entry) > 3:
            out.append((entry[:2].decode(), os.fsdecode(entry[3:])))
    return out


def snapshot(root: Path, grove: str, agent: str, workdir: Path, head: str
             ) -> tuple[str, list[str]]:
    """A tree of the agent's files as they are: `head`'s tree with every changed path
    replaced by a copy taken without following symlinks; with no `head`, every file.
    Returns (tree, paths that could not be kept and why). Raises EngineError when the
    files cannot be read at all."""
    tmp = Path(tempfile.mkdtemp(prefix="snapshot-", dir=_tmp(root)))
    files = tmp / "files"
    files.mkdir()
    try:
        # the shadow's configuration (empty: no filter or attribute driver can run), the
        # trusted repository's object store (the tree must be there for the archive)
        _shadow(root, grove, agent, workdir, head)
        env = {"GIT_DIR": str(shadow_dir(root, grove, agent) / "git"),
               "GIT_OBJECT_DIRECTORY": str(objects_dir(root)), "GIT_WORK_TREE": str(files),
               "GIT_INDEX_FILE": str(tmp / "index")}
        budget = tree.Budget(COPY_BYTES)
        if head:
            changed = [p for c, p in status(root, grove, agent, workdir, head) if c != "!!"]
        else:
            with reader.opendir(workdir) as d:
                changed = sorted(n for n in os.listdir(d) if n != ".git")
        kept = [p for p in changed if _keepable(p)]
        problems = [f"not kept: {p!r} (a name git refuses)" for p in changed
                    if not _keepable(p)]
        tree.copy_paths(workdir, kept, files, budget)
        present = tree.files_under(files)  # a copied directory counts by its files
        git.run(files, "read-tree", head or "--empty", env=env)
        done = set(present)
        problems += _index(files, env, [p for p in kept if p not in done], present)
        return git.run(files, "write-tree", env=env), problems
    except (OSError, Untrusted, RecursionError) as e:
        raise EngineError(f"agent {grove}/{agent}: cannot save its files "
                          f"({reader.one_line(getattr(e, 'summary', None) or str(e))})"
                          ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _keepable(path: str) -> bool:
    """Whether git can hold `path` in a tree (its own path rules: no `.git` in any case or
    disguise, no empty, `.` or `..` component)."""
    for part in path.split("/"):
        low = part.lower().rstrip(". ")
        if part in ("", ".", "..") or low == ".git" or low.startswith("git~"):
            return False
    return True


def _index(files: Path, env: dict[str, str], gone: list[str], copied: list[str]
           ) -> list[str]:
    """Put the copied paths in the index and take the gone ones out (they were deleted,
    or are FIFOs, devices or beyond a symlink: nothing to keep). One batch each; when a
    batch is refused, path by path, and what git still refuses is reported."""
    problems: list[str] = []
    for args, names in ((("--force-remove",), gone), (("--add", "--replace"), copied)):
        if not names:
            continue
        data = b"\0".join(os.fsencode(p) for p in names) + b"\0"
        if git.call(files, "update-index", *args, "-z", "--stdin", input=data,
                    env=env).returncode == 0:
            continue
        for p in names:
            r = git.call(files, "update-index", *args, "-z", "--stdin",
                         input=os.fsencode(p) + b"\0", env=env)
            if r.returncode != 0:
                problems.append(f"not kept: {p!r} ({reader.one_line(r.stderr)})")
    return problems
