"""The grove lock tells who holds it and refuses to be taken from a live holder; `status`
tells what was applied, from which commit, and what became of each agent. Real processes
hold the locks, real git repositories and a real local-runtime agent (tmux) are looked at."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine import inventory
from engine.errors import LockedError
from engine.inventory import Inventory, Record
from tests.conftest import git, local_grove
from tests.test_json_output import check

ONE = "    - name: a\n      task: echo A > A && git add A && git commit -qm a\n"
# holds the lock of grove demo in STATE for SECONDS (then releases it), printing its ID
HOLDER = """\
import sys, time
from pathlib import Path
from engine import inventory
with inventory.locked(Path(sys.argv[1]), "demo", "watch") as info:
    print(info.id, flush=True)
    time.sleep(float(sys.argv[2]))
print("released", flush=True)
time.sleep(60)
"""


def grove(repo: Path, agents: str = ONE, commit: bool = True) -> None:
    local_grove(repo, agents)
    if commit:
        git(repo, "add", "-A")
        git(repo, "commit", "-qm", "grove")


def cli(cwd: Path, *args: str, env: dict[str, str] | None = None
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "engine", *args], cwd=cwd, text=True,
                          capture_output=True, timeout=120, env={**os.environ, **(env or {})})


class Holder:
    """A separate process holding the grove's lock for `seconds`."""

    def __init__(self, state: Path, seconds: float) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(state), str(seconds)],
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        self.id = self.proc.stdout.readline().strip()
        assert self.id, "the holder did not take the lock"

    def released(self) -> bool:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().strip() == "released"

    def end(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        assert self.proc.stdout is not None
        self.proc.stdout.close()


@pytest.fixture
def holders() -> list[Holder]:
    started: list[Holder] = []
    yield started  # type: ignore[misc]
    for h in started:
        h.end()


def write_lock(state: Path, **fields: object) -> None:
    lock = {"id": "abc123", "operation": "apply", "who": "ci", "pid": 0,
            "host": socket.gethostname(), "created": "2026-01-01T00:00:00Z", **fields}
    (state / "state").mkdir(parents=True, exist_ok=True)
    (state / "state" / "demo.lock").write_text(json.dumps(lock))


def take(state: Path, grove: str, operation: str, wait: float = 0.0) -> None:
    with inventory.locked(state, grove, operation, wait=wait):
        pass


# -- the lock --------------------------------------------------------------------------

def test_live_holder_is_not_force_unlocked_and_a_dead_one_is(repo: Path,
                                                            holders: list[Holder]) -> None:
    grove(repo)
    h = Holder(repo / ".engine", 60)
    holders.append(h)
    pid = h.proc.pid
    info = inventory.read_lock(repo / ".engine", "demo")
    assert info is not None and info.started == inventory.start_time(pid) != ""
    p = cli(repo, "force-unlock", h.id, "-g", "demo")
    assert p.returncode == 1
    assert p.stderr.splitlines()[0] == (
        f"error: grove demo: lock ID {h.id} is held by a live process (watch, pid {pid} on "
        f"{socket.gethostname()}); stop it first (kill -TERM {pid}), or it releases the "
        "lock itself")
    assert inventory.held(repo / ".engine", "demo", h.id)
    # the next operation is told to wait for or stop the holder, not to force-unlock
    p = cli(repo, "apply", "--auto-approve", "--lock-timeout", "0")
    assert p.returncode == 1 and "grove demo is locked: watch by" in p.stderr
    assert f"kill -TERM {pid}" in p.stderr and "force-unlock" not in p.stderr
    # killed outright, it cannot release: then force-unlock removes the lock
    h.proc.send_signal(signal.SIGKILL)
    h.proc.wait()
    p = cli(repo, "force-unlock", h.id, "-g", "demo")
    assert p.returncode == 0, p.stderr
    assert "grove demo: removed lock watch by" in p.stdout
    assert inventory.read_lock(repo / ".engine", "demo") is None
    assert not inventory.held(repo / ".engine", "demo", h.id)


def test_holder_on_another_host_is_force_unlocked_by_id(repo: Path) -> None:
    grove(repo)
    write_lock(repo / ".engine", pid=os.getpid(), host="ci-runner-7")
    p = cli(repo, "plan")  # plan takes no lock
    assert p.returncode == 0, p.stderr
    with pytest.raises(LockedError) as e:
        take(repo / ".engine", "demo", "apply")
    assert "engine force-unlock abc123 -g demo" in e.value.detail
    assert cli(repo, "force-unlock", "nope", "-g", "demo").returncode == 1
    assert cli(repo, "force-unlock", "abc123", "-g", "demo").returncode == 0
    with inventory.locked(repo / ".engine", "demo", "apply") as info:
        assert inventory.held(repo / ".engine", "demo", info.id)
    assert not inventory.held(repo / ".engine", "demo", info.id)


def test_a_reused_pid_does_not_keep_the_lock(tmp_path: Path) -> None:
    other = subprocess.Popen(["sleep", "60"])
    try:
        real = inventory.start_time(other.pid)
        assert real
        # the pid lives, but it started at another time: a later process, the holder is gone
        write_lock(tmp_path, pid=other.pid, started=str(int(real) + 1))
        with inventory.locked(tmp_path, "demo", "apply") as info:
            assert inventory.read_lock(tmp_path, "demo") == info
            assert info.pid == os.getpid() and info.started == inventory.start_time(os.getpid())
        # the same pid and start time: that process holds it
        write_lock(tmp_path, pid=other.pid, started=real)
        with pytest.raises(LockedError, match="grove demo is locked: apply by ci"):
            take(tmp_path, "demo", "apply")
        # a lock file from before start times were recorded still loads and still holds
        write_lock(tmp_path, pid=other.pid)
        old = inventory.read_lock(tmp_path, "demo")
        assert old is not None and old.started == "" and old.pid == other.pid
        with pytest.raises(LockedError):
            take(tmp_path, "demo", "apply")
    finally:
        other.kill()
        other.wait()
    with inventory.locked(tmp_path, "demo", "apply"):  # its pid is gone now
        pass


def test_waiting_for_the_lock(tmp_path: Path, holders: list[Holder]) -> None:
    short = Holder(tmp_path, 0.5)
    holders.append(short)
    t0 = time.monotonic()
    with inventory.locked(tmp_path, "demo", "apply", wait=2) as info:
        waited = time.monotonic() - t0
        assert inventory.held(tmp_path, "demo", info.id)
    assert 0.2 < waited < 2
    assert short.released()
    long = Holder(tmp_path, 30)
    holders.append(long)
    t0 = time.monotonic()
    with pytest.raises(LockedError, match="grove demo is locked: watch by"):
        take(tmp_path, "demo", "apply", wait=1)
    assert 1 <= time.monotonic() - t0 < 5
    assert inventory.held(tmp_path, "demo", long.id)
    with pytest.raises(LockedError):  # no wait: at once
        take(tmp_path, "demo", "apply")


# -- status ----------------------------------------------------------------------------

def status_json(engine) -> dict:  # type: ignore[no-untyped-def]
    res = engine("status", "--json")
    assert res.code == 0, res
    doc = json.loads(res.out)
    check("status.json", doc)
    return doc["groves"][0]  # type: ignore[no-any-return]


def test_never_applied_grove_says_so(repo: Path, engine) -> None:
    grove(repo)
    res = engine("status")
    assert res.code == 0, res
    assert res.out.splitlines()[0] == "grove demo: never applied (run engine apply -g demo)"
    entry = status_json(engine)
    assert entry["applied"] is False and entry["revision"] == ""
    assert [(a["name"], a["phase"]) for a in entry["agents"]] == [("a", "Pending")]


def record(**kw: object) -> Record:
    return Record("hash", "{}", "local", branch="engine/demo/a", **kw)  # type: ignore[arg-type]


def test_failed_create_and_stopped_agents(repo: Path, engine) -> None:
    grove(repo, ONE + "    - name: b\n      task: 'true'\n")
    inv = Inventory("demo")
    inv.agents["a"] = record(error="harness claude is not installed")
    inv.agents["b"] = record(stopped=True)
    inventory.save(repo / ".engine", inv)
    entry = status_json(engine)
    assert entry["applied"] is True
    rows = {a["name"]: a for a in entry["agents"]}
    assert (rows["a"]["phase"], rows["a"]["reason"]) == (
        "Failed", "harness claude is not installed")
    assert rows["b"]["phase"] == "Stopped"
    res = engine("status")
    line = next(ln for ln in res.out.splitlines() if ln.strip().startswith("a "))
    assert "Failed" in line and line.endswith("(harness claude is not installed)")


def test_revision_and_uncommitted_manifests(repo: Path, engine) -> None:
    grove(repo)
    head = git(repo, "rev-parse", "HEAD")
    inv = Inventory("demo", revision=head)
    inventory.save(repo / ".engine", inv)
    entry = status_json(engine)
    assert (entry["revision"], entry["manifestsModified"]) == (head, False)
    assert engine("status").out.splitlines()[0] == f"grove demo: synced to {head[:12]}"
    grove(repo, ONE.replace("echo A", "echo B"), commit=False)  # edited, not committed
    entry = status_json(engine)
    assert (entry["revision"], entry["manifestsModified"]) == (head, True)
    assert engine("status").out.splitlines()[0] == (
        f"grove demo: synced to {head[:12]} (manifests modified, not committed)")
    git(repo, "checkout", "-q", "--", "groves")
    (repo / "groves/demo/extra.yaml").write_text("# new, untracked\n")
    assert status_json(engine)["manifestsModified"] is True
    (repo / "groves/demo/extra.yaml").unlink()
    inventory.save(repo / ".engine", Inventory("demo", inv.lineage, inv.serial))
    assert engine("status").out.splitlines()[0] == \
        "grove demo: applied from the working tree"


# -- a real agent: merged work, and its workspace ------------------------------------

def test_merged_agent_is_not_ahead_and_is_deleted_without_archive(repo: Path, engine
                                                                  ) -> None:
    grove(repo)
    res = engine("apply", "--auto-approve", "--wait", "--timeout", "60")
    assert res.code == 0, res
    row = status_json(engine)["agents"][0]
    assert (row["phase"], row["ahead"]) == ("Succeeded", 1)
    wt = repo / ".engine/worktrees/demo/a"

    # inside the agent's workspace the host engine refuses, naming the agent
    p = cli(wt, "plan")
    assert p.returncode == 1 and len(p.stderr.splitlines()) == 1
    assert p.stderr.startswith("error: this is agent a's workspace in grove demo")
    assert "run engine from the repository root" in p.stderr
    p = cli(wt / "groves", "status")  # deeper inside, too
    assert p.returncode == 1 and "agent a's workspace" in p.stderr
    assert not (wt / ".engine").exists()
    assert cli(wt, "validate", "--no-secrets").returncode == 0  # read-only check allowed
    p = cli(repo, "plan", env={"ENGINE_AGENT": "a", "ENGINE_GROVE": "demo"})
    assert p.returncode == 1
    assert p.stderr.startswith("error: this runs as agent a in grove demo (ENGINE_AGENT")
    # the agent-side client still works there (it answers through the inbox)
    client = repo / ".engine/run/demo/a/bin/engine"
    p = subprocess.run([str(client), "status"], cwd=wt, capture_output=True, text=True,
                       timeout=30, env={**os.environ, "ENGINE_AGENT": "a"})
    assert "ENGINE_INBOX is not set" in p.stderr  # its own error, not the host engine's

    git(repo, "merge", "-q", "--no-ff", "--no-edit", "engine/demo/a")
    row = status_json(engine)["agents"][0]
    assert (row["phase"], row["ahead"], row["dirty"]) == ("Succeeded", 0, 0)
    grove(repo, "    - name: keep\n      task: 'true'\n")
    res = engine("plan")
    assert "- a  (delete: no longer in manifest)" in res.out and "archived" not in res.out
    res = engine("apply", "--auto-approve")
    assert res.code == 0, res
    assert not wt.exists()
    assert git(repo, "for-each-ref", "refs/engine/archive/") == ""
    assert git(repo, "show", "main:A") == "A"  # the work is on the base
