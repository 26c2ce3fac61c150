"""Trust boundary, files: read what an agent wrote as untrusted bytes.

Called by every host-side reader of agent-writable paths: the inbox (requests), the
runtimes (control files, logs), results, and the exchange (an agent repository's refs).
Returns bytes or strictly decoded text, or raises `Untrusted` with a one-line reason
(`NotFound` when the file is simply not there). The few writes the engine makes into
agent-writable directories (answers, requests moved aside) are here too: `replace_file`
and `rename` reach the directory the same way and act on the entry, never on a target.

The rules, for every read:
- the path is opened beneath a trusted directory one component at a time with
  `O_NOFOLLOW`, so no symlink anywhere in it is followed (a symlink at `ctl/reason` or an
  inbox that is a symlink to `/etc` is refused, never read through);
- only regular files are read: FIFOs, devices, sockets and directories are refused without
  blocking (`O_NONBLOCK` on open, `fstat` before the first read);
- sizes are capped before reading and again while reading (a file that grows is cut off);
- text is strict UTF-8: invalid bytes and lone surrogates are refused, not replaced;
- text meant for a terminal goes through `for_terminal`, which removes escape sequences
  and control characters, so agent output can never drive the user's terminal.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import stat
import unicodedata
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from engine.errors import EngineError

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY

# CSI, OSC, DCS/PM/APC strings and two-character escapes, then any other C0/C1 control
_ESCAPES = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[\]PX^_][^\x07\x1b]*(?:\x07|\x1b\\)?"
                      r"|\x1b[ -/]*[0-~]?|\x9b[0-?]*[ -/]*[@-~]")
_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e"
                       r"\u2066-\u2069\u200b-\u200f\u061c\u2060\ufeff]")


class Untrusted(EngineError):
    """An agent-written file was refused: not there, not a regular file, too large,
    not valid text or not of the expected shape. The summary says which."""


class NotFound(Untrusted):
    """The file (or a directory on the way to it) is not there."""


@contextlib.contextmanager
def opendir(base: Path, parts: tuple[str, ...] = ()) -> Iterator[int]:
    """An fd of base/parts..., walked with O_NOFOLLOW at every step beneath `base`."""
    fd = os.open(base, _DIR_FLAGS)
    try:
        for part in parts:
            if part in ("", ".", "..") or "/" in part:
                raise Untrusted(f"{base}: refused path component {part!r}")
            nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nxt
        yield fd
    finally:
        os.close(fd)


def _split(base: Path, rel: str | Path) -> tuple[str, ...]:
    parts = Path(rel).parts
    if not parts or Path(rel).is_absolute():
        raise Untrusted(f"{base}: refused path {str(rel)!r}")
    return tuple(parts)


def open_regular(base: Path, rel: str | Path) -> int:
    """A read-only fd of the regular file `base/rel` (the caller closes it), opened by the
    rules above: no symlink followed, never blocking, anything else refused."""
    parts = _split(base, rel)
    where = base.joinpath(*parts)
    try:
        with opendir(base, parts[:-1]) as d:
            fd = os.open(parts[-1], _FILE_FLAGS, dir_fd=d)
    except FileNotFoundError:
        raise NotFound(f"{where}: not found") from None
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise Untrusted(f"{where}: refused (a symlink or not a directory on the way)"
                            ) from None
        raise Untrusted(f"{where}: cannot open ({e.strerror})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise Untrusted(f"{where}: refused (not a regular file)")
    return fd


def read_bytes(base: Path, rel: str | Path, limit: int) -> bytes:
    """The contents of the regular file `base/rel`, at most `limit` bytes. `base` is
    trusted (the engine made it); nothing beneath it is."""
    where = base.joinpath(*_split(base, rel))
    fd = open_regular(base, rel)
    try:
        if os.fstat(fd).st_size > limit:
            raise Untrusted(f"{where}: refused (larger than {limit} bytes)")
        chunks, total = [], 0
        while total <= limit:
            try:
                chunk = os.read(fd, min(65536, limit + 1 - total))
            except BlockingIOError:  # a regular file never blocks; be sure anyway
                break
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > limit:
            raise Untrusted(f"{where}: refused (larger than {limit} bytes)")
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_text(base: Path, rel: str | Path, limit: int) -> str:
    """Strict UTF-8 text of `base/rel` (see read_bytes)."""
    raw = read_bytes(base, rel, limit)
    try:
        return raw.decode("utf-8", errors="strict")
    except UnicodeDecodeError as e:
        raise Untrusted(f"{base.joinpath(rel)}: refused (not UTF-8 at byte {e.start})"
                        ) from None


def read_json(base: Path, rel: str | Path, limit: int) -> Any:
    """A JSON document from `base/rel`: strict UTF-8, no NaN/Infinity, no lone
    surrogates in strings, nesting bounded by the size limit."""
    text = read_text(base, rel, limit)
    try:
        doc = json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:
        raise Untrusted(f"{base.joinpath(rel)}: refused (not valid JSON: "
                        f"{str(e).splitlines()[0][:80]})") from None
    _no_surrogates(doc, base.joinpath(rel))
    return doc


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def _no_surrogates(doc: Any, where: Path) -> None:
    stack = [doc]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                raise Untrusted(f"{where}: refused (a lone surrogate in a string)") from None
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)


def _names(base: Path, rel: str | Path, regular_only: bool) -> list[str]:
    parts = () if str(rel) in ("", ".") else _split(base, rel)
    try:
        with opendir(base, parts) as d, os.scandir(d) as it:
            return sorted(e.name for e in it
                          if not regular_only or e.is_file(follow_symlinks=False))
    except (OSError, Untrusted):
        return []


def regular_files(base: Path, rel: str | Path = ".") -> list[str]:
    """Names of the regular files directly in `base/rel` (sorted), never following a
    symlink; [] when the directory is not there or is not a real directory."""
    return _names(base, rel, regular_only=True)


def entries(base: Path, rel: str | Path = ".") -> list[str]:
    """Names of every entry directly in `base/rel`, whatever its type (symlinks, FIFOs and
    directories included, so a caller can refuse them by name), sorted; [] as above."""
    return _names(base, rel, regular_only=False)


def subdirs(base: Path) -> list[str]:
    """Names of the real (not symlinked) directories directly in `base`, sorted."""
    try:
        with os.scandir(base) as it:
            return sorted(e.name for e in it if e.is_dir(follow_symlinks=False))
    except OSError:
        return []


def for_terminal(text: str) -> str:
    """`text` with escape sequences and control characters removed (newlines and tabs
    kept): safe to print on the user's terminal."""
    return _CONTROLS.sub("", _ESCAPES.sub("", text))


def visible(text: str) -> str:
    """`text` with every character a person cannot see shown as an escape (`\\u00ad`):
    controls, format characters (zero-width, direction, tags, soft hyphen), private
    use, unassigned and separators other than space and newline. For what a person
    reviews, where hiding a character would change what they approve."""
    out = []
    for ch in text:
        if ch == "\n" or ((ch.isprintable() and unicodedata.category(ch) not in (
                "Cf", "Co", "Cn", "Mn")) or ch == " "):
            out.append(ch)
        elif unicodedata.category(ch) == "Mn" and out and out[-1].isalnum():
            out.append(ch)  # an accent on a letter is seen
        else:
            out.append(f"\\u{ord(ch):04x}" if ord(ch) < 0x10000 else f"\\U{ord(ch):08x}")
    return "".join(out)


def one_line(text: str, limit: int = 200) -> str:
    """The first non-empty line of `text`, terminal-safe and at most `limit` chars."""
    for line in text.splitlines():
        line = for_terminal(line).strip()
        if line:
            return line[:limit].rstrip()
    return ""


# -- writing beside what agents wrote ---------------------------------------------------
# Answers and moved-aside requests go into directories an agent can write to: the
# directory is reached the same way (no symlink followed), and names are replaced or
# renamed as entries, never through a symlink an agent left there.

def rename(base: Path, rel_dir: str | Path, old: str, new: str) -> None:
    """Rename the entry `old` in `base/rel_dir` to `new` (the entry itself, whatever it
    is); OSError when that fails (e.g. `new` is a directory)."""
    parts = () if str(rel_dir) in ("", ".") else _split(base, rel_dir)
    for name in (old, new):
        if name in ("", ".", "..") or "/" in name or "\0" in name:
            raise Untrusted(f"{base}: refused name {name!r}")
    with opendir(base, parts) as d:
        os.rename(old, new, src_dir_fd=d, dst_dir_fd=d)


def replace_file(base: Path, rel: str | Path, data: bytes, mode: int = 0o644) -> None:
    """Write `data` to `base/rel` atomically (temporary file, fsync, rename over the
    entry): a symlink or file already there is replaced, never written through."""
    parts = _split(base, rel)
    with opendir(base, parts[:-1]) as d:
        tmp = f".{parts[-1]}.{uuid.uuid4().hex[:12]}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW |
                     os.O_CLOEXEC, mode, dir_fd=d)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, parts[-1], src_dir_fd=d, dst_dir_fd=d)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=d)
            raise
        os.fsync(d)
