"""Local agents: every process an agent starts ends with it, under each containment this
machine offers (cgroup v2, PID namespace, token sweep), and the runtime's readers of the
agent-writable run files never follow a symlink or wait on a FIFO.

Real tmux, real processes, the real CLI in a subprocess (so a hang is a timeout, not a
stuck test run). Escaped processes are `sleep <tag>` with a per-test tag, found from the
host's /proc by their command line: inside a PID namespace the pids an agent records are
its namespace's, not the host's.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from engine.runtimes import local_contain as contain
from tests.conftest import write_grove

pytestmark = pytest.mark.timeout(150)

GROVE = """\
apiVersion: engine/v1alpha1
kind: Grove
metadata: {{name: box}}
spec:
  defaults: {{profile: local, harness: shell}}
  profiles:
    local: {{runtime: local}}
  agents:
{agents}
"""

# each way out of a process group / session / parent, recording its own pid; the last one
# also clears its environment (only the cgroup and the namespace catch that one)
ESCAPES = """\
setsid sleep {tag}1 </dev/null >/dev/null 2>&1 & echo $! > pid.setsid
nohup sleep {tag}2 </dev/null >/dev/null 2>&1 & echo $! > pid.nohup
( sleep {tag}3 </dev/null >/dev/null 2>&1 & echo $! > pid.double ) &
sleep {tag}4 </dev/null >/dev/null 2>&1 & echo $! > pid.disown; disown
env -i /usr/bin/setsid /usr/bin/sleep {tag}5 </dev/null >/dev/null 2>&1 &
echo ready > READY
"""
ENV_CLEARED = "5"


def cli(repo: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "engine", *args], cwd=repo,
                          capture_output=True, text=True, timeout=timeout)


def until(cond: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def agent(repo: Path, name: str = "a") -> dict[str, Any]:
    p = cli(repo, "status", "--json")
    assert p.returncode == 0, p.stderr
    return {a["name"]: a for a in json.loads(p.stdout)["groves"][0]["agents"]}[name]


def tagged(tag: str) -> dict[str, int]:
    """Host pid of each live `sleep <tag>N`, by N."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            argv = Path(f"/proc/{name}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        ours = len(argv) >= 2 and argv[0].endswith(b"sleep") and argv[1].startswith(tag.encode())
        if ours and alive(int(name)):
            out[argv[1].decode()[len(tag):]] = int(name)
    return out


def alive(pid: int) -> bool:
    """Running, not merely a zombie waiting for whichever parent inherited it."""
    try:
        st = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return st[st.rindex(")") + 2] not in "ZX"


@pytest.fixture(params=contain.MECHANISMS)
def mechanism(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(contain.CAP_VAR, request.param)
    return str(request.param)


@pytest.fixture
def tag(repo: Path) -> Iterator[str]:
    t = f"1000.{random.randrange(10**6):06d}"
    yield t
    cli(repo, "destroy", "--auto-approve", timeout=120)
    for pid in tagged(t).values():  # what a failed test (or `marker`) left behind
        os.kill(pid, signal.SIGKILL)


def start(repo: Path, mechanism: str, tag: str, tail: str, extra: str = "") -> dict[str, int]:
    """Apply agent `a` running ESCAPES then `tail`; its escaped processes, once started."""
    task = (ESCAPES.format(tag=tag) + tail).replace("\n", "\n        ")
    write_grove(repo, "box", GROVE.format(agents=f"    - name: a\n{extra}      task: |\n"
                                                 f"        {task}\n"))
    p = cli(repo, "apply", "--auto-approve")
    assert p.returncode == 0, p.stdout + p.stderr
    rd = repo / ".engine/run/box/a"
    got = json.loads((rd / contain.RECORD).read_text())["mechanism"]
    if got != mechanism:
        pytest.skip(f"containment {mechanism} is not available here (got {got})")
    wt = repo / ".engine/worktrees/box/a"
    until(lambda: (wt / "READY").exists() and len(tagged(tag)) >= 5, 20, "the escapes")
    pids = tagged(tag)
    if mechanism != "pidns":  # the pids the agent saw are the host's
        recorded = {int((wt / f"pid.{k}").read_text()) for k in
                    ("setsid", "nohup", "double", "disown")}
        assert recorded == {pids[n] for n in "1234"}
    return pids


def assert_all_ended(mechanism: str, pids: dict[str, int]) -> None:
    escaped = {n for n in pids if n == ENV_CLEARED and mechanism == "marker"}
    until(lambda: not any(alive(p) for n, p in pids.items() if n not in escaped), 5,
          "every process of the agent to end")
    # the documented hole in the best-effort mechanism: a cleared environment plus setsid
    assert all(alive(pids[n]) for n in escaped)


def test_normal_end_ends_every_process(repo: Path, mechanism: str, tag: str) -> None:
    pids = start(repo, mechanism, tag, "while [ ! -e GO ]; do sleep 0.1; done\nexit 0\n")
    (repo / ".engine/worktrees/box/a/GO").write_text("")
    until(lambda: agent(repo)["phase"] == "Succeeded", 20, "Succeeded")
    assert_all_ended(mechanism, pids)
    assert (repo / ".engine/run/box/a/reaped").exists()
    cg = json.loads((repo / ".engine/run/box/a" / contain.RECORD).read_text())["cgroup"]
    assert not cg or not Path(cg).exists()  # the wrapper removed the agent's cgroup


def test_destroy_ends_every_process(repo: Path, mechanism: str, tag: str) -> None:
    pids = start(repo, mechanism, tag, "sleep 300\n")
    cg = json.loads((repo / ".engine/run/box/a" / contain.RECORD).read_text())["cgroup"]
    p = cli(repo, "destroy", "--auto-approve")
    assert p.returncode == 0, p.stdout + p.stderr
    assert_all_ended(mechanism, pids)
    assert not cg or not Path(cg).exists()


def test_max_duration_ends_every_process(repo: Path, mechanism: str, tag: str) -> None:
    pids = start(repo, mechanism, tag, "sleep 300\n", extra="      maxDuration: 6s\n")
    until(lambda: agent(repo)["phase"] == "Failed", 30, "maxDuration")
    assert agent(repo)["reason"] == "maxDuration 6s exceeded"
    assert_all_ended(mechanism, pids)


def test_session_killed_from_outside_is_reaped_by_the_next_look(repo: Path, mechanism: str,
                                                                tag: str) -> None:
    pids = start(repo, mechanism, tag, "sleep 300\n")
    subprocess.run(["tmux", "-S", str(repo / ".engine/tmux.sock"), "kill-session", "-t",
                    "=box__a"], check=True)
    st = agent(repo)  # observing the ended session reaps what it left
    assert (st["phase"], st["reason"]) == ("Failed", "session ended without an exit code "
                                                     "(killed)")
    assert_all_ended(mechanism, pids)


def test_the_mechanism_is_recorded_and_reported(repo: Path) -> None:
    write_grove(repo, "box", GROVE.format(agents="    - name: a\n      task: 'true'\n"))
    assert cli(repo, "apply", "--auto-approve", "--wait").returncode == 0
    rec = json.loads((repo / ".engine/run/box/a" / contain.RECORD).read_text())
    assert rec["mechanism"] in contain.MECHANISMS and len(rec["token"]) == 32
    events = [json.loads(x) for x in (repo / ".engine/events.jsonl").read_text().splitlines()]
    assert {"event": "AgentContained", "grove": "box", "agent": "a", "runtime": "local",
            "containment": rec["mechanism"]}.items() <= next(
        e for e in events if e.get("event") == "AgentContained").items()


# -- the readers of agent-written files ------------------------------------------------------

@pytest.fixture
def ended(repo: Path) -> Iterator[Path]:
    """Agent `a` ran `echo hello` and succeeded; its run dir."""
    write_grove(repo, "box", GROVE.format(agents="    - name: a\n      task: echo hello\n"))
    assert cli(repo, "apply", "--auto-approve", "--wait").returncode == 0
    yield repo / ".engine/run/box/a"
    cli(repo, "destroy", "--auto-approve")


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    f = tmp_path / "secret.txt"
    f.write_text("TOP-SECRET-CONTENT\n")
    return f


@pytest.mark.parametrize("plant", ["symlink-secret", "symlink-zero", "fifo", "text", "huge"])
def test_a_bad_exit_file_fails_the_agent_with_a_fixed_reason(repo: Path, ended: Path,
                                                             secret: Path, plant: str) -> None:
    exit_file = ended / "exit"
    exit_file.unlink()
    if plant == "symlink-secret":
        exit_file.symlink_to(secret)
    elif plant == "symlink-zero":
        exit_file.symlink_to("/dev/zero")
    elif plant == "fifo":
        os.mkfifo(exit_file)
    else:
        exit_file.write_text("0 but not really\n" if plant == "text" else "9" * 50)
    p = cli(repo, "status", "--json", timeout=20)
    assert p.returncode == 0, p.stderr
    st = {a["name"]: a for a in json.loads(p.stdout)["groves"][0]["agents"]}["a"]
    assert (st["phase"], st["exitCode"], st["reason"]) == ("Failed", None,
                                                           "invalid exit code file")
    assert "TOP-SECRET" not in p.stdout + p.stderr


def test_reason_file_is_never_followed_and_is_terminal_safe(repo: Path, ended: Path,
                                                            secret: Path) -> None:
    (ended / "exit").write_text("3\n")
    (ended / "reason").symlink_to(secret)
    st = agent(repo)
    assert (st["phase"], st["exitCode"], st["reason"]) == ("Failed", 3, "exited 3")
    (ended / "reason").unlink()
    (ended / "reason").write_text("\x1b]0;pwned\x07bad \x1b[31mthing\x1b[0m\nsecond line\n")
    assert agent(repo)["reason"] == "bad thing"


@pytest.mark.parametrize("plant", ["symlink-secret", "symlink-zero", "fifo"])
def test_logs_never_follow_a_symlink_or_wait_on_a_fifo(repo: Path, ended: Path,
                                                       secret: Path, plant: str) -> None:
    log = repo / ".engine/logs/box/a.log"
    assert "hello" in cli(repo, "logs", "a").stdout
    log.unlink()
    if plant == "fifo":
        os.mkfifo(log)
    else:
        log.symlink_to(secret if plant == "symlink-secret" else Path("/dev/zero"))
    for args in (("logs", "a"), ("logs", "-f", "a"), ("look", "a")):
        p = cli(repo, *args, timeout=20)
        assert p.returncode == 0, p.stderr
        assert "TOP-SECRET" not in p.stdout and len(p.stdout) < 10_000


def test_a_planted_containment_record_is_not_acted_on(tmp_path: Path) -> None:
    base = tmp_path / "run"
    (base / "a").mkdir(parents=True)
    rec = base / "a" / contain.RECORD
    token = "0" * 32
    for cg in ("/sys/fs/cgroup", "/sys/fs/cgroup/../..", "/tmp/grove-engine_box__a_" + token):
        rec.write_text(json.dumps({"mechanism": "cgroup", "token": token, "cgroup": cg}))
        assert contain.load(base, "box", "a") == contain.Containment("marker", token)
    rec.write_text(json.dumps({"mechanism": "cgroup", "token": "not-hex", "cgroup": ""}))
    assert contain.load(base, "box", "a") is None
    rec.unlink()
    os.mkfifo(rec)
    assert contain.load(base, "box", "a") is None


@pytest.mark.parametrize("how", ["end", "destroy"])
def test_cgroups_the_agent_nested_in_its_own_are_removed(repo: Path, tag: str,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         how: str) -> None:
    """An agent that runs the engine itself (its own tmux server, its own agents) nests
    cgroups in its own: they go with it."""
    monkeypatch.setenv(contain.CAP_VAR, "cgroup")
    nest = (f"cg=$(python3 -c 'import json; print(json.load(open(\"../../../run/box/a/"
            f"{contain.RECORD}\"))[\"cgroup\"])')\nmkdir \"$cg/inner\"\n"
            f"( echo $BASHPID > \"$cg/inner/cgroup.procs\" && exec setsid sleep {tag}6 "
            "</dev/null >/dev/null 2>&1 ) &\n")
    tail = nest + ("while [ ! -e GO ]; do sleep 0.1; done\n" if how == "end" else "sleep 300\n")
    start(repo, "cgroup", tag, tail)
    until(lambda: "6" in tagged(tag), 10, "the nested process")
    pids = tagged(tag)
    cg = Path(json.loads((repo / ".engine/run/box/a" / contain.RECORD).read_text())["cgroup"])
    assert (cg / "inner").is_dir()
    if how == "end":
        (repo / ".engine/worktrees/box/a/GO").write_text("")
        until(lambda: agent(repo)["phase"] == "Succeeded", 20, "Succeeded")
    else:
        assert cli(repo, "destroy", "--auto-approve").returncode == 0
    assert_all_ended("cgroup", pids)
    until(lambda: not cg.exists(), 5, "the agent's cgroup to be removed")
