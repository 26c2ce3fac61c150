"""Docker runtime, the seccomp profile every agent container is sent, on Docker and Podman.

Called by `docker_spec.create_kwargs` (Docker takes the profile inline, as the docker
command sends it) and by the Podman runtime (its compat API reads a host path, never
inline JSON: `write`). Pure but for reading the packaged base profile once.

The base is Docker's own default profile, shipped unchanged as `seccomp_default.json`
(moby v28.5.2 profiles/seccomp/default.json, Apache-2.0), so both engines enforce one
policy: Podman's default lets an unprivileged process make a user namespace (`unshare
-Ur` gives root inside it), Docker's does not without CAP_SYS_ADMIN, which every agent
container drops (clone3 answers ENOSYS, so libc falls back to clone, whose flags it can
check). To it `profile` adds one rule: no set-user-ID or set-group-ID bit, ever. Files an
agent writes land on the host (its workspace, its home, a shared checkout), owned by its
uid there (rootful: 1000, often a person's; rootless: the engine's own user); a set-uid
copy of a shell among them would let any local user run as that uid. So the calls that
set a file's mode (chmod, fchmod, fchmodat, fchmodat2, and creat, mknod, mknodat, open,
openat when they create) are allowed only for modes without S_ISUID and S_ISGID (EPERM
otherwise), and openat2, whose mode seccomp cannot read, answers ENOSYS (libc and the
programs that use it fall back to openat).
"""

from __future__ import annotations

import copy
import functools
import json
import os
from importlib import resources
from pathlib import Path
from typing import Any

from engine.fsutil import atomic_write

SET_ID = 0o6000  # S_ISUID | S_ISGID
ENOSYS = 38
# syscall -> index of its mode argument
MODE_ARG = {"chmod": 1, "fchmod": 1, "fchmodat": 2, "fchmodat2": 2, "creat": 1,
            "mknod": 1, "mknodat": 2, "open": 2, "openat": 3}
# open/openat that create nothing (neither O_CREAT nor O_TMPFILE) carry no mode to check;
# the flag values are these on every architecture listed (not on mips, where only the
# mode rule applies)
CREATES = 0o20000100
CREATE_FLAGS_ARG = {"open": 1, "openat": 2}
GENERIC_FLAGS = ["amd64", "x86", "x32", "arm64", "arm", "ppc64le", "s390", "s390x", "riscv64"]


def _masked_zero(index: int, mask: int) -> dict[str, Any]:
    return {"index": index, "value": mask, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}


@functools.cache
def _base() -> dict[str, Any]:
    raw = resources.files("engine.runtimes").joinpath("seccomp_default.json").read_text()
    data: dict[str, Any] = json.loads(raw)
    return data


@functools.cache
def text() -> str:
    """The profile as compact JSON (what is sent)."""
    return json.dumps(profile(), separators=(",", ":"), sort_keys=True)


def profile() -> dict[str, Any]:
    """Docker's default profile, with no set-id mode allowed and openat2 answering ENOSYS."""
    out = copy.deepcopy(_base())
    guarded = set(MODE_ARG) | {"openat2"}
    for rule in out["syscalls"]:
        if rule["action"] == "SCMP_ACT_ALLOW" and not rule.get("args"):
            rule["names"] = [n for n in rule["names"] if n not in guarded]
    out["syscalls"] = [r for r in out["syscalls"] if r["names"]]
    out["syscalls"] += [{"names": [name], "action": "SCMP_ACT_ALLOW",
                         "args": [_masked_zero(index, SET_ID)]}
                        for name, index in sorted(MODE_ARG.items())]
    out["syscalls"] += [{"names": [name], "action": "SCMP_ACT_ALLOW",
                         "args": [_masked_zero(index, CREATES)],
                         "includes": {"arches": GENERIC_FLAGS}}
                        for name, index in sorted(CREATE_FLAGS_ARG.items())]
    out["syscalls"].append({"names": ["openat2"], "action": "SCMP_ACT_ERRNO",
                            "errnoRet": ENOSYS})
    return out


def security_opt() -> str:
    """The `seccomp=` security option with the profile inline (Docker's API)."""
    return f"seccomp={text()}"


def write(path: Path) -> None:
    """The profile as the engine's file `path` (Podman's API reads a path on its host:
    the engine's, as for every file it mounts), for the service to read at create."""
    atomic_write(path, text().encode(), 0o644)


def file_option(path: Path) -> str:
    """The `seccomp=` security option naming a profile file (Podman's API)."""
    return f"seccomp={os.fspath(path)}"
