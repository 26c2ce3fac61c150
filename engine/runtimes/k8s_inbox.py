"""Kubernetes runtime, exec commands (pure): what runs in an agent's Pod over pods/exec.

Called by `engine.runtimes.kubernetes` for look, send, attach and the agent-side inbox.
The inbox travels as a base64 tar archive on exec's stdout (pull) or in an argument
(push), so only sh, tar, base64 and tmux are needed in the image; `extract` unpacks an
archive on the host. The archive is agent-made: it is size-capped (bytes, members, bytes
unpacked), only regular files with plain flat names are taken, never sparse ones, each cut
at MAX_FILE + 1 bytes (so the host's reader refuses an oversized request and answers it),
and sync copies only requests (`req-*.json`) into the host inbox; host inbox files go back
to the Pod through `engine.trust.reader`.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import re
import stat
import tarfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from engine import fsutil
from engine.errors import EngineError
from engine.runtimes.k8s_objects import INBOX, SESSION, TMUX_SOCKET
from engine.trust import reader

Run = Callable[[list[str]], str]  # runs argv in the agent's container, returns stdout
MAX_PUSH = 96 * 1024  # one exec argument stays well under the kernel's 128 KiB limit
MAX_ARCHIVE = 16 * 1024 * 1024  # base64 text of one pulled inbox
MAX_MEMBERS = 16384  # members of one pulled inbox archive (more: refused; the in-Pod client
# keeps answered requests, so a busy agent's inbox grows by two entries per request)
MAX_FILE = 64 * 1024  # one inbox file (a request is at most this, see engine.inbox)
MAX_PULL = 8 * 1024 * 1024  # bytes written from one pulled inbox (the rest: next pass)
PLAIN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,199}")  # an inbox file name


def tmux(*args: str, socket: str = TMUX_SOCKET) -> list[str]:
    return ["tmux", "-S", socket, *args]


def pack(inbox: str = INBOX, remove: list[str] | tuple[str, ...] = ()) -> list[str]:
    """Print the inbox as a base64 tar archive, after removing `remove` (reports the host
    has taken: plain `req-*.json` names, passed as arguments, never as shell text)."""
    return ["sh", "-c", 'cd "$1" && shift && { [ "$#" -eq 0 ] || rm -f -- "$@"; } && '
            "tar -cf - . | base64", "sh", inbox, *remove]


def paste(text: str, socket: str = TMUX_SOCKET) -> list[str]:
    """Paste `text` into the session, then Enter (the text is an argument, never code)."""
    t = " ".join(tmux(socket=socket))
    return ["sh", "-c", f'{t} set-buffer -b engine -- "$1" && {t} paste-buffer -d -b engine '
                        f"-t {SESSION} && {t} send-keys -t {SESSION} Enter", "sh", text]


def unpack_argv(files: dict[str, bytes], inbox: str = INBOX) -> list[str]:
    """Write `files` (inbox-relative names) into the Pod's inbox."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in sorted(files.items()):
            _safe_name(name)
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    payload = base64.b64encode(buf.getvalue()).decode()
    if len(payload) > MAX_PUSH:
        raise EngineError(f"inbox: {len(files)} files are too large to send over exec")
    return ["sh", "-c", f'printf %s "$1" | base64 -d | tar -C {inbox} -xf -', "sh", payload]


def _safe_name(name: str) -> PurePosixPath:
    p = PurePosixPath(name)
    parts = [x for x in p.parts if x != "."]
    if p.is_absolute() or not parts or ".." in parts:
        raise EngineError(f"inbox: unsafe file name {name!r}")
    return PurePosixPath(*parts)


def extract(b64: str, dest: Path) -> list[Path]:
    """Unpack a `tar | base64` archive of an inbox into `dest`: regular files with plain
    flat names only, no dot-files (half-written) or sparse files, each at most MAX_FILE + 1
    bytes and MAX_PULL in all, nothing outside `dest`. Returns the files written."""
    _, files = _take(b64, lambda name: True)
    for name, data in files.items():
        fsutil.atomic_write(dest / name, data, 0o600)
    return sorted(dest / name for name in files)


def _take(b64: str, want: Callable[[str], bool]) -> tuple[set[str], dict[str, bytes]]:
    """(every plain name in an inbox archive, the content of the wanted ones): each at most
    MAX_FILE + 1 bytes, at most MAX_PULL in all (the rest wait for the next pull).
    EngineError, before anything is read, for an archive of more than MAX_MEMBERS members
    or with an unsafe name."""
    tar, members = _open_archive(b64)
    with tar:
        if len(members) > MAX_MEMBERS:
            raise EngineError(f"inbox: the pod sent an archive of {len(members)} members, "
                              f"more than {MAX_MEMBERS}; refused")
        named = [(m, n) for m in members if (n := _member_name(m))]  # all judged first
        files: dict[str, bytes] = {}
        total = 0
        for member, name in named:
            f = tar.extractfile(member) if want(name) else None
            if f is None:
                continue
            data = f.read(MAX_FILE + 1)
            total += len(data)
            if total > MAX_PULL:
                break
            files[name] = data
    return {n for _, n in named}, files


def _open_archive(b64: str) -> tuple[tarfile.TarFile, list[tarfile.TarInfo]]:
    if len(b64) > MAX_ARCHIVE:
        raise EngineError(f"inbox: the pod sent an archive larger than {MAX_ARCHIVE} bytes")
    try:
        raw = base64.b64decode("".join(b64.split()), validate=True)
        tar = tarfile.open(fileobj=io.BytesIO(raw), mode="r:")  # noqa: SIM115
        return tar, tar.getmembers()
    except (ValueError, tarfile.TarError) as e:
        raise EngineError(f"inbox: the pod sent an unreadable archive "
                          f"({reader.one_line(str(e), 100)})") from None


def _member_name(member: tarfile.TarInfo) -> str | None:
    """The flat file name to extract `member` as, or None to skip it (not a regular file,
    in a subdirectory, a dot-file or an odd name); EngineError for an unsafe name. A sparse
    file is skipped: a small archive would unpack into many bytes of its holes."""
    if not member.isfile() or member.type == tarfile.GNUTYPE_SPARSE or member.issparse():
        return None
    rel = _safe_name(member.name)
    if len(rel.parts) != 1 or not PLAIN.fullmatch(rel.name):
        return None
    return rel.name


def kubectl_flags(kubeconfig: str, context: str) -> list[str]:
    flags = ["--kubeconfig", kubeconfig] if kubeconfig else []
    return flags + (["--context", context] if context and context != "in-cluster" else [])


def pull(run: Run, dest: Path) -> list[Path]:
    return extract(run(pack()), dest)


def push(run: Run, files: dict[str, bytes]) -> None:
    run(unpack_argv(files))


def sync(run: Run, host_inbox: Path) -> list[Path]:
    """One controller step for a Pod's inbox: copy the requests (`req-*.json`, the only
    names ingest reads) the host has neither got nor answered into `host_inbox`, then send
    the host's answers (`res-*.json`) the Pod lacks. Returns the files copied. Few exec
    calls (one pull, one push per MAX_PUSH of answers)."""
    taken = _pulled_dir(host_inbox)
    marked = reader.regular_files(taken)
    reports = sorted(n for n in marked
                     if _request(n) and PLAIN.fullmatch(n) and _is_report(taken, n))
    in_pod, files = _take(run(pack(remove=reports)),
                          lambda n: _request(n) and not _known(host_inbox, n))
    got = []
    if files:
        taken.mkdir(mode=0o700, parents=True, exist_ok=True)
    for name, data in sorted(files.items()):
        fsutil.atomic_write(host_inbox / name, data, 0o600)
        fsutil.atomic_write(taken / name, b"report" if _report(data) else b"", 0o600)
        got.append(host_inbox / name)
    for name in marked:  # the Pod no longer has it: nothing to remember it against
        if name not in in_pod:
            with contextlib.suppress(OSError):
                (taken / name).unlink()
    answers = _answers(host_inbox, in_pod)
    for batch in _batches(answers):
        push(run, batch)
    return got


def _request(name: str) -> bool:
    return name.startswith("req-") and name.endswith(".json")  # as engine.inbox.scan


PULLED = ".pulled"  # in a host inbox: a marker per request pulled from the Pod, so one
# the host has taken in (an AgentReport is removed once applied) is never pulled again;
# a report's marker says so, and the next pull removes the report from the Pod


def _known(host_inbox: Path, name: str) -> bool:
    """Whether the host has the file `name`, has pulled it before, or (for a request) has
    answered it already."""
    names = [name] + ([f"res-{name[4:]}"] if name.startswith("req-") else [])
    return any(os.path.lexists(host_inbox / n) for n in names) or \
        os.path.lexists(host_inbox / PULLED / name)


def _pulled_dir(host_inbox: Path) -> Path:
    """The inbox's marker directory; whatever else stands at its name (a link, a file left
    by an earlier runtime's agent, which could write there) is removed, never followed."""
    taken = host_inbox / PULLED
    with contextlib.suppress(FileNotFoundError):
        st = os.lstat(taken)
        if not stat.S_ISDIR(st.st_mode):
            os.unlink(taken)
    return taken


def _report(data: bytes) -> bool:
    """Whether a pulled request is an AgentReport (taken, never answered: once the host has
    it, the Pod's copy only grows the next archive)."""
    try:
        doc = json.loads(data)
    except ValueError:
        return False
    return isinstance(doc, dict) and doc.get("kind") == "AgentReport"


def _is_report(taken: Path, name: str) -> bool:
    try:
        return reader.read_bytes(taken, name, 16) == b"report"
    except reader.Untrusted:
        return False


def _answers(host_inbox: Path, in_pod: set[str]) -> dict[str, bytes]:
    """The host's answers the Pod lacks, read as any file in an agent's inbox is."""
    out = {}
    for name in reader.regular_files(host_inbox):
        if name.startswith("res-") and name.endswith(".json") and name not in in_pod:
            try:
                out[name] = reader.read_bytes(host_inbox, name, MAX_FILE)
            except reader.Untrusted:
                continue
    return out


def _batches(files: dict[str, bytes]) -> list[dict[str, bytes]]:
    """`files` in groups small enough for one exec argument each (see unpack_argv)."""
    out: list[dict[str, bytes]] = []
    size = MAX_PUSH
    for name, data in sorted(files.items()):
        if size + len(data) + 1024 > MAX_PUSH * 3 // 4:  # base64 grows data by 4/3
            out.append({})
            size = 0
        out[-1][name] = data
        size += len(data) + 1024
    return out
