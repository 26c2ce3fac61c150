"""The Podman runtime against a real Podman service (Debian's podman, rootful, started by
.ci/podman-up.sh): `runtime: podman`, and a docker profile whose engine is Podman's socket.

The Docker runtime's own suites run here a second time against Podman: every test of
test_docker_runtime.py that does not inspect Docker-only output, the runtime suite's
scenarios through the real CLI, and the attacks of test_attacks.py. The `podman_host`
fixture points DOCKER_HOST (docker profiles, the docker command those tests call) and
CONTAINER_HOST (runtime: podman) at the Podman service, so those tests, unchanged, drive
Podman. Podman-specific checks follow them.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine import runtimes, workspace
from engine.errors import EngineError, RuntimeUnavailable
from engine.runtimes import docker as docker_rt
from engine.runtimes import docker_spec as spec
from engine.runtimes import podman as podman_rt
from tests import test_attacks as attacks
from tests import test_docker_runtime as docker_suite
from tests import test_runtime_suite as suite
from tests.conftest import git
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
    assert hc["SecurityOpt"] == ["no-new-privileges"]
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


def test_docker_profile_on_podman_socket_is_read_podmans_way(repo: Path) -> None:
    rt = runtimes.get("docker", repo, PODMAN_HOST)
    assert isinstance(rt, docker_rt.DockerRuntime) and rt.podman and rt.name == "docker"
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
