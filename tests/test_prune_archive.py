"""Finished work does not pile up: `engine prune --finished`, `engine archive list/prune`
and the expiry of answered inbox files. Real git, real tmux (local runtime), the real CLI;
the only thing faked is the clock, once, for answers a day old (a file's change time
cannot be set back)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from engine import inbox
from tests.conftest import git, local_grove

DONE = "    - name: done\n      task: echo w > W && git add W && git commit -qm work && " \
       "echo u > U\n"
BUSY = "    - name: busy\n      task: sleep 300\n"
DAY = 86400


def grove(repo: Path, agents: str) -> Path:
    return local_grove(repo, agents)


def phase(engine, name: str) -> str:  # type: ignore[no-untyped-def]
    res = engine("status", "--json")
    assert res.code == 0, res
    return {a["name"]: a for a in json.loads(res.out)["groves"][0]["agents"]}[name]["phase"]


def wait_ended(engine, *names: str, timeout: float = 60) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    for name in names:
        while phase(engine, name) not in ("Succeeded", "Failed"):
            assert time.monotonic() < deadline, f"{name} did not end"
            time.sleep(0.1)


def wait_running(engine, name: str, timeout: float = 60) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while phase(engine, name) != "Running":
        assert time.monotonic() < deadline, f"{name} is not running"
        time.sleep(0.1)


def record(repo: Path, name: str) -> dict:  # type: ignore[type-arg]
    state = json.loads((repo / ".engine/state/demo.json").read_text())
    return state["agents"][name]  # type: ignore[no-any-return]


def backdate(repo: Path, name: str, seconds: float) -> None:
    """Make `name` look as if it ended `seconds` ago (its exit file and log)."""
    t = time.time() - seconds
    for p in (repo / ".engine/run/demo" / name / "exit", repo / ".engine/logs/demo" /
              f"{name}.log"):
        if p.exists():
            os.utime(p, (t, t))


def age_archive(repo: Path, ref: str, days: int) -> None:
    """Rewrite archive `ref` as made `days` ago: same tree, parents and message."""
    commit = git(repo, "rev-parse", ref)
    parents = git(repo, "rev-list", "--parents", "-n1", commit).split()[1:]
    msg = git(repo, "log", "-1", "--format=%B", commit)
    when = f"@{int(time.time()) - days * DAY} +0000"
    new = subprocess.run(
        ["git", "commit-tree", f"{commit}^{{tree}}", *[x for p in parents for x in ("-p", p)],
         "-m", msg], cwd=repo, check=True, capture_output=True, text=True,
        env={**os.environ, "GIT_COMMITTER_DATE": when, "GIT_AUTHOR_DATE": when}).stdout.strip()
    git(repo, "update-ref", ref, new, commit)


def test_prune_finished_archives_removes_and_apply_does_not_recreate(
        repo: Path, engine, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    grove(repo, DONE + BUSY)
    assert engine("apply", "--auto-approve").code == 0
    wait_ended(engine, "done")
    wait_running(engine, "busy")
    wt = repo / ".engine/worktrees/demo/done"
    box = repo / ".engine/inbox/demo/done"
    outside = tmp_path / "outside.txt"
    outside.write_text("not the engine's\n")
    (box / "res-r1.json").write_text('{"id": "r1", "status": "ok"}')
    (box / "done-r1.json").write_text('{"kind": "StatusRequest", "spec": {}}')
    (box / "done-r2.json").symlink_to(outside)  # planted by the agent: only the link goes

    # --dry-run says what would happen and changes nothing
    state = (repo / ".engine/state/demo.json").read_bytes()
    res = engine("prune", "--finished", "--dry-run")
    assert res.code == 0, res
    assert res.out.splitlines() == ["demo/done: would prune (succeeded; archived first: "
                                    "1 uncommitted file, 1 commit not on base)"]
    assert (repo / ".engine/state/demo.json").read_bytes() == state
    assert wt.is_dir() and (repo / ".engine/run/demo/done").is_dir()
    assert (box / "res-r1.json").exists()
    assert git(repo, "for-each-ref", "refs/engine/archive/") == ""

    # without a terminal it needs --auto-approve
    res = engine("prune", "--finished")
    assert res.code == 1 and "--auto-approve" in res.err

    res = engine("prune", "--finished", "--auto-approve")
    assert res.code == 0, res
    assert res.out.splitlines() == [
        "demo/done: pruned (work archived at refs/engine/archive/demo/done/1)"]
    # the archive holds the commit and the uncommitted file; the worktree is gone
    ref = "refs/engine/archive/demo/done/1"
    assert git(repo, "log", "-1", "--format=%s", f"{ref}^") == "work"
    assert git(repo, "show", f"{ref}:W") == "w" and git(repo, "show", f"{ref}:U") == "u"
    assert not wt.exists()
    assert not (repo / ".engine/run/demo/done").exists()  # the runtime object is gone
    assert git(repo, "log", "-1", "--format=%s", "engine/demo/done") == "work"  # for review
    # answered inbox files went (the planted symlink as a link), and so did the inbox
    assert not box.exists()
    assert outside.read_text() == "not the engine's\n"
    rec = record(repo, "done")
    assert rec["pruned_at"] and rec["workdir"] == "" and rec["notified"] == "Succeeded:0"
    # the running agent is not touched
    assert (repo / ".engine/worktrees/demo/busy").is_dir()
    assert phase(engine, "busy") == "Running" and not record(repo, "busy")["pruned_at"]

    # plan and apply leave it pruned
    res = engine("plan", "--detailed-exitcode")
    assert res.code == 0, res
    assert "No changes" in res.out
    plan = json.loads(engine("plan", "--json").out)["groves"][0]["changes"]
    done = next(c for c in plan if c["agent"] == "done")
    assert done["action"] == "no-op" and done["reason"].startswith("pruned ")
    res = engine("apply", "--auto-approve")
    assert res.code == 0, res
    assert not wt.exists() and not (repo / ".engine/run/demo/done").exists()
    assert record(repo, "done")["pruned_at"] == rec["pruned_at"]
    assert engine("prune", "--finished", "--auto-approve").out == \
        "grove demo: nothing to prune\n"

    # a changed spec runs it again, from its branch
    grove(repo, DONE.replace("echo u > U", "echo again > A") + BUSY)
    res = engine("plan")
    assert "+ done  (create: spec changed since it was pruned: command, task)" in res.out
    assert engine("destroy", "--auto-approve").code == 0


def test_prune_older_than_dependents_and_pending_requests(repo: Path, engine) -> None:  # type: ignore[no-untyped-def]
    grove(repo, "    - name: old\n      task: 'true'\n"
                "    - name: new\n      task: 'true'\n"
                "    - name: asks\n      task: 'true'\n"
                "    - name: bad\n      task: exit 3\n"
                "    - name: after\n      dependsOn: [bad]\n      task: 'true'\n")
    assert engine("apply", "--auto-approve").code == 0
    wait_ended(engine, "old", "new", "asks", "bad")
    for name in ("old", "asks", "bad"):
        backdate(repo, name, 2 * DAY)
    # a request not taken in yet keeps its agent
    (repo / ".engine/inbox/demo/asks/req-x1.json").write_text(
        '{"kind": "StatusRequest", "spec": {}}')

    assert engine("prune", "--finished", "--older-than", "1w").code == 2  # not a duration
    res = engine("prune", "--finished", "--older-than", "1d", "--auto-approve")
    assert res.code == 0, res
    assert res.out.splitlines() == [
        "demo/asks: kept (its inbox holds requests not taken in yet; apply or watch takes "
        "them first)",
        "demo/bad: pruned (nothing to archive)",
        "demo/old: pruned (nothing to archive)"]
    assert record(repo, "bad")["notified"] == "Failed:0"
    assert (repo / ".engine/worktrees/demo/new").is_dir()
    # a pruned failure still blocks its dependent; nothing is created again
    plan = {c["agent"]: c for c in
            json.loads(engine("plan", "--json").out)["groves"][0]["changes"]}
    assert plan["after"]["action"] == "wait"
    assert plan["after"]["reason"] == "blocked: dependency bad failed"
    assert plan["bad"]["action"] == plan["old"]["action"] == "no-op"
    assert engine("plan", "--detailed-exitcode").code == 0
    res = engine("prune", "--finished", "--auto-approve", "--older-than", "36h")
    assert "demo/new" not in res.out and "demo/asks: kept" in res.out


def test_archive_list_and_prune(repo: Path, engine) -> None:  # type: ignore[no-untyped-def]
    one = "    - name: a\n      task: echo one > F && git add F && git commit -qm one\n" \
          "    - name: b\n      task: echo b > B && git add B && git commit -qm b && " \
          "echo dirty > D\n"
    grove(repo, one)
    assert engine("apply", "--auto-approve", "--wait").code == 0
    assert engine("prune", "--finished", "--auto-approve").code == 0
    # a's spec changes: it runs again from its branch and is pruned again (archive #2)
    grove(repo, one.replace("echo one > F && git add F && git commit -qm one",
                            "echo two > G && git add G && git commit -qm two"))
    assert engine("apply", "--auto-approve").code == 0
    wait_ended(engine, "a")
    assert git(repo, "log", "--format=%s", "engine/demo/a").splitlines()[:2] == ["two", "one"]
    res = engine("prune", "--finished", "--auto-approve")
    assert res.out == "demo/a: pruned (work archived at refs/engine/archive/demo/a/2)\n", res

    res = engine("archive", "list", "--json")
    assert res.code == 0, res
    doc = json.loads(res.out)
    assert doc["kind"] == "ArchiveList"
    got = {(x["agent"], x["number"]): x for x in doc["archives"]}
    assert sorted(got) == [("a", 1), ("a", 2), ("b", 1)]
    assert (got["a", 1]["commitsNotOnBase"], got["a", 1]["filesChanged"]) == (1, 1)
    assert (got["a", 2]["commitsNotOnBase"], got["a", 2]["filesChanged"]) == (2, 2)
    assert (got["b", 1]["commitsNotOnBase"], got["b", 1]["filesChanged"]) == (1, 2)
    assert got["b", 1]["uncommitted"] and not got["a", 2]["uncommitted"]
    assert got["a", 1]["createdAt"].endswith("Z")
    lines = engine("archive", "list", "demo/a").out.splitlines()
    assert lines[0].split() == ["AGENT", "#", "DATE", "COMMITS", "FILES", "UNCOMMITTED", "REF"]
    assert [ln.split()[:2] + ln.split()[3:] for ln in lines[1:]] == [
        ["demo/a", "1", "1", "1", "no", "refs/engine/archive/demo/a/1"],
        ["demo/a", "2", "2", "2", "no", "refs/engine/archive/demo/a/2"]]
    # merged into the base branch: no commit of it is off the base any more
    git(repo, "merge", "-q", "--ff-only", "engine/demo/a")
    got = {(x["agent"], x["number"]): x
           for x in json.loads(engine("archive", "list", "a", "--json").out)["archives"]}
    assert got["a", 2]["commitsNotOnBase"] == 0 and got["a", 2]["filesChanged"] == 2

    # archive prune: only old ones, never the newest of an agent without a working copy
    res = engine("archive", "prune", "--older-than", "1d")
    assert res.out == "0 archives deleted, 0 old ones kept\n", res
    for ref in ("a/1", "a/2", "b/1"):
        age_archive(repo, f"refs/engine/archive/demo/{ref}", 3)
    res = engine("archive", "prune", "--older-than", "2d", "--dry-run")
    assert "would delete refs/engine/archive/demo/a/1 (" in res.out
    assert len(git(repo, "for-each-ref", "refs/engine/archive/").splitlines()) == 3
    res = engine("archive", "prune", "--older-than", "2d")
    assert res.code == 0, res
    assert "deleted refs/engine/archive/demo/a/1 (" in res.out
    assert "kept refs/engine/archive/demo/a/2 (" in res.out
    assert "kept refs/engine/archive/demo/b/1 (" in res.out
    assert git(repo, "for-each-ref", "--format=%(refname)", "refs/engine/archive/"
               ).splitlines() == ["refs/engine/archive/demo/a/2",
                                  "refs/engine/archive/demo/b/1"]
    # with its working copy back, the newest archive of b is no longer the only copy
    assert engine("restore", "demo/b").code == 0
    res = engine("archive", "prune", "--older-than", "2d")
    assert "deleted refs/engine/archive/demo/b/1 (" in res.out
    assert res.out.endswith("1 archive deleted, 1 old one kept\n")
    assert engine("archive", "prune", "--older-than", "1x").code == 2


def test_inbox_clean_removes_only_answered_and_follows_no_symlink(
        repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = repo / ".engine/inbox/demo"
    box = base / "a"
    box.mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("keep\n")
    (outside / "res-9.json").write_text("outside\n")
    kept = {"req-1.json": "pending", ".req-2.tmp": "half", "notify-x-c.json": "note",
            "res-3.jsonx": "other", "keep-me.txt": "other"}
    for name, text in kept.items():
        (box / name).write_text(text)
    answered = ["res-4.json", "done-4.json", "bad-5.json", "done-6-0a1b2c3d.json"]
    for name in answered:
        (box / name).write_text("{}")
    (box / "done-7.json").symlink_to(outside / "keep.txt")
    (box / "res-8.json").symlink_to(outside)
    planted = box / "bad-9.json"
    (planted / "deep").mkdir(parents=True)
    (planted / "deep" / "link").symlink_to(outside)
    (planted / "deep" / "out.txt").symlink_to(outside / "keep.txt")
    os.mkfifo(box / "done-10.json")
    (base / "b").symlink_to(outside)  # an inbox that is a symlink is not looked in

    assert inbox.clean_answered(repo, "demo") == 0  # all just answered: a day to go
    real = time.time
    monkeypatch.setattr(inbox.time, "time", lambda: real() + 2 * DAY)
    assert inbox.clean(repo, "demo", "b", 0.0) == 0
    assert inbox.clean_answered(repo, "demo") == len(answered) + 4
    assert sorted(os.listdir(box)) == sorted(kept)
    for name, text in kept.items():
        assert (box / name).read_text() == text
    assert sorted(os.listdir(outside)) == ["keep.txt", "res-9.json"]
    assert (outside / "keep.txt").read_text() == "keep\n"
    assert (base / "b").is_symlink()
    assert not inbox.remove_if_empty(repo, "demo", "a")  # the pending request stays
    assert not inbox.remove_if_empty(repo, "demo", "b")  # a symlink is not an inbox
    assert (base / "b").is_symlink() and (outside / "keep.txt").exists()


def test_prune_tells_the_parent_before_the_child_goes(repo: Path, engine) -> None:  # type: ignore[no-untyped-def]
    grove(repo, "    - name: boss\n      task: sleep 300\n"
                "    - name: kid\n      spawnedBy: boss\n      task: 'true'\n")
    assert engine("apply", "--auto-approve").code == 0
    wait_ended(engine, "kid")
    wait_running(engine, "boss")
    res = engine("prune", "--finished", "--auto-approve")
    assert res.out == "demo/kid: pruned (nothing to archive)\n", res
    notes = [json.loads(p.read_text())
             for p in (repo / ".engine/inbox/demo/boss").glob("notify-*-kid.json")]
    assert [(n["kind"], n["phase"]) for n in notes] == [("ChildEnded", "Succeeded")]
    assert record(repo, "kid")["notified"] == "Succeeded:0"
    assert engine("plan", "--detailed-exitcode").code == 0
    assert engine("destroy", "--auto-approve").code == 0


def test_a_pruned_agents_branch_is_archived_before_it_is_deleted(repo: Path, engine) -> None:  # type: ignore[no-untyped-def]
    """What deleting a pruned agent (no working copy, branch kept) does to its branch:
    `workspace.remove_branch` archives only commits no archive holds yet."""
    from engine import workspace

    grove(repo, "    - name: a\n      task: echo one > F && git add F && git commit -qm one\n"
                "    - name: b\n      task: echo b > B && git add B && git commit -qm b\n")
    assert engine("apply", "--auto-approve").code == 0
    wait_ended(engine, "a", "b")
    assert engine("prune", "--finished", "--auto-approve").code == 0
    base = git(repo, "rev-parse", "main")
    # a's branch holds nothing its archive does not: deleted, nothing archived again
    assert workspace.remove_branch(repo, "demo", "a", "engine/demo/a", base) is None
    assert git(repo, "branch", "--list", "engine/demo/a") == ""
    # b's branch moved on after the prune (a commit made by hand): kept in a new archive
    tip = git(repo, "rev-parse", "engine/demo/b")
    extra = git(repo, "commit-tree", f"{tip}^{{tree}}", "-p", tip, "-m", "by hand")
    git(repo, "update-ref", "refs/heads/engine/demo/b", extra)
    ref = workspace.remove_branch(repo, "demo", "b", "engine/demo/b", base)
    assert ref == "refs/engine/archive/demo/b/2"
    assert git(repo, "log", "-1", "--format=%s", f"{ref}^") == "by hand"
    assert git(repo, "branch", "--list", "engine/demo/b") == ""
    assert workspace.remove_branch(repo, "demo", "b", "engine/demo/b", base) is None


def test_a_branch_only_an_older_archive_holds_is_archived_again(repo: Path) -> None:
    """`archive prune` keeps only an agent's newest archive: a branch tip that only an
    older archive holds is archived anew before the branch goes."""
    from engine import archive

    base = git(repo, "rev-parse", "HEAD")
    git(repo, "checkout", "-qb", "engine/demo/a")
    (repo / "W").write_text("w\n")
    git(repo, "add", "W")
    git(repo, "commit", "-qm", "work")
    tip = git(repo, "rev-parse", "HEAD")
    git(repo, "checkout", "-q", "main")
    git(repo, "update-ref", "refs/engine/archive/demo/a/1", tip)  # holds the tip
    assert archive.archive_branch(repo, "demo", "a", "engine/demo/a", base) is None
    git(repo, "update-ref", "refs/engine/archive/demo/a/2", base)  # newer, without it
    ref = archive.archive_branch(repo, "demo", "a", "engine/demo/a", base)
    assert ref == "refs/engine/archive/demo/a/3"
    assert git(repo, "merge-base", "--is-ancestor", tip, ref) == ""
