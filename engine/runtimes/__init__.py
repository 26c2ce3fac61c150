"""Runtimes: where agent processes run. One module per runtime, all satisfying `Runtime`.

Called by `observe` (batched listing), `executor` (create/stop/delete), `engine stop` and
the interaction commands (logs, look, attach, message). Heavy clients (docker, kubernetes)
are imported only inside their own module, which is imported only when a grove uses it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

# Phases of an agent, as observed, and what a runtime reports (engine.actual: data only).
from engine.actual import FAILED as FAILED
from engine.actual import PENDING as PENDING
from engine.actual import RUNNING as RUNNING
from engine.actual import STOPPED as STOPPED
from engine.actual import SUCCEEDED as SUCCEEDED
from engine.actual import Observed as Observed
from engine.desired import DesiredAgent
from engine.errors import EngineError

# Owner labels carried by everything a runtime creates.
LABEL_GROVE, LABEL_AGENT, LABEL_HASH, LABEL_VERSION, LABEL_REPO = (
    "engine.grove", "engine.agent", "engine.spec-hash", "engine.version", "engine.repo")


@dataclass(frozen=True)
class Launch:
    """Everything a runtime needs to start one agent. `secrets` holds values: never log,
    print, label or persist it outside the agent's own secret files."""

    agent: DesiredAgent
    repo_root: Path
    workdir: Path  # host path the agent works in (its worktree, clone or the repo)
    # Host paths git needs besides workdir, mounted at the same path: (path, read_only).
    # Worktree mode: the repository's common .git dir (read-write); clone mode: the
    # main repository's objects (read-only, for the clone's alternates); shared: none.
    git_paths: tuple[tuple[Path, bool], ...]
    run_dir: Path  # .engine/run/<grove>/<agent>: wrapper script, exit file, secret files
    inbox: Path  # .engine/inbox/<grove>/<agent>
    log_file: Path  # .engine/logs/<grove>/<agent>.log
    client: Path  # the dependency-free agent-side `engine` client (a file)
    env: dict[str, str]  # non-secret environment, ENGINE_* included (host paths; a
    # container runtime rewrites ENGINE_INBOX to where it mounts the inbox)
    resume: bool = False  # restart of an existing agent: the harness may resume
    # `engine resume --task`: the next message, in place of the agent's task (with `resume`)
    task: str | None = None
    secrets: dict[str, str] = field(repr=False, default_factory=dict)


class Runtime(Protocol):
    """The contract every runtime satisfies (tests/runtime_suite.py checks it)."""

    name: str

    def observe(self, grove: str) -> dict[str, Observed]:
        """Every agent of `grove` this runtime holds, in one batched call."""

    def create(self, launch: Launch) -> None:
        """Start the agent (replacing any leftover object of the same agent)."""

    def stop(self, grove: str, agent: str) -> None:
        """End the agent's process/container and release what it holds while running; its
        home (and what `logs` reads) stays for the next `create`. No error if it is gone."""

    def delete(self, grove: str, agent: str) -> None:
        """`stop`, then remove what the agent kept (its home); no error if it is gone."""

    def logs(self, grove: str, agent: str, follow: bool = False, tail: int | None = None,
             previous: bool = False) -> Iterator[str]:
        """The agent's output, line by line: with `tail`, only its last `tail` lines (found
        from the end, never reading all of a long log); with `follow`, then what comes
        until it ends. `previous`: the output of its run before this one (no follow),
        EngineError when it has had none."""

    def look(self, grove: str, agent: str) -> str:
        """The agent's current screen."""

    def attach(self, grove: str, agent: str) -> int:
        """Attach the user's terminal to the agent's session; returns an exit status."""

    def send(self, grove: str, agent: str, text: str) -> None:
        """Type `text` into the agent's session (pasted, then Enter)."""


Factory = Callable[[Path, "str | None"], Runtime]


# The registry: each runtime's module is imported only when a grove uses it (the Docker
# SDK and the Kubernetes client are heavy). The factories are typed, so mypy checks each
# runtime class against the `Runtime` protocol here.
def _local(repo_root: Path, host: str | None) -> Runtime:
    from engine.runtimes import local

    return local.make(repo_root, host)


def _docker(repo_root: Path, host: str | None) -> Runtime:
    from engine.runtimes import docker

    return docker.make(repo_root, host)


def _podman(repo_root: Path, host: str | None) -> Runtime:
    from engine.runtimes import podman

    return podman.make(repo_root, host)


def _kubernetes(repo_root: Path, host: str | None) -> Runtime:
    from engine.runtimes import kubernetes

    return kubernetes.make(repo_root, host)


REGISTRY: dict[str, Factory] = {"local": _local, "docker": _docker, "podman": _podman,
                                "kubernetes": _kubernetes}


def get(name: str, repo_root: Path, host: str | None = None) -> Runtime:
    """The runtime `name` for this repository (and Docker or Podman host / kube context)."""
    factory = REGISTRY.get(name)
    if factory is None:
        raise EngineError(f"unknown runtime {name!r} (runtimes: {', '.join(REGISTRY)})")
    try:
        return factory(repo_root, host)
    except ModuleNotFoundError as e:
        if not (e.name or "").startswith(("docker", "kubernetes")):
            raise
        from engine import __version__
        extra = "[kubernetes]" if name == "kubernetes" else ""  # docker is not an extra
        git_url = f"git+https://github.com/grove-engine/grove-engine@v{__version__}"
        raise EngineError(f"runtime {name} is not available: missing Python package "
                          f"{e.name} (from a clone: pip install -e '.{extra}'; else pip "
                          f"install 'grove-engine{extra} @ {git_url}')") from None
