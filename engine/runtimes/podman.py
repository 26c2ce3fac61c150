"""Podman runtime: Docker profiles on Podman, through its Docker-compatible API service.

Called through `engine.runtimes.get("podman", repo_root, host)` like the Docker runtime,
which it is, pointed at Podman's socket: the same container spec (`docker_spec`), the same
host-side files and secret handling (`docker_fs`), the same hardening. A docker profile
whose `host:` is a Podman socket gets the same treatment (`docker.is_podman`).

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
- `network: none`, `--read-only`, tmpfs with uid/gid/mode, `--pids-limit`, cap drop,
  no-new-privileges, memory without swap, exec and image import behave as on Docker.
- images: Podman stores local images as `localhost/NAME`; the short name resolves to it.
- `attach` runs `podman --remote --url HOST exec -it`, not the docker command.
"""

from __future__ import annotations

import os
from pathlib import Path

from engine.runtimes import docker

ROOTFUL_SOCKET = "unix:///run/podman/podman.sock"
START_HINT = ("start it (podman system service --time=0 unix:///run/podman/podman.sock & as "
              "root; systemctl --user start podman.socket rootless) or fix the profile's host:")


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

    def _cli_host(self) -> list[str]:
        return ["--remote", "--url", self.where]


def make(repo_root: Path, host: str | None) -> PodmanRuntime:
    where = host or default_host()
    client = docker.connect(where, PodmanRuntime.engine, START_HINT)
    return PodmanRuntime(repo_root.resolve(), host or "", client, podman=True, where=where)
