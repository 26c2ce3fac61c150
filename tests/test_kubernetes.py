"""Kubernetes runtime: generated objects against the official schemas, the client flow
against the API server stand-in (tests/k8s_apiserver.py, the suite's one stand-in), the
Pod's wrapper and clone scripts run for real (git, tmux), and bad input."""

from __future__ import annotations

import base64
import copy
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from engine import desired, manifest
from engine.desired import DesiredAgent, DesiredGrove
from engine.errors import EngineError, RuntimeUnavailable
from engine.runtimes import FAILED, PENDING, RUNNING, SUCCEEDED, Launch, get
from engine.runtimes import k8s_inbox as inbox
from engine.runtimes import k8s_objects as objs
from engine.runtimes import kubernetes as k8s_rt
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
            "https://git.example.com/org/repo.git"),
        "app.kubernetes.io/name": "grove-engine-agent",
        "app.kubernetes.io/instance": "full-task", "app.kubernetes.io/part-of": "full",
        "app.kubernetes.io/managed-by": "grove-engine"}
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
    # a host name: its addresses come resolved in PodLaunch (tests/test_kubernetes_netpol.py);
    # unresolved, the policy names no remote at all, and DNS only to the cluster DNS
    ("git@github.com:org/r.git", [{"to": [{"namespaceSelector": {"matchLabels": {
        "kubernetes.io/metadata.name": "kube-system"}}, "podSelector": {"matchLabels": {
            "k8s-app": "kube-dns"}}}], "ports": [{"protocol": "UDP", "port": 53},
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
    with pytest.raises(EngineError, match=r"needs spec\.remote"):
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


# -- (b) the client flow against the API server stand-in --------------------------------

KUBE = """\
apiVersion: engine/v1alpha1
kind: Grove
metadata: {{name: kube}}
spec:
  remote: {remote}
  defaults: {{profile: pod, harness: shell}}
  profiles:
    pod:
      runtime: kubernetes
      image: grove-engine/base:latest
      namespace: {namespace}
      kubeconfig: {kubeconfig}
      credentials: {{GIT_TOKEN: {{fromEnv: TEST_GIT_TOKEN}}}}
{extra}
  agents:
    - name: worker
      task: {task}
      restart: {restart}
"""


class Kube:
    """A repository whose grove `kube` runs on the stand-in API server."""

    def __init__(self, repo: Path, api: FakeApiServer) -> None:
        self.repo, self.api = repo, api
        self.remote = repo.parent / "remote.git"
        git(repo.parent, "init", "-q", "--bare", str(self.remote))
        self.kubeconfig = api.kubeconfig(repo.parent / "kubeconfig")
        self.rt = get("kubernetes", repo)

    def grove(self, task: str = "echo hi", namespace: str = "agents",
              kubeconfig: Path | None = None, extra: str = "", restart: str = "never"
              ) -> DesiredGrove:
        write_grove(self.repo, "kube", KUBE.format(
            remote=self.remote, namespace=namespace, task=json.dumps(task),
            kubeconfig=kubeconfig or self.kubeconfig, extra=extra, restart=restart))
        return load(self.repo, "kube")

    def launch(self, agent: DesiredAgent) -> Launch:
        wt = self.repo / ".engine" / "worktrees" / agent.grove / agent.name
        if not wt.exists():
            git(self.repo, "worktree", "add", "-q", "-b", agent.branch, str(wt))
        eng = self.repo / ".engine"
        return Launch(agent=agent, repo_root=self.repo, workdir=wt, git_paths=(),
                      run_dir=eng / "run", inbox=eng / "inbox" / agent.name,
                      log_file=eng / "logs" / f"{agent.name}.log",
                      client=ROOT / "engine" / "client.py",
                      env={"ENGINE_INBOX": str(eng / "inbox" / agent.name),
                           "ENGINE_GROVE": agent.grove, "LOG_LEVEL": "info"},
                      secrets={"GIT_TOKEN": SECRET})

    def objects(self, ns: str = "agents") -> dict[str, dict[str, Any]]:
        return {f"{o['kind']}/{o['metadata']['name']}": o
                for plural in ("configmaps", "secrets", "networkpolicies", "jobs", "pods",
                               "persistentvolumeclaims")
                for o in self.api.items(plural, ns)}


@pytest.fixture
def kube(repo: Path, api: FakeApiServer) -> Kube:
    return Kube(repo, api)


def job_pod(kube: Kube, ns: str = "agents") -> str:
    pods = [p["metadata"]["name"] for p in kube.api.items("pods", ns)]
    assert len(pods) == 1, pods
    return pods[0]


def test_create_applies_every_object_and_pushes_the_branch(kube: Kube) -> None:
    worker = kube.grove().agent("worker")
    kube.rt.create(kube.launch(worker))
    objs_ = kube.objects()
    assert sorted(k for k in objs_ if not k.startswith("Pod/")) == [
        "ConfigMap/kube-worker", "Job/kube-worker", "NetworkPolicy/kube-worker",
        "Secret/kube-worker"]
    for o in objs_.values():
        assert o["metadata"]["labels"]["engine.grove"] == "kube"
        assert o["metadata"]["labels"]["engine.agent"] == "worker"
        assert SECRET not in json.dumps(o) or o["kind"] == "Secret"
    assert [m["manager"] for m in objs_["Job/kube-worker"]["metadata"]["managedFields"]] == [
        "grove-engine"]
    assert base64.b64decode(objs_["Secret/kube-worker"]["data"]["GIT_TOKEN"]).decode() == SECRET
    # the branch the init container clones is on the remote, at the worktree's commit
    assert git(kube.remote, "rev-parse", "refs/heads/engine/kube/worker") == git(
        kube.repo, "rev-parse", "HEAD")
    env = {e["name"]: e["value"] for e in objs_["Job/kube-worker"]["spec"]["template"]["spec"]
           ["containers"][0]["env"]}
    assert env["ENGINE_INBOX"] == "/run/engine/inbox" and env["LOG_LEVEL"] == "info"
    assert str(kube.repo) not in json.dumps(env)
    state = json.loads((kube.repo / ".engine/state/kubernetes/kube.json").read_text())
    assert state["targets"] == [[str(kube.kubeconfig), "", "agents"]]


def test_observe_is_two_lists_per_namespace_and_follows_the_pod(kube: Kube) -> None:
    g = kube.grove()
    worker = g.agent("worker")
    assert kube.rt.observe("kube") == {}
    kube.rt.create(kube.launch(worker))
    kube.api.requests.clear()
    obs = kube.rt.observe("kube")["worker"]
    assert kube.api.requests == [("GET", "/api/v1/namespaces/agents/pods"),
                                 ("GET", "/apis/batch/v1/namespaces/agents/jobs")]
    assert (obs.phase, obs.spec_hash, obs.runtime) == (PENDING, worker.spec_hash, "kubernetes")
    pod = job_pod(kube)
    kube.api.set_pod("agents", pod, "Running")
    assert kube.rt.observe("kube")["worker"].phase == RUNNING
    kube.api.set_pod("agents", pod, "Failed", exit_code=3, reason="Error")
    kube.api.set_job("agents", "kube-worker", "Failed", "BackoffLimitExceeded")
    obs = kube.rt.observe("kube")["worker"]
    assert (obs.phase, obs.exit_code, obs.reason) == (FAILED, 3, "exited 3")
    kube.api.set_pod("agents", pod, "Failed", exit_code=137, reason="OOMKilled")
    assert kube.rt.observe("kube")["worker"].reason == "killed (out of memory)"


def test_observe_pages_through_long_lists(kube: Kube, monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.runtimes import kubernetes as k8s_runtime
    g = kube.grove()
    for name in ("a1", "a2", "a3"):
        agent = DesiredAgent(**{**g.agent("worker").__dict__, "name": name})
        kube.rt.create(kube.launch(agent))
    monkeypatch.setattr(k8s_runtime, "LIST_PAGE", 2)
    kube.api.requests.clear()
    assert sorted(kube.rt.observe("kube")) == ["a1", "a2", "a3"]
    assert len(kube.api.requests) == 4  # two pages of Pods, two of Jobs


def test_reapply_is_idempotent_and_a_finished_agent_is_replaced(kube: Kube) -> None:
    worker = kube.grove().agent("worker")
    kube.rt.create(kube.launch(worker))
    kube.api.set_pod("agents", job_pod(kube), "Running")
    before = {k: o["metadata"]["resourceVersion"] for k, o in kube.objects().items()}
    kube.rt.create(kube.launch(worker))
    after = {k: o["metadata"]["resourceVersion"] for k, o in kube.objects().items()}
    assert after == before
    # finished: create() starts it again (a new Job, a new Pod)
    kube.api.set_pod("agents", job_pod(kube), "Succeeded", exit_code=0)
    kube.api.set_job("agents", "kube-worker", "Complete")
    assert kube.rt.observe("kube")["worker"].phase == SUCCEEDED
    uid = kube.objects()["Job/kube-worker"]["metadata"]["uid"]
    kube.rt.create(kube.launch(worker))
    assert kube.objects()["Job/kube-worker"]["metadata"]["uid"] != uid
    assert kube.rt.observe("kube")["worker"].phase == PENDING


def test_changed_spec_replaces_the_workload(kube: Kube) -> None:
    kube.rt.create(kube.launch(kube.grove("echo one").agent("worker")))
    old = kube.objects()["Job/kube-worker"]["metadata"]["uid"]
    changed = kube.grove("echo two").agent("worker")
    kube.rt.create(kube.launch(changed))
    job = kube.objects()["Job/kube-worker"]
    assert job["metadata"]["uid"] != old
    assert job["spec"]["template"]["spec"]["containers"][0]["args"][-1] == "echo two"
    assert kube.rt.observe("kube")["worker"].spec_hash == changed.spec_hash


def test_switching_to_a_pod_with_network_drops_the_job_and_the_policy(kube: Kube) -> None:
    kube.rt.create(kube.launch(kube.grove().agent("worker")))
    assert "NetworkPolicy/kube-worker" in kube.objects()
    service = kube.grove(extra="      network: bridge", restart="always").agent("worker")
    kube.rt.create(kube.launch(service))
    assert sorted(kube.objects()) == ["ConfigMap/kube-worker", "Pod/kube-worker",
                                      "Secret/kube-worker"]
    kube.api.set_pod("agents", "kube-worker", "Running")
    assert kube.rt.observe("kube")["worker"].phase == RUNNING


def merge_patch(api: FakeApiServer, url_path: str, patch: dict[str, Any], manager: str) -> int:
    import urllib.request
    req = urllib.request.Request(
        f"{api.url}{url_path}?fieldManager={manager}", method="PATCH",
        data=json.dumps(patch).encode(),
        headers={"Content-Type": "application/merge-patch+json",
                 "Authorization": f"Bearer {api.token}"})
    with urllib.request.urlopen(req) as resp:
        return int(resp.status)


def test_conflict_names_the_other_field_manager_and_overwrites_nothing(kube: Kube) -> None:
    worker = kube.grove().agent("worker")
    kube.rt.create(kube.launch(worker))
    kube.api.set_pod("agents", job_pod(kube), "Running")
    url = "/apis/networking.k8s.io/v1/namespaces/agents/networkpolicies/kube-worker"
    assert merge_patch(kube.api, url, {"spec": {"policyTypes": ["Ingress"]}},
                       "kubectl-edit") == 200
    with pytest.raises(EngineError) as err:
        kube.rt.create(kube.launch(worker))
    assert "kubectl-edit" in err.value.summary and ".spec.policyTypes" in err.value.summary
    assert "\n" not in err.value.summary
    pol = kube.objects()["NetworkPolicy/kube-worker"]
    assert pol["spec"]["policyTypes"] == ["Ingress"]


def test_delete_removes_every_object_and_tolerates_absence(kube: Kube) -> None:
    worker = kube.grove().agent("worker")
    kube.rt.create(kube.launch(worker))
    kube.rt.delete("kube", "worker")
    assert kube.objects() == {}
    fresh = get("kubernetes", kube.repo)  # no memory of where the agent was
    fresh.delete("kube", "worker")
    assert fresh.observe("kube") == {}


def test_dependents_are_owned_by_the_workload_and_the_claim_outlives_it(kube: Kube) -> None:
    """The Secret and ConfigMap name the workload with the uid the server gave it, so
    deleting the workload cascades (the stand-in deletes dependents at once); the
    workspace claim and the NetworkPolicy are never owned: the claim holds the work, and
    the policy must hold while a deleted Pod terminates. The policy exists before the
    workload is written (its Pod never runs without it)."""
    def refs() -> dict[str, list[dict[str, Any]]]:
        return {k: o["metadata"].get("ownerReferences") or []
                for k, o in kube.objects().items() if not k.startswith("Pod/")}

    def owner_uid(kind: str = "Job") -> str:
        return str(kube.objects()[f"{kind}/kube-worker"]["metadata"]["uid"])

    extra = "      persistence: 1Gi"
    kube.rt.create(kube.launch(kube.grove(extra=extra).agent("worker")))
    first = owner_uid()
    owned = refs()
    assert sorted(k for k, r in owned.items() if r) == [
        "ConfigMap/kube-worker", "Secret/kube-worker"]
    assert owned["NetworkPolicy/kube-worker"] == []
    for r in owned.values():
        assert r in ([], [{"apiVersion": "batch/v1", "kind": "Job", "name": "kube-worker",
                           "uid": first, "controller": True, "blockOwnerDeletion": True}])
    paths = [p for _, p, _, _ in kube.api.writes]
    policy = next(i for i, p in enumerate(paths) if "/networkpolicies/kube-worker" in p)
    job = next(i for i, p in enumerate(paths) if "/jobs/kube-worker" in p)
    assert policy < job, paths
    kube.rt.stop("kube", "worker")
    assert sorted(kube.objects()) == ["NetworkPolicy/kube-worker",
                                      "PersistentVolumeClaim/kube-worker"]
    assert refs()["PersistentVolumeClaim/kube-worker"] == []
    kube.rt.create(kube.launch(kube.grove(extra=extra).agent("worker")))
    second = owner_uid()
    assert second != first
    assert {r[0]["uid"] for r in refs().values() if r} == {second}
    # a changed spec replaces the Job: the dependents are adopted by the new one
    kube.rt.create(kube.launch(kube.grove("echo two", extra=extra).agent("worker")))
    third = owner_uid()
    assert third != second and {r[0]["uid"] for r in refs().values() if r} == {third}
    # now a Pod (restart: always) owns them, and still not the claim
    kube.rt.create(kube.launch(kube.grove(extra=extra, restart="always").agent("worker")))
    pod = owner_uid("Pod")
    assert {(r[0]["kind"], r[0]["uid"]) for r in refs().values() if r} == {("Pod", pod)}
    assert refs()["PersistentVolumeClaim/kube-worker"] == []
    kube.rt.delete("kube", "worker")
    assert list(kube.objects()) == ["PersistentVolumeClaim/kube-worker"]
    # the engine's delete waits for the workload to be gone before it lifts the policy
    paths = [(m, p) for m, p in kube.api.requests if m == "DELETE"]
    assert paths.index(("DELETE", "/api/v1/namespaces/agents/pods/kube-worker")) < \
        paths.index(("DELETE", "/apis/networking.k8s.io/v1/namespaces/agents/networkpolicies/"
                               "kube-worker")), paths
    assert {(ctype, manager) for _, _, ctype, manager in kube.api.writes} == {
        ("application/apply-patch+yaml", "grove-engine")}


def test_logs_and_follow(kube: Kube) -> None:
    kube.rt.create(kube.launch(kube.grove().agent("worker")))
    pod = job_pod(kube)
    kube.api.set_pod("agents", pod, "Running")
    kube.api.append_log("agents", pod, "line one\nline two\n")
    assert list(kube.rt.logs("kube", "worker")) == ["line one", "line two"]

    def finish() -> None:
        time.sleep(0.3)
        kube.api.append_log("agents", pod, "line three\n")
        kube.api.set_pod("agents", pod, "Succeeded", exit_code=0)
    t = threading.Thread(target=finish)
    t.start()
    assert list(kube.rt.logs("kube", "worker", follow=True)) == [
        "line one", "line two", "line three"]
    t.join()


def test_logs_cut_a_line_without_end(kube: Kube) -> None:
    """A pod's line of 4 MiB without a newline: shown cut, in linear time (the whole line
    was kept, and scanned again at every chunk)."""
    kube.rt.create(kube.launch(kube.grove().agent("worker")))
    pod = job_pod(kube)
    kube.api.set_pod("agents", pod, "Running")
    kube.api.append_log("agents", pod, "first\n" + "x" * (4 << 20) + "\nlast\n" + "y" * 70000)
    t0 = time.monotonic()
    got = list(kube.rt.logs("kube", "worker"))
    mark = f" [line cut at {k8s_rt.MAX_LOG_LINE} bytes]"
    assert got == ["first", "x" * k8s_rt.MAX_LOG_LINE + mark, "last",
                   "y" * k8s_rt.MAX_LOG_LINE + mark]
    assert time.monotonic() - t0 < 60


# -- bad input: cluster, namespace, RBAC ------------------------------------------------

def test_no_kubeconfig_is_one_line_runtime_unavailable(kube: Kube, repo: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    worker = kube.grove(kubeconfig=repo.parent / "missing").agent("worker")
    with pytest.raises(RuntimeUnavailable) as err:
        kube.rt.create(kube.launch(worker))
    assert "no kubeconfig at" in err.value.summary and "\n" not in err.value.summary


@pytest.mark.parametrize(("text", "message"), [
    ("not: [valid", "is not valid YAML at line 1"),
    ("apiVersion: v1\nkind: Config\nclusters: []\ncontexts: []\nusers: []\n",
     "Expected key current-context")])
def test_broken_kubeconfig_is_one_line_runtime_unavailable(kube: Kube, text: str,
                                                           message: str) -> None:
    broken = kube.repo.parent / "broken-kubeconfig"
    broken.write_text(text)
    kube.grove(kubeconfig=broken)
    with pytest.raises(RuntimeUnavailable) as err:
        kube.rt.observe("kube")
    assert message in err.value.summary and "\n" not in err.value.summary


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_unreachable_cluster_fails_plan_with_one_line_and_exit_1(kube: Kube, engine: Any
                                                                 ) -> None:
    cfg = yaml.safe_load(kube.kubeconfig.read_text())
    cfg["clusters"][0]["cluster"]["server"] = f"http://127.0.0.1:{free_port()}"
    dead = kube.repo.parent / "dead-kubeconfig"
    dead.write_text(yaml.safe_dump(cfg))
    kube.grove(kubeconfig=dead)
    res = engine("plan", "-g", "kube")
    assert res.code == 1, res
    lines = res.err.strip().splitlines()
    assert len(lines) == 1 and "cannot reach the cluster" in lines[0], res.err
    assert "connection refused" in lines[0]


def test_missing_namespace_is_a_clear_error(kube: Kube) -> None:
    worker = kube.grove(namespace="nowhere").agent("worker")
    with pytest.raises(EngineError, match="namespace nowhere not found on context fake"):
        kube.rt.create(kube.launch(worker))


@pytest.mark.parametrize(("verb", "resource", "call"), [
    ("list", "pods", "observe"), ("patch", "jobs", "create"), ("delete", "jobs", "delete"),
    ("get", "pods/log", "logs")])
def test_rbac_forbidden_names_verb_and_resource(kube: Kube, verb: str, resource: str,
                                                call: str) -> None:
    worker = kube.grove().agent("worker")
    kube.rt.create(kube.launch(worker))
    kube.api.set_pod("agents", job_pod(kube), "Running")
    kube.api.forbidden.add((verb, resource))
    actions = {"observe": lambda: kube.rt.observe("kube"),
               "create": lambda: kube.rt.create(kube.launch(kube.grove("changed")
                                                            .agent("worker"))),
               "delete": lambda: kube.rt.delete("kube", "worker"),
               "logs": lambda: list(kube.rt.logs("kube", "worker"))}
    with pytest.raises(EngineError) as err:
        actions[call]()
    assert f"RBAC forbids {verb} on {resource} in namespace agents" in err.value.summary
    assert f"grant verb {verb!r} on resource {resource!r}" in err.value.summary
    if call in ("create", "delete"):  # a write names the object it was refused
        assert f"({resource} agents/kube-worker" in err.value.summary
    assert "\n" not in err.value.summary


def test_resource_quota_refusal_names_the_object_and_the_quota(kube: Kube) -> None:
    """A ResourceQuota's refusal is a 403 like RBAC's; it must not read as an RBAC problem."""
    worker = kube.grove().agent("worker")
    kube.api.over_quota.add("jobs")
    with pytest.raises(EngineError) as err:
        kube.rt.create(kube.launch(worker))
    line = err.value.summary
    assert line.startswith("kubernetes: jobs agents/kube-worker refused by the ResourceQuota "
                           "of namespace agents: exceeded quota: agents-quota"), line
    assert "RBAC" not in line and "\n" not in line
    left = {k[0] for k in kube.api.objects if k[1:] == ("agents", "kube-worker")}
    assert not left & {"secrets", "configmaps"}, left  # no unowned Secret lingers
    kube.api.over_quota.clear()
    kube.rt.create(kube.launch(worker))  # room again: the same agent goes through
    assert kube.api.objects.get(("jobs", "agents", "kube-worker"))


def test_wrong_token_is_runtime_unavailable(kube: Kube) -> None:
    kube.api.kubeconfig(kube.kubeconfig, token="wrong")
    kube.grove()
    with pytest.raises(RuntimeUnavailable, match="refused the kubeconfig's credentials"):
        kube.rt.observe("kube")


def test_foreign_object_of_the_same_name_is_not_taken_over(kube: Kube) -> None:
    worker = kube.grove().agent("worker")
    kube.rt.create(kube.launch(worker))
    url = "/apis/batch/v1/namespaces/agents/jobs/kube-worker"
    merge_patch(kube.api, url, {"metadata": {"labels": {"engine.repo": "other"}}}, "someone")
    with pytest.raises(EngineError, match="not owned by this repository"):
        kube.rt.create(kube.launch(worker))


@pytest.mark.parametrize("plural", ["configmaps", "secrets", "networkpolicies"])
def test_a_dependent_someone_else_made_is_never_adopted_written_or_deleted(
        kube: Kube, plural: str) -> None:
    worker = kube.grove().agent("worker")
    key = (plural, "agents", "kube-worker")
    api_version, kind = k8s_api_kinds()[plural]
    theirs = {"apiVersion": api_version, "kind": kind,
              "metadata": {"name": "kube-worker", "namespace": "agents",
                           "labels": {"team-x/only": "yes"}}}
    theirs |= ({"data": {"db-password": "aGVsbG8="}} if plural == "secrets" else
               {"data": {"x": "y"}} if plural == "configmaps" else
               {"spec": {"podSelector": {"matchLabels": {"team-x/only": "yes"}}}})
    kube.api.apply(key, theirs, "team-x", False)
    before = copy.deepcopy(kube.api.objects[key])
    with pytest.raises(EngineError) as err:
        kube.rt.create(kube.launch(worker))
    assert (f"{kind.lower()} agents/kube-worker exists and is not this agent's "
            "(label engine.grove=none") in err.value.summary
    assert kube.api.objects[key] == before  # not merged into, not owned
    assert ("jobs", "agents", "kube-worker") not in kube.api.objects  # nothing started
    kube.rt.delete("kube", "worker")
    kube.rt.stop("kube", "worker")
    assert kube.api.objects[key] == before  # not deleted by name


def k8s_api_kinds() -> dict[str, tuple[str, str]]:
    from tests.k8s_apiserver import KINDS
    return KINDS


# -- the Pod's scripts, run for real: git, tmux, the agent-side client ------------------

class PodDirs:
    """The Pod's paths as host directories; the scripts read them from ENGINE_* vars."""

    def __init__(self, tmp: Path, remote: Path) -> None:
        self.ws, self.eng, self.sec = tmp / "workspace", tmp / "run-engine", tmp / "secrets"
        for d in (self.ws, self.eng / "bin", self.sec, tmp / "home"):
            d.mkdir(parents=True)
        (self.sec / "GIT_TOKEN").write_text(SECRET)
        for name in ("wrapper", "clone"):
            (self.eng / "bin" / name).write_text(objs.script(name))
        shutil.copy(ROOT / "engine" / "client.py", self.eng / "bin" / "engine")
        (self.eng / "bin" / "engine").chmod(0o755)
        self.env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp / "home"),
                    "ENGINE_WORKSPACE": str(self.ws), "ENGINE_DIR": str(self.eng),
                    "ENGINE_SECRETS": str(self.sec), "ENGINE_REMOTE": str(remote),
                    "ENGINE_BRANCH": "engine/kube/worker", "ENGINE_GROVE": "kube",
                    "ENGINE_AGENT": "worker", "ENGINE_INBOX": str(self.eng / "inbox"),
                    "GIT_CONFIG_NOSYSTEM": "1"}
        self.socket = str(self.eng / "tmux.sock")

    def run(self, argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=30,
                              **kw)


def wait_for(check: Any, timeout: float = 10) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
    return value


def test_wrapper_runs_the_harness_in_tmux_and_pushes_work_back(kube: Kube,
                                                               tmp_path: Path) -> None:
    kube.rt.create(kube.launch(kube.grove().agent("worker")))  # pushes the branch
    pod = PodDirs(tmp_path / "pod", kube.remote)
    clone = pod.run(["sh", str(pod.eng / "bin" / "clone")])
    assert clone.returncode == 0, clone.stderr
    task = ('echo "ready token=${GIT_TOKEN:0:5}"; read -r line; echo "$line" > got.txt; '
            'git add got.txt && git commit -qm got; engine spawn helper --task "help me"; '
            "echo scratch > wip.txt; exit 4")
    proc = subprocess.Popen(["bash", str(pod.eng / "bin" / "wrapper"), "bash", "-c", task],
                            env=pod.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        look = inbox.tmux("capture-pane", "-p", "-t", objs.SESSION, socket=pod.socket)
        wait_for(lambda: "ready token=s3cre" in pod.run(look).stdout)
        sent = pod.run(inbox.paste("hello; $(rm -rf /) 'quoted'", socket=pod.socket))
        assert sent.returncode == 0, sent.stderr
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 4, err
    assert "ready token=s3cre" in out  # the session's output is the container log
    assert (pod.ws / "got.txt").read_text() == "hello; $(rm -rf /) 'quoted'\n"
    branch = git(kube.remote, "log", "-1", "--format=%s", "refs/heads/engine/kube/worker")
    assert branch == "got"
    wip = git(kube.remote, "show", "refs/engine/wip/kube/worker:wip.txt")
    assert wip == "scratch"
    # the inbox, as pull_inbox carries it: tar | base64 in the Pod, extract on the host
    packed = pod.run(inbox.pack(str(pod.eng / "inbox")))
    got = inbox.extract(packed.stdout, tmp_path / "host-inbox")
    assert [p.name.startswith("req-") and p.suffix == ".json" for p in got] == [True]
    request = json.loads(got[0].read_text())
    assert (request["kind"], request["spec"]["name"]) == ("SpawnRequest", "helper")
    # and a result back into the Pod
    res = pod.run(inbox.unpack_argv({"res-1.json": b'{"ok": true}'}, str(pod.eng / "inbox")))
    assert res.returncode == 0, res.stderr
    assert (pod.eng / "inbox" / "res-1.json").read_text() == '{"ok": true}'


def test_inbox_sync_pulls_requests_once_and_sends_answers_once(tmp_path: Path) -> None:
    """The exec transport is replaced by running the same argv locally, with the Pod's
    inbox path mapped to a directory: sh, tar and base64 run for real."""
    pod_inbox, host = tmp_path / "pod-inbox", tmp_path / "host-inbox"
    pod_inbox.mkdir()
    (pod_inbox / "req-1.json").write_text('{"id": "1"}')
    (pod_inbox / ".req-2.tmp").write_text("{half")
    calls: list[list[str]] = []

    def run(argv: list[str]) -> str:
        calls.append(argv)
        argv = [a.replace(objs.INBOX, str(pod_inbox)) for a in argv]
        return subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    assert [p.name for p in inbox.sync(run, host)] == ["req-1.json"]
    assert len(calls) == 1
    (host / "res-1.json").write_text('{"accepted": true}')
    assert inbox.sync(run, host) == []
    assert (pod_inbox / "res-1.json").read_text() == '{"accepted": true}'
    assert len(calls) == 3
    assert inbox.sync(run, host) == [] and len(calls) == 4  # nothing new to send


def test_a_request_the_host_took_in_is_never_pulled_again(tmp_path: Path) -> None:
    """An AgentReport is removed from the host inbox once applied, and an answered request's
    answer expires there: neither may come back from the Pod's copy as new (a report
    applied again would set WaitingForInput again after the person answered). A report the
    host has is removed from the Pod at the next pull; a spawn request stays for its
    waiting client."""
    pod_inbox, host = tmp_path / "pod-inbox", tmp_path / "host-inbox"
    pod_inbox.mkdir()
    (pod_inbox / "req-r1.json").write_text('{"kind": "AgentReport", "spec": {}}')
    (pod_inbox / "req-s1.json").write_text('{"kind": "SpawnRequest", "spec": {}}')

    def run(argv: list[str]) -> str:
        argv = [a.replace(objs.INBOX, str(pod_inbox)) for a in argv]
        return subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    assert sorted(p.name for p in inbox.sync(run, host)) == ["req-r1.json", "req-s1.json"]
    (host / "req-r1.json").unlink()  # the report applied and consumed (inbox.consume)
    (host / "req-s1.json").unlink()  # the spawn answered, its answer long expired
    assert inbox.sync(run, host) == []  # neither is taken in twice
    assert sorted(p.name for p in pod_inbox.iterdir()) == ["req-s1.json"]  # report gone
    assert inbox.sync(run, host) == []
    assert sorted(p.name for p in (host / inbox.PULLED).iterdir()) == ["req-s1.json"]
    (pod_inbox / "req-r2.json").write_text('{"kind": "AgentReport", "spec": {}}')
    assert [p.name for p in inbox.sync(run, host)] == ["req-r2.json"]  # new ones still come
    # a link planted at the marker directory's name is removed, never written through
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.rmtree(host / inbox.PULLED)
    (host / inbox.PULLED).symlink_to(elsewhere)
    (pod_inbox / "req-r3.json").write_text('{"kind": "AgentReport", "spec": {}}')
    assert "req-r3.json" in [p.name for p in inbox.sync(run, host)]
    assert list(elsewhere.iterdir()) == [] and (host / inbox.PULLED).is_dir()
    assert not (host / inbox.PULLED).is_symlink()


def test_inbox_extract_refuses_unsafe_archives(tmp_path: Path) -> None:
    import io
    import tarfile
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name in ("./req-1.json", "./.req-2.tmp"):
            info = tarfile.TarInfo(name)
            info.size = 2
            tar.addfile(info, io.BytesIO(b"{}"))
        link = tarfile.TarInfo("./evil")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    got = inbox.extract(base64.b64encode(buf.getvalue()).decode(), tmp_path / "in")
    assert [p.name for p in got] == ["req-1.json"]
    bad = io.BytesIO()
    with tarfile.open(fileobj=bad, mode="w") as tar:
        first = tarfile.TarInfo("./req-3.json")  # fine on its own, before the bad one
        first.size = 2
        tar.addfile(first, io.BytesIO(b"{}"))
        info = tarfile.TarInfo("../escape")
        info.size = 0
        tar.addfile(info, io.BytesIO(b""))
    with pytest.raises(EngineError, match="unsafe file name"):
        inbox.extract(base64.b64encode(bad.getvalue()).decode(), tmp_path / "in")
    assert not (tmp_path / "escape").exists()
    assert not (tmp_path / "in" / "req-3.json").exists()  # all or nothing
    with pytest.raises(EngineError, match="unreadable archive"):
        inbox.extract("not base64 at all!", tmp_path / "in")


@pytest.mark.parametrize("fmt", ["gnu", "posix"])
def test_inbox_extract_skips_sparse_files(tmp_path: Path, fmt: str) -> None:
    """A sparse member is a few bytes in the archive and its whole size unpacked."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "req-1.json").touch()
    os.truncate(src / "req-1.json", 1 << 30)  # all hole
    (src / "req-2.json").write_text("{}")
    made = subprocess.run(["tar", "--sparse", f"--format={fmt}", "-C", str(src), "-cf", "-",
                           "."], capture_output=True, check=True).stdout
    assert len(made) < 64 << 10
    got = inbox.extract(base64.b64encode(made).decode(), tmp_path / "in")
    assert [p.name for p in got] == ["req-2.json"]
    assert sorted(p.name for p in (tmp_path / "in").iterdir()) == ["req-2.json"]


def test_inbox_sync_copies_only_requests_within_limits(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pod_inbox, host = tmp_path / "pod-inbox", tmp_path / "host-inbox"
    pod_inbox.mkdir()
    for name in ("req-1.json", "junk.bin", "notify-1.json", "req-2.txt", "res-9.json"):
        (pod_inbox / name).write_text("{}")

    def run(argv: list[str]) -> str:
        argv = [a.replace(objs.INBOX, str(pod_inbox)) for a in argv]
        return subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    assert [p.name for p in inbox.sync(run, host)] == ["req-1.json"]
    assert sorted(p.name for p in host.iterdir() if p.name != inbox.PULLED) == ["req-1.json"]
    # more members than MAX_MEMBERS: refused whole, nothing written
    monkeypatch.setattr(inbox, "MAX_MEMBERS", 8)
    for i in range(3):
        (pod_inbox / f"req-m{i}.json").write_text("{}")
    with pytest.raises(EngineError, match="inbox: the pod sent an archive of 9 members, more "
                                          "than 8; refused"):
        inbox.sync(run, host)
    assert sorted(p.name for p in host.iterdir() if p.name != inbox.PULLED) == ["req-1.json"]
    # at most MAX_PULL bytes a pull; the rest in the next one (what the host has is skipped)
    monkeypatch.setattr(inbox, "MAX_MEMBERS", 2048)
    monkeypatch.setattr(inbox, "MAX_PULL", 2500)
    for i in range(3):
        (pod_inbox / f"req-m{i}.json").write_text("x" * 1000)
    first = inbox.sync(run, host)
    assert len(first) == 2
    second = inbox.sync(run, host)
    assert len(second) == 1 and not set(first) & set(second)
    assert sorted(p.name for p in host.iterdir() if p.name != inbox.PULLED) == [
        "req-1.json", "req-m0.json", "req-m1.json", "req-m2.json"]


def test_engine_apply_status_destroy_on_the_cluster(kube: Kube, engine: Any) -> None:
    kube.grove()
    git(kube.repo, "add", "-A")
    git(kube.repo, "commit", "-qm", "grove")
    res = engine("apply", "--auto-approve", "-g", "kube")
    assert res.code == 0, res
    assert "Job/kube-worker" in kube.objects()
    kube.api.set_pod("agents", job_pod(kube), "Running")
    res = engine("status", "--json", "-g", "kube")
    assert res.code == 0, res
    agent = json.loads(res.out)["groves"][0]["agents"][0]
    assert (agent["name"], agent["phase"], agent["runtime"]) == ("worker", "Running",
                                                                 "kubernetes")
    res = engine("plan", "--detailed-exitcode", "-g", "kube")
    assert res.code == 0, res
    res = engine("destroy", "--auto-approve", "-g", "kube")
    assert res.code == 0, res
    assert kube.objects() == {}


def test_kind_workflow_grove_is_valid_and_builds_valid_objects(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GIT_TOKEN", "x")
    flow = yaml.safe_load((ROOT / "docs" / "examples" / "kind-e2e.yml").read_text())
    steps = {s["name"]: s for s in flow["jobs"]["kind"]["steps"] if "name" in s}
    script = steps["Write the end-to-end grove"]["run"]
    text = script.split("<<YAML\n", 1)[1].split("\nYAML\n", 1)[0]
    text = (text.replace("$GROVE", "e2e-123").replace("${{ github.repository }}", "o/r")
            .replace("\\$", "$"))
    write_grove(tmp_path, "e2e-123", text)
    g = load(tmp_path, "e2e-123")
    writer = g.agent("writer")
    assert (writer.runtime, writer.extra("imagePullPolicy")) == ("kubernetes", "Never")
    for obj in objs.build(writer, pod_launch(writer, g.remote), {"GIT_TOKEN": "x"}):
        validate(obj)
    assert "engine apply --auto-approve --wait" in steps["Apply and wait"]["run"]
