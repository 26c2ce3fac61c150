"""Write-back commits (`--commit`, `spec.writeBack.commit`) are made with plumbing on a
private index: a leftover `.git/index.lock` does not stop them, the user's staged changes
stay staged, a branch that moves is retried, and a spawn whose commit never happened (a
crash, a detached HEAD) is listed by `engine history` and committed by the next write-back.
All in real git repositories."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from engine import writeback
from tests.conftest import git, write_grove

GROVE = """\
apiVersion: engine/v1alpha1
kind: Grove
metadata: {name: tree}
spec:
  writeBack: {commit: true}
  defaults: {profile: local, harness: shell}
  profiles:
    local: {runtime: local, spawn: {allowProfiles: [local]}}
  agents:
    - name: seed
      task: 'true'
"""
SPAWNED = "groves/tree/spawned.yaml"


@pytest.fixture
def grove(repo: Path) -> Path:
    write_grove(repo, "tree", GROVE)
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "grove")
    return repo


def trailers(repo: Path, rev: str = "HEAD") -> list[str]:
    return git(repo, "log", "-1", "--format=%(trailers:only,unfold)", rev).splitlines()


def requests_in_file(repo: Path) -> list[str]:
    return sorted(writeback.recorded_requests(repo, "tree"))


def engine_proc(repo: Path, *args: str, failpoint: str = "") -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "ENGINE_FAILPOINT"}
    if failpoint:
        env["ENGINE_FAILPOINT"] = failpoint
    return subprocess.run([sys.executable, "-m", "engine", *args], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=120)


def history(engine: Any) -> list[dict[str, Any]]:
    res = engine("history", "--json")
    assert res.code == 0, res
    commits: list[dict[str, Any]] = json.loads(res.out)["commits"]
    return commits


def test_commit_lands_past_a_leftover_index_lock_and_keeps_staged_changes(
        grove: Path, engine: Any) -> None:
    repo = grove
    (repo / "notes.txt").write_text("the user's own work\n")
    git(repo, "add", "notes.txt")
    lock = repo / ".git" / "index.lock"
    lock.write_bytes(b"left by an interrupted git commit\n")  # as a killed `git commit` leaves it
    stamp = lock.stat().st_mtime_ns
    before = git(repo, "rev-parse", "HEAD")
    res = engine("spawn", "kid", "--task", "true", "--commit")
    assert res.code == 0, res
    assert res.err == ""
    assert git(repo, "rev-parse", "HEAD~1") == before
    assert git(repo, "log", "-1", "--format=%s") == "engine: spawn kid"
    assert git(repo, "show", "--name-only", "--format=", "HEAD") == SPAWNED
    assert trailers(repo) == [f"Spawn-Request: {requests_in_file(repo)[0]}"]
    # the lock is untouched, and the user's staged file is still staged, and only there
    assert lock.read_bytes() == b"left by an interrupted git commit\n"
    assert lock.stat().st_mtime_ns == stamp
    lock.unlink()  # the user cleans up after the interrupted commit
    staged = git(repo, "diff", "--cached", "--name-status").splitlines()
    assert "A\tnotes.txt" in staged
    assert git(repo, "ls-tree", "HEAD", "notes.txt") == ""
    # the index could not be advanced under the lock: spawned.yaml shows as staged
    # differently until the next write-back commit advances it
    assert f"D\t{SPAWNED}" in staged
    assert engine("spawn", "kid2", "--task", "true", "--commit").code == 0
    assert git(repo, "diff", "--cached", "--name-status").splitlines() == ["A\tnotes.txt"]
    assert git(repo, "status", "--porcelain", "--", "groves") == ""
    assert [c["subject"] for c in history(engine)][:2] == ["engine: spawn kid2",
                                                          "engine: spawn kid"]


def test_a_version_the_user_staged_of_their_own_is_left_alone(grove: Path,
                                                              engine: Any) -> None:
    repo = grove
    assert engine("spawn", "kid", "--task", "true", "--commit").code == 0
    path = repo / SPAWNED
    committed = path.read_text()
    path.write_text(committed + "# a note the user staged\n")
    git(repo, "add", SPAWNED)
    mine = git(repo, "ls-files", "-s", SPAWNED)
    path.write_text(committed)
    assert engine("spawn", "kid2", "--task", "true", "--commit").code == 0
    assert git(repo, "ls-files", "-s", SPAWNED) == mine
    assert "kid2" in git(repo, "show", f"HEAD:{SPAWNED}")


def test_killed_between_write_and_commit_is_listed_then_committed(grove: Path,
                                                                  engine: Any) -> None:
    repo = grove
    head = git(repo, "rev-parse", "HEAD")
    p = engine_proc(repo, "spawn", "kid", "--task", "true", "--commit",
                    failpoint="writeback-written")
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert git(repo, "rev-parse", "HEAD") == head
    [rid] = requests_in_file(repo)
    newest = history(engine)[0]
    assert newest["uncommitted"] is True and newest["commit"] is None
    assert [(a["name"], a["spawnRequest"]) for a in newest["added"]] == [("kid", rid)]
    text = engine("history").out
    assert text.startswith("uncommitted ")
    assert f"{SPAWNED}: 1 spawn(s) written, not committed  [grove tree]\n  + kid " in text
    story = engine("history", "--agent", "kid")
    assert story.out.startswith("agent tree/kid: written to spawned.yaml but not committed, "
                                "a seed agent (no parent)\n")
    # the next write-back with commit on commits it too
    assert engine("spawn", "kid2", "--task", "true", "--commit").code == 0
    assert sorted(trailers(repo)) == sorted(f"Spawn-Request: {r}"
                                            for r in requests_in_file(repo))
    assert git(repo, "log", "-1", "--format=%s") == "engine: spawn kid, kid2"
    assert not any(c["uncommitted"] for c in history(engine))


def test_controller_killed_before_the_commit_commits_on_the_next_pass(grove: Path) -> None:
    repo = grove
    box = repo / ".engine/inbox/tree/seed"
    box.mkdir(parents=True)
    (box / "req-r1.json").write_text(json.dumps(
        {"kind": "SpawnRequest", "spec": {"name": "kid", "task": "true"}}))
    head = git(repo, "rev-parse", "HEAD")
    p = engine_proc(repo, "apply", "--auto-approve", failpoint="writeback-written")
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert requests_in_file(repo) == ["r1"] and git(repo, "rev-parse", "HEAD") == head
    story = engine_proc(repo, "history", "--agent", "kid").stdout
    assert story.startswith("agent tree/kid: written to spawned.yaml but not committed, "
                            "spawned by seed\n")
    assert "  + kid (spawned by seed, request r1)" in story
    p = engine_proc(repo, "apply", "--auto-approve")
    assert p.returncode == 0, p.stderr
    assert trailers(repo) == ["Spawned-By: seed", "Spawn-Request: r1"]
    assert git(repo, "rev-parse", "HEAD~1") == head
    assert json.loads((box / "res-r1.json").read_text())["status"] == "accepted"
    assert git(repo, "status", "--porcelain", "--", "groves") == ""


def test_a_branch_that_moves_under_the_commit_is_retried(grove: Path, engine: Any,
                                                         monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    repo = grove
    real = writeback._git
    moved: list[str] = []

    def racing(root: Path, *args: str, **kw: Any) -> str:
        if args[:1] == ("update-ref",) and not moved:  # someone commits just before us
            (repo / "other.txt").write_text("racing commit\n")
            git(repo, "add", "other.txt")
            git(repo, "commit", "-qm", "racing")
            moved.append(git(repo, "rev-parse", "HEAD"))
        return real(root, *args, **kw)

    monkeypatch.setattr(writeback, "_git", racing)
    assert engine("spawn", "kid", "--task", "true", "--commit").code == 0
    assert git(repo, "rev-parse", "HEAD~1") == moved[0]  # built again on the new tip
    assert git(repo, "show", "HEAD:other.txt") == "racing commit"
    assert "kid" in git(repo, "show", f"HEAD:{SPAWNED}")


def test_detached_head_or_no_commits_leave_the_spawn_written_with_a_note(
        grove: Path, engine: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = grove
    git(repo, "checkout", "-q", "--detach")
    head = git(repo, "rev-parse", "HEAD")
    res = engine("spawn", "kid", "--task", "true", "--commit")
    assert res.code == 0, res
    assert res.err == (f"{SPAWNED}: spawns written but not committed: HEAD is detached "
                       "(check out a branch; the next write-back commits them)\n")
    assert git(repo, "rev-parse", "HEAD") == head and requests_in_file(repo)
    assert history(engine)[0]["uncommitted"] is True
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    git(fresh, "init", "-q", "-b", "main")
    write_grove(fresh, "tree", GROVE)
    monkeypatch.chdir(fresh)
    res = engine("spawn", "kid", "--task", "true", "--commit")
    assert res.code == 0, res
    assert res.err == (f"{SPAWNED}: spawns written but not committed: the repository has "
                       "no commits yet\n")
    assert (fresh / SPAWNED).is_file()


def test_a_task_cannot_claim_a_request_id(tmp_path: Path) -> None:
    """Exactly-once ingestion reads request ids from spawned.yaml: only the spec's own key
    counts, never a line inside a (multi-line) task."""
    sneaky = writeback.Spawn("kid", "x\nspawnRequest: victim\n", "seed", "r1", "t")
    writeback.append(tmp_path, "tree", [sneaky], commit=False)
    assert "spawnRequest: victim" in (tmp_path / SPAWNED).read_text()
    assert writeback.recorded_requests(tmp_path, "tree") == {"r1"}
