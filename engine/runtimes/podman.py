"""Podman runtime: Docker profiles on Podman, through its Docker-compatible API service.

Called through `engine.runtimes.get("podman", repo_root, host)` like the Docker runtime,
which it is, pointed at Podman's socket: the same container spec (`docker_spec`), the same
host-side files and secret handling (`docker_fs`), the same hardening. A docker profile
whose `host:` is a Podman socket is handed to this runtime too (`docker.make`, through
`adopt`; `docker.is_podman`), named docker as its profile says.

Where Podman's API answers differently, and how that is handled:
- container states: Podman lists "stopped" (exited, not yet cleaned up), "configured",
  "initialized" and "stopping", which Docker never does; they are read as Docker's
  (`DockerRuntime._podman_entry`), so a finished agent is never taken for a failed one.
- the container list carries no Mounts: a failed agent's reason file is found through
  inspect instead.
- `--init` needs catatonit on the Podman host (Debian: apt-get install catatonit).
- rlimits: rootful Podman raises every container's nofile and nproc limits beyond the
  machine's; without CAP_SYS_RESOURCE (Podman inside a container) runc refuses with
  "error setting rlimit type 7: operation not permitted". containers.conf
  `default_ulimits` at the machine's own hard limits fixes it (.ci/podman-up.sh).
- tmpfs: Podman copies what lies beneath a tmpfs into it (tmpcopyup) unless sent
  `notmpcopyup`; every engine tmpfs is sent it (`docker_spec.podman_tmpfs`), or the one
  that hides .engine in a shared workspace would hold a copy of it.
- `--read-only`: Podman adds writable, unsized /run and /var/tmp tmpfs mounts (the compat
  API has no ReadOnlyTmpfs field); they are sent read-only, as copies of the image's own,
  which is what Docker shows. IpcMode private and a 64 MiB /dev/shm are sent as Docker's
  defaults; Podman 4 still makes (and reports) the IPC namespace shareable.
- `network: none`, tmpfs with uid/gid/mode, `--pids-limit`, cap drop, no-new-privileges,
  memory without swap, exec and image import behave as on Docker.
- images: Podman stores local images as `localhost/NAME`; the short name resolves to it.
- `attach` runs `podman --remote --url HOST exec -it`, not the docker command.
- seccomp: Podman's default profile lets an agent make a user namespace (`unshare -Ur`);
  the engine's (`seccomp`: Docker's default, no set-id modes) is sent instead, as a file
  in the agent's run dir (`docker_spec.seccomp_file`): the compat API reads a host path
  and takes no inline JSON.

Rootless (a service run by an unprivileged user, found from `/libpod/info`:
host.security.rootless; `Service`):
- the engine must run as the service's own user (for a unix socket): the files it mounts
  are that user's, and only that user's service can reach them. Else a one-line refusal.
- the container's user is mapped to the service's user (`--userns=keep-id:uid=U,gid=G`),
  so the agent is uid U inside, as the profile says, and the engine's own uid outside:
  its files need no grant at all (`docker_fs.prepare(owner=...)`), and no host uid but
  the service's ever gains access to them.
- limits: a rootless service enforces pids, memory and cpus only through cgroup v2
  controllers delegated to its user (`host.cgroupControllers`). Without them Podman drops
  the limits silently (the API reports no warning; inspect shows PidsLimit 0), so the
  engine refuses the agent with one line naming the missing controllers, unless
  ENGINE_PODMAN_UNLIMITED=1 says to run without them.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import requests

from engine import images
from engine.desired import DesiredAgent, Resources
from engine.errors import EngineError, PermanentError
from engine.runtimes import Launch, docker, seccomp
from engine.runtimes import docker_fs as fs
from engine.runtimes import docker_spec as spec

ROOTFUL_SOCKET = "unix:///run/podman/podman.sock"
START_HINT = ("start it (podman system service --time=0 unix:///run/podman/podman.sock & as "
              "root; systemctl --user start podman.socket rootless) or fix the profile's host:")
UNLIMITED = "ENGINE_PODMAN_UNLIMITED"  # =1: a rootless service may run agents unlimited


@dataclasses.dataclass(frozen=True)
class Service:
    """What the Podman service says of itself (`/libpod/info`) that changes what it is
    sent: whether it is rootless, as which host uid:gid (the host side of its container
    root), and which cgroup controllers it may use (limits need them)."""

    rootless: bool = False
    uid: int = 0
    gid: int = 0
    controllers: frozenset[str] = frozenset()


def service(client: Any, where: str) -> Service:
    """The service's own account of itself (Podman's API, beside the Docker one)."""
    api = client.api
    try:
        info = api._result(api._get(api._url("/libpod/info")), True)
    except requests.RequestException as e:  # the SDK's APIError is one
        raise EngineError(f"podman service at {where}: /libpod/info failed ({e}); is it "
                          "Podman 4 or later?") from None
    host = info.get("host") or {}
    if not (host.get("security") or {}).get("rootless"):
        return Service(controllers=frozenset(host.get("cgroupControllers") or ()))

    def root(kind: str) -> int:  # the host id container id 0 maps to: the user's own
        for m in (host.get("idMappings") or {}).get(kind) or []:
            if m.get("container_id") == 0:
                return int(m["host_id"])
        raise EngineError(f"podman service at {where}: rootless, but /libpod/info names "
                          f"no {kind} for its user")

    return Service(True, root("uidmap"), root("gidmap"),
                   frozenset(host.get("cgroupControllers") or ()))


def unenforced(res: Resources, controllers: frozenset[str]) -> list[str]:
    """The limits of `res` (pids always: the engine's default) whose cgroup controller is
    not among `controllers`, as `limit` or `limit (controller)`."""
    wanted = [("pids", "pids", True), ("memory", "memory", res.memory is not None),
              ("cpus", "cpu", res.cpus is not None)]
    return [name if name == ctl else f"{name} ({ctl})"
            for name, ctl, on in wanted if on and ctl not in controllers]


def default_host() -> str:
    """CONTAINER_HOST (Podman's own variable), else the socket Podman's service listens on
    for this user: /run/podman/podman.sock as root, $XDG_RUNTIME_DIR/podman/podman.sock
    rootless."""
    env = os.environ.get("CONTAINER_HOST")
    if env:
        return env
    if os.geteuid() == 0:
        return ROOTFUL_SOCKET
    run = os.environ.get("XDG_RUNTIME_DIR") or f"/run/user/{os.geteuid()}"
    return f"unix://{run}/podman/podman.sock"


class PodmanRuntime(docker.DockerRuntime):
    """One Podman service, as seen from one repository."""

    name = "podman"
    engine = "podman service"
    hint = START_HINT
    cli = "podman"
    cli_package = "podman"

    def __init__(self, repo_root: Path, host: str, client: Any, where: str,
                 svc: Service, name: str = "podman") -> None:
        super().__init__(repo_root, host, client, podman=True, where=where)
        self.service = svc
        self.name = name  # what observe reports: the profile's runtime (docker or podman)

    def _cli_host(self) -> list[str]:
        return ["--remote", "--url", self.where]

    def _check_limits(self, a: DesiredAgent) -> None:
        """A rootless service without the controllers for the agent's limits would run it
        unlimited without a word: refused, unless ENGINE_PODMAN_UNLIMITED=1."""
        missing = unenforced(a.resources, self.service.controllers) if self.service.rootless else []
        if missing and os.environ.get(UNLIMITED) != "1":
            raise PermanentError(
                f"agent {a.grove}/{a.name}: the rootless podman service at {self.where} "
                f"cannot enforce its limits ({', '.join(missing)}): its user has no such "
                "cgroup controller (cgroup v1, or v2 without delegation) and Podman would "
                "drop them silently; use the rootful service, delegate the controllers, or "
                f"set {UNLIMITED}=1 to run it unlimited")

    def check_image(self, a: DesiredAgent) -> None:
        """As Docker's, and a limit the service cannot enforce fails the plan too."""
        self._check_limits(a)
        super().check_image(a)

    def create(self, launch: Launch) -> None:
        """Docker's create, refused first when a rootless service cannot enforce the
        agent's limits; see `_prepare` and `_host_config` for what rootless changes."""
        self._check_limits(launch.agent)
        super().create(launch)

    def _prepare(self, launch: Launch) -> spec.HostDirs:
        """Rootless: the agent's files stay the engine's own (its user is the service's
        user on the host, keep-id): no grant to anyone. The seccomp profile is written
        where the container spec names it."""
        owner = (self.service.uid, self.service.gid) if self.service.rootless else None
        dirs = fs.prepare(launch, images.entrypoint(), owner)
        seccomp.write(spec.seccomp_file(launch))  # Podman's API reads the profile's path
        return dirs

    def _host_config(self, launch: Launch, host_config: dict[str, Any]) -> dict[str, Any]:
        """Rootless: the container's user mapped to the service's (keep-id), which the
        SDK cannot say (it accepts no userns mode but "host")."""
        if self.service.rootless:
            uid, gid = spec.uid_gid(launch.agent.user)
            host_config["UsernsMode"] = f"keep-id:uid={uid},gid={gid}"
        return host_config


def adopt(repo_root: Path, host: str | None, client: Any, where: str,
          name: str = "podman") -> PodmanRuntime:
    """The runtime for a connected `client` that Podman answers (closed on a refusal):
    named `name` (docker, for a docker profile whose host is Podman's socket)."""
    try:
        svc = service(client, where)
        if svc.rootless and where.startswith("unix://") and os.geteuid() != svc.uid:
            raise EngineError(
                f"podman service at {where}: rootless as uid {svc.uid}, but the engine runs "
                f"as uid {os.geteuid()}; run the engine as uid {svc.uid} (the files it "
                "mounts must be that user's) or use the rootful service")
    except BaseException:
        client.close()
        raise
    return PodmanRuntime(repo_root.resolve(), host or "", client, where, svc, name)


def make(repo_root: Path, host: str | None) -> PodmanRuntime:
    where = host or default_host()
    return adopt(repo_root, host, docker.connect(where, PodmanRuntime.engine, START_HINT),
                 where)
