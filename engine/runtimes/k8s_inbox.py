"""Kubernetes runtime, exec commands (pure): what runs in an agent's Pod over pods/exec.

Called by `engine.runtimes.kubernetes` for look, send, attach and the agent-side inbox.
The inbox travels as a base64 tar archive on exec's stdout (pull) or in an argument
(push), so only sh, tar, base64 and tmux are needed in the image; `extract` unpacks an
archive on the host, accepting regular files only, inside the destination.
"""

from __future__ import annotations

import base64
import io
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from engine import fsutil
from engine.errors import EngineError
from engine.runtimes.k8s_objects import INBOX, SESSION, TMUX_SOCKET

Run = Callable[[list[str]], str]  # runs argv in the agent's container, returns stdout
MAX_PUSH = 96 * 1024  # one exec argument stays well under the kernel's 128 KiB limit


def tmux(*args: str, socket: str = TMUX_SOCKET) -> list[str]:
    return ["tmux", "-S", socket, *args]


def pack(inbox: str = INBOX) -> list[str]:
    """Print the inbox as a base64 tar archive."""
    return ["sh", "-c", f"cd {inbox} && tar -cf - . | base64"]


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
    """Unpack a `tar | base64` archive of an inbox into `dest`: regular files only, no
    dot-files (half-written), nothing outside `dest`. Returns the files written."""
    out = []
    try:
        raw = base64.b64decode("".join(b64.split()), validate=True)
        tar = tarfile.open(fileobj=io.BytesIO(raw), mode="r:")  # noqa: SIM115
        members = tar.getmembers()
    except (ValueError, tarfile.TarError) as e:
        raise EngineError(f"inbox: the pod sent an unreadable archive ({e})") from None
    with tar:
        for member in members:
            if not member.isfile():
                continue
            rel = _safe_name(member.name)
            if rel.name.startswith("."):  # a file the agent is still writing
                continue
            f = tar.extractfile(member)
            if f is None:
                continue
            target = dest / rel
            fsutil.atomic_write(target, f.read(), 0o600)
            out.append(target)
    return sorted(out)


def kubectl_flags(kubeconfig: str, context: str) -> list[str]:
    flags = ["--kubeconfig", kubeconfig] if kubeconfig else []
    return flags + (["--context", context] if context and context != "in-cluster" else [])


def pull(run: Run, dest: Path) -> list[Path]:
    return extract(run(pack()), dest)


def push(run: Run, files: dict[str, bytes]) -> None:
    run(unpack_argv(files))


def sync(run: Run, host_inbox: Path) -> list[Path]:
    """One controller step for a Pod's inbox: copy the files the host lacks into
    `host_inbox` (where ingest reads them), then send the host's answers (`res-*.json`)
    the Pod lacks. Returns the files copied. Two exec calls at most."""
    with tempfile.TemporaryDirectory() as tmp:
        pulled = pull(run, Path(tmp))
        in_pod = {p.name for p in pulled}
        got = []
        for p in pulled:
            if not (host_inbox / p.name).exists():
                fsutil.atomic_write(host_inbox / p.name, p.read_bytes(), 0o600)
                got.append(host_inbox / p.name)
    answers = {p.name: p.read_bytes() for p in sorted(host_inbox.glob("res-*.json"))
               if p.name not in in_pod} if host_inbox.is_dir() else {}
    if answers:
        push(run, answers)
    return got
