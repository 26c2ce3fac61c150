"""The Docker runtime against a real Docker engine: sandbox, workspace, secrets, phases,
interaction, two engines, bad input. Launches are built directly (a real repository and
worktree per test) instead of going through plan/apply, which have their own tests.
The agent-side client mounted into containers is the real engine/client.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine import workspace
from engine.errors import EngineError, PermanentError, RuntimeUnavailable
from engine.runtimes import docker as docker_rt
from engine.runtimes import docker_fs as fs
from engine.runtimes import docker_spec as spec
from engine.runtimes import seccomp
from tests.conftest import git, searchable, write_grove
from tests.docker_fixtures import IMAGE, Agents, docker_cli

pytestmark = pytest.mark.docker

SECRET_A = "s3cr3t-value-for-a-8d1f"
SECRET_B = "s3cr3t-value-for-b-77c2"

GROVE = f"""\
apiVersion: engine/v1alpha1
kind: Grove
metadata: {{name: g}}
spec:
  defaults: {{profile: box, harness: shell}}
  harnesses:
    broken: {{command: ["no-such-harness", "{{{{ task }}}}"], taskArg: none}}
  profiles:
    box:
      runtime: docker
      image: {IMAGE}
      resources: {{cpus: 1, memory: 256Mi, pids: 128}}
      credentials: {{TOKEN: {{fromEnv: TEST_TOKEN}}}}
    reader: {{runtime: docker, image: {IMAGE}, access: read-only}}
    small: {{runtime: docker, image: {IMAGE}, resources: {{memory: 64Mi}}}}
    odd: {{runtime: docker, image: {IMAGE}, user: "2000:3000"}}
    typo: {{runtime: docker, image: {IMAGE}, env: {{X: "1"}}}}
  agents:
"""

PROBE = r"""
set -u
out=/workspace/probe.txt
{
  echo "uid=$(id -u)"
  echo "cap=$(awk '/^CapEff/ {print $2}' /proc/self/status)"
  echo "net=$(ls /sys/class/net | tr '\n' ' ')"
  touch /usr/x 2>/dev/null && echo "root=writable" || echo "root=readonly"
  touch /tmp/x && echo "tmp=ok"
  touch "$HOME/x" && echo "home=ok"
  echo "token=$TOKEN"
  echo "secret=$(stat -c '%a %u' /run/secrets/TOKEN)"
  echo "secrets=$(ls /run/secrets | tr '\n' ' ')"
  echo "file=$(cat "$HOME/.config/tool/token") $(stat -c '%a %u' "$HOME/.config/tool/token")"
  echo "fileenv=${FILECRED:-unset}"
  echo "sock=$(ls /var/run/docker.sock 2>&1 >/dev/null | wc -l)"
  echo "inbox=$ENGINE_INBOX"
  echo "other=$(cat /run/secrets/* | grep -c for-b)"
  echo "worktree-b=$(ls {other} 2>&1 | grep -c 'No such file')"
} > "$out"
engine message b hello-from-a
git add probe.txt && git commit -qm "a: probe"
"""


def agent_entry(name: str, task: str, **extra: str) -> str:
    lines = [f"    - name: {name}", f"      task: {json.dumps(task)}"]
    lines += [f"      {k}: {v}" for k, v in extra.items()]
    return "\n".join(lines) + "\n"


def parse(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def test_sandbox_isolation_secrets_and_commit(agents: Agents, repo: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_TOKEN", "digest-input")
    other = repo / ".engine" / "worktrees" / "g" / "b"
    g = agents.grove(GROVE + agent_entry("a", PROBE.replace("{other}", str(other)))
                     + agent_entry("b", "sleep 30"))
    a = dataclasses.replace(g.agent("a"), credential_files=(("FILECRED", ".config/tool/token"),))
    la = agents.launch(a, {"TOKEN": SECRET_A, "FILECRED": "file-secret-9f"})
    lb = agents.launch(g.agent("b"), {"TOKEN": SECRET_B})
    rt = agents.start(lb)
    agents.start(la)
    o = agents.wait(rt, "g", "a")
    assert (o.phase, o.exit_code, o.runtime) == ("Succeeded", 0, "docker"), o
    probe = parse((la.workdir / "probe.txt").read_text())
    assert probe["uid"] == "1000"
    assert probe["cap"] == "0000000000000000"
    assert probe["net"].split() == ["lo"]
    assert probe["root"] == "readonly"
    assert probe["tmp"] == probe["home"] == "ok"
    assert probe["token"] == SECRET_A
    assert probe["secret"] == "400 1000"
    assert probe["secrets"].split() == ["FILECRED", "TOKEN"]
    assert probe["file"] == "file-secret-9f 600 1000"  # a credential file in the home
    assert probe["fileenv"] == "unset"  # ... and not in the environment
    assert probe["sock"] == "1"
    assert probe["inbox"] == "/run/engine/inbox"
    assert probe["other"] == "0"
    assert probe["worktree-b"] == "1"
    # the commit made inside the container reaches the agent's branch through the exchange
    workspace.sync(repo, "g", "a")
    assert git(repo, "log", "-1", "--format=%s", "engine/g/a") == "a: probe"
    assert git(repo, "show", "engine/g/a:probe.txt").startswith("uid=1000")
    assert git(repo, "fsck", "--no-progress") == ""
    assert git(la.workdir, "status", "--porcelain") == ""
    # the real agent client wrote into the inbox the host reads
    reqs = [json.loads(p.read_text()) for p in la.inbox.glob("req-*.json")]
    assert [(r["kind"], r["from"]) for r in reqs] == [("MessageRequest", "a")]
    # secret values: nowhere in the container config, labels or the log
    name = spec.container_name(repo, "g", "a")
    inspect = docker_cli("inspect", name)
    assert SECRET_A not in inspect and SECRET_B not in inspect
    labels = json.loads(inspect)[0]["Config"]["Labels"]
    assert labels["engine.grove"] == "g" and labels["engine.agent"] == "a"
    assert set(labels) >= {"engine.spec-hash", "engine.version", "engine.repo"}
    assert SECRET_A not in la.log_file.read_text(errors="replace")
    hc = json.loads(inspect)[0]["HostConfig"]
    assert (hc["CapDrop"], hc["SecurityOpt"], hc["ReadonlyRootfs"], hc["Init"]) == (
        ["ALL"], ["no-new-privileges", seccomp.security_opt()], True, True)
    assert hc["Memory"] == hc["MemorySwap"] == 256 * 1024**2
    assert hc["PidsLimit"] == 128 and hc["NanoCpus"] == 10**9
    assert hc["NetworkMode"] == "none" and not hc["Privileged"]
    # observe is one list: b still runs, a succeeded
    seen = rt.observe("g")
    assert sorted(seen) == ["a", "b"] and seen["b"].phase == "Running"
    assert seen["a"].spec_hash == g.agent("a").spec_hash
    # delete removes the container and the secret files on the host
    rt.delete("g", "b")
    assert "b" not in rt.observe("g")
    assert not (lb.run_dir / "secrets").exists()
    rt.delete("g", "b")  # gone already: no error


def test_exit_codes_and_reasons(agents: Agents, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_TOKEN", "x")
    hog = "python3 -c 'b = bytearray(400 * 1024 * 1024); print(len(b))'"
    g = agents.grove(GROVE + agent_entry("fails", "echo bye; exit 3")
                     + agent_entry("hog", hog, profile="small")
                     + agent_entry("slow", "sleep 60", maxDuration="2s", profile="small")
                     + agent_entry("victim", "sleep 60", profile="small")
                     + agent_entry("stopped", "sleep 60", profile="small")
                     + agent_entry("odd", "test $(id -u):$(id -g) = 2000:3000 && "
                                   "touch /workspace/odd $HOME/odd", profile="odd")
                     + agent_entry("typo", "x", profile="typo", harness="broken"))
    names = ("fails", "hog", "slow", "victim", "stopped", "odd", "typo")
    rts = [agents.start(agents.launch(g.agent(n), {"TOKEN": "x"} if n == "fails" else {}))
           for n in names]
    rt = rts[0]
    agents.wait(rt, "g", "victim", until=("Running",))
    agents.wait(rt, "g", "stopped", until=("Running",))
    docker_cli("kill", spec.container_name(agents.repo, "g", "victim"))
    docker_cli("stop", "-t", "20", spec.container_name(agents.repo, "g", "stopped"))
    got = {n: agents.wait(rt, "g", n) for n in names}
    assert (got["fails"].phase, got["fails"].exit_code, got["fails"].reason) == (
        "Failed", 3, "exited 3")
    assert (got["hog"].phase, got["hog"].exit_code, got["hog"].reason) == (
        "Failed", 137, "killed: out of memory")
    assert (got["slow"].phase, got["slow"].exit_code, got["slow"].reason) == (
        "Failed", 124, "maxDuration 2s exceeded")
    assert (got["victim"].phase, got["victim"].exit_code, got["victim"].reason) == (
        "Failed", 137, "exited 137")
    assert (got["stopped"].phase, got["stopped"].exit_code, got["stopped"].reason) == (
        "Failed", 143, "stopped")
    assert (got["odd"].phase, got["odd"].exit_code) == ("Succeeded", 0)  # uid:gid 2000:3000
    assert (got["typo"].phase, got["typo"].exit_code, got["typo"].reason) == (
        "Failed", 127, "command not found: no-such-harness")
    assert "bye" in list(rt.logs("g", "fails"))


def attach_and_detach(repo: Path, tmp_path: Path) -> int:
    """`attach` in a real terminal (a pane of a separate tmux server on the host): the
    agent's screen shows up, C-b d detaches, and attach returns docker exec's status."""
    sock, rc = tmp_path / "tmux.sock", tmp_path / "rc"
    py = (f"import sys; from pathlib import Path; from engine.runtimes import docker; "
          f"sys.exit(docker.make(Path({str(repo)!r}), None).attach('g', 'talk'))")
    cmd = f"{shlex.quote(sys.executable)} -c {shlex.quote(py)}; echo $? > {rc}"
    subprocess.run(["tmux", "-S", str(sock), "new-session", "-d", "-x", "120", "-y", "30",
                    cmd], check=True)
    try:
        deadline = time.monotonic() + 20
        while "ready" not in subprocess.run(["tmux", "-S", str(sock), "capture-pane", "-p"],
                                            capture_output=True, text=True).stdout:
            assert time.monotonic() < deadline, "attach did not show the agent's screen"
            time.sleep(0.2)
        subprocess.run(["tmux", "-S", str(sock), "send-keys", "C-b", "d"], check=True)
        while not rc.exists():
            assert time.monotonic() < deadline + 10, "attach did not return after detach"
            time.sleep(0.2)
        return int(rc.read_text())
    finally:
        subprocess.run(["tmux", "-S", str(sock), "kill-server"], capture_output=True)


def test_look_send_and_follow_logs(agents: Agents, monkeypatch: pytest.MonkeyPatch,
                                   tmp_path: Path) -> None:
    monkeypatch.setenv("TEST_TOKEN", "x")
    task = "echo ready; read -r line; echo \"got:$line\"; exit 0"
    g = agents.grove(GROVE + agent_entry("talk", task))
    rt = agents.start(agents.launch(g.agent("talk"), {"TOKEN": "x"}))
    deadline = time.monotonic() + 30
    while "ready" not in rt.look("g", "talk"):
        assert time.monotonic() < deadline, rt.look("g", "talk")
        time.sleep(0.2)
    assert attach_and_detach(agents.repo, tmp_path) == 0
    rt.send("g", "talk", "hello 'quoted' $HOME")
    lines = list(rt.logs("g", "talk", follow=True))  # ends when the container does
    assert "got:hello 'quoted' $HOME" in lines
    o = agents.wait(rt, "g", "talk")
    assert (o.phase, o.exit_code) == ("Succeeded", 0)
    assert "got:hello 'quoted' $HOME" in rt.look("g", "talk")  # ended: the log's tail
    with pytest.raises(EngineError, match="not running"):
        rt.send("g", "talk", "too late")


def test_read_only_access_and_clone_mode(agents: Agents, repo: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_TOKEN", "x")
    g = agents.grove(GROVE
                     + agent_entry("ro", "touch /workspace/x || exit 7", profile="reader")
                     + agent_entry("cl", "echo c > c.txt && git add c.txt && "
                                         "git commit -qm clone-commit", profile="reader"))
    rt = agents.start(agents.launch(g.agent("ro")))
    o = agents.wait(rt, "g", "ro")
    assert (o.phase, o.exit_code) == ("Failed", 7)
    # clone mode: the commit lands in the agent's own clone, the repository's objects are
    # mounted read-only for its alternates
    cl = g.agent("cl")
    writable = dataclasses.replace(cl, access="read-write")
    launch = agents.launch(writable, mode="clone")
    agents.start(launch)
    o = agents.wait(rt, "g", "cl")
    assert (o.phase, o.exit_code) == ("Succeeded", 0), o
    assert git(launch.workdir, "log", "-1", "--format=%s", "engine/g/cl") == "clone-commit"
    assert git(repo, "log", "-1", "--format=%s", "engine/g/cl") == "initial"


# -- two engines --------------------------------------------------------------------------

@pytest.fixture
def second_engine(docker_client: object, base_image: str) -> Iterator[str]:
    """A second dockerd on its own socket (no bridge, no iptables), with the test image."""
    d = Path(tempfile.mkdtemp(prefix="eng-d2-", dir="/tmp"))
    host = f"unix://{d}/docker.sock"
    log = open(d / "dockerd.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        ["dockerd", "--bridge=none", "--iptables=false", "--ip6tables=false", "-H", host,
         "--data-root", str(d / "data"), "--exec-root", str(d / "exec"),
         "--pidfile", str(d / "docker.pid")], stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                client = docker_rt.connect(host)
                break
            except RuntimeUnavailable:
                assert proc.poll() is None, (d / "dockerd.log").read_text()[-2000:]
                assert time.monotonic() < deadline, "second dockerd did not start"
                time.sleep(0.5)
        image = docker_client.api.get_image(base_image)  # type: ignore[attr-defined]
        client.api.load_image(image)
        client.close()
        yield host
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        shutil.rmtree(d, ignore_errors=True)


def test_agents_on_two_engines(second_engine: str, agents: Agents,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_TOKEN", "x")
    text = GROVE.replace("  agents:\n", f"    far: {{runtime: docker, image: {IMAGE}, "
                                        f"host: 'unix://{second_engine[7:]}'}}\n  agents:\n")
    g = agents.grove(text + agent_entry("near", "sleep 30")
                     + agent_entry("away", "sleep 30", profile="far"))
    near = agents.start(agents.launch(g.agent("near"), {"TOKEN": "x"}))
    away = agents.start(agents.launch(g.agent("away")))
    assert away is not near and away.host == second_engine
    agents.wait(near, "g", "near", until=("Running",))
    o = agents.wait(away, "g", "away", until=("Running",))
    assert o.host == second_engine
    assert sorted(near.observe("g")) == ["near"]
    assert sorted(away.observe("g")) == ["away"]
    assert spec.container_name(agents.repo, "g", "away") in docker_cli(
        "ps", "--format", "{{.Names}}", host=second_engine)
    away.delete("g", "away")  # before the second engine stops, so it stops at once
    assert away.observe("g") == {}


# -- bad input ----------------------------------------------------------------------------

def test_missing_image_is_a_clear_error(agents: Agents) -> None:
    g = agents.grove(GROVE.replace("  agents:\n", "    nope: {runtime: docker, image: "
                                   "grove-engine/nope:latest}\n    nonet: {runtime: docker, "
                                   f"image: {IMAGE}, network: no-such-net}}\n  agents:\n")
                     + agent_entry("x", "true", profile="nope")
                     + agent_entry("y", "true", profile="nonet"))
    with pytest.raises(EngineError) as e:
        agents.start(agents.launch(g.agent("x")))
    assert "grove-engine/nope:latest not found" in e.value.summary
    assert "engine image build" in e.value.summary and "bootstrap" not in e.value.summary
    with pytest.raises(PermanentError, match=r"^agent g/y: .*no-such-net"):
        agents.start(agents.launch(g.agent("y")))
    assert agents.runtime().observe("g") == {}


def test_engine_not_running_and_unknown_scheme(tmp_path: Path) -> None:
    with pytest.raises(RuntimeUnavailable) as e:
        docker_rt.make(tmp_path, f"unix://{tmp_path}/no.sock")
    assert "\n" not in e.value.summary and "start it" in e.value.summary
    assert str(tmp_path / "no.sock") in e.value.summary
    with pytest.raises(EngineError, match="unknown scheme"):
        docker_rt.make(tmp_path, "ftp://example.invalid")


def test_engine_cli_without_engine(engine, tmp_path: Path,  # type: ignore[no-untyped-def]
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/absent.sock")
    r = engine("image", "bootstrap")
    assert r.code == 1 and r.err.count("\n") <= 2 and "not reachable" in r.err
    assert "Traceback" not in r.err


def test_hardening_is_in_the_spec_and_secrets_are_not(agents: Agents, repo: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_TOKEN", "x")
    g = agents.grove(GROVE + agent_entry("p", "true"))
    launch = agents.launch(g.agent("p"), {"TOKEN": SECRET_A})
    dirs = spec.HostDirs(ctl=Path("/c"), secrets=Path("/s"), log=Path("/l"), inbox=Path("/i"),
                         client=Path("/cl"), client_bin=Path("/b"), entrypoint=Path("/e"))
    kw = spec.create_kwargs(launch, dirs, IMAGE)
    assert SECRET_A not in json.dumps(kw)
    assert kw["user"] == "1000:1000" and kw["network_mode"] == "none"
    assert kw["tmpfs"]["/home/agent"].endswith("uid=1000,gid=1000,mode=0700")
    targets = {m["Target"]: m for m in kw["mounts"]}
    assert targets["/workspace"]["Source"] == str(launch.workdir)
    # of the trusted repository only the object store is mounted, and read-only
    assert targets[str(repo / ".git" / "objects")]["ReadOnly"] is True
    assert not any(m["Source"] == str(repo / ".git") for m in kw["mounts"])
    assert targets["/run/secrets"]["ReadOnly"] is True
    assert not any("docker.sock" in m["Source"] for m in kw["mounts"])
    assert os.path.basename(kw["name"]).startswith("engine-g-p-")


def test_killed_container_through_plan(engine, repo: Path,  # type: ignore[no-untyped-def]
                                       base_image: str) -> None:
    """End to end through the CLI: apply, `docker kill`, and the plan restarts only the
    agent whose restart policy asks for it, with the observed reason."""
    write_grove(repo, "k", f"""\
apiVersion: engine/v1alpha1
kind: Grove
metadata: {{name: k}}
spec:
  defaults: {{profile: box, harness: shell}}
  harnesses:
    broken: {{command: ["no-such-harness", "{{{{ task }}}}"], taskArg: none}}
  profiles:
    box: {{runtime: docker, image: {base_image}}}
  agents:
    - {{name: once, task: sleep 60}}
    - {{name: keeper, task: sleep 60, restart: on-failure}}
""")
    try:
        assert engine("apply", "--auto-approve").code == 0
        names = [spec.container_name(repo.resolve(), "k", n) for n in ("once", "keeper")]
        docker_cli("kill", *names)
        r = engine("plan", "--json")
        assert r.code == 0, r
        changes = {c["agent"]: c for c in json.loads(r.out)["groves"][0]["changes"]}
        assert (changes["keeper"]["action"], changes["keeper"]["reason"]) == (
            "restart", "exited 137, restart: on-failure")
        assert (changes["once"]["action"], changes["once"]["reason"]) == (
            "no-op", "failed: exited 137")
    finally:
        assert engine("destroy", "--auto-approve").code == 0
    assert docker_cli("ps", "-aq", "--filter", "label=engine.grove=k",
                      "--filter", f"label=engine.repo={repo.resolve()}") == ""


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to another uid needs root")
def test_acl_grant_gives_one_uid_access_and_keeps_owners() -> None:
    """docker_fs.share on real files: uid 4242 gains write access (inherited by new
    directories), the owner and mode bits of the owner stay, other uids gain nothing."""
    top = Path(tempfile.mkdtemp(prefix="eng-acl-", dir="/tmp"))  # pytest's tmp is 0700
    try:
        top.chmod(0o755)
        _check_acl_grant(top / "objects")
    finally:
        shutil.rmtree(top)


def _check_acl_grant(shared: Path) -> None:
    (shared / "ab").mkdir(parents=True)
    (shared / "ab" / "obj").write_text("x")
    fs.share(shared, 4242, files=False)
    (shared / "cd").mkdir()  # made after the grant: inherits it

    def as_uid(uid: int, *argv: str) -> int:
        return subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}",
                               "--clear-groups", *argv], capture_output=True).returncode

    assert as_uid(4242, "touch", str(shared / "ab" / "new")) == 0
    assert as_uid(4242, "touch", str(shared / "cd" / "new")) == 0
    assert as_uid(4343, "touch", str(shared / "ab" / "other")) != 0
    assert as_uid(4242, "sh", "-c", f"echo y > {shared / 'ab' / 'obj'}") != 0  # files: no
    st = (shared / "ab").stat()
    assert (st.st_uid, st.st_mode & 0o700) == (0, 0o700)


# -- set-id files and user namespaces (the engine's seccomp profile) -------------------------

SETID_PROBE = r"""
set -u
{
  cp /bin/sh suid && chmod 4755 suid 2>/dev/null; echo "chmod=$(stat -c %a suid)"
  cp /bin/sh "$HOME/sgid" && chmod g+s "$HOME/sgid" 2>/dev/null
  python3 -c "import os; os.open('/run/engine/ctl/made', os.O_CREAT | os.O_WRONLY, 0o4755)" \
    2>/dev/null && echo "create=made" || echo "create=refused"
  echo "userns=$(unshare -Ur id -u 2>/dev/null || echo refused)"
  echo "setid=$(find /workspace "$HOME" /run/engine/ctl -type f -perm /6000 | wc -l)"
  chmod 700 suid && echo "plain=$(stat -c %a suid)"
} > setid.txt 2>&1
"""


def setid_files(*roots: Path) -> list[Path]:
    """Regular files under `roots` (not following links) with a set-uid or set-gid bit."""
    out = []
    for root in roots:
        for d, _, files in os.walk(root):
            out += [Path(d, f) for f in files
                    if os.lstat(Path(d, f)).st_mode & 0o6000 and Path(d, f).is_file()]
    return out


def run_as_nobody(program: Path) -> str:
    """What `program -p -c 'id -u'` prints as uid/gid 65534 (root only): a set-uid
    shell would print its owner's uid."""
    searchable(program.parent)
    return subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--",
         str(program), "-p", "-c", "id -u"], capture_output=True, text=True).stdout.strip()


def test_agent_cannot_plant_setid_files_or_make_user_namespaces(
        agents: Agents, repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Files an agent writes land on the host as its uid: a set-uid copy of a shell among
    them would let any local user run as that uid. The seccomp profile every container is
    sent refuses set-id modes (chmod and create), and user namespaces (Docker's default)."""
    monkeypatch.setenv("TEST_TOKEN", "x")
    g = agents.grove(GROVE + agent_entry("s", SETID_PROBE))
    launch = agents.launch(g.agent("s"))
    rt = agents.start(launch)
    o = agents.wait(rt, "g", "s")
    assert (o.phase, o.exit_code) == ("Succeeded", 0), o
    probe = parse((launch.workdir / "setid.txt").read_text())
    assert probe["chmod"] == "755" and probe["create"] == "refused", probe
    assert probe["userns"] == "refused" and probe["setid"] == "0", probe
    assert probe["plain"] == "700", probe  # modes without set-id bits still change
    assert setid_files(repo / ".engine") == []
    if os.geteuid() == 0:  # another local user runs the agent's shell as itself
        assert run_as_nobody(launch.workdir / "suid") == "65534"
    info = json.loads(docker_cli("inspect", spec.container_name(repo, "g", "s")))[0]
    assert info["HostConfig"]["SecurityOpt"][0] == "no-new-privileges"
    assert info["HostConfig"]["SecurityOpt"][1].startswith("seccomp=")
