"""Day-2 operations on one agent, end to end through the real CLI: `engine restart`, `stop`,
`start` and `resume`, and the agent's home that outlives restarts and replacements, on real
tmux sessions (local) and real containers (Docker). The harness whose arguments are checked
is `sh -c` writing its own "$@" to a file in its workspace, with `resume: [--continue]`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine import inventory
from tests.conftest import write_grove

GROVE = """\
apiVersion: engine/v1alpha1
kind: Grove
metadata: {{name: d2}}
spec:
  defaults: {{profile: main, harness: shell}}
  harnesses:
    rec:
      command: [sh, -c, 'printf "%s\\n" "$@" >> args.txt', rec]
      taskArg: position
      resume: [--continue]
  profiles:
    main: {profile}
  agents:
{agents}"""

PROFILES = {
    "local": "{runtime: local}",
    "docker": "{runtime: docker, image: 'grove-engine/base:latest', network: none}",
}

# fails the first time, leaving a mark in its home; later runs say whether the mark is there
MARKS = """\
    - name: a
      task: 'if [ -f "$HOME/mark" ]; then echo {word} > seen.txt; else echo x > "$HOME/mark";
        exit 1; fi'
"""
RECORDS = """\
    - name: r
      harness: rec
      task: first task
"""
SLEEPS = """\
    - name: s
      restart: always
      task: 'echo run >> "$HOME/runs"; sleep 600'
"""


def grove(repo: Path, runtime: str, agents: str) -> None:
    write_grove(repo, "d2", GROVE.format(profile=PROFILES[runtime], agents=agents))


def status(engine, name: str) -> dict:  # type: ignore[no-untyped-def]
    res = engine("status", "--json")
    assert res.code == 0, res
    return {a["name"]: a for a in json.loads(res.out)["groves"][0]["agents"]}[name]


def wait_phase(engine, name: str, phases: set[str], timeout: float = 60) -> dict:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        st = status(engine, name)
        if st["phase"] in phases:
            return st
        assert time.monotonic() < deadline, f"{name} still {st['phase']}, wanted {phases}"
        time.sleep(0.1)


def wait_file(path: Path, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while not path.is_file():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.1)
    return path.read_text()


def record(repo: Path, name: str) -> inventory.Record:
    return inventory.load(repo / ".engine", "d2").agents[name]


def one_line_error(res, text: str) -> None:  # type: ignore[no-untyped-def]
    assert res.code == 1, res
    assert text in res.err and res.err.count("\n") == 1 and "Traceback" not in res.err, res


@pytest.fixture(params=["local", pytest.param("docker", marks=pytest.mark.docker)])
def runtime(request: pytest.FixtureRequest, repo: Path) -> Iterator[str]:
    if request.param == "docker":
        request.getfixturevalue("base_image")
    yield request.param
    subprocess.run([sys.executable, "-m", "engine", "destroy", "--auto-approve"], cwd=repo,
                   capture_output=True, timeout=120)


def home_of(repo: Path, runtime: str, agent: str) -> Path:
    """A local agent's home, or a container's (sealed: no local agent reaches it)."""
    return repo / ".engine" / ("home-sealed" if runtime == "docker" else "home") / "d2" / agent


def test_restart_of_failed_agent_and_home_survives_restart_and_replace(
        repo: Path, runtime: str, engine) -> None:  # type: ignore[no-untyped-def]
    grove(repo, runtime, MARKS.format(word="kept"))
    engine("apply", "--auto-approve", "--wait", "--timeout", "60")
    assert wait_phase(engine, "a", {"Failed", "Succeeded"})["phase"] == "Failed"
    assert record(repo, "a").restarts == 0
    res = engine("restart", "a")
    assert res.code == 0, res
    assert "d2/a: restarted" in res.out
    wait_phase(engine, "a", {"Succeeded"})
    wt = repo / ".engine/worktrees/d2/a"
    assert (wt / "seen.txt").read_text() == "kept\n"  # the first run's $HOME/mark is there
    assert record(repo, "a").restarts == 1
    # a spec change replaces the agent: a new process/container, the same home
    grove(repo, runtime, MARKS.format(word="replaced"))
    res = engine("apply", "--auto-approve", "--wait", "--timeout", "60")
    assert res.code == 0 and "1 replaced" in res.out, res
    assert (wt / "seen.txt").read_text() == "replaced\n"
    # removing the agent removes its home
    grove(repo, runtime, RECORDS)
    assert engine("apply", "--auto-approve").code == 0
    assert not home_of(repo, runtime, "a").exists()


def test_stopped_agent_stays_stopped_until_start(repo: Path, runtime: str, engine
                                                 ) -> None:  # type: ignore[no-untyped-def]
    grove(repo, runtime, SLEEPS)
    assert engine("apply", "--auto-approve").code == 0
    wait_phase(engine, "s", {"Running"})
    res = engine("stop", "s")
    assert res.code == 0 and "d2/s: stopped" in res.out, res
    assert status(engine, "s")["phase"] == "Stopped"
    assert record(repo, "s").stopped
    # restart: always would start it again; stopped, neither apply nor a controller does
    res = engine("apply", "--auto-approve")
    assert res.code == 0 and "no changes" in res.out, res
    assert engine("watch", "--once", "--working-tree").code == 0
    assert status(engine, "s")["phase"] == "Stopped"
    home = home_of(repo, runtime, "s")
    own_home = runtime == "docker" or os.geteuid() == 0  # else it shares the user's home
    if own_home:
        assert (home / "runs").read_text() == "run\n"
    res = engine("start", "s")
    assert res.code == 0 and "d2/s: restarted" in res.out, res
    wait_phase(engine, "s", {"Running"})
    assert not record(repo, "s").stopped
    if own_home:  # the same home, with the second run's line
        deadline = time.monotonic() + 30
        while (home / "runs").read_text() != "run\nrun\n":
            assert time.monotonic() < deadline
            time.sleep(0.1)
    res = engine("start", "s")
    assert res.code == 0 and "already running" in res.out, res


def test_resume_passes_resume_args_then_the_new_task(repo: Path, runtime: str, engine
                                                     ) -> None:  # type: ignore[no-untyped-def]
    grove(repo, runtime, RECORDS + MARKS.format(word="x"))
    engine("apply", "--auto-approve", "--wait", "--timeout", "60")
    args = repo / ".engine/worktrees/d2/r/args.txt"
    assert wait_file(args) == "first task\n"
    res = engine("resume", "r", "--task", "next: fix the tests")
    assert res.code == 0 and "d2/r: restarted" in res.out, res
    wait_phase(engine, "r", {"Succeeded"})
    assert args.read_text() == "first task\n--continue\nnext: fix the tests\n"
    assert engine("restart", "d2/r").code == 0  # a restart resumes too, with its own task
    wait_phase(engine, "r", {"Succeeded"})
    assert args.read_text().endswith("fix the tests\n--continue\nfirst task\n")
    assert record(repo, "r").restarts == 2
    # the shell harness has no resume arguments
    one_line_error(engine("resume", "a"), "harness shell cannot resume a session")


def test_bad_input_is_one_line(repo: Path, engine) -> None:  # type: ignore[no-untyped-def]
    grove(repo, "local", RECORDS)
    for cmd in ("restart", "stop", "start", "resume"):
        one_line_error(engine(cmd, "nope"), "agent nope: not found")
        one_line_error(engine(cmd, "r"), "agent d2/r: not started yet")
    res = engine("resume", "r", "--task", " ")
    assert res.code == 2 and "Traceback" not in res.err, res


def test_a_link_where_the_home_goes_is_never_followed(repo: Path, runtime: str, engine,
                                                       tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    if runtime == "local" and os.geteuid() != 0:
        pytest.skip("a local agent has a home of its own only when the engine is root")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep").write_text("mine\n")
    home = home_of(repo, runtime, "a")
    home.parent.mkdir(parents=True)
    home.symlink_to(elsewhere)
    grove(repo, runtime, MARKS.format(word="x"))
    res = engine("apply", "--auto-approve")
    assert res.code == 1 and "is not a directory" in res.out, res
    st = status(engine, "a")
    assert st["phase"] == "Failed" and "is not a directory" in st["reason"], st
    assert engine("destroy", "--auto-approve").code == 0
    assert not os.path.lexists(home)  # the link went, not what it points to
    assert [p.name for p in elsewhere.iterdir()] == ["keep"]
    assert (elsewhere / "keep").read_text() == "mine\n"
    assert elsewhere.stat().st_uid == os.geteuid()


@pytest.mark.docker
def test_a_containers_home_is_out_of_a_local_agents_reach(repo: Path, engine,
                                                          base_image: str) -> None:
    """Local agents run as uid 1000, which a container's user may share: a container's
    home sits where only the engine's user can enter, so a local agent cannot read its
    credential or configuration files by path."""
    if os.geteuid() != 0:
        pytest.skip("a local agent runs as another uid only when the engine is root")
    grove(repo, "docker", MARKS.format(word="x"))
    assert engine("apply", "--auto-approve", "--wait").code in (0, 1)
    home = home_of(repo, "docker", "a")
    assert home.is_dir()
    peek = subprocess.run(["setpriv", "--reuid", "1000", "--regid", "1000", "--clear-groups",
                           "ls", str(home)], capture_output=True, text=True)
    assert peek.returncode != 0 and "Permission denied" in peek.stderr, peek
    assert engine("destroy", "--auto-approve").code == 0


def test_a_home_deeper_than_python_recursion_is_removed_with_its_agent(
        repo: Path, engine) -> None:  # type: ignore[no-untyped-def]
    """An agent nests 1,100 directories in its home: deleting it removes them all (no
    RecursionError, no exit 3), and prune and destroy go on."""
    if os.geteuid() != 0:
        pytest.skip("a local agent has a home of its own only when the engine is root")
    grove(repo, "local", "    - name: a\n      task: |\n"
                         "        cd \"$HOME\"; for i in $(seq 1100); do mkdir d && cd d; done\n")
    assert engine("apply", "--auto-approve", "--wait").code == 0
    home = home_of(repo, "local", "a")
    assert (home / "d" / "d" / "d").is_dir()
    res = engine("destroy", "--auto-approve")
    assert res.code == 0 and "Traceback" not in res.out + res.err, res
    assert not os.path.lexists(home)
