"""The spawn gate (engine.policy): a child, resolved as it would run from real manifests,
never gets more than its parent on any security-relevant field, and every violation is
reported at once. Driven through `engine spawn --parent` (the same Gate as inbox requests),
through the inbox, and through `policy.compare` on agents built by `desired.build`."""

from __future__ import annotations

import copy
import dataclasses
import json
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import desired, layers, manifest, policy
from tests.conftest import git, write_grove

DROP = object()  # remove the key from the child's profile

PARENT: dict[str, Any] = {
    "runtime": "docker", "image": "engine/agent:test", "host": "unix:///run/parent.sock",
    "access": "read-only", "network": "agents", "user": "1000", "readOnlyRoot": True,
    "privileged": False, "resources": {"cpus": 1, "memory": "1Gi", "pids": 256},
    "mounts": [{"source": "data", "target": "/data", "readOnly": True}],
    "credentials": {"TOKEN": {"fromEnv": "PARENT_TOKEN"}},
}
K8S = {**{k: v for k, v in PARENT.items() if k != "host"}, "runtime": "kubernetes",
       "serviceAccountName": "agent", "namespace": "agents"}

# (case, changes to the parent's profile for the child's, the field the refusal names)
CASES: list[tuple[str, dict[str, Any], str]] = [
    ("root", {"user": "0"}, "user"),
    ("other-uid", {"user": "1001"}, "user"),
    ("other-gid", {"user": "1000:0"}, "user"),
    ("writable-root", {"readOnlyRoot": False}, "readOnlyRoot"),
    ("privileged", {"privileged": True}, "privileged"),
    ("extra-mount", {"mounts": [*PARENT["mounts"], {"source": "more", "target": "/more"}]},
     "mounts"),
    ("moved-mount", {"mounts": [{"source": "data", "target": "/elsewhere",
                                 "readOnly": True}]}, "mounts"),
    ("rw-mount", {"mounts": [{"source": "data", "target": "/data", "readOnly": False}]},
     "mounts"),
    ("cpus", {"resources": {"cpus": 2, "memory": "1Gi", "pids": 256}}, "resources.cpus"),
    ("memory", {"resources": {"cpus": 1, "memory": "2Gi", "pids": 256}}, "resources.memory"),
    ("no-memory", {"resources": {"cpus": 1, "memory": None, "pids": 256}},
     "resources.memory"),
    ("pids", {"resources": {"cpus": 1, "memory": "1Gi", "pids": 4096}}, "resources.pids"),
    ("host-net", {"network": "host"}, "network"),
    ("other-net", {"network": "elsewhere"}, "network"),
    ("extra-cred", {"credentials": {"TOKEN": {"fromEnv": "PARENT_TOKEN"},
                                    "EXTRA": {"fromEnv": "EXTRA"}}}, "credentials"),
    ("cred-source", {"credentials": {"TOKEN": {"fromEnv": "ADMIN_TOKEN"}}}, "credentials"),
    ("cred-file", {"credentials": {"TOKEN": {"fromFile": "/etc/admin-token"}}},
     "credentials"),
    ("read-write", {"access": "read-write"}, "access"),
    ("local", {"runtime": "local", "host": DROP}, "runtime"),
    ("kubernetes", {"runtime": "kubernetes", "host": DROP}, "runtime"),
    ("docker-host", {"host": "tcp://elsewhere.invalid:2375"}, "host"),
    ("default-host", {"host": DROP}, "host"),
]
K8S_CASES: list[tuple[str, dict[str, Any], str]] = [
    ("service-account", {"serviceAccountName": "admin"}, "serviceAccountName"),
    ("namespace", {"namespace": "kube-system"}, "namespace"),
    ("context", {"context": "prod"}, "context"),
    ("runtime-class", {"runtimeClassName": "runc"}, "runtimeClassName"),
]


def child_profile(parent: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(parent)
    for key, value in changes.items():
        if value is DROP:
            out.pop(key, None)
        else:
            out[key] = value
    return out


def grove_text(parent: dict[str, Any], children: dict[str, dict[str, Any]],
               seed: dict[str, Any] | None = None, spec: dict[str, Any] | None = None,
               harnesses: dict[str, Any] | None = None) -> str:
    profiles = {"parent": {**parent, "spawn": {"allowProfiles": ["parent", *children]}},
                **children}
    spec = dict(spec or {})
    defaults = {"profile": "parent", "harness": "shell", **spec.pop("defaults", {})}
    doc = {"apiVersion": "engine/v1alpha1", "kind": "Grove", "metadata": {"name": "gate"},
           "spec": {"defaults": defaults, **spec,
                    "policy": {"maxAgents": 20, "maxDepth": 3, "maxChildren": 10},
                    "profiles": profiles, "harnesses": harnesses or {},
                    "agents": [{"name": "seed", "task": "true", **(seed or {})}]}}
    return yaml.safe_dump(doc, sort_keys=False)


def allow_everything() -> None:
    """A user config (in the test's own home) that allows what the engine refuses by
    default, so that the gate, not the profile checks, refuses a child asking for more."""
    conf = layers.user_config_path()
    conf.parent.mkdir(parents=True, exist_ok=True)
    conf.write_text("security: {allowPrivileged: true, allowHostMounts: true, "
                    "allowRootAgents: true}\n")


@pytest.fixture
def gate_repo(repo: Path) -> Path:
    allow_everything()
    return repo


def spawn_refused(engine: Any, repo: Path, profile: str, *extra: str) -> str:
    res = engine("spawn", "kid", "--parent", "seed", "--profile", profile, "--task", "x",
                 *extra)
    assert res.code == 1, res
    assert not (repo / "groves/gate/spawned.yaml").exists()
    line = res.err.strip()
    assert "\n" not in line and line.startswith("error: agent gate/kid: refused: child kid "
                                                "would get more than its parent seed: "), line
    return line


@pytest.mark.parametrize(("case", "changes", "field"), CASES, ids=[c[0] for c in CASES])
def test_child_asking_for_more_is_refused_naming_the_field(
        gate_repo: Path, engine: Any, case: str, changes: dict[str, Any], field: str) -> None:
    write_grove(gate_repo, "gate", grove_text(PARENT, {case: child_profile(PARENT, changes)}))
    line = spawn_refused(engine, gate_repo, case)
    assert f": {field}: " in line or f"; {field}: " in line, line


@pytest.mark.parametrize(("case", "changes", "field"), K8S_CASES,
                         ids=[c[0] for c in K8S_CASES])
def test_kubernetes_child_keeps_its_parents_cluster_identity(
        gate_repo: Path, engine: Any, case: str, changes: dict[str, Any], field: str) -> None:
    write_grove(gate_repo, "gate", grove_text(K8S, {case: child_profile(K8S, changes)}))
    assert f": {field}: " in spawn_refused(engine, gate_repo, case)


def test_max_duration_never_longer_and_unset_counts_as_longer(gate_repo: Path,
                                                               engine: Any) -> None:
    shell = {"command": ["bash", "-c", "{{ task }}"]}
    text = grove_text(PARENT, {"same": PARENT}, seed={"maxDuration": "30m"},
                      harnesses={"long": {**shell, "maxDuration": "2h"},
                                 "short": {**shell, "maxDuration": "10m"}})
    write_grove(gate_repo, "gate", text)
    line = spawn_refused(engine, gate_repo, "same")  # no maxDuration of its own: unbounded
    assert "maxDuration: would get no limit; the parent has 1800s" in line
    line = spawn_refused(engine, gate_repo, "same", "--harness", "long")
    assert "maxDuration: would get 7200s; the parent has 1800s" in line
    res = engine("spawn", "kid", "--parent", "seed", "--profile", "same", "--harness",
                 "short", "--task", "x")
    assert res.code == 0, res


def test_identical_and_lesser_children_pass(gate_repo: Path, engine: Any) -> None:
    lesser = child_profile(PARENT, {
        "resources": {"cpus": 0.5, "memory": "512Mi", "pids": 64}, "network": "none",
        "credentials": None, "mounts": None, "image": "another/image:1"})
    write_grove(gate_repo, "gate", grove_text(PARENT, {"same": PARENT, "lesser": lesser}))
    assert engine("spawn", "twin", "--parent", "seed", "--profile", "same",
                  "--task", "x").code == 0
    res = engine("spawn", "small", "--parent", "seed", "--profile", "lesser", "--task", "x")
    assert res.code == 0, res
    docs = list(yaml.safe_load_all((gate_repo / "groves/gate/spawned.yaml").read_text()))
    assert [(d["metadata"]["name"], d["spec"]["profile"]) for d in docs] == [
        ("twin", "same"), ("small", "lesser")]


def test_a_root_parent_may_hand_out_a_non_root_user(gate_repo: Path, engine: Any) -> None:
    root = {**PARENT, "user": "0"}
    write_grove(gate_repo, "gate", grove_text(root, {"plain": {**root, "user": "1000"}}))
    res = engine("spawn", "kid", "--parent", "seed", "--profile", "plain", "--task", "x")
    assert res.code == 0, res


def build(root: Path, text: str) -> desired.DesiredGrove:
    write_grove(root, "gate", text)
    opts = desired.Options(user=layers.load_user_config(), resolve_secrets=False,
                           repo_root=root)
    return desired.build(manifest.load_grove(root / "groves" / "gate", root), opts)


def test_every_violation_is_reported_at_once(gate_repo: Path) -> None:
    greedy = child_profile(PARENT, {"user": "0", "network": "host", "access": "read-write",
                                    "readOnlyRoot": False, "host": DROP})
    text = grove_text(PARENT, {"greedy": greedy})
    text = text.replace("  - name: seed\n", "  - name: greedy\n    profile: greedy\n"
                        "    task: 'true'\n  - name: seed\n")
    g = build(gate_repo, text)
    problems = policy.compare(g.by_name["seed"], g.by_name["greedy"])
    assert [p.split(":")[0] for p in problems] == ["user", "readOnlyRoot", "network",
                                                   "access", "host"]
    assert policy.compare(g.by_name["seed"], g.by_name["seed"]) == []


def test_workspace_mode_never_widens() -> None:
    """workspace is grove-wide today, so no manifest can make a child differ: pure check."""
    with tempfile.TemporaryDirectory() as tmp:
        g = build(Path(tmp), grove_text(PARENT, {}))
    seed = g.by_name["seed"]
    assert policy.compare(seed, dataclasses.replace(seed, workspace="shared")) == [
        "workspace: would get shared; the parent has worktree"]
    assert policy.compare(seed, dataclasses.replace(seed, workspace="clone")) == []


def test_inbox_request_asking_for_more_gets_every_reason_back(gate_repo: Path,
                                                              engine: Any) -> None:
    local = {"runtime": "local", "user": "1000", "resources": {"memory": "1Gi"}}
    greedy = {"runtime": "local", "user": "0", "network": "host",
              "resources": {"memory": "4Gi"}}
    write_grove(gate_repo, "gate", grove_text(local, {"greedy": greedy}))
    git(gate_repo, "add", "-A")
    git(gate_repo, "commit", "-qm", "grove")
    box = gate_repo / ".engine/inbox/gate/seed"
    box.mkdir(parents=True)
    (box / "req-r1.json").write_text(json.dumps({"kind": "SpawnRequest", "spec": {
        "name": "kid", "task": "true", "profile": "greedy"}}))
    assert engine("apply", "--auto-approve").code == 0
    res = json.loads((box / "res-r1.json").read_text())
    assert res["status"] == "rejected"
    assert res["reason"].startswith("child kid would get more than its parent seed: user: ")
    for field in ("; network: would get host", "; resources.memory: would get 4Gi"):
        assert field in res["reason"], res["reason"]
    assert not (gate_repo / "groves/gate/spawned.yaml").exists()


# -- property: a child resolved from its parent's own profile always passes --------------

PROFILES = st.fixed_dictionaries({
    "runtime": st.sampled_from(["local", "docker", "kubernetes"]),
    "user": st.sampled_from(["1000", "0", "1000:1000", "4242"]),
    "readOnlyRoot": st.booleans(),
    "privileged": st.booleans(),
    "access": st.sampled_from(["read-only", "read-write"]),
    "network": st.sampled_from(["none", "host", "agents"]),
    "resources": st.fixed_dictionaries({
        "cpus": st.none() | st.sampled_from([0.5, 1, 4]),
        "memory": st.none() | st.sampled_from(["512Mi", "2Gi", 1000000]),
        "pids": st.none() | st.integers(16, 4096)}),
    "mounts": st.lists(st.fixed_dictionaries({
        "source": st.sampled_from(["a", "b"]), "target": st.sampled_from(["/a", "/b"]),
        "readOnly": st.booleans()}), max_size=2, unique_by=lambda m: m["target"]),
    "credentials": st.dictionaries(st.sampled_from(["TOKEN", "KEY"]), st.sampled_from(
        [{"fromEnv": "ONE"}, {"fromFile": "/run/two"}]), max_size=2),
})


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(profile=PROFILES, host=st.sampled_from([None, "tcp://h.invalid:2375"]),
       duration=st.sampled_from([None, "1h"]))
def test_a_child_identical_to_its_parent_passes(profile: dict[str, Any], host: str | None,
                                                duration: str | None) -> None:
    profile = {**profile, "image": "engine/agent:test"}
    if host and profile["runtime"] == "docker":
        profile["host"] = host
    spec = {"defaults": {"maxDuration": duration}} if duration else {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        text = grove_text(profile, {}, spec=spec).replace(
            "  - name: seed\n", "  - name: kid\n    task: 'true'\n    spawnedBy: seed\n"
            "  - name: seed\n")
        allow_everything()
        opts = desired.Options(user=layers.load_user_config(), resolve_secrets=False,
                               repo_root=root)
        write_grove(root, "gate", text)
        g = desired.build(manifest.load_grove(root / "groves" / "gate", root), opts)
    seed, kid = g.by_name["seed"], g.by_name["kid"]
    assert policy.compare(seed, kid) == []
    assert policy.compare(seed, seed) == []
    assert policy.compare(kid, seed) == []
