"""Docker runtime, host side of the disk: the directories and files one agent container
mounts, owned or made writable by the agent's uid.

Called by `engine.runtimes.docker` before a container is created (`prepare`, which
returns the `HostDirs` the container spec mounts), after it is removed (`forget`), and to
read its log (`read_log`).

Ownership: the agent runs as a fixed uid (1000 by default) that is usually not the uid of
the engine. What the engine made for this one agent's container (its scratch dirs, its secret
files) is given to that uid: chown when the engine is root, nothing when the uids already
match, else a POSIX ACL. Git state (the worktree, its entry in the common git dir, the git
objects, the grove's branch refs) keeps its owner and gains an ACL entry for the agent uid
only, so the repository's owner keeps every right it had, and the host's git, which refuses a
repository owned by another user, keeps working in the worktree.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from engine.errors import EngineError
from engine.fsutil import atomic_write
from engine.runtimes import Launch
from engine.runtimes.docker_spec import HostDirs, client_shim, uid_gid

_ACCESS, _DEFAULT = "system.posix_acl_access", "system.posix_acl_default"
_USER_OBJ, _USER, _GROUP_OBJ, _GROUP, _MASK, _OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
_NO_ID = 0xFFFFFFFF


def prepare(launch: Launch, entrypoint: Path) -> HostDirs:
    """Create the agent's scratch dirs, write its secret files, grant its uid access."""
    a = launch.agent
    uid, gid = uid_gid(a.user)
    if not launch.client.is_file():
        raise EngineError(f"agent {a.grove}/{a.name}: agent-side client {launch.client} "
                          "is missing (a broken install)")
    ctl, secrets = launch.run_dir / "ctl", launch.run_dir / "secrets"
    for d in (ctl, secrets):
        shutil.rmtree(d, ignore_errors=True)
    ctl.mkdir(parents=True)
    _write_secrets(secrets, launch.secrets)
    shim = launch.run_dir / "bin" / "engine"
    atomic_write(shim, client_shim().encode(), 0o755)
    launch.inbox.mkdir(parents=True, exist_ok=True)
    launch.log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(launch.log_file, "ab" if launch.resume else "wb"):
        pass
    for p in (ctl, secrets, launch.inbox, launch.log_file):
        give(p, uid, gid)
    if a.access != "read-only":
        _grant_workspace(launch, uid)
    return HostDirs(ctl=ctl, secrets=secrets, log=launch.log_file, inbox=launch.inbox,
                    client=launch.client, client_bin=shim, entrypoint=entrypoint)


def forget(run_dir: Path) -> None:
    """Remove what `prepare` made in the run dir (secret files first) once the container
    is gone; the log and the inbox stay."""
    for sub in ("secrets", "ctl", "bin"):
        shutil.rmtree(run_dir / sub, ignore_errors=True)


def _write_secrets(directory: Path, values: dict[str, str]) -> None:
    directory.mkdir(mode=0o700)
    os.chmod(directory, 0o700)
    for name, value in sorted(values.items()):
        fd = os.open(directory / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
        with os.fdopen(fd, "w") as f:
            f.write(value)


def _grant_workspace(launch: Launch, uid: int) -> None:
    """Make the workdir and the git state its commits touch writable by the agent uid.
    ACLs, not chown: the host's git refuses repositories owned by another user."""
    share(launch.workdir, uid, files=True)
    dotgit = launch.workdir / ".git"
    if dotgit.is_file():  # a worktree: its private git dir lives in the common dir
        text = dotgit.read_text().strip()
        if text.startswith("gitdir:"):
            share(Path(text.removeprefix("gitdir:").strip()), uid, files=True)
    branch_dir = Path(launch.agent.branch).parent
    for path, read_only in launch.git_paths:
        if read_only:
            continue
        share(path / "objects", uid, files=False)
        share(path / "refs" / "heads" / branch_dir, uid, files=False)
        share(path / "logs" / "refs" / "heads" / branch_dir, uid, files=True)


def read_log(path: Path, follow: bool, running: Callable[[], bool]) -> Iterator[str]:
    """Lines of the agent's log file; with `follow`, until `running()` turns false and the
    file is drained."""
    with open(path, "rb") as f:
        buf = b""
        while True:
            chunk = f.read(65536)
            if chunk:
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    yield line.rstrip(b"\r").decode(errors="replace")
                continue
            if not follow:
                break
            if not running():
                follow = False  # one more read drains what the last moments wrote
                continue
            time.sleep(0.3)
        if buf:
            yield buf.rstrip(b"\r").decode(errors="replace")


# -- ownership ------------------------------------------------------------------------------

def _walk(path: Path) -> Iterator[tuple[Path, bool]]:
    """`path` and everything under it, as (path, is_dir); symlinks are never followed."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    yield path, stat.S_ISDIR(st.st_mode)
    if not stat.S_ISDIR(st.st_mode):
        return
    for root, dirs, files in os.walk(path):
        for d in dirs:
            p = Path(root, d)
            yield p, not p.is_symlink()
        for f in files:
            yield Path(root, f), False


def give(path: Path, uid: int, gid: int) -> None:
    """Hand `path` (recursively) to the agent uid."""
    if os.geteuid() == 0:
        for p, _ in _walk(path):
            os.lchown(p, uid, gid)
    elif os.geteuid() != uid:
        share(path, uid, files=True)


def share(path: Path, uid: int, files: bool) -> None:
    """Add rwx (dirs, inherited by what is created in them) and rw (files, with `files`)
    for the agent uid to `path` and everything under it, keeping owners and modes."""
    for p, is_dir in _walk(path):
        if p.is_symlink() or (not is_dir and not files):
            continue
        st = p.lstat()
        if st.st_uid == uid:
            continue
        _add_acl(p, _ACCESS, st.st_mode, uid, 7 if is_dir else 6)
        if is_dir:
            _add_acl(p, _DEFAULT, st.st_mode, uid, 7)


def _add_acl(path: Path, attr: str, mode: int, uid: int, perm: int) -> None:
    try:
        raw = os.getxattr(path, attr, follow_symlinks=False)
        entries = [struct.unpack_from("<HHI", raw, 4 + 8 * i) for i in range((len(raw) - 4) // 8)]
    except OSError as e:
        if e.errno not in (errno.ENODATA, errno.EOPNOTSUPP):
            raise
        entries = []
    if not entries:
        entries = [(_USER_OBJ, (mode >> 6) & 7, _NO_ID), (_GROUP_OBJ, (mode >> 3) & 7, _NO_ID),
                   (_OTHER, mode & 7, _NO_ID)]
    entries = [e for e in entries if e[0] != _MASK and not (e[0] == _USER and e[2] == uid)]
    entries.append((_USER, perm, uid))
    mask = 0
    for tag, p, _ in entries:
        if tag in (_USER, _GROUP_OBJ, _GROUP):
            mask |= p
    entries.append((_MASK, mask, _NO_ID))
    entries.sort(key=lambda e: (e[0], e[2]))
    data = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)
    try:
        os.setxattr(path, attr, data, follow_symlinks=False)
    except OSError as e:
        raise EngineError(f"{path}: cannot give uid {uid} access ({e.strerror}); run the "
                          f"engine as uid {uid} or as root, or set the profile's user: to "
                          "your uid") from None
