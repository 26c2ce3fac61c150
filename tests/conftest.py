"""Test contract: everything runs for real (git, tmux, Docker, the engine's own CLI).

Fakes exist only at edges this machine cannot run, and each one says so where it is
defined: the model providers' APIs, in tests/model_server.py (a scripted model server on
127.0.0.1 speaking the Anthropic Messages, OpenAI Responses and Chat Completions and Gemini
wire formats, which the real agent CLIs talk to in tests/test_real_agents.py); the
Kubernetes API server in tests/k8s_apiserver.py (no cluster runs here), with its pods/exec
websocket, whose commands run in a local process per pod (`PodSandbox`: own mount and PID
namespaces, the pod's directory at /run/engine, a real tmux); a
program that records its argv in place of the real `claude` in one harness test (its exact
command line and secret handling; the real CLIs run in tests/test_real_agents.py); a
tiny `mmdebstrap` in tests/test_images.py for the import's failure paths (the real
bootstrap runs in the Docker fixtures); and a Unix socket that accepts and never answers,
in tests/test_untrusted_files.py, standing in for a hung tmux server so a `watch` pass can
be held blocked while the test checks that SIGTERM still ends it within a second; and in
tests/test_credentials_harness.py, a bash probe in place of each agent CLI (it writes down
the credential names the agent was given, never a value) with an image
(`grove-engine/test-credentials`) that is the base image labelled as carrying the CLIs,
because what is checked there is what the runtimes hand an agent, not the CLIs (those run
for real in tests/test_real_agents.py); and in tests/test_kubernetes_netpol.py, the name
resolver for `*.test` names only (`socket.getaddrinfo`: no DNS server is reachable here,
and what is checked is which addresses a NetworkPolicy names and refuses; `localhost`
and IP remotes resolve for real).
Tests never touch the developer's $HOME or real config: HOME and XDG_CONFIG_HOME point
into a temporary directory for every test.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from engine.cli import main as engine_main

ROOT = Path(__file__).resolve().parent.parent
pytest_plugins = ["tests.docker_fixtures"]  # Docker fixtures (engine, base image)


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory: pytest.TempPathFactory,
                   monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    monkeypatch.setenv("GIT_AUTHOR_NAME", "Test")
    monkeypatch.setenv("GIT_AUTHOR_EMAIL", "test@example.invalid")
    monkeypatch.setenv("GIT_COMMITTER_NAME", "Test")
    monkeypatch.setenv("GIT_COMMITTER_EMAIL", "test@example.invalid")
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    monkeypatch.delenv("TMUX", raising=False)
    monkeypatch.delenv("ENGINE_AGENT", raising=False)  # the suite run inside an agent
    monkeypatch.setenv("NO_COLOR", "1")
    yield home
    real_home = Path(os.path.expanduser("~root"))
    assert not (real_home / ".config" / "engine" / "config.yaml.test-touched").exists()


@pytest.fixture
def watch(repo: Path) -> Iterator[list[Any]]:
    """Controllers (`engine watch` processes: anything with a `proc`) a test starts; those
    still running at the end are killed."""
    started: list[Any] = []
    yield started
    for w in started:
        if w.proc.poll() is None:
            w.proc.kill()
            w.proc.wait()


def searchable(path: Path) -> None:
    """As root, the local runtime runs agents as uid 1000, which must reach the repository:
    pytest's temporary directories are 0700, so let others search (not list) them."""
    if os.geteuid() != 0:
        return
    for d in [path, *path.parents]:
        if d == Path("/tmp") or d == Path("/"):
            break
        d.chmod(d.stat().st_mode | 0o001)


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                          text=True).stdout.strip()


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh git repository (branch main, one commit) as the working directory."""
    r = tmp_path / "repo"
    r.mkdir()
    searchable(r)
    git(r, "init", "-q", "-b", "main")
    (r / "README.md").write_text("test repo\n")
    (r / ".gitignore").write_text(".engine/\n")
    git(r, "add", "-A")
    git(r, "commit", "-qm", "initial")
    monkeypatch.chdir(r)
    return r


class Result:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err

    def __repr__(self) -> str:
        return f"Result(code={self.code}, out={self.out!r}, err={self.err!r})"


@pytest.fixture
def engine(capsys: pytest.CaptureFixture[str]):  # type: ignore[no-untyped-def]
    """Run the real CLI in-process: engine("plan", "--json") -> Result."""
    def run(*args: str) -> Result:
        capsys.readouterr()
        code = engine_main(list(args))
        cap = capsys.readouterr()
        return Result(code, cap.out, cap.err)
    return run


LOCAL_GROVE = """\
apiVersion: engine/v1alpha1
kind: Grove
metadata: {{name: demo}}
spec:
  defaults: {{profile: local, harness: shell}}
  profiles:
    local: {{runtime: local, spawn: {{allowProfiles: [local]}}}}
  agents:
{agents}
"""


def local_grove(root: Path, agents: str) -> Path:
    """Grove `demo` on the local runtime with the shell harness and these agents."""
    return write_grove(root, "demo", LOCAL_GROVE.format(agents=agents))


def write_grove(root: Path, name: str, text: str, file: str = "grove.yaml") -> Path:
    d = root / "groves" / name
    d.mkdir(parents=True, exist_ok=True)
    (d / file).write_text(text)
    return d


# -- real agent CLIs, installed once --------------------------------------------------------
# A persistent cache outside pytest's temporary directories, so repeated runs (and every
# xdist worker: installs are flock-serialized and atomic) reuse what was installed once.
SHARED_CACHE = Path(os.environ.get("GROVE_ENGINE_TEST_CACHE", "/tmp/grove-engine-test-cache"))


def npm_env(mp: pytest.MonkeyPatch, cache: Path) -> None:
    mp.setenv("GROVE_ENGINE_CACHE", str(cache))
    mp.setenv("npm_config_cache", str(SHARED_CACHE / "npm"))


@pytest.fixture(scope="session")
def harness_program() -> Callable[..., Any]:
    """harness_program("claude") -> the Installed program in the shared test cache,
    installed on first use (skips the test when npm is missing)."""
    from engine import harness_install

    def get(name: str, version: str | None = None) -> Any:
        if shutil.which("npm") is None:
            pytest.skip("npm is not installed")
        with pytest.MonkeyPatch.context() as mp:
            npm_env(mp, SHARED_CACHE)
            return harness_install.install(name, version, lambda _line: None)
    return get


@pytest.fixture
def shared_harness_cache(monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point the engine (GROVE_ENGINE_CACHE) at the shared test cache for one test, so the
    runtimes find what `harness_program` installed; returns the harnesses directory."""
    from engine import harness_install
    npm_env(monkeypatch, SHARED_CACHE)
    return harness_install.cache_root()


@pytest.fixture
def api() -> Iterator[Any]:
    """The Kubernetes API server stand-in (tests/k8s_apiserver.py) with namespaces
    `default` and `agents`, for one test."""
    from tests.k8s_apiserver import FakeApiServer
    server = FakeApiServer(namespaces=("default", "agents"))
    server.start()
    yield server
    server.stop()
