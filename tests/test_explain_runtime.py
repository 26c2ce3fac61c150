"""`engine explain` marks the settings its agent's runtime ignores, from the one table of
engine/runtimes/honoured.py, which docs/runtimes.md shows. Offline: the kubernetes agent is
explained with no cluster anywhere."""

from __future__ import annotations

import json
import re
from pathlib import Path

from engine import runtimes
from engine.runtimes import honoured
from tests.conftest import ROOT, write_grove

GROVE = """\
apiVersion: engine/v1alpha1
kind: Grove
metadata: {name: demo}
spec:
  remote: https://git.example.invalid/demo.git
  defaults: {profile: here, harness: shell}
  profiles:
    here:
      runtime: local
      image: grove-engine/base:latest
      network: host
      resources: {cpus: 2, memory: 1Gi, pids: 64}
      mounts: [{source: ./data, target: /data}]
      env: {LEVEL: info}
    walled: {runtime: local, network: egress, egress: ["example.org:443"], access: read-only}
    box:
      runtime: docker
      image: grove-engine/base:latest
      network: host
      resources: {cpus: 2, memory: 1Gi, pids: 64}
      mounts: [{source: ./data, target: /data}]
    pod:
      runtime: kubernetes
      image: grove-engine/base:latest
      namespace: agents
      network: host
      resources: {cpus: 2, memory: 1Gi, pids: 64}
  agents:
    - {name: a, task: echo a}
    - {name: w, task: echo w, profile: walled}
    - {name: d, task: echo d, profile: box}
    - {name: k, task: echo k, profile: pod}
"""


def lines(out: str) -> dict[str, str]:
    """explain's text output: setting -> its line."""
    return {ln.split()[0]: ln for ln in out.splitlines()[1:] if ln.startswith("  ")}


def test_local_runtime_marks_container_settings_ignored(repo: Path, engine) -> None:  # type: ignore[no-untyped-def]
    write_grove(repo, "demo", GROVE)
    r = engine("explain", "a")
    assert r.code == 0, r
    rows = lines(r.out)
    for key, why in (("image", "it runs no container"), ("network", "shares this machine"),
                     ("resources.cpus", "not enforced"), ("resources.memory", "not enforced"),
                     ("resources.pids", "not enforced"), ("readOnlyRoot", "no container"),
                     ("privileged", "no container"), ("mounts", "this machine's files")):
        assert "(ignored by the local runtime: " in rows[key], rows[key]
        assert why in rows[key]
    for key in ("task", "env.LEVEL", "runtime", "command", "restart", "workspace"):
        assert "ignored" not in rows[key], rows[key]
    # egress is what the local runtime applies of `network`; read-only needs root
    w = lines(engine("explain", "w").out)
    assert "ignored" not in w["network"]
    assert "(local runtime: only when the engine runs as root)  # " in w["access"]
    assert "only when" not in lines(r.out)["access"]  # read-write: nothing to enforce


def test_docker_runtime_applies_them(repo: Path, engine) -> None:  # type: ignore[no-untyped-def]
    write_grove(repo, "demo", GROVE)
    r = engine("explain", "demo/d")
    assert r.code == 0, r
    assert "ignored" not in r.out and "runtime:" not in r.out.split("\n", 1)[1]
    assert '"grove-engine/base:latest"' in lines(r.out)["image"]


def test_kubernetes_runtime_offline(repo: Path, engine) -> None:  # type: ignore[no-untyped-def]
    write_grove(repo, "demo", GROVE)
    r = engine("explain", "k")
    assert r.code == 0, r
    rows = lines(r.out)
    assert "(ignored by the kubernetes runtime: no per-Pod field" in rows["resources.pids"]
    assert "(ignored by the kubernetes runtime: the Pod is on the cluster's Pod network)" \
        in rows["network"]
    for key in ("image", "resources.cpus", "resources.memory", "readOnlyRoot", "user"):
        assert "ignored" not in rows[key], rows[key]


def test_json_lists_ignored_settings(repo: Path, engine) -> None:  # type: ignore[no-untyped-def]
    write_grove(repo, "demo", GROVE)
    doc = json.loads(engine("explain", "a", "--json").out)
    assert doc["settings"]["runtime"] == "local"
    assert sorted(doc["ignored"]) == ["image", "mounts", "network", "privileged",
                                      "readOnlyRoot", "resources.cpus", "resources.memory",
                                      "resources.pids"]
    assert doc["ignored"]["resources.memory"] == "not enforced"
    assert doc["appliesOnly"] == {"user": "only when the engine runs as root"}
    assert set(doc["ignored"]) <= set(doc["sources"])
    k = json.loads(engine("explain", "k", "--json").out)
    assert k["ignored"] == {
        "network": "the Pod is on the cluster's Pod network",
        "resources.pids": "no per-Pod field; the kubelet's --pod-max-pids bounds it"}
    d = json.loads(engine("explain", "d", "--json").out)
    assert d["ignored"] == {} and d["appliesOnly"] == {}


def test_table_covers_every_runtime_and_real_settings() -> None:
    schema = json.loads((ROOT / "schemas" / "v1alpha1" / "profile.json").read_text())
    fields = set(schema["$defs"]["spec"]["properties"])
    assert set(honoured.RUNTIMES) == set(runtimes.REGISTRY)
    for key, row in honoured.HONOURED.items():
        assert key.split(".")[0] in fields, key
        assert set(row) == set(honoured.RUNTIMES), key


def test_docs_table_is_the_generated_one() -> None:
    text = (ROOT / "docs" / "runtimes.md").read_text()
    m = re.search(r"<!-- generated from engine/runtimes/honoured.py[^\n]*-->\n(.*?)"
                  r"<!-- end of generated table -->", text, re.S)
    assert m, "docs/runtimes.md lost its table of honoured settings"
    assert m.group(1) == honoured.markdown(), (
        "docs/runtimes.md is out of date: paste the output of python -c 'from "
        "engine.runtimes import honoured; print(honoured.markdown(), end=\"\")'")
