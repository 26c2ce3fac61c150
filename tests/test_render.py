"""`engine render`: the objects apply sends, printed offline. Checked against what `engine
apply` sends to the API server stand-in (tests/k8s_apiserver.py, the suite's one stand-in),
against the official schemas (kubernetes-validate), and for what it must never need (a
cluster, a kubeconfig, the network, a credential's value) or print (a secret value)."""

from __future__ import annotations

import base64
import copy
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from engine import desired, manifest, secrets
from engine.runtimes import k8s_objects as objs
from tests.conftest import ROOT, git, write_grove
from tests.k8s_apiserver import FakeApiServer
from tests.test_kubernetes import validate

SECRET = "render-s3cret-value-9f1c"
PLURALS = {"ConfigMap": "configmaps", "Secret": "secrets", "NetworkPolicy": "networkpolicies",
           "Job": "jobs", "Pod": "pods", "Service": "services", "Deployment": "deployments",
           "PersistentVolumeClaim": "persistentvolumeclaims"}
SERVER_SET = ("uid", "resourceVersion", "generation", "creationTimestamp", "managedFields")

GROVE = """\
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
      namespace: agents
      kubeconfig: {kubeconfig}
      persistence: 1Gi
      resources: {{cpus: 0.5, memory: 512Mi, disk: 4Gi}}
      credentials: {{GIT_TOKEN: {{fromEnv: RENDER_GIT_TOKEN}}}}
    open:
      runtime: kubernetes
      image: grove-engine/base:latest
      namespace: agents
      kubeconfig: {kubeconfig}
      network: egress
      egress: [api.example.com:443, models.example.com:8443]
    here:
      runtime: local
  agents:
    - {{name: worker, task: make test, role: You test.}}
    - {{name: service, task: serve, restart: always, profile: open}}
    - {{name: fetcher, task: fetch, profile: open}}
    - {{name: notes, task: "true", profile: here}}
"""


@pytest.fixture
def grove(repo: Path, api: FakeApiServer, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("RENDER_GIT_TOKEN", SECRET)
    remote = repo.parent / "remote.git"
    git(repo.parent, "init", "-q", "--bare", str(remote))
    kubeconfig = api.kubeconfig(repo.parent / "kubeconfig")
    write_grove(repo, "kube", GROVE.format(remote=remote, kubeconfig=kubeconfig))
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "grove")
    return repo


def rendered(engine: Any, *args: str) -> list[dict[str, Any]]:
    res = engine("render", "-g", "kube", "--format", "json", *args)
    assert res.code == 0, res
    doc = json.loads(res.out)
    assert (doc["apiVersion"], doc["kind"]) == ("v1", "List")
    items: list[dict[str, Any]] = doc["items"]
    return items


def as_rendered(obj: dict[str, Any], uids: dict[tuple[str, str], str],
                hashes: dict[str, str]) -> dict[str, Any]:
    """An object as the stand-in holds it, without what the server sets, with the owner's
    uid checked and then shown as render shows it, and secret values redacted."""
    obj = copy.deepcopy(obj)
    obj.pop("status", None)
    meta = obj["metadata"]
    for key in SERVER_SET:
        meta.pop(key, None)
    labels = meta["labels"]
    if labels.get("engine.agent") in hashes and \
            labels.get("engine.spec-hash") == hashes[labels["engine.agent"]]:
        labels["engine.spec-hash"] = objs.SPEC_HASH_AT_APPLY  # an agent with credentials
    for ref in meta.get("ownerReferences") or []:
        assert ref["uid"] == uids[(ref["kind"], ref["name"])]
        ref["uid"] = objs.OWNER_UID
    if meta["name"] == objs.GATEWAY_POLICIES:
        policies = {k: json.loads(v) for k, v in obj["data"].items()}
        for k, pol in policies.items():
            assert re.fullmatch(r"[0-9a-f]{64}", pol["tokenSha256"])
            pol["tokenSha256"] = objs.TOKEN_AT_APPLY
            obj["data"][k] = json.dumps(pol, indent=1, sort_keys=True) + "\n"
    return objs.redacted(obj)


def test_render_prints_what_apply_sends(grove: Path, api: FakeApiServer, engine: Any) -> None:
    before = rendered(engine)
    assert [o["kind"] for o in before][:5] == ["ConfigMap", "ConfigMap", "Deployment",
                                               "Service", "NetworkPolicy"]  # the gateway
    res = engine("apply", "--auto-approve", "-g", "kube")
    assert res.code == 0, res
    on_server = {(o["kind"], o["metadata"]["name"]): o
                 for kind, plural in PLURALS.items() for o in api.items(plural, "agents")
                 if not (kind == "Pod" and o["metadata"].get("labels", {}).get("job-name"))}
    uids = {k: o["metadata"]["uid"] for k, o in on_server.items()}
    # the spec hash of an agent with credentials digests their values: apply knows it
    grove_ = desired.build(manifest.load_grove(grove / "groves" / "kube", grove),
                           desired.Options(repo_root=grove, secret_key=secrets.repo_key(
                               grove / ".engine", False)))
    hashes = {a.name: a.spec_hash for a in grove_.agents if a.credentials}
    assert hashes.keys() == {"worker"}
    keys = [(o["kind"], o["metadata"]["name"]) for o in before]
    assert len(keys) == len(set(keys)) and set(keys) == set(on_server)
    for obj in before:
        key = (obj["kind"], obj["metadata"]["name"])
        assert as_rendered(on_server[key], uids, hashes) == obj, key
    # every dependent names its owner, and the owner exists with that uid
    owned = [o for o in on_server.values() if o["metadata"].get("ownerReferences")]
    assert {o["kind"] for o in owned} == {"ConfigMap", "Secret"}  # never the policy
    for o in owned:
        (ref,) = o["metadata"]["ownerReferences"]
        assert ref["kind"] in ("Job", "Pod") and ref["controller"] and ref["blockOwnerDeletion"]
        assert ref["name"] == o["metadata"]["name"] and ref["uid"] == uids[(ref["kind"],
                                                                               ref["name"])]
    # rendering again after apply prints the same: nothing in it comes from the cluster
    assert rendered(engine) == before
    # one agent, in its own order: the workload last (its NetworkPolicy before it)
    only = rendered(engine, "worker")
    assert [o["kind"] for o in only] == ["ConfigMap", "Secret", "PersistentVolumeClaim",
                                         "NetworkPolicy", "Job"]
    assert only == [o for o in before if o["metadata"]["name"] == "kube-worker"]


def test_every_write_names_the_field_manager(grove: Path, api: FakeApiServer,
                                             engine: Any) -> None:
    assert engine("apply", "--auto-approve", "-g", "kube").code == 0
    assert api.writes
    for _, path, ctype, manager in api.writes:
        if path.endswith(f"/{objs.GATEWAY_POLICIES}"):  # each agent's key: its own manager
            assert re.fullmatch(r"grove-engine:kube/(service|fetcher)", manager), path
        else:
            assert (ctype, manager) == ("application/apply-patch+yaml", "grove-engine"), path


def test_yaml_stream_validates_against_the_official_schemas(grove: Path, engine: Any) -> None:
    res = engine("render", "-g", "kube")
    assert res.code == 0, res
    assert res.out.startswith("---\n")
    docs = list(yaml.safe_load_all(res.out))
    assert docs == rendered(engine)
    for obj in docs:
        validate(obj)
    job = next(o for o in docs if o["kind"] == "Job" and o["metadata"]["name"] == "kube-worker")
    main = job["spec"]["template"]["spec"]["containers"][0]
    assert main["resources"]["limits"]["ephemeral-storage"] == "4Gi"
    assert main["resources"]["requests"]["ephemeral-storage"] == "4Gi"
    labels = job["metadata"]["labels"]
    assert (labels["app.kubernetes.io/managed-by"], labels["app.kubernetes.io/part-of"],
            labels["app.kubernetes.io/instance"]) == ("grove-engine", "kube", "kube-worker")
    assert "note: skipping kube/notes: runtime local, not kubernetes" in res.err


def test_no_secret_value_no_kubeconfig_no_network(grove: Path, engine: Any,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBECONFIG", str(grove / "no-such-kubeconfig"))
    for fmt in ("yaml", "json"):
        res = engine("render", "-g", "kube", "--format", fmt)
        assert res.code == 0, res
        assert SECRET not in res.out + res.err
        placeholder = base64.b64encode(objs.SECRET_PLACEHOLDER.encode()).decode()
        assert f"GIT_TOKEN: {placeholder}" in res.out or fmt == "json"
    secret = next(o for o in rendered(engine, "worker") if o["kind"] == "Secret")
    assert set(secret["data"]) == {"GIT_TOKEN"}
    # the credential is named, never read: render works while it is not set at all
    monkeypatch.delenv("RENDER_GIT_TOKEN")
    assert engine("render", "-g", "kube").code == 0
    # and with no network at all (a network namespace of its own), as a separate process
    unshare = shutil.which("unshare")
    if unshare is None or subprocess.run([unshare, "-rn", "true"]).returncode != 0:
        pytest.skip("unshare -rn is not available here")
    env = {**os.environ, "RENDER_GIT_TOKEN": SECRET}
    out = subprocess.run([unshare, "-rn", str(ROOT / ".venv" / "bin" / "engine"), "render",
                          "-g", "kube"], cwd=grove, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert SECRET not in out.stdout + out.stderr and "kind: Job" in out.stdout


def test_namespace_comes_from_the_kubeconfig_file_or_default(
        repo: Path, engine: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    text = GROVE.format(remote="https://192.0.2.7/o/r.git", kubeconfig="kc.yaml")  # no DNS
    write_grove(repo, "kube", text.replace("      namespace: agents\n", "", 1))
    (repo / "kc.yaml").write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "contexts": [{"name": "c", "context": {"cluster": "x", "namespace": "team-a"}}]}))
    ns = {o["metadata"]["name"]: o["metadata"]["namespace"]
          for o in rendered(engine, "worker")}
    assert set(ns.values()) == {"team-a"}
    (repo / "kc.yaml").unlink()
    ns = {o["metadata"]["name"]: o["metadata"]["namespace"]
          for o in rendered(engine, "worker")}
    assert set(ns.values()) == {"default"}


def test_bad_selections_are_one_line_errors(grove: Path, engine: Any) -> None:
    res = engine("render", "-g", "kube", "worker", "wroker")
    assert res.code == 1 and "agent wroker: not found in kube (did you mean 'worker'?)" \
        in res.err, res
    assert res.out == ""
    res = engine("render", "-g", "kube", "notes")
    assert res.code == 1 and res.out == "", res
    assert "nothing to render: no selected agent runs on the kubernetes runtime " \
           "(selected: kube/notes)" in res.err
    assert "Traceback" not in res.err
    res = engine("render", "-g", "kube", "--format", "xml")
    assert res.code == 2 and "invalid choice" in res.err


def test_agent_written_bytes_are_escaped_in_both_formats(grove: Path, engine: Any) -> None:
    text = (grove / "groves" / "kube" / "grove.yaml").read_text()
    write_grove(grove, "kube", text.replace("task: make test,",
                                            'task: "make \\e[2J\\u202etest\\a",'))
    for fmt in ("yaml", "json"):
        res = engine("render", "-g", "kube", "worker", "--format", fmt)
        assert res.code == 0, res
        assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f\u202e]", res.out), fmt
    job = rendered(engine, "worker")[-1]  # the workload comes last
    assert job["spec"]["template"]["spec"]["containers"][0]["args"][-1] == \
        "make \x1b[2J\u202etest\x07"


def test_long_values_become_valid_distinct_labels() -> None:
    valid = re.compile(r"([A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?)?")
    assert objs.safe_label("demo") == "demo"
    long_a, long_b = "g" * 70 + "a", "g" * 70 + "b"
    for text in (long_a, long_b, "-starts-with-dash", "has space/and:colon", "x" * 63 + ".",
                 "ÄÖÜ" * 30):
        value = objs.safe_label(text)
        assert len(value) <= 63 and valid.fullmatch(value), (text, value)
    assert objs.safe_label(long_a) != objs.safe_label(long_b)
    assert objs.safe_label("x" * 63) == "x" * 63


def test_a_kubeconfig_the_repository_names_is_read_as_data(tmp_path: Path) -> None:
    """render reads a profile's kubeconfig only for its namespace: a FIFO never hangs it,
    an alias bomb is refused, and a namespace that is not a name is an error."""
    from engine.commands import render
    from engine.errors import EngineError

    os.mkfifo(tmp_path / "fifo.yaml")
    assert render._kubeconfig_namespace(tmp_path, "fifo.yaml", "") == "default"
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
        for p, c in zip("abcdefgh", "bcdefghi", strict=True))
    (tmp_path / "bomb.yaml").write_text(bomb + "current-context: c\n")
    assert render._kubeconfig_namespace(tmp_path, "bomb.yaml", "") == "default"
    (tmp_path / "bad.yaml").write_text(
        "current-context: c\ncontexts:\n- name: c\n  context: {namespace: \"Evil NS\\n--- x\"}\n")
    with pytest.raises(EngineError, match="is not a valid namespace name"):
        render._kubeconfig_namespace(tmp_path, "bad.yaml", "")
    (tmp_path / "ok.yaml").write_text(
        "current-context: c\ncontexts:\n- name: c\n  context: {namespace: team-a}\n")
    assert render._kubeconfig_namespace(tmp_path, "ok.yaml", "") == "team-a"


@pytest.mark.parametrize("text", [
    "current-context: c\ncontexts: 5\n",
    "current-context: c\ncontexts:\n- name: c\n  context: just-a-string\n",
    "current-context: c\ncontexts:\n- name: c\n  context: [1, 2]\n",
    "current-context: [c]\ncontexts:\n- {name: c, context: {namespace: 7}}\n",
])
def test_a_kubeconfig_of_the_wrong_shape_is_no_traceback(tmp_path: Path, text: str) -> None:
    """A kubeconfig is data of any shape: what is not a context with a namespace gives the
    default (or, for a namespace that is not a name, a one-line error)."""
    from engine.commands import render
    from engine.errors import EngineError

    (tmp_path / "kc.yaml").write_text(text)
    try:
        assert render._kubeconfig_namespace(tmp_path, "kc.yaml", "") == "default"
    except EngineError as e:
        assert "is not a valid namespace name" in e.summary and "\n" not in e.summary
