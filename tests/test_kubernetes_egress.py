"""Kubernetes runtime, `network: egress`: the namespace's egress gateway (Deployment,
Service, ConfigMaps, NetworkPolicies) and the agent's side (proxy variables from its
Secret, a NetworkPolicy that reaches only the gateway, DNS and the git remote).

Objects are validated against the official schemas as in test_kubernetes.py; the client
flow runs against the API server stand-in (tests/k8s_apiserver.py, extended here with
Deployments and Services); the gateway itself runs for real, from the files of its code
ConfigMap laid out as the kubelet lays out a ConfigMap volume, with the command line of
its Deployment, on loopback sockets."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from engine.desired import DesiredAgent
from engine.errors import EngineError
from engine.runtimes import k8s_objects as objs
from tests import k8s_apiserver
from tests.conftest import git, write_grove
from tests.k8s_apiserver import FakeApiServer
from tests.test_kubernetes import SECRET, Kube, free_port, load, pod_launch, validate

TOKEN = "tok-3b1f0c9e5a7d4c2b8e6f1a0d9c8b7a6f"

GROVE = """\
apiVersion: engine/v1alpha1
kind: Grove
metadata: {name: net}
spec:
  remote: https://git.example.com/org/repo.git
  defaults: {profile: pod, harness: shell}
  profiles:
    pod:
      runtime: kubernetes
      image: registry.example.com/agents/base:1.2
      namespace: agents
      network: egress
      egress: [api.anthropic.com:443, github.com:443, models.example.com:8443]
      imagePullPolicy: IfNotPresent
      imagePullSecrets: [regcred]
      credentials: {GIT_TOKEN: {fromEnv: TEST_GIT_TOKEN}}
  agents:
    - {name: coder, task: make test}
    - {name: server, task: serve, restart: always}
"""


@pytest.fixture(autouse=True)
def creds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_GIT_TOKEN", SECRET)


def agents(root: Path) -> dict[str, DesiredAgent]:
    write_grove(root, "net", GROVE)
    return {a.name: a for a in load(root, "net").agents}


def everything(agent: DesiredAgent, pl: objs.PodLaunch, token: str = TOKEN
               ) -> list[dict[str, Any]]:
    """Every object the engine applies for one egress agent, and the bodies it applies to
    forget it (the policies without its key, the NetworkPolicy for what is left)."""
    return [*objs.gateway_objects(agent, pl, token),
            *objs.build(agent, pl, {"GIT_TOKEN": SECRET}, token),
            objs.gateway_policies(pl.namespace), objs.gateway_network_policy(pl.namespace, [])]


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container["env"]}


# -- the objects: schemas, the token, the NetworkPolicies ------------------------------

def test_egress_objects_validate_against_oldest_and_newest_kubernetes(tmp_path: Path) -> None:
    kinds = set()
    for agent in agents(tmp_path).values():
        for obj in everything(agent, pod_launch(agent)):
            validate(obj)
            kinds.add(obj["kind"])
    assert kinds == {"ConfigMap", "Secret", "NetworkPolicy", "Deployment", "Service", "Job",
                     "Pod"}


def test_the_token_is_only_in_the_agents_secret(tmp_path: Path) -> None:
    for agent in agents(tmp_path).values():
        pl = pod_launch(agent)
        built = everything(agent, pl)
        secrets = [o for o in built if o["kind"] == "Secret"]
        assert len(secrets) == 1
        for obj in built:
            if obj["kind"] == "Secret":
                continue
            text = json.dumps(obj)
            for form in (TOKEN, base64.b64encode(TOKEN.encode()).decode()):
                assert form not in text, obj["kind"]
            assert objs.EGRESS_PROXY_KEY not in obj.get("data", {})
        url = base64.b64decode(secrets[0]["data"][objs.EGRESS_PROXY_KEY]).decode()
        assert url == (f"http://net%2F{agent.name}:{TOKEN}@engine-egress.agents.svc:3128")
        assert objs.proxy_token(url) == TOKEN
        assert base64.b64decode(secrets[0]["data"]["GIT_TOKEN"]).decode() == SECRET
        # the policy holds the digest of the token, under the agent's key
        policies = objs.gateway_objects(agent, pl, TOKEN)[1]
        doc = json.loads(policies["data"][f"net.{agent.name}.json"])
        assert doc == {"grove": "net", "agent": agent.name,  # git goes through it too
                       "allow": ["api.anthropic.com:443", "github.com:443",
                                 "models.example.com:8443", "git.example.com:443"],
                       "tokenSha256": hashlib.sha256(TOKEN.encode()).hexdigest()}
        # the agent reads it from its Secret, never from a plain value
        spec = objs.pod_spec(agent, pl)
        for c in [*spec["initContainers"], *spec["containers"]]:
            env = env_of(c)
            for name in objs.PROXY_VARS:
                assert env[name] == {"name": name, "valueFrom": {"secretKeyRef": {
                    "name": f"net-{agent.name}", "key": objs.EGRESS_PROXY_KEY}}}
            assert env["NO_PROXY"]["value"] == "localhost,127.0.0.1"  # https: the gateway
            assert env["no_proxy"]["value"] == env["NO_PROXY"]["value"]


def test_a_new_token_changes_only_the_secret_and_the_digest(tmp_path: Path) -> None:
    agent = agents(tmp_path)["coder"]
    pl = pod_launch(agent)
    one, two = everything(agent, pl, "a" * 43), everything(agent, pl, "b" * 43)
    changed = [a["kind"] + "/" + a["metadata"]["name"] for a, b in zip(one, two, strict=True)
               if a != b]
    assert changed == ["ConfigMap/engine-egress-policies", "Secret/net-coder"]


def tcp(port: int, *cidrs: str) -> dict[str, Any]:
    return {"to": [{"ipBlock": {"cidr": c}} for c in cidrs],
            "ports": [{"protocol": "TCP", "port": port}]}


RESOLVED = ("192.0.2.10", "2001:db8::10")  # as k8s_net.remote_addresses returns them


@pytest.mark.parametrize(("remote", "git_rules"), [
    # https goes through the gateway: no rule of its own, whatever names the host
    ("https://10.0.0.7:8443/r.git", []),
    ("https://github.com/org/r.git", []),
    # ssh, git:// and plain http speak no HTTP proxy: exactly the remote, directly
    ("git@github.com:org/r.git", [tcp(22, "192.0.2.10/32", "2001:db8::10/128")]),
    ("ssh://git@10.0.0.7:2222/r.git", [tcp(2222, "10.0.0.7/32")]),
    ("git://[2001:db8::7]/r.git", [tcp(9418, "2001:db8::7/128")]),
    ("http://192.0.2.5/r.git", [tcp(80, "192.0.2.5/32")]),
    ("/srv/git/r.git", []),
])
def test_agent_reaches_only_the_gateway_dns_and_the_git_remote(
        tmp_path: Path, remote: str, git_rules: list[Any]) -> None:
    agent = agents(tmp_path)["coder"]
    addresses = RESOLVED if objs.resolve_target(agent, remote) else ()
    pl = replace(pod_launch(agent, remote), remote_addresses=addresses)
    pol = objs.network_policy(agent, pl)
    assert pol is not None
    validate(pol)
    spec = pol["spec"]
    assert spec["podSelector"] == {"matchLabels": {"engine.grove": "net",
                                                   "engine.agent": "coder"}}
    assert spec["policyTypes"] == ["Ingress", "Egress"] and spec["ingress"] == []
    gateway = {"to": [{"podSelector": {"matchLabels": {"engine.egress": "gateway"}}}],
               "ports": [{"protocol": "TCP", "port": 3128}]}
    dns = {"to": [{"namespaceSelector": {"matchLabels": {
                       "kubernetes.io/metadata.name": "kube-system"}},
                   "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}],
           "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]}
    assert spec["egress"] == [gateway, dns, *git_rules]
    # and the Pod carries the label the gateway admits
    workload = objs.workload(agent, pod_launch(agent, remote))
    labels = workload["spec"]["template"]["metadata"]["labels"]
    assert labels["engine.egress"] == "client"
    # the gateway's list has the remote exactly when git goes through it
    via, allowed = objs.remote_via_gateway(remote), objs.allowed(agent, remote)
    assert bool(via) == remote.startswith("https://")
    assert allowed[:len(agent.egress)] == list(agent.egress) and len(set(allowed)) == len(
        allowed) and (not via or via in allowed)
    # network: none keeps its own policy (the remote and the cluster DNS), no gateway
    none = DesiredAgent(**{**agent.__dict__, "network": "none", "egress": ()})
    none_pol = objs.network_policy(none, pod_launch(none, remote))
    assert none_pol is not None and gateway not in none_pol["spec"]["egress"]


def test_gateway_network_policy_admits_agents_and_opens_the_endpoint_ports(
        tmp_path: Path) -> None:
    agent = agents(tmp_path)["coder"]
    pol = objs.gateway_objects(agent, pod_launch(agent), TOKEN)[4]
    validate(pol)
    spec = pol["spec"]
    assert pol["metadata"]["name"] == "engine-egress-gateway"
    assert spec["podSelector"] == {"matchLabels": {"engine.egress": "gateway"}}
    assert spec["ingress"] == [{"from": [{"podSelector": {"matchLabels": {
        "engine.egress": "client"}}}], "ports": [{"protocol": "TCP", "port": 3128}]}]
    assert spec["egress"][1] == {"ports": [{"protocol": "TCP", "port": 443},
                                           {"protocol": "TCP", "port": 8443}]}
    assert spec["egress"][0]["ports"] == [{"protocol": "UDP", "port": 53},
                                          {"protocol": "TCP", "port": 53}]


def test_gateway_pod_is_hardened_and_runs_the_shipped_code(tmp_path: Path) -> None:
    agent = agents(tmp_path)["coder"]
    code, policies, deployment, service, _ = objs.gateway_objects(agent, pod_launch(agent),
                                                                  TOKEN)
    assert deployment["metadata"]["name"] == service["metadata"]["name"] == "engine-egress"
    assert deployment["spec"]["replicas"] == 1
    spec = deployment["spec"]["template"]["spec"]
    assert spec["automountServiceAccountToken"] is False
    assert spec["enableServiceLinks"] is False
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] != 0
    assert spec["imagePullSecrets"] == [{"name": "regcred"}]
    for c in spec["containers"]:
        assert c["image"] == "registry.example.com/agents/base:1.2"
        assert c["imagePullPolicy"] == "IfNotPresent"
        assert c["securityContext"] == {
            "allowPrivilegeEscalation": False, "privileged": False,
            "capabilities": {"drop": ["ALL"]}, "readOnlyRootFilesystem": True,
            "runAsNonRoot": True}
    main = spec["containers"][0]
    assert main["command"][:4] == ["python3", "-s", "-m", "engine.egress.gateway"]
    assert "--listen" in main["command"] and "0.0.0.0:3128" in main["command"]
    vols = {v["name"]: v for v in spec["volumes"]}
    assert vols["policies"]["configMap"]["name"] == "engine-egress-policies"
    assert "items" not in vols["policies"]["configMap"]  # a new agent: no new Pod
    shipped = {i["path"] for i in vols["code"]["configMap"]["items"]}
    assert shipped == set(objs.GATEWAY_FILES)
    assert set(code["data"]) == {i["key"] for i in vols["code"]["configMap"]["items"]}
    assert service["spec"]["selector"] == {"engine.egress": "gateway"}
    assert service["spec"]["ports"] == [{"name": "proxy", "port": 3128, "targetPort": 3128,
                                         "protocol": "TCP"}]
    # the recommended labels on every gateway object and its Pods; selectors unchanged
    labels = {"engine.egress": "gateway",
              "app.kubernetes.io/name": "grove-engine-egress-gateway",
              "app.kubernetes.io/instance": "engine-egress",
              "app.kubernetes.io/part-of": "grove-engine",
              "app.kubernetes.io/managed-by": "grove-engine"}
    assert policies["metadata"]["labels"] == labels
    for obj in objs.gateway_objects(agent, pod_launch(agent), TOKEN):
        assert obj["metadata"]["labels"] == labels, obj["kind"]
    assert deployment["spec"]["template"]["metadata"]["labels"] == labels
    assert deployment["spec"]["selector"] == {"matchLabels": {"engine.egress": "gateway"}}


def test_agent_waits_for_the_gateway_before_the_clone(tmp_path: Path) -> None:
    agent = agents(tmp_path)["coder"]
    pl = pod_launch(agent)
    spec = objs.pod_spec(agent, pl)
    # the https clone goes through the gateway, which must know the agent first
    assert [c["name"] for c in spec["initContainers"]] == ["egress", "workspace"]
    wait = spec["initContainers"][0]
    assert wait["command"][:3] == ["python3", "-I", "/run/engine/bin/egress-wait"]
    assert all(m["readOnly"] for m in wait["volumeMounts"])
    assert objs.config_map(agent, pl)["data"]["egress-wait"] == objs.EGRESS_WAIT


def test_loopback_endpoints_are_refused_on_kubernetes(tmp_path: Path) -> None:
    agent = agents(tmp_path)["coder"]
    local = DesiredAgent(**{**agent.__dict__, "egress": ("127.0.0.1:11434",)})
    with pytest.raises(EngineError, match="loopback address"):
        objs.check(local, "https://git.example.com/r.git")
    with pytest.raises(ValueError, match="token"):
        objs.build(agent, pod_launch(agent), {})


# -- the client flow against the API server stand-in -----------------------------------

@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeApiServer]:
    """The stand-in, also serving apps/v1 Deployments and v1 Services (stored as given,
    like its other kinds)."""
    monkeypatch.setitem(k8s_apiserver.KINDS, "deployments", ("apps/v1", "Deployment"))
    monkeypatch.setitem(k8s_apiserver.KINDS, "services", ("v1", "Service"))
    monkeypatch.setattr(k8s_apiserver, "_ROUTE", re.compile(
        r"^/(?:api/v1|apis/batch/v1|apis/apps/v1|apis/networking\.k8s\.io/v1)/namespaces/"
        r"(?P<ns>[^/]+)/(?P<plural>[a-z]+)(?:/(?P<name>[^/]+)(?:/(?P<sub>log))?)?$"))
    server = FakeApiServer(namespaces=("default", "agents"))
    server.start()
    yield server
    server.stop()


PLURALS = ("configmaps", "secrets", "networkpolicies", "jobs", "pods", "services",
           "deployments", "persistentvolumeclaims")
GATEWAY_OBJECTS = ["ConfigMap/engine-egress-code", "ConfigMap/engine-egress-policies",
                   "Deployment/engine-egress", "NetworkPolicy/engine-egress-gateway",
                   "Service/engine-egress"]
EGRESS = """\
      network: egress
      egress: [api.anthropic.com:443, models.example.com:8443]"""


class EgressKube(Kube):
    def objects(self, ns: str = "agents") -> dict[str, dict[str, Any]]:
        return {f"{o['kind']}/{o['metadata']['name']}": o
                for plural in PLURALS for o in self.api.items(plural, ns)}

    def token(self, name: str) -> str:
        data = self.objects()[f"Secret/{name}"]["data"]
        return objs.proxy_token(base64.b64decode(data[objs.EGRESS_PROXY_KEY]).decode())

    def policies(self) -> dict[str, Any]:
        data = self.objects()["ConfigMap/engine-egress-policies"].get("data") or {}
        return {k: json.loads(v) for k, v in data.items()}

    def gateway_ports(self) -> list[int]:
        pol = self.objects()["NetworkPolicy/engine-egress-gateway"]
        return [p["port"] for p in pol["spec"]["egress"][1]["ports"]]


@pytest.fixture
def kube(repo: Path, api: FakeApiServer) -> EgressKube:
    return EgressKube(repo, api)


def test_create_applies_the_gateway_and_the_agent_and_delete_cleans_up(
        kube: EgressKube) -> None:
    worker = kube.grove(extra=EGRESS).agent("worker")
    kube.rt.create(kube.launch(worker))
    found = kube.objects()
    assert sorted(k for k in found if not k.startswith("Pod/")) == sorted([
        *GATEWAY_OBJECTS, "ConfigMap/kube-worker", "Job/kube-worker",
        "NetworkPolicy/kube-worker", "Secret/kube-worker"])
    token = kube.token("kube-worker")
    assert len(token) >= 40
    for key, obj in found.items():  # the token (and its base64) only in the Secret
        if key != "Secret/kube-worker":
            assert token not in json.dumps(obj), key
            assert base64.b64encode(token.encode()).decode()[:40] not in json.dumps(obj), key
    assert kube.policies() == {"kube.worker.json": {
        "grove": "kube", "agent": "worker",
        "allow": ["api.anthropic.com:443", "models.example.com:8443"],
        "tokenSha256": hashlib.sha256(token.encode()).hexdigest()}}
    managers = [m["manager"] for m in
                found["ConfigMap/engine-egress-policies"]["metadata"]["managedFields"]]
    assert managers == ["grove-engine:kube/worker"]
    assert kube.gateway_ports() == [443, 8443]
    job = found["Job/kube-worker"]["spec"]["template"]
    assert job["metadata"]["labels"]["engine.egress"] == "client"
    assert env_of(job["spec"]["containers"][0])["HTTPS_PROXY"]["valueFrom"] == {
        "secretKeyRef": {"name": "kube-worker", "key": objs.EGRESS_PROXY_KEY}}
    # the gateway objects are the namespace's, not the grove's: observe does not see them
    assert sorted(kube.rt.observe("kube")) == ["worker"]

    kube.rt.delete("kube", "worker")
    assert kube.objects() == {}


def test_reapply_keeps_the_token_and_a_new_pod_gets_a_new_one(kube: EgressKube) -> None:
    worker = kube.grove(extra=EGRESS).agent("worker")
    kube.rt.create(kube.launch(worker))
    token = kube.token("kube-worker")
    before = {k: o["metadata"]["resourceVersion"] for k, o in kube.objects().items()}
    kube.rt.create(kube.launch(worker))  # live, same spec: nothing changes
    assert {k: o["metadata"]["resourceVersion"] for k, o in kube.objects().items()} == before
    assert kube.token("kube-worker") == token
    pod = next(k.split("/")[1] for k in kube.objects() if k.startswith("Pod/"))
    kube.api.set_pod("agents", pod, "Succeeded", exit_code=0)
    kube.api.set_job("agents", "kube-worker", "Complete")
    kube.rt.create(kube.launch(worker))  # a new Job: a new token, and its digest
    fresh = kube.token("kube-worker")
    assert fresh != token
    assert kube.policies()["kube.worker.json"]["tokenSha256"] == hashlib.sha256(
        fresh.encode()).hexdigest()


def test_agents_share_the_gateway_until_the_last_one_goes(kube: EgressKube) -> None:
    g = kube.grove(extra=EGRESS)
    worker = g.agent("worker")
    other = DesiredAgent(**{**worker.__dict__, "name": "other", "image": "other/image:2",
                            "egress": ("github.com:22", "github.com:443")})
    kube.rt.create(kube.launch(worker))
    deployment = kube.objects()["Deployment/engine-egress"]
    kube.rt.create(kube.launch(other))
    found = kube.objects()
    assert sorted(kube.policies()) == ["kube.other.json", "kube.worker.json"]
    assert kube.gateway_ports() == [22, 443, 8443]
    # the second agent's image does not roll the gateway
    assert found["Deployment/engine-egress"]["metadata"]["resourceVersion"] == \
        deployment["metadata"]["resourceVersion"]
    assert sorted(m["manager"] for m in
                  found["ConfigMap/engine-egress-policies"]["metadata"]["managedFields"]) == [
        "grove-engine:kube/other", "grove-engine:kube/worker"]

    kube.rt.delete("kube", "worker")
    assert sorted(kube.policies()) == ["kube.other.json"]
    assert kube.gateway_ports() == [22, 443]
    assert all(k in kube.objects() for k in GATEWAY_OBJECTS)
    kube.rt.delete("kube", "other")
    assert kube.objects() == {}


def test_leaving_network_egress_forgets_the_agent(kube: EgressKube) -> None:
    kube.rt.create(kube.launch(kube.grove(extra=EGRESS).agent("worker")))
    assert "Deployment/engine-egress" in kube.objects()
    none = kube.grove().agent("worker")
    kube.rt.create(kube.launch(none))
    found = kube.objects()
    assert not [k for k in found if k in GATEWAY_OBJECTS]
    pol = found["NetworkPolicy/kube-worker"]["spec"]["egress"]
    assert all("podSelector" not in str(rule) for rule in pol)
    assert objs.EGRESS_PROXY_KEY not in found["Secret/kube-worker"]["data"]


def test_a_foreign_deployment_named_like_the_gateway_is_not_taken_over(
        kube: EgressKube) -> None:
    import urllib.request
    body = {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "engine-egress", "namespace": "agents"},
            "spec": {"replicas": 3}}
    req = urllib.request.Request(
        f"{kube.api.url}/apis/apps/v1/namespaces/agents/deployments/engine-egress"
        "?fieldManager=someone", method="PATCH", data=json.dumps(body).encode(),
        headers={"Content-Type": "application/apply-patch+yaml",
                 "Authorization": f"Bearer {kube.api.token}"})
    with urllib.request.urlopen(req) as resp:
        assert resp.status == 201
    with pytest.raises(EngineError, match="not the engine's egress gateway"):
        kube.rt.create(kube.launch(kube.grove(extra=EGRESS).agent("worker")))
    assert kube.objects()["Deployment/engine-egress"]["spec"] == {"replicas": 3}


def test_engine_apply_and_destroy_with_egress(kube: EgressKube, engine: Any) -> None:
    kube.grove(extra=EGRESS)
    git(kube.repo, "add", "-A")
    git(kube.repo, "commit", "-qm", "grove")
    res = engine("apply", "--auto-approve", "-g", "kube")
    assert res.code == 0, res
    assert all(k in kube.objects() for k in GATEWAY_OBJECTS)
    res = engine("destroy", "--auto-approve", "-g", "kube")
    assert res.code == 0, res
    assert kube.objects() == {}


# -- the gateway, run for real from its ConfigMaps --------------------------------------

def kubelet_volume(dest: Path, files: dict[str, str], version: int) -> None:
    """Lay out `files` (path -> text) as the kubelet's atomic writer does for a ConfigMap
    volume: the files in `..<version>/`, `..data` -> it, each top-level entry a symlink
    into `..data`; a new version swaps `..data` at once."""
    dest.mkdir(parents=True, exist_ok=True)
    stamp = f"..{version}"
    for rel, text in files.items():
        (dest / stamp / rel).parent.mkdir(parents=True, exist_ok=True)
        (dest / stamp / rel).write_text(text)
    (dest / "..data_tmp").symlink_to(stamp)
    os.replace(dest / "..data_tmp", dest / "..data")
    tops = {rel.split("/")[0] for rel in files}
    for entry in os.listdir(dest):
        if entry.startswith(".."):
            if entry not in (stamp, "..data"):
                shutil.rmtree(dest / entry)
        elif entry not in tops:
            (dest / entry).unlink()
    for top in tops - set(os.listdir(dest)):
        (dest / top).symlink_to(f"..data/{top}")


def volume_files(cm: dict[str, Any], volume: dict[str, Any]) -> dict[str, str]:
    items = volume["configMap"].get("items")
    data = cm.get("data") or {}
    return {i["path"]: data[i["key"]] for i in items} if items else dict(data)


class Upstream:
    """A TCP echo server on loopback: the endpoint an agent is allowed."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(4096):
                conn.sendall(data)


def connect(port: int, target: str, user: str, token: str) -> tuple[int, socket.socket]:
    """CONNECT through the gateway with Basic proxy credentials: (status, socket)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    cred = base64.b64encode(f"{user}:{token}".encode()).decode()
    s.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n"
              f"Proxy-Authorization: Basic {cred}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(1)
        if not chunk:
            break
        head += chunk
    return int(head.split(b" ")[1]), s


def status(port: int, target: str, user: str, token: str) -> int:
    code, s = connect(port, target, user, token)
    s.close()
    return code


def wait_until(check: Any, timeout: float = 15) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)
    return value


def test_gateway_from_its_configmaps_admits_the_right_token_only(tmp_path: Path) -> None:
    up = Upstream()
    base = agents(tmp_path)["coder"]
    coder = DesiredAgent(**{**base.__dict__, "egress": (f"127.0.0.1:{up.port}",)})
    server = DesiredAgent(**{**base.__dict__, "name": "server",
                             "egress": (f"127.0.0.1:{up.port}",)})
    # the git remote, named by https: on coder's list for git's sake. On loopback, as the
    # gateway runs on this host: `objs.check` (apply, render) refuses a loopback remote,
    # the objects built here without it only carry the list to the gateway under test
    remote = Upstream()
    pl = pod_launch(coder, f"https://127.0.0.1:{remote.port}/org/r.git")
    code_map, policies, deployment, _, _ = objs.gateway_objects(coder, pl, TOKEN)
    spec = deployment["spec"]["template"]["spec"]
    vols = {v["name"]: v for v in spec["volumes"]}
    pod = tmp_path / "gateway-pod"
    where = {objs.GATEWAY_CODE_DIR: pod / "code", objs.GATEWAY_POLICY_DIR: pod / "policies",
             objs.GATEWAY_ROOT: pod / "state"}
    kubelet_volume(where[objs.GATEWAY_CODE_DIR], volume_files(code_map, vols["code"]), 1)
    kubelet_volume(where[objs.GATEWAY_POLICY_DIR],
                   volume_files(policies, vols["policies"]), 1)
    where[objs.GATEWAY_ROOT].mkdir()
    port = free_port()

    def here(text: str) -> str:
        for path, local in where.items():
            text = text.replace(path, str(local))
        return text.replace(f"0.0.0.0:{objs.GATEWAY_PORT}", f"127.0.0.1:{port}")
    main = spec["containers"][0]
    assert main["command"][0] == "python3"
    # -S: no site-packages, so the engine's modules can only come from the ConfigMap
    argv = [sys.executable, "-S", *(here(a) for a in main["command"][1:])]
    env = {e["name"]: here(e["value"]) for e in main["env"]}
    env.update(PATH=os.environ["PATH"], ENGINE_EGRESS_CHECK_EVERY="0.2")
    log = (pod / "gateway.err").open("wb")
    proc = subprocess.Popen(argv, cwd=here(main["workingDir"]), env=env,
                            stdout=log, stderr=log)
    try:
        def ready() -> bool:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port)):
                return True
            assert proc.poll() is None, (pod / "gateway.err").read_text()
            return False
        wait_until(ready)
        target = f"127.0.0.1:{up.port}"
        code, s = connect(port, target, "net/coder", TOKEN)
        assert code == 200
        with s:
            s.sendall(b"ping")
            assert s.recv(4) == b"ping"
        assert status(port, target, "net/coder", TOKEN + "x") == 407
        assert status(port, target, "net/coder", hashlib.sha256(TOKEN.encode()).hexdigest()
                      ) == 407  # the digest from the ConfigMap is no credential
        assert status(port, target, "net/server", TOKEN) == 407  # not yet known
        assert status(port, "github.com:443", "net/coder", TOKEN) == 403  # not listed

        # a real client: curl, with the agent's proxy URL as the Pod gets it
        url = objs.proxy_url(coder, "agents", TOKEN).replace(
            f"engine-egress.agents.svc:{objs.GATEWAY_PORT}", f"127.0.0.1:{port}")
        if shutil.which("curl"):  # 403, not 407: it decoded the id and sent the token
            res = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_connect}",
                                  "--max-time", "5", "-p", "-x", url,
                                  "http://github.com:443/"],
                                 capture_output=True, text=True, timeout=30)
            assert res.stdout == "403", res

        # the egress init container's wait: ready for the right token, not for a wrong one
        wait = [sys.executable, "-I", "-c", objs.EGRESS_WAIT]
        ok = subprocess.run([*wait, "5"], env={"HTTPS_PROXY": url}, capture_output=True,
                            text=True, timeout=30)
        assert ok.returncode == 0 and "is ready" in ok.stdout, ok
        bad = subprocess.run([*wait, "1"], env={"HTTPS_PROXY": url.replace(TOKEN, "nope")},
                             capture_output=True, text=True, timeout=30)
        assert bad.returncode == 1 and "answered 407" in bad.stderr, bad
        assert TOKEN not in bad.stderr and "nope" not in bad.stderr

        # git itself, as the init container clones an https remote: with the Pod's proxy
        # variables it tunnels through the gateway (the remote is an echo server, so TLS
        # then fails: what counts is the gateway's record below)
        home = tmp_path / "git-home"
        home.mkdir()
        res = subprocess.run(["git", "ls-remote", pl.remote],
                             env={"PATH": os.environ["PATH"], "HOME": str(home),
                                  "HTTPS_PROXY": url, "GIT_TERMINAL_PROMPT": "0"},
                             capture_output=True, text=True, timeout=60)
        assert res.returncode != 0 and TOKEN not in res.stderr, res

        # the kubelet updates the policies ConfigMap: a new agent, then the first one gone
        server_token = "s" * 43
        both = {**policies["data"], **objs.gateway_policies(
            "agents", server, server_token)["data"]}
        kubelet_volume(where[objs.GATEWAY_POLICY_DIR], both, 2)
        wait_until(lambda: status(port, target, "net/server", server_token) == 200)
        only = {k: v for k, v in both.items() if k != "net.coder.json"}
        kubelet_volume(where[objs.GATEWAY_POLICY_DIR], only, 3)
        wait_until(lambda: status(port, target, "net/coder", TOKEN) == 407)
        assert status(port, target, "net/server", server_token) == 200
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()
    # every connection is on record in the log the `log` container follows
    log_file = Path(here(objs.GATEWAY_LOG))
    records = [json.loads(line) for line in log_file.read_text().splitlines()]
    verdicts = {(r["agent"], r["status"]) for r in records}
    assert {("coder", 200), ("coder", 403), ("server", 200)} <= verdicts
    assert any(r["agent"] == "coder" and r["status"] == 200
               and r["target"] == f"127.0.0.1:{remote.port}" for r in records)
    # a refused login is never filed under the agent it claimed to be
    assert ("coder", 407) not in verdicts
    assert any(r["status"] == 407 and r["agent"] == "" and r.get("claimed") == "net/coder"
               for r in records)
    assert TOKEN not in log_file.read_text()
    assert "stopped" in (pod / "gateway.err").read_text()
    # in a cluster the rotating log.jsonl is the record: no events.jsonl grows in the pod
    assert not (where[objs.GATEWAY_ROOT] / ".engine" / "events.jsonl").exists()


def test_gateway_reads_a_configmap_key_and_checks_the_digest_strictly(tmp_path: Path) -> None:
    from engine.egress.gateway import load_policy
    d = tmp_path / "agents" / "configmap"
    d.mkdir(parents=True)
    digest = hashlib.sha256(TOKEN.encode()).hexdigest()

    def write(name: str, **doc: Any) -> Path:
        (d / name).write_text(json.dumps({"grove": "net", "agent": "coder",
                                          "allow": ["github.com:443"], **doc}))
        return d / name
    agent = load_policy(write("net.coder.json", tokenSha256=digest))
    assert (agent.grove, agent.name, agent.token, agent.token_sha256) == (
        "net", "coder", None, digest)
    with pytest.raises(ValueError, match="do not match"):
        load_policy(write("net.other.json", tokenSha256=digest))
    with pytest.raises(ValueError, match="64 lowercase hex"):
        load_policy(write("net.coder.json", tokenSha256=digest.upper()))
    with pytest.raises(ValueError, match="exclude each other"):
        load_policy(write("net.coder.json", tokenSha256=digest, token=TOKEN))
    with pytest.raises(ValueError, match="invalid agent name"):
        load_policy(write("net.co.der.json", tokenSha256=digest, agent="co.der"))
