"""Docker runtime, host side of the disk: the directories and files one agent container
mounts, owned or made writable by the agent's uid.

Called by `engine.runtimes.docker` before a container is created (`prepare`, which
returns the `HostDirs` the container spec mounts), after it is removed (`forget`), and to
read its log (`read_log`); the agent's home (`ensure_home`, `remove_home`) by the local
runtime too, which keeps it in the same place.

The home is the one directory that outlives the agent's container (or session): a
harness keeps its login and its sessions there, which a restart resumes. It is made by the
engine under `.engine/home/<grove>/` (the engine's, so the agent cannot swap it for a
link), handed to the agent uid, never read by the engine, and removed with the agent.

Ownership: the agent runs as a fixed uid (1000 by default) that is usually not the uid of
the engine. What the engine made for this one agent's container (its scratch dirs, its secret
files) is given to that uid: chown when the engine is root, nothing when the uids already
match, else a POSIX ACL. The agent's workspace (its own repository) keeps its owner and
gains an ACL entry for the agent uid. Nothing of the trusted repository is granted: its
object store is mounted read-only and readable as it is.

Grants are never computed from agent data: every walk opens each entry relative to its
already open parent without following symlinks and changes the open file (`fchown`,
`fsetxattr`), so an agent that swaps a directory for a symlink mid-walk cannot steer a
grant outside its own tree. The workspace is granted once per uid (a marker in the
engine's state), not on every restart.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import os
import stat
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from engine import fsutil, paths
from engine.errors import EngineError
from engine.fsutil import atomic_write
from engine.runtimes import Launch, logfile
from engine.runtimes.docker_spec import HostDirs, client_shim, uid_gid
from engine.trust import reader, tree

_ACCESS, _DEFAULT = "system.posix_acl_access", "system.posix_acl_default"
_USER_OBJ, _USER, _GROUP_OBJ, _GROUP, _MASK, _OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
_NO_ID = 0xFFFFFFFF


def prepare(launch: Launch, entrypoint: Path,
            owner: tuple[int, int] | None = None) -> HostDirs:
    """Create the agent's scratch dirs, write its secret files, grant its uid access.
    `owner`: the uid:gid the agent's user is on the host when that is not its uid in the
    container (rootless Podman maps it to the service's own user: keep-id)."""
    a = launch.agent
    uid, gid = owner or uid_gid(a.user)
    if not launch.client.is_file():
        raise EngineError(f"agent {a.grove}/{a.name}: agent-side client {launch.client} "
                          "is missing (a broken install)")
    ctl, secrets = launch.run_dir / "ctl", launch.run_dir / "secrets"
    for d in (ctl, secrets):  # the agent wrote in ctl: any shape, any depth
        with contextlib.suppress(OSError):
            fsutil.remove_tree(d)
    ctl.mkdir(parents=True)
    if os.geteuid() == 0:
        # the container reaches these through its mounts, never by path: no uid on the
        # host (a local agent runs as uid 1000 too) may reach this agent's secret files
        os.chmod(launch.run_dir, 0o700)
    _write_secrets(secrets, launch.secrets)
    shim = launch.run_dir / "bin" / "engine"
    atomic_write(shim, client_shim().encode(), 0o755)
    launch.inbox.mkdir(parents=True, exist_ok=True)
    logfile.private_dir(launch.log_file)
    logfile.rotate(launch.log_file)  # the run before's log: logs --previous
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    os.close(os.open(launch.log_file, flags | os.O_TRUNC, 0o644))
    for p in (ctl, secrets, launch.inbox, launch.log_file):
        give(p, uid, gid)
    if a.access != "read-only":
        grant_workspace(launch, uid)
    home = ensure_home(launch.repo_root, a.grove, a.name, uid, gid, sealed=True)
    return HostDirs(ctl=ctl, secrets=secrets, log=launch.log_file, inbox=launch.inbox,
                    client=launch.client, client_bin=shim, entrypoint=entrypoint, home=home)


def forget(run_dir: Path) -> None:
    """Remove what `prepare` made in the run dir (secret files first) once the container
    is gone; the log and the inbox stay."""
    for sub in ("secrets", "ctl", "bin"):
        with contextlib.suppress(OSError):
            fsutil.remove_tree(run_dir / sub)


def home_dir(repo_root: Path, grove: str, agent: str, sealed: bool = False) -> Path:
    """`.engine/home/<grove>/<agent>`: the agent's own home on the host. `sealed` (a
    container's home, reached only through its mount): under `.engine/home-sealed/`,
    which only the engine's user may enter, so no local agent (whose uid a container's
    user may share) can reach it by path."""
    return paths.state(repo_root) / ("home-sealed" if sealed else "home") / grove / agent


def ensure_home(repo_root: Path, grove: str, agent: str, uid: int, gid: int,
                sealed: bool = False) -> Path:
    """The agent's home, made if need be and handed to its uid (a home another uid had,
    the profile's user having changed, is handed over whole, walked by descriptor)."""
    home = home_dir(repo_root, grove, agent, sealed)
    home.parent.mkdir(parents=True, exist_ok=True)
    if sealed:
        os.chmod(home.parent.parent, 0o700)  # entered by the engine's user alone
    made = False
    with contextlib.suppress(FileExistsError):
        home.mkdir(mode=0o700)
        made = True
    try:
        fd = os.open(home, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:  # a link or a file where the home goes: not made by the engine
        raise EngineError(f"agent {grove}/{agent}: its home {home} is not a directory "
                          f"({e.strerror}); refused") from None
    try:
        st = os.fstat(fd)
        if os.geteuid() == 0:
            if st.st_uid != uid:
                give(home, uid, gid)
            elif st.st_gid != gid:
                os.fchown(fd, uid, gid)
        elif made and os.geteuid() != uid:
            # the agent's uid may write it, and what it makes there stays removable by
            # the engine's (a default entry its new directories inherit)
            _add_acl(fd, home, _ACCESS, st.st_mode, uid, 7)
            _add_acl(fd, home, _DEFAULT, st.st_mode, uid, 7)
            _add_acl(fd, home, _DEFAULT, st.st_mode, os.geteuid(), 7)
    finally:
        os.close(fd)
    return home


def remove_home(repo_root: Path, grove: str, agent: str, sealed: bool = False) -> None:
    """Remove the agent's home with the agent (a link in it is removed, not followed)."""
    home = home_dir(repo_root, grove, agent, sealed)
    try:
        st = home.lstat()
    except FileNotFoundError:
        return
    try:
        if stat.S_ISDIR(st.st_mode):
            fsutil.remove_tree(home)  # no symlink inside is followed, any depth
        else:
            home.unlink()
    except OSError as e:
        raise EngineError(f"agent {grove}/{agent}: its home {home} cannot be removed "
                          f"({e.strerror}); remove it by hand") from None


def _write_secrets(directory: Path, values: dict[str, str]) -> None:
    directory.mkdir(mode=0o700)
    os.chmod(directory, 0o700)
    for name, value in sorted(values.items()):
        fd = os.open(directory / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
        with os.fdopen(fd, "w") as f:
            f.write(value)


def grant_workspace(launch: Launch, uid: int) -> None:
    """Make the agent's workspace writable by its uid, once (its own files are its own
    after that). A shared workspace is the user's checkout: its files, never its `.git`
    or the engine's `.engine`."""
    a = launch.agent
    marker = paths.state(launch.repo_root) / "exchange" / a.grove / a.name / f"granted-{uid}"
    if marker.is_file():
        return
    shared = launch.workdir.resolve() == launch.repo_root.resolve()
    share(launch.workdir, uid, files=True,
          skip_top=frozenset({".git", paths.STATE_DIR}) if shared else frozenset())
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()


def read_log(path: Path, follow: bool, running: Callable[[], bool],
             tail: int | None = None) -> Iterator[str]:
    """Lines of the agent's log file (with `tail`, its last `tail` lines, found from the
    end: `logfile.tail_start`); with `follow`, until `running()` turns false and the
    file is drained. The file is agent-written: it is opened through the trust reader (a
    symlink at `path` is not followed, anything but a regular file is refused, the open
    never blocks), and a line longer than 64 KiB comes in pieces. The lines are not yet
    safe for a terminal: the caller passes them through `reader.for_terminal`."""
    cap = logfile.LINE_CAP
    f = os.fdopen(reader.open_regular(path.parent, path.name), "rb")
    try:
        last: collections.deque[str] | None = None
        if tail is not None:  # the last lines there are now, then (following) what comes
            f.seek(logfile.tail_start(f.fileno(), tail))
            last = collections.deque(maxlen=max(tail, 0))
        out: Callable[[str], None] | None = None if last is None else last.append
        buf = b""
        while True:
            chunk = f.read(65536)
            if chunk:
                *lines, buf = (buf + chunk).split(b"\n")
                pieces = [line.rstrip(b"\r")[at:at + cap].decode(errors="replace")
                          for line in lines
                          for at in range(0, max(len(line.rstrip(b"\r")), 1), cap)]
                while len(buf) > cap:
                    pieces.append(buf[:cap].decode(errors="replace"))
                    buf = buf[cap:]
                if out is None:
                    yield from pieces
                else:
                    for piece in pieces:
                        out(piece)
                continue
            if last is not None:  # the end as it was: the tail is complete
                if buf and not follow:
                    last.append(buf.rstrip(b"\r").decode(errors="replace"))
                    buf = b""
                yield from last
                last = out = None
            if not follow:
                break
            if logfile.replaced(f.fileno(), path):
                # a restart rotated the log: this run's is read from its start
                if buf:
                    yield buf.rstrip(b"\r").decode(errors="replace")
                    buf = b""
                f.close()
                f = os.fdopen(reader.open_regular(path.parent, path.name), "rb")
                continue
            if not running():
                follow = False  # one more read drains what the last moments wrote
                continue
            time.sleep(0.3)
        if buf:
            yield buf.rstrip(b"\r").decode(errors="replace")
    finally:
        f.close()


# -- ownership ------------------------------------------------------------------------------

def _each(path: Path, visit: Callable[[int, bool], None],
          skip_top: frozenset[str] = frozenset()) -> None:
    """`visit(fd, is_dir)` for `path` and, for a directory, everything beneath it; no
    symlink is followed, at the top or below."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        tree.walk_fds(path, visit, tree.Budget(1 << 62), skip_top)
    elif stat.S_ISREG(st.st_mode):
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            visit(fd, False)
        finally:
            os.close(fd)


def _single(fd: int, is_dir: bool) -> bool:
    """Whether a grant may touch this entry: a directory, or a file with one link (a hard
    link an agent made to someone else's file is never handed to it)."""
    return is_dir or os.fstat(fd).st_nlink == 1


def give(path: Path, uid: int, gid: int) -> None:
    """Hand `path` (recursively) to the agent uid."""
    if os.geteuid() == 0:
        _each(path, lambda fd, d: os.fchown(fd, uid, gid) if _single(fd, d) else None)
    elif os.geteuid() != uid:
        share(path, uid, files=True)


def share(path: Path, uid: int, files: bool, skip_top: frozenset[str] = frozenset()
          ) -> None:
    """Add rwx (dirs, inherited by what is created in them) and rw (files, with `files`)
    for the agent uid to `path` and everything under it, keeping owners and modes."""
    def visit(fd: int, is_dir: bool) -> None:
        if not is_dir and not files:
            return
        st = os.fstat(fd)
        if st.st_uid == uid or not _single(fd, is_dir):
            return
        _add_acl(fd, path, _ACCESS, st.st_mode, uid, 7 if is_dir else 6)
        if is_dir:
            _add_acl(fd, path, _DEFAULT, st.st_mode, uid, 7)

    _each(path, visit, skip_top)


def grant_search(path: Path, uid: int) -> None:
    """Let `uid` search (not list, not read) the directory `path`: an ACL entry --x."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        _add_acl(fd, path, _ACCESS, os.fstat(fd).st_mode, uid, 1)
    finally:
        os.close(fd)


def _add_acl(fd: int, path: Path, attr: str, mode: int, uid: int, perm: int) -> None:
    try:
        raw = os.getxattr(fd, attr)
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
        os.setxattr(fd, attr, data)
    except OSError as e:
        raise EngineError(f"{path}: cannot give uid {uid} access ({e.strerror}); run the "
                          f"engine as uid {uid} or as root, or set the profile's user: to "
                          "your uid") from None
