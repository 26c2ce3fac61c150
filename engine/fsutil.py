"""Durable file writes and advisory locks shared by every stage that writes to disk.

Writes go to a temporary file in the same directory, are fsynced, then `os.replace`d,
so a crash leaves either the old file or the new one, never half of either.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def flock(path: Path, blocking: bool = True) -> Iterator[bool]:
    """An exclusive advisory lock on `path`; yields False if non-blocking and taken."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def failpoint(name: str) -> None:
    """Fault injection for crash tests: ENGINE_FAILPOINT=<name> SIGKILLs this process
    there, the way a power cut or an OOM kill would."""
    if os.environ.get("ENGINE_FAILPOINT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def remove_tree(path: Path, missing_ok: bool = True) -> None:
    """Remove a directory an agent may have shaped: fd-based, never following a symlink
    inside; a tree deeper than Python's recursion goes to `rm -rf`, which walks it
    iteratively and does not follow symlinks either. OSError when it cannot."""
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        if not missing_ok:
            raise
    except RecursionError:
        r = subprocess.run(["rm", "-rf", "--one-file-system", "--", str(path)],
                           capture_output=True, text=True, timeout=600)
        if r.returncode != 0 or os.path.lexists(path):
            raise OSError(f"{path}: cannot remove ({r.stderr.strip()[:200]})") from None
