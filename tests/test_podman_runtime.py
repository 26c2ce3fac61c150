"""The Podman runtime against a real Podman service (Debian's podman, rootful, started by
.ci/podman-up.sh): `runtime: podman`, and a docker profile whose engine is Podman's socket.

The Docker runtime's own suites run here a second time against Podman: every test of
test_docker_runtime.py that does not inspect Docker-only output, the runtime suite's
scenarios through the real CLI, and the attacks of test_attacks.py. The `podman_host`
fixture points DOCKER_HOST (docker profiles, the docker command those tests call) and
CONTAINER_HOST (runtime: podman) at the Podman service, so those tests, unchanged, drive
Podman. Podman-specific checks follow them, then the rootless service's
(.ci/podman-rootless-up.sh), driven through the real CLI as that service's user.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pwd
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine import desired, runtimes, workspace
from engine.errors import EngineError, RuntimeUnavailable
from engine.runtimes import docker as docker_rt
from engine.runtimes import docker_spec as spec
from engine.runtimes import podman as podman_rt
from engine.runtimes import seccomp
from tests import test_attacks as attacks
from tests import test_docker_runtime as docker_suite
from tests import test_runtime_suite as suite
from tests.conftest import git, searchable
from tests.docker_fixtures import IMAGE, PODMAN_HOST, Agents

pytestmark = [pytest.mark.docker, pytest.mark.timeout(300)]


@pytest.fixture(autouse=True)
def _on_podman(podman_host: str) -> str:
    return podman_host


# -- the Docker runtime's tests, on Podman's socket ----------------------------------------

test_exit_codes_and_reasons = docker_suite.test_exit_codes_and_reasons
test_look_send_and_follow_logs = docker_suite.test_look_send_and_follow_logs
test_read_only_access_and_clone_mode = docker_suite.test_read_only_access_and_clone_mode
test_missing_image_is_a_clear_error = docker_suite.test_missing_image_is_a_clear_error
test_killed_container_through_plan = docker_suite.test_killed_container_through_plan
test_agent_cannot_plant_setid_files_or_make_user_namespaces = (
    docker_suite.test_agent_cannot_plant_setid_files_or_make_user_namespaces)

test_agent_git_configuration_never_runs_on_the_host = (
    attacks.test_agent_git_configuration_never_runs_on_the_host)
test_agent_git_pointers_are_never_followed = attacks.test_agent_git_pointers_are_never_followed
test_agent_cannot_destroy_history = attacks.test_agent_cannot_destroy_history
test_no_grant_follows_agent_paths = attacks.test_no_grant_follows_agent_paths
test_control_file_symlink_never_read = attacks.test_control_file_symlink_never_read
test_shared_workspace_cannot_touch_git_metadata = (
    attacks.test_shared_workspace_cannot_touch_git_metadata)
test_inbox_attacks_never_stop_apply_and_escalation_is_refused = (
    attacks.test_inbox_attacks_never_stop_apply_and_escalation_is_refused)

# -- the runtime suite, through the CLI, with runtime: podman -------------------------------

suite.PROFILES.setdefault("podman", suite.PROFILES["docker"].replace("runtime: docker",
                                                                     "runtime: podman"))


@pytest.fixture
def runtime(repo: Path) -> Iterator[str]:
    yield "podman"
    suite.cli(repo, "destroy", "--auto-approve")


test_task_runs_commits_on_its_branch_and_converges = (
    suite.test_task_runs_commits_on_its_branch_and_converges)
test_killed_from_outside_is_restarted_per_policy = (
    suite.test_killed_from_outside_is_restarted_per_policy)
test_message_reaches_the_agent = suite.test_message_reaches_the_agent


# -- Podman itself ---------------------------------------------------------------------------

SECRET = "podman-s3cr3t-5b0e"


def podman_cli(*args: str) -> str:
    return subprocess.run(["podman", *args], check=True, capture_output=True,
                          text=True).stdout


def test_runtime_podman_sandbox_secrets_and_commit(agents: Agents, repo: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_TOKEN", "digest-input")
    text = docker_suite.GROVE.replace("      runtime: docker\n", "      runtime: podman\n")
    other = repo / ".engine" / "worktrees" / "g" / "b"
    g = agents.grove(text + docker_suite.agent_entry(
        "a", docker_suite.PROBE.replace("{other}", str(other)))
        + docker_suite.agent_entry("b", "sleep 30"))
    a = dataclasses.replace(g.agent("a"), credential_files=(("FILECRED", ".config/tool/token"),))
    assert a.runtime == "podman"
    rt = runtimes.get("podman", repo)
    assert isinstance(rt, podman_rt.PodmanRuntime) and rt.podman and rt.host == ""
    agents.runtimes[""] = rt  # what agents.start uses (and cleans up)
    la = agents.launch(a, {"TOKEN": SECRET, "FILECRED": "file-secret-9f"})
    agents.start(agents.launch(g.agent("b"), {"TOKEN": "other-secret-b"}))
    agents.start(la)
    o = agents.wait(rt, "g", "a")
    assert (o.phase, o.exit_code, o.runtime, o.host) == ("Succeeded", 0, "podman", ""), o
    probe = docker_suite.parse((la.workdir / "probe.txt").read_text())
    assert probe["uid"] == "1000" and probe["cap"] == "0000000000000000"
    assert probe["net"].split() == ["lo"]  # network none: loopback only
    assert probe["root"] == "readonly" and probe["tmp"] == probe["home"] == "ok"
    assert probe["token"] == SECRET and probe["secret"] == "400 1000"
    assert probe["file"] == "file-secret-9f 600 1000" and probe["fileenv"] == "unset"
    assert probe["other"] == "0" and probe["worktree-b"] == "1"
    # the work is committed on the agent's branch
    workspace.sync(repo, "g", "a")
    assert git(repo, "log", "-1", "--format=%s", "engine/g/a") == "a: probe"
    assert git(repo, "show", "engine/g/a:probe.txt").startswith("uid=1000")
    # the secret is nowhere in what Podman keeps about the container, nor in its log
    name = spec.container_name(repo, "g", "a")
    inspect = podman_cli("inspect", name)
    assert SECRET not in inspect and "file-secret-9f" not in inspect
    assert SECRET not in la.log_file.read_text(errors="replace")
    info = json.loads(inspect)[0]
    hc = info["HostConfig"]
    assert hc["ReadonlyRootfs"] is True and hc["Init"] is True and not hc["Privileged"]
    assert hc["SecurityOpt"] == [  # Podman's API reads the seccomp profile from a file
        "no-new-privileges", f"seccomp={repo / '.engine' / 'run' / 'g' / 'a' / 'seccomp.json'}"]
    assert hc["NetworkMode"] == "none"
    assert hc["PidsLimit"] == 128 and hc["Memory"] == hc["MemorySwap"] == 256 * 1024**2
    assert info["EffectiveCaps"] in (None, [])  # Podman lists what it dropped, not "ALL"
    assert rt.observe("g")["b"].phase == "Running"
    rt.delete("g", "b")
    assert "b" not in rt.observe("g")


def test_network_none_has_only_loopback(agents: Agents, repo: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_TOKEN", "x")
    rt = runtimes.get("podman", repo)
    agents.runtimes[""] = rt
    text = docker_suite.GROVE.replace("      runtime: docker\n", "      runtime: podman\n")
    g = agents.grove(text + docker_suite.agent_entry(
        "n", "cat /proc/net/dev > /workspace/dev; ls /sys/class/net > /workspace/ifs; "
             "python3 -c 'import socket; socket.create_connection((\"192.0.2.1\", 80), 2)' "
             "2> /workspace/conn; true"))
    launch = agents.launch(g.agent("n"))
    agents.start(launch)
    assert agents.wait(rt, "g", "n").phase == "Succeeded"
    assert (launch.workdir / "ifs").read_text().split() == ["lo"]
    devs = [line.split(":")[0].strip() for line in (launch.workdir / "dev").read_text()
            .splitlines()[2:]]
    assert devs == ["lo"]
    assert "Network is unreachable" in (launch.workdir / "conn").read_text()


ENGINE_PEEK = r"""
ls -A /workspace/.engine > engine-ls 2>&1
grep -rl {canary} /workspace/.engine > engine-grep 2>&1
true
"""


def test_shared_workspace_sees_nothing_of_the_engine_state(repo: Path, engine) -> None:  # type: ignore[no-untyped-def]
    """The tmpfs over /workspace/.engine hides the engine's state on Podman too: Podman
    copies what lies beneath a tmpfs into it unless told not to, which would hand the
    agent every other agent's worktree, inbox and state (and fail to start it once
    .engine outgrows the 1 MiB tmpfs). A docker profile, on Podman's socket (DOCKER_HOST)."""
    canary = "podman-engine-canary-41d7"
    other = repo / ".engine" / "worktrees" / "g" / "other"
    other.mkdir(parents=True)
    (other / "notes.txt").write_text(canary + "\n")
    attacks.grove(repo, {"a": ENGINE_PEEK.format(canary=canary)}, workspace="shared")
    try:
        for bulk in (False, True):
            if bulk:  # more than the tmpfs holds: a copy of it could not even start
                (repo / ".engine" / "bulk").write_bytes(os.urandom(2 * 1024**2))
            for f in ("engine-ls", "engine-grep"):
                (repo / f).unlink(missing_ok=True)
            r = engine("apply", "--auto-approve", "--wait", "--timeout", "120")
            assert r.code == 0, r.out + r.err
            assert (repo / "engine-ls").read_text() == "", bulk
            assert (repo / "engine-grep").read_text() == "", bulk
            assert engine("destroy", "--auto-approve").code == 0
    finally:
        engine("destroy", "--auto-approve")


def test_podman_is_sent_dockers_sandbox(agents: Agents, repo: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """What Podman needs said to give Docker's sandbox, and Docker is never sent: no tmpfs
    copy-up, /run and /var/tmp the image's own and read-only under a read-only root,
    IpcMode private, Docker's /dev/shm size."""
    monkeypatch.setenv("TEST_TOKEN", "x")
    g = agents.grove(docker_suite.GROVE + docker_suite.agent_entry("p", "true"))
    launch = dataclasses.replace(agents.launch(g.agent("p")), workdir=repo)  # shared
    dirs = spec.HostDirs(ctl=Path("/c"), secrets=Path("/s"), log=Path("/l"), inbox=Path("/i"),
                         client=Path("/cl"), client_bin=Path("/b"), entrypoint=Path("/e"))
    on_docker = spec.create_kwargs(launch, dirs, IMAGE)
    on_podman = spec.create_kwargs(launch, dirs, IMAGE, podman=True)
    assert set(on_docker["tmpfs"]) == {"/tmp", "/workspace/.engine", "/home/agent"}
    assert not any("copyup" in o for o in on_docker["tmpfs"].values())
    assert "ipc_mode" not in on_docker and "shm_size" not in on_docker
    assert {k: v for k, v in on_podman.items() if k != "tmpfs"} == {
        **{k: v for k, v in on_docker.items() if k != "tmpfs"},
        "ipc_mode": "private", "shm_size": 64 * 1024**2,
        # one seccomp profile: inline for Docker, a file for Podman (its API reads a path)
        "security_opt": ["no-new-privileges", f"seccomp={spec.seccomp_file(launch)}"]}
    assert on_docker["security_opt"] == ["no-new-privileges", seccomp.security_opt()]
    assert on_podman["tmpfs"] == {
        **{p: f"{o},notmpcopyup" for p, o in on_docker["tmpfs"].items()},
        "/run": "ro,nosuid,nodev,tmpcopyup", "/var/tmp": "ro,nosuid,nodev,tmpcopyup"}
    writable = dataclasses.replace(launch, agent=dataclasses.replace(
        launch.agent, read_only_root=False))
    assert set(spec.create_kwargs(writable, dirs, IMAGE, podman=True)["tmpfs"]) == {
        "/tmp", "/workspace/.engine"}


READ_ONLY_PROBE = r"""
{
  for d in /var/tmp /run /run/lock /usr; do
    touch "$d/x" 2>/dev/null && echo "$d=writable" || echo "$d=readonly"
  done
  echo "shm=$(df -k /dev/shm | awk 'NR == 2 {print $2}')"
} > /workspace/ro.txt
"""


def test_read_only_root_is_read_only_as_on_docker(agents: Agents, repo: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Podman's --read-only would leave /run and /var/tmp writable (unsized tmpfs mounts
    of its own); the agent finds them read-only, as on Docker."""
    monkeypatch.setenv("TEST_TOKEN", "x")
    rt = runtimes.get("podman", repo)
    agents.runtimes[""] = rt
    text = docker_suite.GROVE.replace("      runtime: docker\n", "      runtime: podman\n")
    launch = agents.launch(agents.grove(text + docker_suite.agent_entry(
        "r", READ_ONLY_PROBE)).agent("r"))
    agents.start(launch)
    assert agents.wait(rt, "g", "r").phase == "Succeeded"
    got = docker_suite.parse((launch.workdir / "ro.txt").read_text())
    assert got == {"/var/tmp": "readonly", "/run": "readonly", "/run/lock": "readonly",
                   "/usr": "readonly", "shm": "65536"}, got
    hc = json.loads(podman_cli("inspect", spec.container_name(repo, "g", "r")))[0][
        "HostConfig"]
    assert hc["Tmpfs"]["/var/tmp"].startswith("ro,") and hc["Tmpfs"]["/run"].startswith("ro,")
    assert hc["ShmSize"] == 64 * 1024**2


def test_docker_profile_on_podman_socket_is_read_podmans_way(repo: Path) -> None:
    rt = runtimes.get("docker", repo, PODMAN_HOST)
    # handed to the Podman runtime (all it sends and checks), under the profile's name
    assert isinstance(rt, podman_rt.PodmanRuntime) and rt.podman and rt.name == "docker"
    assert runtimes.get("podman", repo, PODMAN_HOST).name == "podman"
    by_env = runtimes.get("docker", repo)  # DOCKER_HOST: attach reaches it all the same
    assert isinstance(by_env, podman_rt.PodmanRuntime) and by_env.name == "docker"
    assert by_env._cli_host() == ["--remote", "--url", PODMAN_HOST]
    entry = {"Id": "x" * 64, "State": "stopped", "Status": "Exited (0) 1 second ago",
             "Labels": {"engine.grove": "g", "engine.agent": "a"}, "Mounts": []}
    got = rt._podman_entry(entry)
    assert (got["State"], got["Mounts"]) == ("exited", [])  # no such container: no mounts
    o = spec.observed(got, "")
    assert (o.phase, o.exit_code) == ("Succeeded", 0)
    assert rt._podman_entry({**entry, "State": "configured"})["State"] == "created"


def test_podman_not_running_is_a_clear_error(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(RuntimeUnavailable) as e:
        runtimes.get("podman", tmp_path, f"unix://{tmp_path}/podman.sock")
    assert "\n" not in e.value.summary and "podman service at" in e.value.summary
    assert "podman system service" in e.value.summary
    with pytest.raises(EngineError, match=r"^podman host ftp://x: unknown scheme"):
        runtimes.get("podman", tmp_path, "ftp://x")
    monkeypatch.delenv("CONTAINER_HOST")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    want = (podman_rt.ROOTFUL_SOCKET if podman_rt.os.geteuid() == 0
            else f"unix://{tmp_path}/podman/podman.sock")
    assert podman_rt.default_host() == want
    assert IMAGE


def test_validation_of_podman_profiles(engine, repo: Path) -> None:  # type: ignore[no-untyped-def]
    from tests.conftest import write_grove
    write_grove(repo, "v", f"""\
apiVersion: engine/v1alpha1
kind: Grove
metadata: {{name: v}}
spec:
  defaults: {{profile: p, harness: shell}}
  profiles:
    p: {{runtime: podman, image: {IMAGE}, host: '{PODMAN_HOST}'}}
    k: {{runtime: podman, image: {IMAGE}, namespace: x}}
  agents:
    - {{name: a, task: "true"}}
""")
    r = engine("validate", "--no-secrets")
    assert r.code == 1 and "Traceback" not in r.err
    assert "field 'namespace' only applies to runtime kubernetes, not podman" in r.err
    assert "'host'" not in r.err  # host: is a podman profile's field too
    grove = repo / "groves" / "v" / "grove.yaml"
    grove.write_text(grove.read_text().replace("runtime: podman, image: "
                                               f"{IMAGE}, namespace: x", "runtime: podmn"))
    r = engine("validate", "--no-secrets")
    assert r.code == 1 and "'podmn' is not one of local, docker, podman, kubernetes" in r.err


# -- rootless: a service run by an unprivileged user (.ci/podman-rootless-up.sh) ------------

ROOTLESS_USER = "engine-rootless"
ROOTLESS_UNAVAILABLE = Path("/run/engine-podman-rootless.unavailable")


@dataclasses.dataclass(frozen=True)
class Rootless:
    user: str
    uid: int
    home: Path
    socket: str  # unix://...

    def cli(self, repo: Path, home: Path, *args: str,
            **env: str) -> subprocess.CompletedProcess[str]:
        """The real CLI, run as the service's user (what a rootless setup is)."""
        base = {"HOME": str(home), "XDG_RUNTIME_DIR": f"/run/user/{self.uid}",
                "CONTAINER_HOST": self.socket, "PATH": os.environ["PATH"],
                "PYTHONDONTWRITEBYTECODE": "1", "GIT_CONFIG_NOSYSTEM": "1", "NO_COLOR": "1",
                "GIT_AUTHOR_NAME": "Test", "GIT_AUTHOR_EMAIL": "test@example.invalid",
                "GIT_COMMITTER_NAME": "Test", "GIT_COMMITTER_EMAIL": "test@example.invalid",
                **env}
        argv = ["runuser", "-u", self.user, "--", "env", "-i",
                *(f"{k}={v}" for k, v in sorted(base.items())), *_python(self.user), *args]
        return subprocess.run(argv, cwd=repo, capture_output=True, text=True, timeout=240)


def _python(user: str) -> list[str]:
    """This interpreter with the project importable, as `user` may run it: a venv made
    from a python under /root (0700) is not, Debian's python3 of the same version is."""
    if subprocess.run(["runuser", "-u", user, "--", sys.executable, "-c", ""],
                      capture_output=True).returncode == 0:
        return [sys.executable, "-m", "engine"]
    system = Path("/usr/bin/python3")
    ver = subprocess.run([str(system), "-c", "import sys; print(sys.version_info[:2])"],
                         capture_output=True, text=True).stdout.strip()
    assert ver == str(sys.version_info[:2]), f"{user} cannot run {sys.executable}"
    path = f"{Path(__file__).resolve().parents[1]}:{sysconfig.get_paths()['purelib']}"
    if not _imports(user, system, path):  # the checkout or the venv is not theirs to read
        path = _readable_mirror()         # (a CI clone in a 0700 mktemp -d directory)
        assert _imports(user, system, path), f"{user} cannot import the engine from {path}"
    return ["env", f"PYTHONPATH={path}", str(system), "-m", "engine"]


def _imports(user: str, python: Path, path: str) -> bool:
    return subprocess.run(["runuser", "-u", user, "--", "env", "-i", f"PYTHONPATH={path}",
                           str(python), "-c", "import engine.cli, yaml, docker"],
                          cwd="/", capture_output=True).returncode == 0


@functools.cache
def _readable_mirror() -> str:
    """The engine package and the venv's packages, linked (else copied) into a directory
    any user may read, for the whole test session."""
    top = Path(tempfile.mkdtemp(prefix="grove-engine-rootless-"))
    top.chmod(0o755)
    root = Path(__file__).resolve().parents[1]
    sources = [(root / d, top / "src" / d) for d in ("engine", "schemas", "images")]
    sources.append((Path(sysconfig.get_paths()["purelib"]), top / "lib"))
    for src, dest in sources:
        dest.parent.mkdir(parents=True, exist_ok=True)
        if subprocess.run(["cp", "-al", str(src), str(dest)], capture_output=True
                          ).returncode != 0:
            shutil.rmtree(dest, ignore_errors=True)
            subprocess.run(["cp", "-a", str(src), str(dest)], check=True)
    subprocess.run(["chmod", "-R", "a+rX", str(top)], check=True)
    return f"{top / 'src'}:{top / 'lib'}"


@pytest.fixture(scope="module")
def rootless() -> Rootless:
    """The rootless service .ci/podman-rootless-up.sh started; skipped (with the reason the
    script found) only where the machine cannot run rootless Podman."""
    if ROOTLESS_UNAVAILABLE.is_file():
        pytest.skip(f"rootless Podman cannot run here: {ROOTLESS_UNAVAILABLE.read_text()}")
    if os.geteuid() != 0:
        pytest.skip("the rootless tests run the engine as another user: they need root")
    try:
        pw = pwd.getpwnam(ROOTLESS_USER)
    except KeyError:
        pytest.fail("rootless Podman tests need bash .ci/podman-rootless-up.sh")
    sock = f"unix:///run/user/{pw.pw_uid}/podman/podman.sock"
    try:
        docker_rt.connect(sock, "podman service", podman_rt.START_HINT).close()
    except EngineError as e:
        pytest.fail(f"rootless Podman tests need bash .ci/podman-rootless-up.sh: {e.summary}")
    return Rootless(ROOTLESS_USER, pw.pw_uid, Path(pw.pw_dir), sock)


def test_rootless_is_read_from_the_service(rootless: Rootless, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    client = docker_rt.connect(rootless.socket, "podman service", podman_rt.START_HINT)
    try:
        svc = podman_rt.service(client, rootless.socket)
    finally:
        client.close()
    assert svc.rootless and (svc.uid, svc.gid) == (rootless.uid, pwd.getpwnam(
        rootless.user).pw_gid)
    client = docker_rt.connect(PODMAN_HOST, "podman service", podman_rt.START_HINT)
    try:
        rootful = podman_rt.service(client, PODMAN_HOST)
    finally:
        client.close()
    assert not rootful.rootless and {"pids", "memory"} <= rootful.controllers
    # the engine as root: the rootless user's service cannot reach root's files
    with pytest.raises(EngineError) as e:
        runtimes.get("podman", tmp_path, rootless.socket)
    assert e.value.summary == (
        f"podman service at {rootless.socket}: rootless as uid {rootless.uid}, but the "
        f"engine runs as uid 0; run the engine as uid {rootless.uid} (the files it mounts "
        "must be that user's) or use the rootful service")
    # a docker profile whose host: (or DOCKER_HOST) is the rootless socket is the Podman
    # runtime's too
    with pytest.raises(EngineError) as e2:
        runtimes.get("docker", tmp_path, rootless.socket)
    assert e2.value.summary == e.value.summary
    monkeypatch.setenv("DOCKER_HOST", rootless.socket)
    with pytest.raises(EngineError) as e2:
        runtimes.get("docker", tmp_path)
    assert e2.value.summary == e.value.summary


ROOTLESS_PROBE = r"""
set -u
{
  echo "uid=$(id -u)"
  echo "map=$(awk '$1 == 1000 {print $2, $3}' /proc/self/uid_map)"
  echo "cap=$(awk '/^CapEff/ {print $2}' /proc/self/status)"
  echo "net=$(ls /sys/class/net | tr '\n' ' ')"
  touch /usr/x 2>/dev/null && echo "root=writable" || echo "root=readonly"
  touch "$HOME/x" && echo "home=ok"
  echo "token=$TOKEN"
  echo "secret=$(stat -c '%a %u' /run/secrets/TOKEN)"
  touch /run/secrets/x 2>/dev/null && echo "secrets=writable" || echo "secrets=readonly"
  rm -rf {repo}/.git/objects/* 2>/dev/null  # the trusted store: the agent's user owns it
  touch {repo}/.git/objects/x 2>/dev/null && echo "objects=written" || echo "objects=refused"
  echo '[core]' 2>/dev/null >> {repo}/.git/config && echo "config=written" \
    || echo "config=refused"
  cp /bin/sh suid && chmod 4755 suid 2>/dev/null; echo "suid=$(stat -c %a suid)"
  echo "userns=$(unshare -Ur id -u 2>/dev/null || echo refused)"
} > probe.txt
git add probe.txt && git commit -qm "a: probe"
"""


def test_rootless_agent_runs_hardened_as_the_services_user(rootless: Rootless,
                                                           tmp_path: Path) -> None:
    owned = tmp_path / "rootless"
    repo, home = owned / "repo", owned / "home"
    for d in (repo / "groves" / "r", home):
        d.mkdir(parents=True)
    (repo / "groves" / "r" / "grove.yaml").write_text(f"""\
apiVersion: engine/v1alpha1
kind: Grove
metadata: {{name: r}}
spec:
  defaults: {{profile: box, harness: shell}}
  profiles:
    box:
      runtime: podman
      image: {IMAGE}
      resources: {{cpus: 1, memory: 256Mi, pids: 128}}
      credentials: {{TOKEN: {{fromEnv: TEST_TOKEN}}}}
  agents:
    - name: a
      task: {json.dumps(ROOTLESS_PROBE.replace("{repo}", str(repo)))}
""")
    (repo / ".gitignore").write_text(".engine/\n")
    subprocess.run(["chown", "-R", f"{rootless.user}:", str(owned)], check=True)
    searchable(owned)
    run = functools.partial(rootless.cli, repo, home, TEST_TOKEN=SECRET)
    for argv in (["git", "init", "-q", "-b", "main"], ["git", "add", "-A"],
                 ["git", "commit", "-qm", "grove"]):
        subprocess.run(["runuser", "-u", rootless.user, "--", *argv], cwd=repo, check=True,
                       env={**os.environ, "HOME": str(home)}, capture_output=True)
    client = docker_rt.connect(rootless.socket, "podman service", podman_rt.START_HINT)
    try:
        svc = podman_rt.service(client, rootless.socket)
    finally:
        client.close()
    missing = podman_rt.unenforced(desired.Resources(1, 256 * 1024**2, 128), svc.controllers)
    env = {}
    if missing:  # cgroup v1 (or no delegation): refused, in one line, unless asked for
        p = run("plan")
        assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
        line = p.stderr.strip().splitlines()[-1]
        assert line.startswith(f"error: agent r/a: the rootless podman service at "
                               f"{rootless.socket} cannot enforce its limits ("), line
        assert ", ".join(missing) in line and "ENGINE_PODMAN_UNLIMITED=1" in line
        env = {podman_rt.UNLIMITED: "1"}
    try:
        p = run("apply", "--auto-approve", "--wait", "--timeout", "120", **env)
        assert p.returncode == 0, p.stdout + p.stderr
        probe = docker_suite.parse(subprocess.run(
            ["runuser", "-u", rootless.user, "--", "git", "show", "engine/r/a:probe.txt"],
            cwd=repo, check=True, capture_output=True, text=True).stdout)
        # uid 1000 inside, as the profile says; the service's own user outside (keep-id)
        assert probe["uid"] == "1000" and probe["map"] == "0 1", probe
        assert probe["cap"] == "0000000000000000" and probe["net"].split() == ["lo"]
        assert probe["root"] == "readonly" and probe["home"] == "ok"
        assert probe["token"] == SECRET and probe["secret"] == "400 1000"
        assert probe["secrets"] == "readonly"
        # the engine's seccomp profile: no set-id mode, no user namespace (as on Docker)
        assert probe["suid"] == "755" and probe["userns"] == "refused", probe
        # on the host the agent is the repository's owner: only its mounts keep it out
        assert probe["objects"] == probe["config"] == "refused", probe
        assert subprocess.run(["runuser", "-u", rootless.user, "--", "git", "fsck",
                               "--no-progress"], cwd=repo, capture_output=True).returncode == 0
        # the engine's files stay its user's: no grant to host uid 1000 (someone else)
        run_dir = repo / ".engine" / "run" / "r" / "a"
        for p_ in (run_dir / "ctl", repo / ".engine" / "logs" / "r" / "a.log"):
            assert p_.stat().st_uid == rootless.uid, p_
            with pytest.raises(OSError):
                os.getxattr(p_, "system.posix_acl_access")
        inspect = subprocess.run(
            ["runuser", "-u", rootless.user, "--", "env", "-i", f"PATH={os.environ['PATH']}",
             f"HOME={rootless.home}",
             f"XDG_RUNTIME_DIR=/run/user/{rootless.uid}", "podman", "inspect",
             spec.container_name(repo, "r", "a")],
            cwd="/", capture_output=True, text=True)
        assert inspect.returncode == 0, inspect.stderr
        info = json.loads(inspect.stdout)[0]
        assert SECRET not in inspect.stdout and info["HostConfig"]["ReadonlyRootfs"] is True
        assert info["HostConfig"]["SecurityOpt"] == [
            "no-new-privileges", f"seccomp={repo / '.engine' / 'run' / 'r' / 'a' / 'seccomp.json'}"]
        # the agent planted no set-uid file another local user could run as this user
        assert docker_suite.setid_files(repo / ".engine") == []
        assert docker_suite.run_as_nobody(repo / ".engine" / "worktrees" / "r" / "a" /
                                          "suid") == "65534"
        assert SECRET not in (repo / ".engine" / "logs" / "r" / "a.log").read_text()
    finally:
        p = run("destroy", "--auto-approve")
    assert p.returncode == 0, p.stdout + p.stderr

