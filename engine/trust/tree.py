"""Trust boundary, directory trees: walk and copy what an agent wrote without following it.

Called by `exchange` (copy an agent's objects and changed files somewhere the agent cannot
reach before git reads them) and by the Docker runtime (grant the agent uid access to the
workspace the engine made for it). Every step opens the next component relative to an
already open directory with `O_NOFOLLOW`, so swapping a directory for a symlink while the
walk runs cannot lead it outside the tree; only regular files, directories and symlinks
(copied as links, never followed) are handled.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Callable
from pathlib import Path

from engine.trust.reader import Untrusted, opendir

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
MAX_ENTRIES = 500_000
MAX_DEPTH = 256  # deeper trees are refused, never a recursion error


class Budget:
    """What a copy may still take: bytes and entries. Exceeding either is Untrusted."""

    def __init__(self, max_bytes: int, max_entries: int = MAX_ENTRIES) -> None:
        self.bytes = max_bytes
        self.entries = max_entries

    def take(self, n_bytes: int, where: str) -> None:
        self.bytes -= n_bytes
        self.entries -= 1
        if self.bytes < 0:
            raise Untrusted(f"{where}: the work is larger than the copy limit")
        if self.entries < 0:
            raise Untrusted(f"{where}: the work has more than {MAX_ENTRIES} entries")


def listdir(base: Path, parts: tuple[str, ...] = ()) -> tuple[list[str], list[str]]:
    """(directories, regular files) directly in base/parts..., sorted, reached without
    following a symlink; ([], []) when it is not there or not a real directory."""
    try:
        with opendir(base, parts) as fd, os.scandir(fd) as it:
            dirs, files = [], []
            for e in it:
                if e.is_dir(follow_symlinks=False):
                    dirs.append(e.name)
                elif e.is_file(follow_symlinks=False):
                    files.append(e.name)
            return sorted(dirs), sorted(files)
    except (OSError, Untrusted):
        return [], []


def copy_file(dir_fd: int, name: str, out_fd: int, out_name: str, budget: Budget,
              where: str) -> bool:
    """Copy the regular file or symlink `name` (in dir_fd) to `out_name` (in out_fd),
    never following a symlink on either side. False when it is something else (a FIFO, a
    device, a socket, a directory) or is gone."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    if stat.S_ISLNK(st.st_mode):
        target = os.readlink(name, dir_fd=dir_fd)
        budget.take(len(target), where)
        os.symlink(target, out_name, dir_fd=out_fd)
        return True
    if not stat.S_ISREG(st.st_mode):
        return False
    fd = os.open(name, _FILE, dir_fd=dir_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return False
        budget.take(st.st_size, where)
        out = os.open(out_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW |
                      os.O_CLOEXEC, 0o755 if st.st_mode & 0o111 else 0o644, dir_fd=out_fd)
        try:
            _copy_fd(fd, out, st.st_size, budget, where)
        finally:
            os.close(out)
    finally:
        os.close(fd)
    return True


def _copy_fd(fd: int, out: int, size: int, budget: Budget, where: str) -> None:
    left = size
    while True:
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            break
        left -= len(chunk)
        if left < 0:  # grew while read: count the growth against the budget
            budget.take(-left, where)
            left = 0
        os.write(out, chunk)


def _outdir(out_fd: int, name: str) -> int:
    """An fd of the directory `name` in out_fd (made when missing); never a symlink."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(name, 0o755, dir_fd=out_fd)
    return os.open(name, _DIR, dir_fd=out_fd)


def copy_paths(src: Path, rels: list[str], dest: Path, budget: Budget) -> list[str]:
    """Copy each relative path (a file, a symlink or a whole directory) from `src` to the
    same place under `dest`, both sides walked by descriptor without following a symlink.
    A path inside another one in `rels` is copied with it. Returns the paths that were
    there and copied."""
    copied = []
    with opendir(dest) as out_root:
        for rel in _outermost(rels):
            parts = tuple(p for p in rel.split("/") if p)
            if not parts or ".git" in parts:
                continue
            if len(parts) > MAX_DEPTH:
                raise Untrusted(f"deeper than {MAX_DEPTH} directories: {rel[:100]}")
            try:
                if _copy_one(src, parts, out_root, budget, rel):
                    copied.append(rel)
            except (FileNotFoundError, FileExistsError):
                continue  # deleted (git records it as deleted), or copied with a parent
            except OSError as e:
                if e.errno in (20, 40):  # ENOTDIR, ELOOP: a symlink on the way
                    continue
                raise
    return copied


def _outermost(rels: list[str]) -> list[str]:
    """`rels` without the paths that lie inside another of them (copied with it)."""
    chosen: set[str] = set()
    out = []
    for rel in sorted(set(rels), key=lambda r: (r.count("/"), r)):
        parts = rel.split("/")
        if any("/".join(parts[:i]) in chosen for i in range(1, len(parts))):
            continue
        chosen.add(rel)
        out.append(rel)
    return sorted(out)


def _copy_one(src: Path, parts: tuple[str, ...], out_root: int, budget: Budget,
              rel: str) -> bool:
    with opendir(src, parts[:-1]) as d:
        fds = [os.dup(out_root)]
        try:
            for part in parts[:-1]:
                fds.append(_outdir(fds[-1], part))
            return _copy_entry(d, parts[-1], fds[-1], parts[-1], budget, rel)
        finally:
            for fd in fds:
                os.close(fd)


def _copy_entry(dir_fd: int, name: str, out_fd: int, out_name: str, budget: Budget,
                where: str) -> bool:
    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    if stat.S_ISDIR(st.st_mode):
        copy_dir(dir_fd, name, out_fd, out_name, budget, where)
        return True
    return copy_file(dir_fd, name, out_fd, out_name, budget, where)


def copy_dir(parent_fd: int, name: str, out_parent: int, out_name: str, budget: Budget,
             where: str, skip: Callable[[str], bool] = lambda n: n == ".git") -> None:
    """Copy the directory `name` (in parent_fd) to `out_name` (in out_parent),
    recursively; entries for which `skip(name)` is true (nested `.git` directories by
    default) are left out."""
    if where.count("/") > MAX_DEPTH:
        raise Untrusted(f"deeper than {MAX_DEPTH} directories: {where[:100]}")
    fd = os.open(name, _DIR, dir_fd=parent_fd)
    try:
        out = _outdir(out_parent, out_name)
        try:
            budget.take(0, where)
            with os.scandir(fd) as it:
                entries = sorted(e.name for e in it)
            for entry in entries:
                if not skip(entry):
                    _copy_entry(fd, entry, out, entry, budget, f"{where}/{entry}")
        finally:
            os.close(out)
    finally:
        os.close(fd)


def files_under(base: Path) -> list[str]:
    """Relative paths of the regular files and symlinks under `base` (a private copy the
    engine made, so plain os.walk is safe), sorted."""
    out = []
    for top, dirs, names in os.walk(base):
        rel = os.path.relpath(top, base)
        for n in names + [d for d in dirs if os.path.islink(os.path.join(top, d))]:
            out.append(n if rel == "." else f"{rel}/{n}")
    return sorted(out)


def walk_fds(base: Path, visit: Callable[[int, bool], None], budget: Budget,
             skip_top: frozenset[str] = frozenset()) -> None:
    """Call `visit(fd, is_dir)` on `base` and every directory and regular file beneath it,
    each opened without following a symlink (symlinks and special files are skipped);
    entries of `base` named in `skip_top` are left out."""
    with opendir(base) as fd:
        _walk(fd, visit, budget, str(base), skip_top)


def _walk(fd: int, visit: Callable[[int, bool], None], budget: Budget, where: str,
          skip: frozenset[str] = frozenset()) -> None:
    if where.count("/") > MAX_DEPTH + 64:
        raise Untrusted(f"deeper than {MAX_DEPTH} directories: {where[:100]}")
    visit(fd, True)
    with os.scandir(fd) as it:
        entries = [(e.name, e.is_dir(follow_symlinks=False),
                    e.is_file(follow_symlinks=False)) for e in it if e.name not in skip]
    for name, is_dir, is_file in entries:
        budget.take(0, where)
        try:
            if is_dir:
                sub = os.open(name, _DIR, dir_fd=fd)
                try:
                    _walk(sub, visit, budget, f"{where}/{name}")
                finally:
                    os.close(sub)
            elif is_file:
                f = os.open(name, _FILE, dir_fd=fd)
                try:
                    if stat.S_ISREG(os.fstat(f).st_mode):
                        visit(f, False)
                finally:
                    os.close(f)
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError as e:
            if e.errno == 40:  # ELOOP: it became a symlink; never followed
                continue
            raise
