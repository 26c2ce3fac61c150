"""Agent log files on this host, for the local and Docker runtimes: the previous run's log
and the last lines of a log.

Called by `local` (`create`, `logs`) and `docker_fs` (`prepare`, `read_log`). Each run
writes `.engine/logs/<grove>/<agent>.log`; when a run starts, `rotate` moves the log of
the run before to `<agent>.log.1` (one generation, its last PREVIOUS_MAX bytes), which
`engine logs --previous` reads. `tail_start` finds where the last N lines of an open log
begin by reading backwards from its end, so a huge log is never read whole.

The log is agent-written: a log that is not a regular file (a symlink or a FIFO an agent
put there) is removed by `rotate`, never followed; the directory is the engine's.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

PREVIOUS = ".1"  # the previous run's log: <agent>.log.1
PREVIOUS_MAX = 8 << 20  # bytes of the previous run's log kept (its end)
LINE_CAP = 64 * 1024  # a longer line counts (and is shown) as pieces this long
_BLOCK = 64 * 1024
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY


def private_dir(log: Path) -> None:
    """Make the directories of `log` (`.engine/logs/<grove>/`), readable by the engine's
    user only: an agent running as another uid never reads its neighbours' logs (a
    Docker agent writes its own through a mount of that one file)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    for d in (log.parent.parent, log.parent):
        with contextlib.suppress(OSError):
            st = os.lstat(d)
            if stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid():
                os.chmod(d, 0o700)


def previous(path: Path) -> Path:
    """Where the previous run's log of `path` is kept."""
    return path.with_name(path.name + PREVIOUS)


def rotate(path: Path, keep: int = PREVIOUS_MAX) -> None:
    """Before a run starts: the log at `path` becomes `previous(path)` (only its last `keep`
    bytes, from the first line start among them, when it is longer) and `path` is gone.
    No log: nothing happens. A log that is not a regular file is removed, and the older
    generation with it (the previous run's log is then unknown)."""
    try:
        d = os.open(path.parent, _DIR)
    except OSError:
        return
    prev = path.name + PREVIOUS
    try:
        try:
            st = os.stat(path.name, dir_fd=d, follow_symlinks=False)
        except FileNotFoundError:
            return
        if not stat.S_ISREG(st.st_mode):
            os.unlink(path.name, dir_fd=d)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(prev, dir_fd=d)
            return
        if st.st_size <= keep:
            os.rename(path.name, prev, src_dir_fd=d, dst_dir_fd=d)
            return
        tmp = f".{prev}.tmp"
        src = os.open(path.name, _FILE, dir_fd=d)
        try:
            dst = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
                          | os.O_CLOEXEC, 0o600, dir_fd=d)
            try:
                start = st.st_size - keep
                newline = os.pread(src, _BLOCK, start).find(b"\n")
                at = start + newline + 1 if newline >= 0 else start
                while chunk := os.pread(src, 1 << 20, at):
                    at += len(chunk)
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(dst, view):]
            finally:
                os.close(dst)
        finally:
            os.close(src)
        os.replace(tmp, prev, src_dir_fd=d, dst_dir_fd=d)
        os.unlink(path.name, dir_fd=d)
    finally:
        os.close(d)


def tail_start(fd: int, lines: int) -> int:
    """The offset in the open file `fd` where its last `lines` lines begin (its end for 0).
    Read backwards in blocks from the end, never more than `lines` x LINE_CAP bytes: the
    last lines of a file with longer ones start inside a line."""
    size = os.fstat(fd).st_size
    if lines <= 0 or size == 0:
        return size
    floor = max(0, size - lines * LINE_CAP)
    end = size - 1 if os.pread(fd, 1, size - 1) == b"\n" else size  # ends the last line
    pos, count = end, 0
    while pos > floor:
        step = min(_BLOCK, pos - floor)
        pos -= step
        block = os.pread(fd, step, pos)
        i = len(block)
        while (i := block.rfind(b"\n", 0, i)) >= 0:
            count += 1
            if count == lines:
                return pos + i + 1
    return floor


def replaced(fd: int, path: Path) -> bool:
    """Whether `path` is now another file than the open `fd` (a restart rotated the log
    being followed and the new run's is there), without following a symlink."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    mine = os.fstat(fd)
    return stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) != (mine.st_dev, mine.st_ino)
