"""Fixtures for tests that need a real Docker engine (imported by the Docker test modules).

Nothing here is faked: the engine is the machine's dockerd (.ci/docker-up.sh starts one in
CI), the image is grove-engine/base:latest made by `engine image bootstrap` once (cached by
tag, serialized across xdist workers by a lock), the repositories and worktrees are real
git. Without an engine the tests FAIL: they must run in CI.
"""

from __future__ import annotations

import contextlib
import dataclasses
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from engine import desired, images, manifest, workspace
from engine.cli import main as engine_main
from engine.errors import EngineError
from engine.fsutil import flock
from engine.runtimes import Launch, Observed
from engine.runtimes import docker as docker_rt
from engine.runtimes import podman as podman_rt
from tests.conftest import write_grove

IMAGE = images.tag(images.BASE)
CLIENT = Path(desired.__file__).resolve().parent / "client.py"  # the real agent client
BOOTSTRAP_LOCK = Path("/tmp/grove-engine-test-bootstrap.lock")


@pytest.fixture(scope="session")
def docker_client() -> Iterator[Any]:
    try:
        client = docker_rt.connect(None)
    except EngineError as e:
        pytest.fail(f"Docker tests need a running engine (bash .ci/docker-up.sh): {e.summary}")
    yield client
    client.close()


@pytest.fixture(scope="session")
def base_image(docker_client: Any) -> str:
    """grove-engine/base:latest, bootstrapped offline the first time."""
    with flock(BOOTSTRAP_LOCK):
        code = engine_main(["image", "bootstrap"])
    assert code == 0, "engine image bootstrap failed"
    return IMAGE


class Agents:
    """Creates agents of one test's grove and removes every container it made."""

    def __init__(self, repo: Path, image: str) -> None:
        self.repo = repo
        self.image = image
        self.made: list[tuple[docker_rt.DockerRuntime, str, str]] = []
        self.runtimes: dict[str, docker_rt.DockerRuntime] = {}

    def runtime(self, host: str | None = None) -> docker_rt.DockerRuntime:
        key = host or ""
        if key not in self.runtimes:
            self.runtimes[key] = docker_rt.make(self.repo, host)
        return self.runtimes[key]

    def grove(self, text: str, name: str = "g") -> desired.DesiredGrove:
        d = write_grove(self.repo, name, text)
        return desired.build(manifest.load_grove(d, self.repo),
                             desired.Options(repo_root=self.repo))

    def launch(self, agent: desired.DesiredAgent, secrets: dict[str, str] | None = None,
               mode: str = "worktree") -> Launch:
        """The Launch the executor would make: the agent's own repository on its branch
        (`workspace.ensure`, the same for worktree and clone mode) and its scratch paths
        under .engine/."""
        agent = dataclasses.replace(agent, workspace=mode)
        ws = workspace.ensure(self.repo, agent, "main")
        wt, git_paths = ws.workdir, ws.git_paths
        inbox = self.repo / ".engine" / "inbox" / agent.grove / agent.name
        inbox.mkdir(parents=True, exist_ok=True)
        env = {"ENGINE_GROVE": agent.grove, "ENGINE_AGENT": agent.name,
               "ENGINE_INBOX": str(inbox), "ENGINE_BRANCH": agent.branch}
        return Launch(agent=agent, repo_root=self.repo, workdir=wt, git_paths=git_paths,
                      run_dir=self.repo / ".engine" / "run" / agent.grove / agent.name,
                      inbox=inbox,
                      log_file=self.repo / ".engine" / "logs" / agent.grove / f"{agent.name}.log",
                      client=CLIENT, env=env, secrets=dict(secrets or {}))

    def start(self, launch: Launch) -> docker_rt.DockerRuntime:
        rt = self.runtime(launch.agent.host)
        self.made.append((rt, launch.agent.grove, launch.agent.name))
        rt.create(launch)
        return rt

    def wait(self, rt: docker_rt.DockerRuntime, grove: str, name: str,
             timeout: float = 60, until: tuple[str, ...] = ("Succeeded", "Failed")
             ) -> Observed:
        deadline = time.monotonic() + timeout
        while True:
            o = rt.observe(grove).get(name)
            if o is not None and o.phase in until:
                return o
            if time.monotonic() > deadline:
                raise AssertionError(f"{grove}/{name} still {o} after {timeout}s")
            time.sleep(0.2)

    def cleanup(self) -> None:
        for rt, grove, name in self.made:
            with contextlib.suppress(EngineError):
                rt.delete(grove, name)
        for rt in self.runtimes.values():
            rt.close()


@pytest.fixture
def agents(repo: Path, base_image: str) -> Iterator[Agents]:
    a = Agents(repo.resolve(), base_image)
    yield a
    a.cleanup()


def docker_cli(*args: str, host: str | None = None) -> str:
    argv = ["docker", *(["-H", host] if host else []), *args]
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


# -- Podman: the same runtime through Podman's Docker-compatible API -----------------------

PODMAN_HOST = "unix:///run/podman/podman.sock"  # .ci/podman-up.sh starts the service there


@pytest.fixture(scope="session")
def podman_image(docker_client: Any, base_image: str) -> str:
    """grove-engine/base:latest in Podman's store, loaded from the Docker engine's (no
    registry is reached). Without a Podman service the tests FAIL: they must run in CI."""
    try:
        client = docker_rt.connect(PODMAN_HOST, "podman service", podman_rt.START_HINT)
    except EngineError as e:
        pytest.fail(f"Podman tests need its API service (bash .ci/podman-up.sh): {e.summary}")
    try:
        assert docker_rt.is_podman(client), f"{PODMAN_HOST} is not a Podman service"
        with flock(BOOTSTRAP_LOCK):
            try:
                client.api.inspect_image(base_image)
            except Exception:  # any answer but the image: load it
                client.api.load_image(docker_client.api.get_image(base_image))
    finally:
        client.close()
    return base_image


@pytest.fixture
def podman_host(podman_image: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """DOCKER_HOST (for the docker runtime, the docker command and the engine's CLI) and
    CONTAINER_HOST (for runtime: podman) pointed at the Podman service."""
    monkeypatch.setenv("DOCKER_HOST", PODMAN_HOST)
    monkeypatch.setenv("CONTAINER_HOST", PODMAN_HOST)
    return PODMAN_HOST
