"""The shared runtime suite: the same scenarios, through the real CLI, on every runtime that
runs on this machine (local tmux sessions and Docker containers on a real engine).

Kubernetes runs its own flow against the loopback API server in tests/test_kubernetes.py;
no cluster can run here.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import git, write_grove

PROFILES = {
    "local": "{runtime: local, spawn: {allowProfiles: [main]}}",
    "docker": "{runtime: docker, image: 'grove-engine/base:latest', network: none, "
              "resources: {cpus: 1, memory: 256Mi, pids: 256}, "
              "spawn: {allowProfiles: [main]}}",
}


def grove(repo: Path, runtime: str, agents: str) -> None:
    write_grove(repo, "suite", f"""\
apiVersion: engine/v1alpha1
kind: Grove
metadata: {{name: suite}}
spec:
  defaults: {{profile: main, harness: shell}}
  policy: {{maxAgents: 10, maxDepth: 2, maxChildren: 3}}
  profiles:
    main: {PROFILES[runtime]}
  agents:
{agents}""")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "grove")


@pytest.fixture(params=["local", pytest.param("docker", marks=pytest.mark.docker)])
def runtime(request: pytest.FixtureRequest, repo: Path) -> Iterator[str]:
    if request.param == "docker":
        request.getfixturevalue("base_image")
    yield request.param
    subprocess.run([sys.executable, "-m", "engine", "destroy", "--auto-approve"], cwd=repo,
                   capture_output=True, timeout=120)


def cli(repo: Path, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "engine", *args], cwd=repo,
                          capture_output=True, text=True, timeout=timeout)


def agents_status(repo: Path) -> dict[str, dict]:
    p = cli(repo, "status", "--json")
    assert p.returncode == 0, p.stderr
    return {a["name"]: a for a in json.loads(p.stdout)["groves"][0]["agents"]}


def until(cond, timeout: float = 90, what: str = "") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.25)


def test_task_runs_commits_on_its_branch_and_converges(repo: Path, runtime: str) -> None:
    grove(repo, runtime, "    - name: worker\n      task: |\n        echo working on it\n"
                         "        echo done > OUT && git add OUT && git commit -qm out\n")
    p = cli(repo, "apply", "--auto-approve", "--wait", "--timeout", "120")
    assert p.returncode == 0, p.stdout + p.stderr
    st = agents_status(repo)["worker"]
    assert (st["phase"], st["exitCode"], st["runtime"]) == ("Succeeded", 0, runtime)
    assert git(repo, "show", "engine/suite/worker:OUT") == "done"
    assert git(repo, "log", "-1", "--format=%an", "engine/suite/worker") == "worker (suite)"
    assert "working on it" in cli(repo, "logs", "worker").stdout
    p = cli(repo, "plan", "--detailed-exitcode")
    assert p.returncode == 0, p.stdout


def test_killed_from_outside_is_restarted_per_policy(repo: Path, runtime: str) -> None:
    grove(repo, runtime, "    - name: svc\n      restart: on-failure\n      task: sleep 300\n")
    assert cli(repo, "apply", "--auto-approve").returncode == 0
    until(lambda: agents_status(repo)["svc"]["phase"] == "Running", what="Running")
    if runtime == "local":
        sock = repo / ".engine" / "tmux.sock"
        subprocess.run(["tmux", "-S", str(sock), "kill-session", "-t", "=suite__svc"],
                       check=True)
    else:
        ids = subprocess.run(["docker", "ps", "-q", "--filter", "label=engine.agent=svc",
                              "--filter", "label=engine.grove=suite"], capture_output=True,
                             text=True, check=True).stdout.split()
        subprocess.run(["docker", "kill", *ids], check=True, capture_output=True)
    until(lambda: agents_status(repo)["svc"]["phase"] == "Failed", what="Failed")
    p = cli(repo, "plan")
    assert "~> svc  (restart:" in p.stdout and "restart: on-failure" in p.stdout
    assert cli(repo, "apply", "--auto-approve").returncode == 0
    until(lambda: agents_status(repo)["svc"]["phase"] == "Running", what="Running again")


def test_message_reaches_the_agent(repo: Path, runtime: str) -> None:
    grove(repo, runtime, "    - name: chat\n      task: |\n        echo ready\n"
                         "        IFS= read -r line\n"
                         "        printf '%s\\n' \"$line\" > MSG && git add MSG && "
                         "git commit -qm msg\n")
    assert cli(repo, "apply", "--auto-approve").returncode == 0
    until(lambda: "ready" in cli(repo, "look", "chat").stdout, what="the prompt")
    p = cli(repo, "message", "chat", "quote ' dollar $HOME tick `x`")
    assert p.returncode == 0, p.stderr
    until(lambda: agents_status(repo)["chat"]["phase"] == "Succeeded", what="Succeeded")
    assert git(repo, "show", "engine/suite/chat:MSG") == "quote ' dollar $HOME tick `x`"


SPAWNER = """\
    - name: seed
      task: |
        engine spawn kid-a --wait --task 'echo a > A && git add A && git commit -qm a && \\
          engine spawn grandkid --wait --task "echo g > G && git add G && git commit -qm g"'
        engine spawn kid-b --wait --task 'echo b > B && git add B && git commit -qm b'
        engine spawn nope --profile other --wait --task true 2> REJECTED || true
        git add REJECTED && git commit -qm rejected
"""


def test_seed_spawns_children_and_a_grandchild(repo: Path, runtime: str) -> None:
    grove(repo, runtime, SPAWNER)
    with (repo.parent / "watch.log").open("w") as log:
        watch = subprocess.Popen([sys.executable, "-m", "engine", "watch", "--interval", "1"],
                                 cwd=repo, stdout=subprocess.DEVNULL, stderr=log,
                                 env=dict(os.environ))
    try:
        want = {"seed", "kid-a", "kid-b", "grandkid"}
        until(lambda: {n for n, a in agents_status(repo).items()
                       if a["phase"] == "Succeeded"} == want, timeout=180,
              what="the tree to succeed")
    finally:
        watch.send_signal(signal.SIGTERM)
        assert watch.wait(timeout=60) == 0
    st = agents_status(repo)
    assert {n: a["parent"] for n, a in st.items()} == {
        "seed": "", "kid-a": "seed", "kid-b": "seed", "grandkid": "kid-a"}
    for name, f in (("kid-a", "A"), ("kid-b", "B"), ("grandkid", "G")):
        assert git(repo, "show", f"engine/suite/{name}:{f}")
    assert "profile other is not allowed" in git(repo, "show", "engine/suite/seed:REJECTED")
    spawned = (repo / "groves/suite/spawned.yaml").read_text()
    assert spawned.count("kind: Agent") == 3 and "nope" not in spawned


def test_destroy_removes_everything_and_keeps_the_work(repo: Path, runtime: str) -> None:
    grove(repo, runtime, "    - name: w\n      task: echo x > X && git add X && "
                         "git commit -qm x && echo wip > WIP\n")
    assert cli(repo, "apply", "--auto-approve", "--wait").returncode == 0
    p = cli(repo, "destroy", "--auto-approve")
    assert p.returncode == 0, p.stderr
    assert "refs/engine/archive/suite/w/1" in p.stdout
    assert agents_status(repo)["w"]["phase"] == "Pending"  # in the manifest, not running
    assert not (repo / ".engine/worktrees/suite/w").exists()
    assert cli(repo, "restore", "suite/w").returncode == 0
    assert (repo / ".engine/worktrees/suite/w/WIP").read_text() == "wip\n"
