"""Emergent coordination on the local runtime: agents spawn children through their inbox,
the controller gates and writes them back to spawned.yaml, and converges them. Everything
is real: the `engine watch` process, tmux sessions, git worktrees, the agent-side client."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.manifest import load_grove
from tests.conftest import git, write_grove

HEAD = """\
apiVersion: engine/v1alpha1
kind: Grove
metadata: {{name: tree}}
spec:
  defaults: {{profile: local, harness: shell}}
  policy: {{maxAgents: {max_agents}, maxDepth: 2, maxChildren: {max_children}}}
  profiles:
    local: {{runtime: local, spawn: {{allowProfiles: [local]}}}}
    other: {{runtime: local}}
  agents:
"""


def grove(repo: Path, agents: str, max_agents: int = 20, max_children: int = 3) -> None:
    text = HEAD.format(max_agents=max_agents, max_children=max_children) + agents
    if not agents:
        text = text.replace("  agents:\n", "  agents: []\n")
    write_grove(repo, "tree", text)
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "grove")


class Watch:
    def __init__(self, repo: Path, env: dict[str, str] | None = None) -> None:
        self.repo = repo
        self.log = repo.parent / f"watch-{time.monotonic_ns()}.log"
        with self.log.open("w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "engine", "watch", "--interval", "0.5"], cwd=repo,
                stdout=subprocess.DEVNULL, stderr=err, env={**os.environ, **(env or {})})

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)

    def text(self) -> str:
        return self.log.read_text()


def engine_json(repo: Path, *args: str) -> dict:
    p = subprocess.run([sys.executable, "-m", "engine", *args, "--json"], cwd=repo,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def phases(repo: Path) -> dict[str, str]:
    doc = engine_json(repo, "status")
    return {a["name"]: a["phase"] for a in doc["groves"][0]["agents"]}


def until(cond, timeout: float = 30.0, what: str = "") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def spawned_docs(repo: Path) -> list[dict]:
    src = load_grove(repo / "groves/tree", repo)
    return [{"name": n, **e.data} for n, e in src.agents.items() if "spawnRequest" in e.data]


SEED = """\
    - name: seed
      task: |
        engine spawn kid-a --wait --task 'echo a > A && git add A && git commit -qm a && \
          engine spawn grandkid --wait --task "echo g > G && git add G && git commit -qm g"'
        engine spawn kid-b --wait --task 'echo b > B && git add B && git commit -qm b; \
          engine done --result "b is done"'
        engine spawn bad --profile other --wait --task true 2> REJECTED || true
        git add REJECTED && git commit -qm rejected
"""


def test_seed_spawns_a_tree_written_back_and_converged(repo: Path, watch: list[Watch],
                                                       engine) -> None:
    grove(repo, SEED)
    watch.append(Watch(repo))
    until(lambda: phases(repo) == {"seed": "Succeeded", "kid-a": "Succeeded",
                                   "kid-b": "Succeeded", "grandkid": "Succeeded"},
          what="all four agents to succeed")
    docs = {d["name"]: d for d in spawned_docs(repo)}
    assert {n: d.get("spawnedBy") for n, d in docs.items()} == {
        "kid-a": "seed", "kid-b": "seed", "grandkid": "kid-a"}
    for d in docs.values():
        assert d["spawnedAt"] and d["spawnRequest"]
    for name, f in (("kid-a", "A"), ("kid-b", "B"), ("grandkid", "G")):
        assert git(repo, "show", f"engine/tree/{name}:{f}")
    # the rejected request got its reason back and nothing was written for it
    assert "bad" not in docs
    rejected = git(repo, "show", "engine/tree/seed:REJECTED")
    assert "profile other is not allowed for children of seed" in rejected
    graph = engine("graph", "--format", "json")
    edges = {(e["from"], e["to"]) for e in json.loads(graph.out)["edges"]}
    assert edges == {("seed", "kid-a"), ("seed", "kid-b"), ("kid-a", "grandkid")}
    # the parent was told when its children ended, with the result text
    until(lambda: len(list((repo / ".engine/inbox/tree/seed").glob("notify-*"))) == 2,
          what="two notifications")
    notes = [json.loads(p.read_text()) for p in (repo / ".engine/inbox/tree/seed")
             .glob("notify-*")]
    by_child = {n["child"]: n for n in notes}
    assert by_child["kid-b"]["phase"] == "Succeeded"
    assert by_child["kid-b"]["result"] == "b is done"
    assert by_child["kid-b"]["exitCode"] == 0
    events = [json.loads(ln) for ln in (repo / ".engine/events.jsonl").read_text()
              .splitlines()]
    kinds = [(e["event"], e.get("status")) for e in events]
    assert kinds.count(("SpawnRequest", "accepted")) == 3
    assert kinds.count(("SpawnRequest", "rejected")) == 1
    assert watch[0].stop() == 0
    assert "stopped" in watch[0].text()


def test_commit_writeback_has_trailers(repo: Path, watch: list[Watch]) -> None:
    grove(repo, "    - name: seed\n      task: engine spawn kid --wait --task true\n")
    text = (repo / "groves/tree/grove.yaml").read_text().replace(
        "spec:\n", "spec:\n  writeBack: {commit: true}\n")
    (repo / "groves/tree/grove.yaml").write_text(text)
    git(repo, "commit", "-qam", "commit spawns")
    watch.append(Watch(repo))
    until(lambda: phases(repo).get("kid") == "Succeeded", what="kid")
    msg = git(repo, "log", "-1", "--format=%B", "--", "groves/tree/spawned.yaml")
    assert "Spawned-By: seed" in msg and "Spawn-Request: " in msg
    assert git(repo, "status", "--porcelain", "--", "groves") == ""


def test_removing_an_entry_prunes_the_agent_with_work_archived(repo: Path, engine) -> None:
    grove(repo, "")
    assert engine("spawn", "helper", "--task", "echo x > X && git add X && "
                  "git commit -qm x").code == 0
    assert engine("apply", "--auto-approve", "--wait").code == 0
    (repo / "groves/tree/spawned.yaml").write_text("# emptied\n")
    res = engine("plan")
    assert "- helper  (delete: no longer in manifest)" in res.out
    assert "1 commit not on base" in res.out
    assert engine("apply", "--auto-approve").code == 0
    assert git(repo, "for-each-ref", "--format=%(refname)", "refs/engine/archive/tree/helper/")


def write_request(repo: Path, agent: str, rid: str, body: bytes) -> Path:
    box = repo / ".engine/inbox/tree" / agent
    box.mkdir(parents=True, exist_ok=True)
    p = box / f"req-{rid}.json"
    p.write_bytes(body)
    return p


BAD = {
    "notjson": b"{not json",
    "toolarge": json.dumps({"kind": "SpawnRequest", "spec": {"name": "x",
                                                             "task": "a" * 70000}}).encode(),
    "unknownprofile": json.dumps({"kind": "SpawnRequest", "spec": {
        "name": "y", "task": "true", "profile": "nosuch"}}).encode(),
    "dotdot": json.dumps({"kind": "SpawnRequest", "spec": {"name": "../x",
                                                           "task": "true"}}).encode(),
    "template": json.dumps({"kind": "SpawnRequest", "spec": {
        "name": "z", "task": "{{ ''.__class__.__mro__ }}"}}).encode(),
}


def test_bad_requests_are_rejected_with_a_reason_and_nothing_written(repo: Path,
                                                                     engine) -> None:
    grove(repo, "    - name: seed\n      task: sleep 5\n")
    assert engine("apply", "--auto-approve").code == 0
    for rid, body in BAD.items():
        write_request(repo, "seed", rid, body)
    ok = write_request(repo, "seed", "good", json.dumps(
        {"kind": "SpawnRequest", "spec": {"name": "good", "task": "true"}}).encode())
    res = engine("apply", "--auto-approve")
    assert res.code == 0, res
    box = ok.parent
    reasons = {rid: json.loads((box / f"res-{rid}.json").read_text()) for rid in BAD}
    assert all(r["status"] == "rejected" for r in reasons.values())
    assert "not valid JSON" in reasons["notjson"]["reason"]
    assert "larger than" in reasons["toolarge"]["reason"]
    assert "profile nosuch is not allowed" in reasons["unknownprofile"]["reason"]
    assert "is not valid" in reasons["dotdot"]["reason"]
    assert "template syntax" in reasons["template"]["reason"]
    assert json.loads((box / "res-good.json").read_text())["status"] == "accepted"
    assert [d["name"] for d in spawned_docs(repo)] == ["good"]


def test_hundred_concurrent_spawns_all_land_once(repo: Path, watch: list[Watch]) -> None:
    seeds = "".join(
        f"    - name: s{i}\n      task: |\n"
        f"        for j in 1 2 3 4 5; do engine spawn c{i}-$j --task true & done; wait\n"
        for i in range(20))
    grove(repo, seeds, max_agents=200, max_children=5)
    watch.append(Watch(repo))
    until(lambda: len(list((repo / ".engine/inbox/tree").glob("*/res-*.json"))) == 100,
          timeout=120, what="100 answers")
    docs = spawned_docs(repo)
    names = [d["name"] for d in docs]
    assert len(set(names)) == 100
    assert len({d["spawnRequest"] for d in docs}) == 100
    results = list((repo / ".engine/inbox/tree").glob("*/res-*.json"))
    assert len(results) == 100
    assert all(json.loads(p.read_text())["status"] == "accepted" for p in results)


@pytest.mark.parametrize("point", ["ingest-written", "ingest-answered"])
def test_controller_killed_mid_ingest_ends_each_request_once(repo: Path, point: str,
                                                             watch: list[Watch]) -> None:
    grove(repo, "    - name: seed\n      task: sleep 30\n", max_children=3)
    assert subprocess.run([sys.executable, "-m", "engine", "apply", "--auto-approve"],
                          cwd=repo, capture_output=True).returncode == 0
    for i in range(4):  # the fourth is over maxChildren: rejected
        write_request(repo, "seed", f"r{i}", json.dumps(
            {"kind": "SpawnRequest", "spec": {"name": f"k{i}", "task": "true"}}).encode())
    first = Watch(repo, {"ENGINE_FAILPOINT": point})
    watch.append(first)
    assert first.proc.wait(timeout=30) == -signal.SIGKILL
    second = Watch(repo)
    watch.append(second)
    box = repo / ".engine/inbox/tree/seed"
    until(lambda: len(list(box.glob("res-*.json"))) == 4 and not list(box.glob("req-*")),
          what="all four answered")
    docs = spawned_docs(repo)
    assert sorted(d["spawnRequest"] for d in docs) == ["r0", "r1", "r2"]
    res = {p.name: json.loads(p.read_text())["status"] for p in box.glob("res-*.json")}
    assert res == {"res-r0.json": "accepted", "res-r1.json": "accepted",
                   "res-r2.json": "accepted", "res-r3.json": "rejected"}
    events = [json.loads(ln) for ln in (repo / ".engine/events.jsonl").read_text()
              .splitlines() if '"SpawnRequest"' in ln]
    assert sorted(e["id"] for e in events) == ["r0", "r1", "r2", "r3"]


def test_agent_messages_another_agent(repo: Path, watch: list[Watch]) -> None:
    grove(repo, "    - name: listener\n      task: |\n        IFS= read -r line\n"
                "        echo \"$line\" > HEARD && git add HEARD && git commit -qm heard\n"
                "    - name: talker\n      task: engine message listener 'hi there' --wait\n")
    watch.append(Watch(repo))
    until(lambda: phases(repo).get("listener") == "Succeeded", what="listener")
    heard = git(repo, "show", "engine/tree/listener:HEARD")
    assert heard == "[message from talker] hi there"


def test_watch_survives_a_bad_edit_and_holds_the_lock(repo: Path, watch: list[Watch]) -> None:
    grove(repo, "    - name: one\n      task: 'true'\n")
    w = Watch(repo)
    watch.append(w)
    until(lambda: phases(repo).get("one") == "Succeeded", what="one")
    # a second controller for the same grove is refused, naming the holder
    p = subprocess.run([sys.executable, "-m", "engine", "watch", "--once"], cwd=repo,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and "grove tree already has a controller: engine watch" \
        in p.stderr
    path = repo / "groves/tree/grove.yaml"
    good = path.read_text()
    path.write_text(good + "    - name: two\n      task: 'true'\n      colour: red\n")
    git(repo, "commit", "-qam", "a bad edit")
    until(lambda: "manifests invalid, nothing changed" in w.text(),
          what="the bad commit to be logged")
    assert w.proc.poll() is None  # still running
    path.write_text(good + "    - name: two\n      task: 'true'\n")
    git(repo, "commit", "-qam", "fixed")
    until(lambda: phases(repo).get("two") == "Succeeded", what="two after the fix")
    assert w.stop() == 0


def test_agent_reads_the_grove_status(repo: Path, watch: list[Watch]) -> None:
    grove(repo, "    - name: peer\n      task: sleep 30\n"
                "    - name: asker\n      task: |\n"
                "        engine status --json > S.json && git add S.json && "
                "git commit -qm status\n")
    watch.append(Watch(repo))
    until(lambda: phases(repo).get("asker") == "Succeeded", what="asker")
    doc = json.loads(git(repo, "show", "engine/tree/asker:S.json"))
    rows = {a["name"]: a for a in doc["agents"]}
    assert doc["grove"] == "tree" and rows["peer"]["phase"] == "Running"
    assert rows["asker"]["phase"] == "Running"


def test_host_spawn_for_a_parent_passes_the_gate(repo: Path, engine) -> None:
    grove(repo, "    - name: seed\n      task: 'true'\n")
    res = engine("spawn", "kid", "--parent", "seed", "--profile", "other", "--task", "x")
    assert res.code == 1 and "profile other is not allowed for children of seed" in res.err
    assert not (repo / "groves/tree/spawned.yaml").exists()
    assert engine("spawn", "kid", "--parent", "seed", "--task", "x").code == 0
    docs = {d["name"]: d for d in spawned_docs(repo)}
    assert docs["kid"]["spawnedBy"] == "seed" and docs["kid"]["profile"] == "local"
