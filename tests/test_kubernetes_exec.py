"""Kubernetes runtime, the exec paths: look, message, attach and inbox sync through the API
server stand-in's pods/exec websocket (tests/k8s_apiserver.py, the suite's one stand-in).

Each agent's Pod runs on this machine in the stand-in's `PodSandbox` (its own mount and PID
namespaces, the pod's directory at /run/engine): the container's own command (the Pod's
wrapper, from the ConfigMap the engine applied) runs there with a real tmux, and every exec
runs the engine's argv unchanged in it. The pod is the agent's, so what it sends back is
hostile here: archive names, sizes, endless output, programs in its image."""

from __future__ import annotations

import base64
import io
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
import websocket

from engine.errors import EngineError, TemporaryError
from engine.runtimes import k8s_inbox as inbox
from engine.runtimes import kubernetes as k8s_rt
from tests.conftest import git
from tests.k8s_apiserver import FakeApiServer, PodSandbox
from tests.test_kubernetes import SECRET, Kube, job_pod, wait_for

NS = "agents"
SPAWN = "      spawn: {allowProfiles: [pod]}"


def _sandboxes_work() -> bool:
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("nsenter"):
        return False
    try:
        probe = PodSandbox(Path(os.environ.get("TMPDIR", "/tmp")) / f"probe-{os.getpid()}", {})
    except RuntimeError:
        return False
    probe.stop()
    shutil.rmtree(probe.root, ignore_errors=True)
    return True


pytestmark = pytest.mark.skipif(not _sandboxes_work(), reason="the stand-in's pods need root "
                                "(unshare --mount --pid, nsenter)")


@pytest.fixture(autouse=True)
def _creds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_GIT_TOKEN", SECRET)


@pytest.fixture
def kube(repo: Path, api: FakeApiServer) -> Kube:
    return Kube(repo, api)


def applied(kube: Kube, engine: Any, task: str = "sleep 60", extra: str = "") -> str:
    """`engine apply` of grove kube (agent worker running `task`); the Pod's name."""
    kube.grove(task=task, extra=extra)
    git(kube.repo, "add", "-A")
    git(kube.repo, "commit", "-qm", "grove")
    res = engine("apply", "--auto-approve", "-g", "kube")
    assert res.code == 0, res
    pod = job_pod(kube, NS)
    kube.api.set_pod(NS, pod, "Running")
    return pod


def start(kube: Kube, pod: str) -> Path:
    """Run the Pod's container (its own command and arguments) in its sandbox, with its
    /workspace and home at host directories; returns the pod's /run/engine."""
    spec = kube.api.get("pods", NS, pod)
    assert spec
    c = spec["spec"]["containers"][0]
    box = kube.api.sandbox(NS, pod)
    for d in ("workspace", "home"):
        (box.root / d).mkdir(exist_ok=True)
    kube.api.run_container(NS, pod, [*c["command"], *c.get("args", [])],
                           {"ENGINE_WORKSPACE": str(box.root / "workspace"),
                            "HOME": str(box.root / "home")})
    return box.engine


def screen(kube: Kube, pod_dir: Path) -> str:
    """The session's screen, read on the host side of the pod's directory."""
    return subprocess.run(inbox.tmux("capture-pane", "-p", "-t", "agent",
                                     socket=str(pod_dir / "tmux.sock")),
                          capture_output=True, text=True).stdout


# -- look, message, attach: the CLI through pods/exec -----------------------------------

def test_look_and_message_run_in_the_pod_over_v5(kube: Kube, engine: Any) -> None:
    task = 'echo "ready $ENGINE_INBOX"; read -r line; echo "got:$line"; sleep 60'
    pod = applied(kube, engine, task)
    pod_dir = start(kube, pod)
    wait_for(lambda: "ready /run/engine/inbox" in screen(kube, pod_dir), 20)
    res = engine("look", "-g", "kube", "worker")
    assert res.code == 0, res
    assert "ready /run/engine/inbox" in res.out
    text = "hello 'quoted' $(touch /tmp/pwned) \x1b[31m"
    res = engine("message", "-g", "kube", "worker", text)
    assert res.code == 0 and "delivered to kube/worker" in res.out, res
    wait_for(lambda: "got:hello 'quoted' $(touch /tmp/pwned)" in screen(kube, pod_dir), 20)
    assert not Path("/tmp/pwned").exists()
    res = engine("look", "-g", "kube", "worker")
    assert "got:hello 'quoted' $(touch /tmp/pwned)" in res.out and "\x1b" not in res.out
    execs = [e for e in kube.api.execs if e[1] == pod]
    look = inbox.tmux("capture-pane", "-p", "-t", "agent")
    assert [e[2] for e in execs] == [look, inbox.paste(text), look]  # unchanged argv
    assert {e[3] for e in execs} == {"v5.channel.k8s.io"}
    assert [e[5] for e in execs] == [0, 0, 0]
    assert execs[0][4] == {"stdin": False, "stdout": True, "stderr": True, "tty": False}


def test_look_against_a_server_that_speaks_only_v4(kube: Kube, engine: Any) -> None:
    kube.api.exec_protocols = ("v4.channel.k8s.io",)
    pod_dir = start(kube, applied(kube, engine, "echo 'ready v4'; sleep 60"))
    wait_for(lambda: "ready v4" in screen(kube, pod_dir), 20)
    res = engine("look", "-g", "kube", "worker")
    assert res.code == 0 and "ready v4" in res.out, res
    assert kube.api.execs[-1][3] == "v4.channel.k8s.io"
    # a non-zero exit in v4's Status (reason NonZeroExitCode, cause ExitCode)
    subprocess.run(inbox.tmux("kill-server", socket=str(pod_dir / "tmux.sock")))
    res = engine("look", "-g", "kube", "worker")
    assert res.code == 1, res
    line, = res.err.strip().splitlines()
    assert "agent kube/worker: tmux in pod agents/" in line and " exited 1: " in line
    assert "no server running on /run/engine/tmux.sock" in line


def test_attach_with_kubectl_exec_it(kube: Kube, engine: Any, tmp_path: Path) -> None:
    """`engine attach` in a real terminal (a pane of a separate tmux server on the host):
    kubectl exec -it over the websocket (tty, stdin, resize), the agent's screen shows up,
    C-b d detaches, kubectl exits 0, and so does attach."""
    if not shutil.which("kubectl"):
        pytest.skip("kubectl is not installed")
    kube.api.anonymous = True  # kubectl sends no token over http, as the stand-in speaks
    pod_dir = start(kube, applied(kube, engine, "echo 'ready to attach'; sleep 120"))
    wait_for(lambda: "ready to attach" in screen(kube, pod_dir), 20)
    term, rc = str(tmp_path / "term.sock"), tmp_path / "rc"
    cmd = (f"{shlex.quote(sys.executable)} -m engine attach -g kube worker; "
           f"echo $? > {rc}; sleep 30")
    subprocess.run(["tmux", "-S", term, "new-session", "-d", "-x", "100", "-y", "30",
                    "-c", str(kube.repo), cmd], check=True)
    try:
        def terminal() -> str:
            return subprocess.run(["tmux", "-S", term, "capture-pane", "-p"],
                                  capture_output=True, text=True).stdout
        try:
            wait_for(lambda: "ready to attach" in terminal(), 60)
        except AssertionError:
            raise AssertionError(f"{terminal()} {rc.exists() and rc.read_text()} "
                                 f"{kube.api.requests[-5:]} {kube.api.execs[-1:]}") from None
        attached = [e for e in kube.api.execs if e[4]["tty"]]
        assert attached and attached[-1][2] == inbox.tmux("attach", "-t", "agent")
        assert attached[-1][3] == "v5.channel.k8s.io"
        assert attached[-1][4] == {"stdin": True, "stdout": True, "stderr": False, "tty": True}
        # the terminal's size reached the pod (channel 4): the agent's window follows it
        size = ["display-message", "-p", "-t", "agent", "#{window_width}x#{window_height}"]
        wait_for(lambda: subprocess.run(inbox.tmux(*size, socket=str(pod_dir / "tmux.sock")),
                                        capture_output=True, text=True).stdout.strip()
                 == "100x29", 20)
        subprocess.run(["tmux", "-S", term, "send-keys", "C-b", "d"], check=True)
        wait_for(rc.exists, 30)
        assert rc.read_text().strip() == "0", terminal()
        assert attached[-1][5] == 0  # the tmux client in the pod exited normally
    finally:
        subprocess.run(["tmux", "-S", term, "kill-server"], capture_output=True)
    assert "ready to attach" in screen(kube, pod_dir)  # the agent runs on


def test_a_pod_name_that_is_not_the_agents_is_never_used(kube: Kube, engine: Any,
                                                         tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    """What a hostile server lists with the agent's labels, newer than its Pod: a kubectl
    flag as a name, a name not the agent's. Neither is exec'd into nor given to kubectl."""
    real = applied(kube, engine)
    time.sleep(1.1)  # creationTimestamp has seconds
    labels = kube.api.get("pods", NS, real)["metadata"]["labels"]  # type: ignore[index]
    for name in ("--kubeconfig=/tmp/evil.yaml", "other-pod"):
        with kube.api.lock:
            kube.api.apply(("pods", NS, name), {
                "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": labels},
                "spec": {"containers": [{"name": "agent", "image": "x"}]}}, "someone", True)
        kube.api.set_pod(NS, name, "Running")
    res = engine("message", "-g", "kube", "worker", "hi")
    assert {e[1] for e in kube.api.execs} == {real}, res
    bin_dir = tmp_path / "bin"  # a kubectl that only records its arguments
    bin_dir.mkdir()
    (bin_dir / "kubectl").write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {tmp_path / "argv"}\n')
    (bin_dir / "kubectl").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    assert kube.rt.attach("kube", "worker") == 0
    argv = (tmp_path / "argv").read_text().splitlines()
    assert argv[argv.index("-it") + 1] == f"pod/{real}"
    assert not [a for a in argv if "evil" in a or "other-pod" in a]


# -- error paths: one line each, never a hang --------------------------------------------

def test_rbac_forbidding_pods_exec_is_one_line(kube: Kube, engine: Any) -> None:
    applied(kube, engine)
    kube.api.forbidden.add(("create", "pods/exec"))
    for args in (("look", "-g", "kube", "worker"), ("message", "-g", "kube", "worker", "hi")):
        res = engine(*args)
        assert res.code == 1, res
        line, = res.err.strip().splitlines()
        assert ("kubernetes: RBAC forbids create on pods/exec in namespace agents (context "
                "fake): grant verb 'create' on resource 'pods/exec'") in line
    assert kube.api.execs == []


def test_exec_refusals_and_failures_are_one_line(kube: Kube, engine: Any) -> None:
    pod = applied(kube, engine)
    kube.api.set_pod(NS, pod, "Pending")
    res = engine("look", "-g", "kube", "worker")
    assert res.code == 1, res
    line, = res.err.strip().splitlines()
    assert f'exec in pod agents/{pod} failed: container "agent" in pod "{pod}" is waiting ' \
           "to start: ContainerCreating" in line
    kube.api.set_pod(NS, pod, "Running")
    # an image without tmux: the command does not run at all (an InternalError Status)
    kube.api.sandbox(NS, pod).env["PATH"] = str(kube.api.sandbox(NS, pod).image_bin)
    res = engine("look", "-g", "kube", "worker")
    assert res.code == 1, res
    line, = res.err.strip().splitlines()
    assert f"agent kube/worker: tmux in pod agents/{pod} did not run: Internal error " \
           'occurred: error executing command in container: failed to exec in container: ' \
           'exec: "tmux": executable file not found in $PATH' in line
    # stderr that is many lines with escapes: the first line, terminal-safe
    with pytest.raises(EngineError) as err:
        kube.rt._exec("kube", "worker", ["/bin/sh", "-c",
                                         "printf '\\033]0;title\\007bad\\nsecond\\n' >&2; "
                                         "exit 7"])
    assert err.value.summary.endswith(f"/bin/sh in pod agents/{pod} exited 7: bad")


def test_an_exec_that_never_answers_times_out_and_ends_in_the_pod(kube: Kube, engine: Any
                                                                   ) -> None:
    applied(kube, engine)
    t0 = time.monotonic()
    with pytest.raises(TemporaryError, match="no answer within 1s"):
        kube.rt._exec("kube", "worker", ["sleep", "100"], timeout=1)
    assert time.monotonic() - t0 < 15
    # the stand-in ends the process once the client has gone (137: killed)
    wait_for(lambda: len(kube.api.execs[-1]) == 6, 20)
    assert kube.api.execs[-1][5] == 137


def test_a_server_stuck_in_the_exec_handshake_is_one_line_not_a_hang(
        kube: Kube, engine: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    applied(kube, engine)
    monkeypatch.setattr(k8s_rt, "EXEC_CONNECT_TIMEOUT", 1.0)
    kube.api.exec_stall = 30.0
    t0 = time.monotonic()
    with pytest.raises(EngineError) as err:
        kube.rt._exec("kube", "worker", ["true"], timeout=5)
    assert time.monotonic() - t0 < 10
    assert "exec in pod agents/" in err.value.summary and "\n" not in err.value.summary


def test_a_pod_that_prints_without_end_is_refused(kube: Kube, engine: Any) -> None:
    pod = applied(kube, engine)
    box = kube.api.sandbox(NS, pod)
    hostile = box.image_bin / "tar"  # the image is the agent's: its tar never stops
    hostile.write_text("#!/bin/sh\nexec cat /dev/zero\n")
    hostile.chmod(0o755)
    (box.engine / "inbox").mkdir()
    t0 = time.monotonic()
    with pytest.raises(EngineError, match=f"printed more than {k8s_rt.MAX_EXEC_OUTPUT} "
                                          "bytes; refused"):
        kube.rt.pull_inbox("kube", "worker", kube.repo.parent / "host-inbox")
    assert time.monotonic() - t0 < 60
    wait_for(lambda: len(kube.api.execs[-1]) == 6, 20)  # and it was stopped in the pod
    assert not (kube.repo.parent / "host-inbox").exists()


def bounded_exec(kube: Kube, timeout: float, within: float) -> BaseException:
    """What `_exec` of `true` raised, which it must within `within` seconds."""
    out: list[BaseException] = []

    def run() -> None:
        try:
            kube.rt._exec("kube", "worker", ["true"], timeout=timeout)
        except Exception as e:  # judged by the caller
            out.append(e)
    t = threading.Thread(target=run, daemon=True)
    t0 = time.monotonic()
    t.start()
    t.join(within)
    assert not t.is_alive(), f"_exec(timeout={timeout}) still reading after {within}s"
    assert time.monotonic() - t0 < within and out
    return out[0]


def test_an_exec_message_of_endless_fragments_is_refused(
        kube: Kube, engine: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """websocket-client's own recv_data_frame joins a message's fragments without limit."""
    applied(kube, engine)
    monkeypatch.setattr(k8s_rt, "MAX_EXEC_OUTPUT", 1 << 20)
    kube.api.exec_hostile = "fragments"
    err = bounded_exec(kube, 60, 30)
    assert isinstance(err, EngineError) and not isinstance(err, TemporaryError), err
    assert err.summary.endswith(f"printed more than {1 << 20} bytes; refused")


def test_an_exec_frame_announcing_a_gigabyte_is_refused_unread(kube: Kube, engine: Any
                                                               ) -> None:
    applied(kube, engine)
    kube.api.exec_hostile = "huge"
    err = bounded_exec(kube, 60, 20)  # the pod sends a byte every 0.2 s: never the payload
    assert isinstance(err, EngineError) and not isinstance(err, TemporaryError), err
    assert err.summary.endswith(f"printed more than {k8s_rt.MAX_EXEC_OUTPUT} bytes; refused")


def test_an_exec_frame_trickled_a_byte_at_a_time_ends_at_the_deadline(kube: Kube,
                                                                      engine: Any) -> None:
    applied(kube, engine)
    kube.api.exec_hostile = "trickle"  # a 4 KiB frame at 5 bytes a second: 800 s
    err = bounded_exec(kube, 2, 20)
    assert isinstance(err, TemporaryError), err
    assert err.summary.endswith("no answer within 2s")


@pytest.mark.parametrize("status", [
    '{"details": "x"}', '{"reason": "NonZeroExitCode", "details": {"causes": ["x"]}}',
    '{"details": {"causes": {"reason": "ExitCode"}}}', '["Success"]', "not json",
    '{"reason": "NonZeroExitCode", "details": {"causes": [{"reason": "ExitCode", '
    '"message": 1e999}]}}'])
def test_an_odd_exit_status_is_one_line_not_a_traceback(kube: Kube, engine: Any,
                                                        status: str) -> None:
    pod = applied(kube, engine)
    kube.api.exec_hostile = f"status:{status}"
    with pytest.raises(EngineError) as err:
        kube.rt._exec("kube", "worker", ["true"])
    assert f"agent kube/worker: true in pod agents/{pod} did not run: " in err.value.summary
    assert "\n" not in err.value.summary


# -- the inbox over exec: round trip, limits, a hostile pod --------------------------------

def test_spawn_in_the_pod_is_synced_judged_and_answered_by_apply(kube: Kube, engine: Any
                                                                   ) -> None:
    """The agent runs `engine spawn --wait` in its Pod; the next `engine apply` pulls the
    request over exec, the gate accepts it, and the same pass sends the answer into the
    Pod, where the waiting client reads it."""
    task = ('engine spawn helper --task "help me" --wait > spawn.out 2>&1; '
            'echo "spawn exit $?"; cat spawn.out; sleep 60')
    pod = applied(kube, engine, task, extra=SPAWN)
    pod_dir = start(kube, pod)
    wait_for(lambda: list((pod_dir / "inbox").glob("req-*.json")), 20)
    res = engine("apply", "--auto-approve", "-g", "kube")
    assert res.code == 0, res
    spawned = (kube.repo / "groves" / "kube" / "spawned.yaml").read_text()
    assert "name: helper" in spawned and "spawnedBy: worker" in spawned
    answers = list((pod_dir / "inbox").glob("res-*.json"))  # answered in the same pass
    assert len(answers) == 1 and json.loads(answers[0].read_text())["status"] == "accepted"
    wait_for(lambda: "spawn exit 0" in screen(kube, pod_dir), 20)
    host_inbox = kube.repo / ".engine" / "inbox" / "kube" / "worker"
    assert not host_inbox.exists() or len(list(host_inbox.glob("req-*.json"))) <= 1
    calls = len(kube.api.execs)
    res = engine("apply", "--auto-approve", "-g", "kube")  # nothing new: one pull, no push
    assert res.code == 0, res
    assert [e[2][:2] for e in kube.api.execs[calls:] if e[1] == pod] == [["sh", "-c"]]


def archive(members: list[tuple[tarfile.TarInfo, bytes]]) -> str:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for info, data in members:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return base64.b64encode(buf.getvalue()).decode()


def test_inbox_round_trip_takes_only_plain_files_within_limits(
        kube: Kube, engine: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inbox, "MAX_MEMBERS", 2048)  # under MAX_ARCHIVE's own bound
    pod = applied(kube, engine)
    pod_inbox = kube.api.pod_dir(NS, pod) / "inbox"
    pod_inbox.mkdir()
    (pod_inbox / "req-1.json").write_text('{"id": "1"}')
    (pod_inbox / ".req-2.tmp").write_text("{half")
    (pod_inbox / "req-3.json").symlink_to("/etc/passwd")
    (pod_inbox / "sub").mkdir()
    (pod_inbox / "sub" / "req-4.json").write_text("{}")
    os.mkfifo(pod_inbox / "req-5.json")
    (pod_inbox / "req-6.json").write_bytes(b"x" * (inbox.MAX_FILE + 5000))
    (pod_inbox / "req-\N{BLACK STAR}.json").write_text("{}")
    host = tmp_path / "host-inbox"
    got = kube.rt.sync_inbox("kube", "worker", host)
    assert [p.name for p in got] == ["req-1.json", "req-6.json"]
    assert (host / "req-6.json").stat().st_size == inbox.MAX_FILE + 1  # the reader refuses it
    assert sorted(p.name for p in host.iterdir() if p.name != ".pulled") == [
        "req-1.json", "req-6.json"]
    # answers go back, in as many execs as their size needs (argv in the URL, > 64 KiB):
    # two of 40 KB do not fit one argument
    answers = {f"res-{i}.json": json.dumps({"pad": "y" * 40000, "i": i}).encode()
               for i in range(5)}
    for name, data in answers.items():
        (host / name).write_bytes(data)
    calls = len(kube.api.execs)
    assert kube.rt.sync_inbox("kube", "worker", host) == []
    pushes = [e for e in kube.api.execs[calls:] if "base64 -d" in e[2][2]]
    assert len(pushes) == len(answers) and all(e[5] == 0 for e in pushes)
    for name, data in answers.items():
        assert (pod_inbox / name).read_bytes() == data
    # a second pass: nothing new either way, one pull
    calls = len(kube.api.execs)
    assert kube.rt.sync_inbox("kube", "worker", host) == []
    assert len(kube.api.execs) == calls + 1
    # too many files: the whole pull is refused, nothing written
    for i in range(inbox.MAX_MEMBERS + 10):
        (pod_inbox / f"req-m{i:05}.json").write_text("{}")
    with pytest.raises(EngineError, match=r"archive of \d+ members, more than "
                                          f"{inbox.MAX_MEMBERS}; refused"):
        kube.rt.sync_inbox("kube", "worker", host)
    assert sorted(p.name for p in host.iterdir() if p.name.startswith("req-")) == [
        "req-1.json", "req-6.json"]


@pytest.mark.parametrize(("members", "error"), [
    ([(tarfile.TarInfo("../escape"), b"x")], "inbox: unsafe file name '../escape'"),
    ([(tarfile.TarInfo("/tmp/abs-escape"), b"x")], "inbox: unsafe file name '/tmp/abs"),
    ([(tarfile.TarInfo("./req-1.json"), b"{}"), (tarfile.TarInfo("a/../../up"), b"x")],
     "inbox: unsafe file name 'a/../../up'"),
])
def test_a_hostile_tar_in_the_image_cannot_write_outside_the_inbox(
        kube: Kube, engine: Any, tmp_path: Path, members: list[tuple[tarfile.TarInfo, bytes]],
        error: str) -> None:
    pod = applied(kube, engine)
    box = kube.api.sandbox(NS, pod)
    (box.engine / "inbox").mkdir()
    # what `tar -cf - .` prints in this image: a crafted archive (base64 is the real one)
    (box.root / "crafted.tar").write_bytes(base64.b64decode(archive(members)))
    (box.image_bin / "tar").write_text(f"#!/bin/sh\ncat {box.root / 'crafted.tar'}\n")
    (box.image_bin / "tar").chmod(0o755)
    host = tmp_path / "deep" / "host-inbox"
    with pytest.raises(EngineError, match=error.replace("'", ".")):
        kube.rt.sync_inbox("kube", "worker", host)  # what the controller runs
    assert not (tmp_path / "deep" / "escape").exists() and not (tmp_path / "up").exists()
    assert not Path("/tmp/abs-escape").exists()
    assert not host.exists() or not any(host.iterdir())  # not even the good member


def test_a_hostile_archive_of_links_devices_and_oversize_is_cut_down(
        kube: Kube, engine: Any, tmp_path: Path) -> None:
    pod = applied(kube, engine)
    box = kube.api.sandbox(NS, pod)
    (box.engine / "inbox").mkdir()
    link, hard, dev = (tarfile.TarInfo(n) for n in ("req-l.json", "req-h.json", "req-d.json"))
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/shadow"
    hard.type, hard.linkname = tarfile.LNKTYPE, "/etc/shadow"
    dev.type = tarfile.CHRTYPE
    big = tarfile.TarInfo("req-big.json")
    members = [(link, b""), (hard, b""), (dev, b""), (big, b"z" * (inbox.MAX_FILE * 3)),
               (tarfile.TarInfo("req-ok.json"), b"{}")]
    (box.root / "crafted.tar").write_bytes(base64.b64decode(archive(members)))
    (box.image_bin / "tar").write_text(f"#!/bin/sh\ncat {box.root / 'crafted.tar'}\n")
    (box.image_bin / "tar").chmod(0o755)
    got = kube.rt.pull_inbox("kube", "worker", tmp_path / "in")
    assert [p.name for p in got] == ["req-big.json", "req-ok.json"]
    assert (tmp_path / "in" / "req-big.json").stat().st_size == inbox.MAX_FILE + 1
    # an archive over MAX_ARCHIVE (but under the exec cap) is refused whole
    (box.image_bin / "tar").write_text(
        f"#!/bin/sh\nhead -c {inbox.MAX_ARCHIVE} /dev/zero\n")
    with pytest.raises(EngineError, match="archive larger than"):
        kube.rt.pull_inbox("kube", "worker", tmp_path / "in2")


# -- the stand-in's websocket itself, as a client sees it ---------------------------------

def raw_exec(api: FakeApiServer, pod: str, argv: list[str], protocols: str,
             **opts: bool) -> websocket.WebSocket:
    query = urlencode([*(("command", c) for c in argv),
                       *((k, str(v).lower()) for k, v in opts.items())])
    ws = websocket.WebSocket()
    ws.connect(f"ws{api.url[4:]}/api/v1/namespaces/{NS}/pods/{pod}/exec?{query}",
               header=[f"Authorization: Bearer {api.token}"],
               subprotocols=protocols.split(", "), timeout=20)
    return ws


def frames(ws: websocket.WebSocket) -> dict[int, bytes]:
    """Every channel's data until the server closes."""
    out: dict[int, bytes] = {}
    while True:
        op, data = ws.recv_data(control_frame=True)
        if op == websocket.ABNF.OPCODE_CLOSE:
            return out
        if op == websocket.ABNF.OPCODE_PONG:
            out[-1] = data
        elif data:
            out[data[0]] = out.get(data[0], b"") + data[1:]


def test_stand_in_websocket_fragments_ping_close_and_v4_status(kube: Kube, engine: Any
                                                               ) -> None:
    pod = applied(kube, engine)
    ws = raw_exec(kube.api, pod, ["sh", "-c", "cat; exit 3"], "v4.channel.k8s.io",
                  stdin=True, stdout=True, stderr=True)
    assert ws.getsubprotocol() == "v4.channel.k8s.io"
    ws.ping(b"are you there")
    # stdin as a fragmented text message, then a binary one
    ws.send_frame(websocket.ABNF.create_frame("\x00hel", websocket.ABNF.OPCODE_TEXT, fin=0))
    ws.send_frame(websocket.ABNF.create_frame("lo ", websocket.ABNF.OPCODE_CONT, fin=1))
    ws.send_binary(b"\x00world")
    time.sleep(0.5)
    ws.send_close()  # the client ends the exec: cat is killed
    got = frames(ws)
    assert got[-1] == b"are you there" and got[1] == b"hello world"
    ws.shutdown()  # close() skips it once the server has closed
    # v5: closing stdin (channel 255) ends cat; the exit code comes as a v4-style Status
    ws = raw_exec(kube.api, pod, ["sh", "-c", "cat; echo done >&2; exit 3"],
                  "v5.channel.k8s.io, v4.channel.k8s.io", stdin=True, stdout=True, stderr=True)
    assert ws.getsubprotocol() == "v5.channel.k8s.io"
    ws.send_binary(b"\x00abc")
    ws.send_binary(b"\xff\x00")
    got = frames(ws)
    ws.shutdown()  # close() skips it once the server has closed
    assert (got[1], got[2]) == (b"abc", b"done\n")
    status = json.loads(got[3])
    assert (status["status"], status["reason"], status["details"]["causes"]) == (
        "Failure", "NonZeroExitCode", [{"reason": "ExitCode", "message": "3"}])


def test_stand_in_refuses_bad_handshakes_and_unmasked_frames(kube: Kube, engine: Any) -> None:
    pod = applied(kube, engine)
    with pytest.raises(websocket.WebSocketBadStatusException) as err:
        raw_exec(kube.api, pod, ["true"], "v3.channel.k8s.io", stdout=True)
    assert err.value.status_code == 400 and b"not supported" in err.value.resp_body
    with pytest.raises(websocket.WebSocketBadStatusException) as err:
        raw_exec(kube.api, pod, ["true"], "v5.channel.k8s.io")  # no stream asked for
    assert err.value.status_code == 400
    ws = raw_exec(kube.api, pod, ["sleep", "30"], "v5.channel.k8s.io", stdin=True,
                  stdout=True)
    ws.sock.sendall(b"\x82\x02\x00x")  # unmasked: a protocol error (RFC 6455 5.1)
    op, data = ws.recv_data(control_frame=True)
    while op != websocket.ABNF.OPCODE_CLOSE:
        op, data = ws.recv_data(control_frame=True)
    assert int.from_bytes(data[:2], "big") == 1002
    ws.shutdown()  # close() skips it once the server has closed
    ws = raw_exec(kube.api, pod, ["sleep", "30"], "v5.channel.k8s.io", stdin=True,
                  stdout=True)
    ws.send_binary(b"\x00" + b"x" * (2 << 20))  # over the stand-in's message bound
    op, data = ws.recv_data(control_frame=True)
    while op != websocket.ABNF.OPCODE_CLOSE:
        op, data = ws.recv_data(control_frame=True)
    assert int.from_bytes(data[:2], "big") == 1009
    ws.shutdown()  # close() skips it once the server has closed
    with socket.create_connection(("127.0.0.1", int(kube.api.url.rsplit(":", 1)[1]))) as s:
        s.sendall(b"GET /" + b"a" * (2 << 20) + b" HTTP/1.1\r\n\r\n")  # bounded, answered
        assert s.recv(100).startswith(b"HTTP/1.1 414")
