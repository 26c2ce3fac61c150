"""Kubernetes runtime: generated objects against the official schemas, the client flow
against the API server stand-in (tests/k8s_apiserver.py, the suite's one stand-in), the
Pod's wrapper and clone scripts run for real (git, tmux), and bad input."""

from __future__ import annotations

import base64
import json
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from engine import desired, manifest
from engine.desired import DesiredAgent, DesiredGrove
from engine.errors import EngineError, InvalidManifests, RuntimeUnavailable
from engine.runtimes import FAILED, PENDING, RUNNING, SUCCEEDED, Launch, get
from engine.runtimes import k8s_inbox as inbox
from engine.runtimes import k8s_objects as objs
from tests.conftest import ROOT, git, write_grove
from tests.k8s_apiserver import FakeApiServer

K8S_VERSIONS = (kubernetes_validate.utils.all_versions()[0],
                kubernetes_validate.utils.latest_version())
SECRET = "s3cret-token-value"


def load(root: Path, name: str) -> DesiredGrove:
    return desired.build(manifest.load_grove(root / "groves" / name, root),
                         desired.Options(repo_root=root, secret_key=b"test"))


def pod_launch(agent: DesiredAgent, remote: str = "https://git.example.com/org/repo.git"
               ) -> objs.PodLaunch:
    env = objs.pod_env(agent, {"ENGINE_INBOX": "/host/repo/.engine/inbox"}, ("/host/",), remote)
    return objs.PodLaunch("agents", remote, env, "0.1.0", objs.repo_label(remote),
                          (ROOT / "engine" / "client.py").read_text())


def validate(obj: dict[str, Any]) -> None:
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(obj, version, strict=True)


# -- (a) every object, every example grove, official schemas ---------------------------

def as_kubernetes(text: str) -> str:
    """An example grove with every profile moved to the kubernetes runtime: the change a
    user makes (plus a remote, and an image where the local profile had none)."""
    doc = yaml.safe_load(text)
    doc["spec"]["remote"] = "https://git.example.com/org/repo.git"
    for prof in doc["spec"].get("profiles", {}).values():
        prof["runtime"] = "kubernetes"
        prof.setdefault("image", "grove-engine/base:latest")
    return yaml.safe_dump(doc)


EXAMPLES = sorted(p.parent.name for p in (ROOT / "groves").glob("*/grove.yaml"))

FULL = """\
apiVersion: engine/v1alpha1
kind: Grove
metadata: {name: full}
spec:
  remote: https://10.0.0.7:8443/org/repo.git
  defaults: {profile: pod, harness: shell}
  profiles:
    pod:
      runtime: kubernetes
      image: registry.example.com/agents/base:1.2
      namespace: agents
      context: prod
      kubeconfig: ~/.kube/prod
      runtimeClassName: gvisor
      serviceAccountName: agent
      nodeSelector: {pool: agents, kubernetes.io/arch: amd64}
      tolerations: [{key: dedicated, operator: Equal, value: agents, effect: NoSchedule}]
      imagePullPolicy: IfNotPresent
      imagePullSecrets: [regcred]
      persistence: 10Gi
      user: "1000:2000"
      resources: {cpus: 0.5, memory: 768Mi, pids: 256}
      env: {LOG_LEVEL: debug}
      credentials:
        GIT_TOKEN: {fromEnv: TEST_GIT_TOKEN}
        GIT_SSH_KEY: {fromEnv: TEST_SSH_KEY}
      spawn: {allowProfiles: [reader]}
    reader:
      runtime: kubernetes
      image: grove-engine/base:latest
      access: read-only
      network: bridge
      readOnlyRoot: false
  agents:
    - {name: task, task: make test, maxDuration: 30m, role: You test.}
    - {name: service, task: serve, restart: always}
    - {name: retrier, task: flaky, restart: on-failure}
    - {name: reviewer, profile: reader, task: git log}
"""


@pytest.fixture(autouse=True)
def creds(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    values = {"TEST_GIT_TOKEN": SECRET, "TEST_SSH_KEY": "-----BEGIN KEY-----\nabc\n"}
    for k, v in values.items():
        monkeypatch.setenv(k, v)
    return values


def all_example_agents(root: Path) -> list[DesiredAgent]:
    for name in EXAMPLES:
        write_grove(root, name, as_kubernetes((ROOT / "groves" / name / "grove.yaml")
                                              .read_text()))
    write_grove(root, "full", FULL)
    return [a for g in [*EXAMPLES, "full"] for a in load(root, g).agents]


def test_every_generated_object_validates_against_oldest_and_newest_kubernetes(
        tmp_path: Path, creds: dict[str, str]) -> None:
    kinds = set()
    agents = all_example_agents(tmp_path)
    assert len(agents) >= 8
    for agent in agents:
        values = {c.name: "value" for c in agent.credentials}
        for obj in objs.build(agent, pod_launch(agent), values):
            validate(obj)
            kinds.add(obj["kind"])
    assert kinds == {"ConfigMap", "Secret", "PersistentVolumeClaim", "NetworkPolicy", "Job",
                     "Pod"}


def test_schema_validation_rejects_a_broken_object(tmp_path: Path) -> None:
    agent = all_example_agents(tmp_path)[0]
    job = objs.workload(agent, pod_launch(agent))
    job["spec"]["template"]["spec"]["containers"][0]["securityContext"]["runAsNonRoot"] = "yes"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(job)


def test_pod_is_hardened_and_carries_no_secret_values(tmp_path: Path,
                                                      creds: dict[str, str]) -> None:
    write_grove(tmp_path, "full", FULL)
    g = load(tmp_path, "full")
    task = g.agent("task")
    built = {o["kind"]: o for o in objs.build(task, pod_launch(task),
                                              {"GIT_TOKEN": SECRET, "GIT_SSH_KEY": "k"})}
    job = built["Job"]
    spec = job["spec"]["template"]["spec"]
    assert job["spec"]["backoffLimit"] == 0 and spec["restartPolicy"] == "Never"
    assert spec["securityContext"] == {
        "runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 2000, "fsGroup": 2000,
        "fsGroupChangePolicy": "OnRootMismatch", "seccompProfile": {"type": "RuntimeDefault"}}
    for c in [*spec["initContainers"], *spec["containers"]]:
        assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert c["resources"] == {"requests": {"cpu": "500m", "memory": "768Mi"},
                                  "limits": {"cpu": "500m", "memory": "768Mi"}}
        assert c["imagePullPolicy"] == "IfNotPresent"
    assert spec["activeDeadlineSeconds"] == 1800
    assert spec["automountServiceAccountToken"] is False
    assert (spec["runtimeClassName"], spec["serviceAccountName"]) == ("gvisor", "agent")
    assert spec["nodeSelector"] == {"pool": "agents", "kubernetes.io/arch": "amd64"}
    assert spec["tolerations"][0]["key"] == "dedicated"
    assert spec["imagePullSecrets"] == [{"name": "regcred"}]
    vols = {v["name"]: v for v in spec["volumes"]}
    assert vols["secrets"]["secret"] == {"secretName": "full-task", "defaultMode": 0o400}
    assert vols["workspace"] == {"name": "workspace",
                                 "persistentVolumeClaim": {"claimName": "full-task"}}
    main = spec["containers"][0]
    assert {m["mountPath"]: m["readOnly"] for m in main["volumeMounts"]}["/run/secrets"]
    assert main["args"] == ["bash", "-c", "make test"]
    env = {e["name"]: e["value"] for e in main["env"]}
    assert env["ENGINE_INBOX"] == "/run/engine/inbox" and env["LOG_LEVEL"] == "debug"
    assert "GIT_TOKEN" not in env and "/run/secrets/GIT_TOKEN" in env["GIT_CONFIG_VALUE_0"]
    for kind in ("Job", "ConfigMap", "NetworkPolicy", "PersistentVolumeClaim"):
        assert SECRET not in json.dumps(built[kind])
    assert base64.b64decode(built["Secret"]["data"]["GIT_TOKEN"]).decode() == SECRET
    assert job["metadata"]["labels"] == {
        "engine.grove": "full", "engine.agent": "task", "engine.spec-hash": task.spec_hash,
        "engine.version": "0.1.0", "engine.repo": objs.repo_label(
            "https://git.example.com/org/repo.git")}
    assert built["ConfigMap"]["data"]["instructions"] == "You test."


def test_restart_policies_network_and_access(tmp_path: Path, creds: dict[str, str]) -> None:
    write_grove(tmp_path, "full", FULL)
    g = load(tmp_path, "full")
    service = objs.workload(g.agent("service"), pod_launch(g.agent("service")))
    assert (service["kind"], service["spec"]["restartPolicy"]) == ("Pod", "Always")
    retrier = objs.workload(g.agent("retrier"), pod_launch(g.agent("retrier")))
    assert retrier["spec"]["restartPolicy"] == "OnFailure"
    reviewer = g.agent("reviewer")
    assert objs.network_policy(reviewer, pod_launch(reviewer)) is None
    spec = objs.workload(reviewer, pod_launch(reviewer))["spec"]["template"]["spec"]
    main = spec["containers"][0]
    assert {m["mountPath"]: m["readOnly"] for m in main["volumeMounts"]}["/workspace"] is True
    assert {m["mountPath"]: m["readOnly"] for m in spec["initContainers"][0]["volumeMounts"]
            }["/workspace"] is False
    assert main["securityContext"]["readOnlyRootFilesystem"] is False
    assert objs.claim(reviewer, pod_launch(reviewer)) is None


@pytest.mark.parametrize(("remote", "egress"), [
    ("https://10.0.0.7:8443/r.git", [{"ports": [{"protocol": "TCP", "port": 8443}],
                                      "to": [{"ipBlock": {"cidr": "10.0.0.7/32"}}]}]),
    ("git@github.com:org/r.git", [{"ports": [{"protocol": "TCP", "port": 22}]},
                                  {"ports": [{"protocol": "UDP", "port": 53},
                                             {"protocol": "TCP", "port": 53}]}]),
    ("https://github.com/org/r.git", [{"ports": [{"protocol": "TCP", "port": 443}]},
                                      {"ports": [{"protocol": "UDP", "port": 53},
                                                 {"protocol": "TCP", "port": 53}]}]),
    ("/srv/git/r.git", []),
])
def test_network_none_denies_all_but_the_git_remote(tmp_path: Path, remote: str,
                                                    egress: list[Any]) -> None:
    agent = all_example_agents(tmp_path)[0]
    pol = objs.network_policy(agent, pod_launch(agent, remote))
    assert pol is not None
    assert pol["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert pol["spec"]["ingress"] == [] and pol["spec"]["egress"] == egress
    validate(pol)


def test_long_names_fit_kubernetes_limits() -> None:
    name = objs.object_name("g" * 40, "a" * 40)
    assert len(name) <= 52 and name != objs.object_name("g" * 40, "a" * 39 + "b")
    assert objs.object_name("demo", "coder") == "demo-coder"
    assert objs.label_value("0.1.0+dev") == "0.1.0-dev"


# -- bad input that validation or the object builder refuses ---------------------------

KUBE_ONLY = {"namespace": "agents", "context": "prod", "kubeconfig": "~/.kube/x",
             "runtimeClassName": "gvisor", "serviceAccountName": "sa",
             "nodeSelector": {"a": "b"}, "tolerations": [{"operator": "Exists"}],
             "imagePullPolicy": "Always", "imagePullSecrets": ["x"], "persistence": "1Gi"}


@pytest.mark.parametrize("runtime", ["local", "docker"])
@pytest.mark.parametrize("field", sorted(KUBE_ONLY))
def test_kubernetes_only_fields_are_refused_on_other_runtimes(
        repo: Path, engine: Any, runtime: str, field: str) -> None:
    prof = {"runtime": runtime, "image": "x:1", field: KUBE_ONLY[field]}
    doc = {"apiVersion": "engine/v1alpha1", "kind": "Grove", "metadata": {"name": "bad"},
           "spec": {"defaults": {"profile": "p", "harness": "shell"},
                    "profiles": {"p": prof}, "agents": [{"name": "a", "task": "true"}]}}
    write_grove(repo, "bad", yaml.safe_dump(doc))
    res = engine("validate")
    assert res.code == 1
    assert f"field {field!r} only applies to runtime kubernetes, not {runtime}" in res.err
    assert "groves/bad/grove.yaml:" in res.err


def test_docker_host_is_refused_on_kubernetes(repo: Path, engine: Any) -> None:
    write_grove(repo, "bad", """\
apiVersion: engine/v1alpha1
kind: Grove
metadata: {name: bad}
spec:
  profiles: {p: {runtime: kubernetes, image: x, host: "tcp://h:2375"}}
  agents: [{name: a, profile: p, task: "true"}]
""")
    res = engine("validate")
    assert res.code == 1 and "field 'host' only applies to runtime docker" in res.err


def test_builder_refuses_mounts_missing_remote_and_embedded_tokens(tmp_path: Path) -> None:
    agent = all_example_agents(tmp_path)[0]
    with pytest.raises(EngineError, match="needs spec.remote"):
        objs.check(agent, "")
    with pytest.raises(EngineError, match="must not embed a password or token"):
        objs.check(agent, "https://user:tok@github.com/o/r.git")
    objs.check(agent, "ssh://git@github.com/o/r.git")
    mounted = desired.DesiredAgent(**{**agent.__dict__,
                                      "mounts": (("data", "/data", True),)})
    with pytest.raises(EngineError, match="mounts, which the kubernetes runtime refuses"):
        objs.check(mounted, "https://x/r.git")
    root = desired.DesiredAgent(**{**agent.__dict__, "user": "0"})
    with pytest.raises(EngineError, match="user 0 is root"):
        objs.check(root, "https://x/r.git")
