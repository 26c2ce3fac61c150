"""Credentials: where secret values come from, and the keyed digest that stands for them.

Called by `desired` (digest for the spec hash, so rotating a secret replaces the agent) and
by the runtimes (values, at start time only). A value is never returned in an error, a
repr, a plan or a state file: only its name and where it was looked for. A `fromFile`
source must be a regular file of at most MAX_SECRET_BYTES (symlinks to one are followed):
FIFOs, devices and directories are refused without blocking or reading them.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets as _random
from dataclasses import dataclass
from pathlib import Path

from engine.errors import EngineError
from engine.yamlio import NotReadable, read_regular

MAX_SECRET_BYTES = 1024 * 1024


@dataclass(frozen=True)
class CredentialRef:
    """A named secret and where its value lives: ('env', VAR) or ('file', path)."""

    name: str
    source: str
    ref: str

    def describe(self) -> str:
        return f"environment variable {self.ref}" if self.source == "env" else f"file {self.ref}"


class MissingSecret(EngineError):
    pass


def read(cred: CredentialRef) -> str:
    """The secret's value. Raises MissingSecret naming where it looked, never the value."""
    if cred.source == "env":
        value = os.environ.get(cred.ref)
        if value is None:
            raise MissingSecret(f"credential {cred.name}: environment variable {cred.ref} "
                                "is not set")
        return value
    path = Path(cred.ref).expanduser()
    try:  # a symlink to a regular file is fine (~/.config/...); a FIFO or device is not
        return read_regular(path, MAX_SECRET_BYTES).decode("utf-8").rstrip("\n")
    except NotReadable as e:
        raise MissingSecret(f"credential {cred.name}: file {cred.ref} {e}") from None
    except OSError as e:
        raise MissingSecret(f"credential {cred.name}: cannot read file {cred.ref}: "
                            f"{e.strerror}") from None
    except UnicodeDecodeError:
        raise MissingSecret(f"credential {cred.name}: file {cred.ref} is not text") from None


def digest(creds: tuple[CredentialRef, ...], key: bytes) -> str:
    """A keyed digest of the values: changes when a secret rotates, reveals nothing."""
    if not creds:
        return ""
    mac = hmac.new(key, digestmod=hashlib.sha256)
    for c in sorted(creds, key=lambda c: c.name):
        value = read(c).encode()
        mac.update(c.name.encode() + b"\0" + len(value).to_bytes(8, "big") + value)
    return mac.hexdigest()[:32]


def repo_key(state_dir: Path, create: bool) -> bytes:
    """The per-repository HMAC key (`.engine/secret-key`, 0600). Without `create` and
    without a key file, a throw-away key: digests are then only compared within one run."""
    path = state_dir / "secret-key"
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        text = ""
    except OSError as e:
        raise EngineError(f"{path}: cannot read the secret-digest key: {e.strerror}") from None
    if text:
        try:
            key = bytes.fromhex(text)
        except ValueError:
            key = b""
        if len(key) != 32:
            raise EngineError(f"{path} is damaged; delete it (agents with credentials are "
                              "then replaced once, as after a rotation)")
        return key
    key = _random.token_bytes(32)
    if create:
        state_dir.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process made it first: use theirs
            return repo_key(state_dir, create=False)
        with os.fdopen(fd, "w") as f:
            f.write(key.hex())
            f.flush()
            os.fsync(f.fileno())
    return key
