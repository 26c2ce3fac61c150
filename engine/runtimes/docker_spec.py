"""Docker runtime, pure part: a `Launch` -> the container's create arguments, and a listed
container -> `Observed`.

Called by `engine.runtimes.docker` (create and observe). Pure: no Docker SDK, no disk, no
network, so the hardening and the "no secret in the config" promise can be checked without
an engine. Returns plain dicts in the shape of `docker.containers.create(**kwargs)`.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine import __version__, egress, paths
from engine.errors import EngineError
from engine.runtimes import (
    FAILED,
    LABEL_AGENT,
    LABEL_GROVE,
    LABEL_HASH,
    LABEL_REPO,
    LABEL_VERSION,
    PENDING,
    RUNNING,
    STOPPED,
    SUCCEEDED,
    Launch,
    Observed,
    seccomp,
)
from engine.trust import reader

# Where things live inside every agent container.
WORKSPACE = "/workspace"
HOME = "/home/agent"
SECRETS = "/run/secrets"
CTL = "/run/engine/ctl"  # exit code and reason, written by the entrypoint
INBOX = "/run/engine/inbox"
LOG = "/run/engine/log"  # the pane's output, a bind-mounted host file
CLIENT = "/usr/local/lib/engine/client.py"
CLIENT_BIN = "/usr/local/bin/engine"  # a two-line shim: runs CLIENT with python3
ENTRYPOINT = "/usr/local/lib/engine/entrypoint.sh"
SESSION = "agent"  # the tmux session the harness runs in
EGRESS = "/run/engine/egress"  # the agent's own gateway socket dir (network: egress)
FORWARDER = "/usr/local/lib/engine/forwarder.py"  # in-container end of the gateway
HARNESS = "/opt/engine/harness"  # an installed agent program (engine harness install)
PROXY = "http://127.0.0.1:3128"  # the forwarder's proxy port, as the harness sees it
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

TMPFS_TMP = "rw,nosuid,nodev,size=512m"
# create_kwargs keys that belong to the HostConfig; the rest are the container's Config
HOST_CONFIG_KEYS = frozenset({
    "mounts", "tmpfs", "read_only", "cap_drop", "security_opt", "init", "pids_limit",
    "network_mode", "privileged", "mem_limit", "memswap_limit", "nano_cpus", "ipc_mode",
    "shm_size"})
DEFAULT_PIDS = 512
SHM_SIZE = 64 * 1024**2  # Docker's default /dev/shm; sent to Podman, whose own is 64000k
# A read-only root on Podman: /run and /var/tmp as Docker shows them, the image's own and
# read-only (Podman's compat API would mount them writable and unsized, and has no field
# to say otherwise): read-only tmpfs copies of the image's directories (tmpcopyup).
PODMAN_READ_ONLY = {"/run": "ro,nosuid,nodev,tmpcopyup", "/var/tmp": "ro,nosuid,nodev,tmpcopyup"}


@dataclass(frozen=True)
class HostDirs:
    """Host paths the runtime prepares for one agent (see docker_fs.prepare)."""

    ctl: Path
    secrets: Path
    log: Path
    inbox: Path
    client: Path
    client_bin: Path
    entrypoint: Path
    egress: Path | None = None  # the gateway's socket dir for this agent (network: egress)
    forwarder: Path | None = None  # engine/egress/forwarder.py (network: egress)
    harness: Path | None = None  # the installed harness program's cache dir
    home: Path | None = None  # the agent's own home, kept across containers (else a tmpfs)


def repo_tag(repo_root: Path, grove: str, agent: str) -> str:
    """A short, stable digest of (repository path, grove, agent), NUL-separated (no name
    or path holds a NUL): keeps two repositories' groves of the same name apart on one
    Docker engine, and two (grove, agent) pairs that read alike (`a` + `b-c` and `a-b` +
    `c`) apart in one repository."""
    return hashlib.sha256(f"{repo_root}\0{grove}\0{agent}".encode()).hexdigest()[:12]


def container_name(repo_root: Path, grove: str, agent: str) -> str:
    """`engine-<grove>-<agent>-<digest>`, unique per (repository, grove, agent): the
    readable part alone is ambiguous, the digest of all three is not. Containers made
    under the earlier naming (`engine-<grove>-<agent>-<digest of the repository>`) are
    still found through their owner labels (DockerRuntime._name)."""
    return f"engine-{grove}-{agent}-{repo_tag(repo_root, grove, agent)}"


def owner_filters(repo_root: Path, grove: str) -> dict[str, list[str]]:
    """The one label filter observe lists with."""
    return {"label": [f"{LABEL_GROVE}={grove}", f"{LABEL_REPO}={repo_root}"]}


def uid_gid(user: str) -> tuple[int, int]:
    uid, _, gid = user.partition(":")
    return int(uid), int(gid or uid)


def _env(launch: Launch, dirs: HostDirs | None = None) -> dict[str, str]:
    """The container's environment: no secret values, host paths rewritten to container
    paths, git made usable for the agent user; with `network: egress` the proxy variables
    that lead to the in-container forwarder; with an installed harness program its bin
    directory first on PATH."""
    a = launch.agent
    rewrite = {str(launch.inbox): INBOX, str(launch.workdir): WORKSPACE}
    env = {**dict(a.env), **{k: rewrite.get(v, v) for k, v in launch.env.items()}}
    env["ENGINE_INBOX"] = INBOX
    env.setdefault("ENGINE_GROVE", a.grove)
    env.setdefault("ENGINE_AGENT", a.name)
    env["HOME"] = HOME
    env["ENGINE_OWN_HOME"] = "1"  # the home is the agent's own: adapters may set it up
    env.setdefault("LANG", "C.UTF-8")
    git_config = [("safe.directory", "*"), ("gc.auto", "0"), ("maintenance.auto", "false"),
                  ("user.name", f"{a.name} ({a.grove})"),
                  ("user.email", f"{a.name}@{a.grove}.engine.invalid")]
    env["GIT_CONFIG_COUNT"] = str(len(git_config))
    for i, (k, v) in enumerate(git_config):
        env[f"GIT_CONFIG_KEY_{i}"] = k
        env[f"GIT_CONFIG_VALUE_{i}"] = v
    if a.max_duration:
        env["ENGINE_MAX_DURATION"] = str(a.max_duration)
    files = credential_files(launch)
    if files:
        env["ENGINE_CREDENTIAL_FILES"] = "\n".join(f"{n}={p}" for n, p in files)
    if dirs is not None and dirs.harness is not None:
        env["PATH"] = f"{HARNESS}/bin:{PATH}"
    if dirs is not None and dirs.egress is not None:
        env.update(egress_env(a.egress))
    return dict(sorted(env.items()))


def egress_env(endpoints: tuple[str, ...]) -> dict[str, str]:
    """What the entrypoint and the harness need for `network: egress`: the forwarder's
    socket and loopback ports, and the proxy variables (both spellings: programs read
    either). Loopback endpoints are reached directly: the forwarder listens on them."""
    loopback = [e for e in endpoints if egress.is_loopback(egress.parse_endpoint(e)[0])]
    no_proxy = "localhost,127.0.0.1,::1"
    return {"ENGINE_EGRESS_SOCKET": f"{EGRESS}/{egress.SOCKET_NAME}",
            "ENGINE_EGRESS_FORWARD": " ".join(loopback),
            "HTTPS_PROXY": PROXY, "HTTP_PROXY": PROXY, "https_proxy": PROXY,
            "http_proxy": PROXY, "NO_PROXY": no_proxy, "no_proxy": no_proxy}


def credential_files(launch: Launch) -> list[tuple[str, str]]:
    """(credential, path relative to home) of the credentials the harness reads as files."""
    out = []
    for name, path in launch.agent.credential_files:
        rel = str(path).lstrip("/")
        if ".." in Path(rel).parts or not rel:
            raise EngineError(f"agent {launch.agent.grove}/{launch.agent.name}: credential "
                              f"file {path!r} is not a path inside the home")
        if name not in launch.secrets:
            continue
        out.append((name, rel))
    return sorted(out)


def _mount(source: Path | str, target: str, read_only: bool) -> dict[str, Any]:
    return {"Type": "bind", "Source": str(source), "Target": target, "ReadOnly": read_only}


def mounts(launch: Launch, dirs: HostDirs) -> list[dict[str, Any]]:
    a = launch.agent
    ro = a.access == "read-only"
    out = [_mount(launch.workdir, WORKSPACE, ro)]
    out += [_mount(p, str(p), ro or p_ro) for p, p_ro in launch.git_paths]
    if launch.workdir.resolve() == launch.repo_root.resolve():
        # shared workspace: the user's checkout. Its git metadata (config, hooks, refs,
        # objects), which host git trusts, and its grove manifests, which say what runs
        # where, are read by the agent and never written
        for guarded in (".git", "groves"):
            if (launch.repo_root / guarded).exists():
                out.append(_mount(launch.repo_root / guarded, f"{WORKSPACE}/{guarded}",
                                  True))
    out += [_mount(dirs.secrets, SECRETS, True), _mount(dirs.ctl, CTL, False),
            _mount(dirs.log, LOG, False), _mount(dirs.inbox, INBOX, False),
            _mount(dirs.client, CLIENT, True), _mount(dirs.client_bin, CLIENT_BIN, True),
            _mount(dirs.entrypoint, ENTRYPOINT, True)]
    if dirs.egress is not None and dirs.forwarder is not None:
        out += [_mount(dirs.egress, EGRESS, True), _mount(dirs.forwarder, FORWARDER, True)]
    if dirs.harness is not None:
        out.append(_mount(dirs.harness, HARNESS, True))
    if dirs.home is not None:
        out.append(_mount(dirs.home, HOME, False))
    for source, target, m_ro in a.mounts:
        out.append(_mount(mount_source(launch, source), target, m_ro))
    return out


def mount_source(launch: Launch, source: str) -> Path:
    """A profile mount's host path, checked again now (validation ran earlier, and in a
    shared workspace an agent can since have replaced a directory with a symlink): a
    source inside the repository may not pass through a symlink, and nothing may reach the
    repository's `.git` or `.engine`."""
    root = launch.repo_root.resolve()
    lexical = Path(os.path.normpath(root / Path(source).expanduser()))
    src = lexical.resolve()
    who = f"agent {launch.agent.grove}/{launch.agent.name}: mount {source}"
    if lexical.is_relative_to(root) and src != lexical:
        raise EngineError(f"{who}: a symlink on the way inside the repository; refused")
    for guarded in (root / ".git", paths.state(root)):
        if src.is_relative_to(guarded) or guarded.is_relative_to(src):
            raise EngineError(f"{who}: reaches {guarded.name}; refused")
    return src


def client_shim() -> str:
    """The `engine` command on PATH inside the container (mode bits of the mounted client
    file do not matter)."""
    return f'#!/bin/sh\nexec python3 -S {CLIENT} "$@"\n'


def network_mode(network: str) -> str:
    """`egress` has no network of its own: the gateway is reached through a socket."""
    return "none" if network in ("", "egress") else network


def podman_tmpfs(tmpfs: Mapping[str, str], read_only: bool) -> dict[str, str]:
    """The engine's tmpfs mounts as Podman must be sent them to behave as on Docker.
    Podman's compat API copies what lies beneath every tmpfs into it (tmpcopyup) unless
    told `notmpcopyup`: the host's .engine under a shared workspace would be copied into
    the very tmpfs that hides it, and the image's /tmp and home into theirs. With a
    read-only root, PODMAN_READ_ONLY in place of the writable /run and /var/tmp Podman
    would add."""
    out = {path: f"{opts},notmpcopyup" for path, opts in tmpfs.items()}
    if read_only:
        out = {**PODMAN_READ_ONLY, **out}
    return dict(sorted(out.items()))


def security_opt(launch: Launch, podman: bool) -> list[str]:
    """no-new-privileges, and the engine's seccomp profile (`seccomp`: Docker's default,
    no set-uid or set-gid file ever) unless the profile is privileged (which has none):
    inline for Docker, for Podman the file `seccomp_file` names (its API takes a path)."""
    if launch.agent.privileged:
        return ["no-new-privileges"]
    sent = seccomp.file_option(seccomp_file(launch)) if podman else seccomp.security_opt()
    return ["no-new-privileges", sent]


def seccomp_file(launch: Launch) -> Path:
    """Where the Podman runtime writes the seccomp profile for this agent: its run dir,
    the engine's own (never mounted)."""
    return launch.run_dir / "seccomp.json"


def create_kwargs(launch: Launch, dirs: HostDirs, image: str,
                  podman: bool = False) -> dict[str, Any]:
    """Arguments for `client.containers.create`: the hardened default sandbox, loosened
    only where the resolved profile says so. Carries no secret value. `podman`: for
    Podman's Docker-compatible API, which needs more said to give the same sandbox
    (`podman_tmpfs`, a private IPC namespace and Docker's /dev/shm size)."""
    a = launch.agent
    uid, gid = uid_gid(a.user)
    res = a.resources
    tmpfs = {"/tmp": TMPFS_TMP}
    if launch.workdir.resolve() == launch.repo_root.resolve():
        # shared workspace: hide the engine's state (other agents' worktrees and secrets)
        tmpfs[f"{WORKSPACE}/.engine"] = "ro,size=1m"
    if a.read_only_root and dirs.home is None:
        tmpfs[HOME] = f"rw,nosuid,nodev,size=512m,uid={uid},gid={gid},mode=0700"
    if podman:
        tmpfs = podman_tmpfs(tmpfs, a.read_only_root)
    kwargs: dict[str, Any] = {
        "image": image,
        "name": container_name(launch.repo_root, a.grove, a.name),
        "hostname": a.name,
        "entrypoint": ["/bin/bash", ENTRYPOINT],
        "command": list(a.argv(launch.resume, launch.task)),  # a restart may resume
        "user": f"{uid}:{gid}",
        "working_dir": WORKSPACE,
        "environment": _env(launch, dirs),
        "labels": {LABEL_GROVE: a.grove, LABEL_AGENT: a.name, LABEL_HASH: a.spec_hash,
                   LABEL_VERSION: __version__, LABEL_REPO: str(launch.repo_root)},
        "mounts": mounts(launch, dirs),
        "tmpfs": tmpfs,
        "read_only": a.read_only_root,
        "cap_drop": ["ALL"],
        "security_opt": security_opt(launch, podman),
        "init": True,
        "pids_limit": res.pids or DEFAULT_PIDS,
        "network_mode": network_mode(a.network),
        "privileged": a.privileged,
    }
    if res.memory:
        kwargs["mem_limit"] = res.memory
        kwargs["memswap_limit"] = res.memory  # equal: no swap, so the limit really holds
    if res.cpus:
        kwargs["nano_cpus"] = int(res.cpus * 1e9)
    if podman:  # Docker's defaults, which Podman's differ from (shareable, 64000k)
        kwargs["ipc_mode"] = "private"
        kwargs["shm_size"] = SHM_SIZE
    return kwargs


# -- observation ---------------------------------------------------------------------------

_EXITED = re.compile(r"Exited \((-?\d+)\)")


def exit_code(status: str) -> int | None:
    """The exit code in a container list entry's Status ("Exited (137) 3 seconds ago")."""
    m = _EXITED.match(status or "")
    return int(m.group(1)) if m else None


def ctl_dir(entry: Mapping[str, Any]) -> Path | None:
    """The host directory mounted at CTL, from a list entry's Mounts."""
    for m in entry.get("Mounts") or []:
        if m.get("Destination") == CTL and m.get("Source"):
            return Path(m["Source"])
    return None


def read_reason(ctl: Path | None) -> str:
    """The reason the entrypoint recorded (out of memory, maxDuration), if readable here.
    `ctl/reason` is agent-writable: it is read through the trust reader (a symlink, FIFO
    or directory there is refused, never followed) and comes back as one safe line."""
    if ctl is None:
        return ""
    try:
        return reader.one_line(reader.read_text(ctl, "reason", 4096))
    except reader.NotFound:
        return ""
    except reader.Untrusted:
        return "unreadable reason (ctl/reason is not a small regular text file)"


def observed(entry: Mapping[str, Any], host: str) -> Observed:
    """A container list entry (sparse, as the list call returns it) -> Observed."""
    labels = entry.get("Labels") or {}
    state = entry.get("State") or ""
    code, reason = None, ""
    if state in ("running", "restarting", "paused"):
        phase = RUNNING
    elif state == "created":
        phase = PENDING
    elif state == "exited":
        code = exit_code(entry.get("Status") or "")
        phase = SUCCEEDED if code == 0 else FAILED
        if code != 0:
            reason = read_reason(ctl_dir(entry)) or f"exited {code}"
    elif state == "removing":
        phase = STOPPED
    else:
        phase, reason = FAILED, f"container {state or 'in an unknown state'}"
    return Observed(grove=labels.get(LABEL_GROVE, ""), name=labels.get(LABEL_AGENT, ""),
                    runtime="docker", spec_hash=labels.get(LABEL_HASH, ""), phase=phase,
                    exit_code=code, reason=reason, host=host)
