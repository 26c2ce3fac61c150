"""Plan/apply/destroy on the local runtime, end to end: real git, real tmux, the real CLI."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import LOCAL_GROVE, git, local_grove, write_grove

GROVE = LOCAL_GROVE  # the shell harness on the local runtime (conftest)


def grove(repo: Path, agents: str) -> Path:
    return local_grove(repo, agents)


TWO = """\
    - name: researcher
      task: echo notes > NOTES.md && git add NOTES.md && git commit -qm notes
    - name: coder
      dependsOn: [researcher]
      task: |
        test -f NOTES.md || exit 3
        echo code > CODE.md && git add CODE.md && git commit -qm code
"""


def status(engine, name: str | None = None) -> dict:  # type: ignore[no-untyped-def]
    res = engine("status", "--json")
    assert res.code == 0, res
    agents = {a["name"]: a for a in json.loads(res.out)["groves"][0]["agents"]}
    return agents[name] if name else agents


def wait_phase(engine, name: str, phases: set[str], timeout: float = 60) -> dict:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        st = status(engine, name)
        if st["phase"] in phases:
            return st
        assert time.monotonic() < deadline, f"{name} still {st['phase']}, wanted {phases}"
        time.sleep(0.1)


def test_apply_converges_in_dependency_order_and_is_idempotent(repo: Path, engine) -> None:
    grove(repo, TWO)
    res = engine("plan", "--detailed-exitcode")
    assert res.code == 2
    assert "+ researcher" in res.out and "Plan: 2 to create" in res.out
    res = engine("apply", "--auto-approve", "--wait", "--timeout", "30")
    assert res.code == 0, res
    st = status(engine)
    assert st["researcher"]["phase"] == "Succeeded" and st["coder"]["phase"] == "Succeeded"
    assert st["coder"]["ahead"] == 2  # started from researcher's work, then its own commit
    assert git(repo, "log", "-1", "--format=%s", "engine/demo/coder") == "code"
    # each agent's commits are attributed to the agent
    assert git(repo, "log", "-1", "--format=%an <%ae>", "engine/demo/coder") == \
        "coder (demo) <coder@demo.agents.invalid>"
    res = engine("plan", "--detailed-exitcode")
    assert res.code == 0, res
    assert "No changes" in res.out


def test_dependent_is_pending_until_a_later_apply(repo: Path, engine) -> None:
    grove(repo, TWO)
    assert engine("apply", "--auto-approve").code == 0
    assert status(engine, "coder")["phase"] == "Pending"
    wait_phase(engine, "researcher", {"Succeeded"})
    res = engine("plan", "--json")
    changes = {c["agent"]: c for c in json.loads(res.out)["groves"][0]["changes"]}
    assert changes["coder"]["action"] == "create"
    assert changes["coder"]["reason"] == "dependencies succeeded"
    assert engine("apply", "--auto-approve", "--wait").code == 0
    assert status(engine, "coder")["phase"] == "Succeeded"


def test_spec_change_replaces_with_reason_and_keeps_branch(repo: Path, engine) -> None:
    grove(repo, "    - name: a\n      task: echo one > A && git add A && git commit -qm one\n")
    assert engine("apply", "--auto-approve", "--wait").code == 0
    grove(repo, "    - name: a\n      task: echo two > B && git add B && git commit -qm two\n")
    res = engine("plan")
    assert "-/+ a  (replace: spec changed: command, task)" in res.out
    assert engine("apply", "--auto-approve", "--wait").code == 0
    log = git(repo, "log", "--format=%s", "engine/demo/a").splitlines()
    assert log[:2] == ["two", "one"]


def test_removed_agent_is_deleted_with_work_archived_and_restorable(repo: Path, engine) -> None:
    grove(repo, "    - name: keep\n      task: 'true'\n"
                "    - name: gone\n      task: echo c > C && git add C && git commit -qm c\n")
    assert engine("apply", "--auto-approve", "--wait").code == 0
    wt = repo / ".engine/worktrees/demo/gone"
    (wt / "UNSAVED.txt").write_text("precious\n")
    grove(repo, "    - name: keep\n      task: 'true'\n")
    res = engine("plan")
    assert "- gone  (delete: no longer in manifest)" in res.out
    assert "work archived first: 1 uncommitted file, 1 commit not on base" in res.out
    res = engine("apply", "--auto-approve")
    assert res.code == 0 and "refs/engine/archive/demo/gone/1" in res.out
    assert not wt.exists()
    assert "engine/demo/gone" not in git(repo, "branch", "--list")
    res = engine("restore", "demo/gone")
    assert res.code == 0, res
    assert (wt / "UNSAVED.txt").read_text() == "precious\n"
    assert (wt / "C").exists()
    assert git(wt, "status", "--porcelain") == "?? UNSAVED.txt"


def test_rename_is_said_in_the_plan(repo: Path, engine) -> None:
    grove(repo, "    - name: old\n      task: echo same\n")
    assert engine("apply", "--auto-approve", "--wait").code == 0
    grove(repo, "    - name: new\n      task: echo same\n")
    res = engine("plan")
    assert "- old  (delete: no longer in manifest (renamed to new?))" in res.out
    assert "+ new  (create: new agent)" in res.out


def test_failed_command_fails_its_agent_and_others_go_on(repo: Path, engine) -> None:
    grove(repo, "    - name: broken\n      task: no-such-command-xyz\n"
                "    - name: fine\n      task: 'true'\n")
    res = engine("apply", "--auto-approve", "--wait")
    assert res.code == 1  # an agent ended Failed
    st = status(engine)
    assert st["broken"]["phase"] == "Failed" and st["broken"]["exitCode"] == 127
    assert "command not found" in st["broken"]["reason"]
    assert st["fine"]["phase"] == "Succeeded"


def test_restart_on_failure_is_planned(repo: Path, engine) -> None:
    grove(repo, "    - name: flaky\n      restart: on-failure\n      task: exit 4\n")
    t0 = time.monotonic()
    waited = engine("apply", "--auto-approve", "--wait", "--timeout", "120")
    # --wait restarts it per policy, backing off (1 s, 2 s), three times; then reports it
    assert waited.code == 1 and "flaky Failed" in waited.out, waited
    assert waited.out.count("flaky: restarted") == 3 and time.monotonic() - t0 < 30
    res = engine("plan")
    assert "~> flaky  (restart: exited 4, restart: on-failure)" in res.out


def test_max_duration_stops_a_sleeping_agent(repo: Path, engine) -> None:
    grove(repo, "    - name: sleepy\n      maxDuration: 1s\n      task: sleep 30\n")
    t0 = time.monotonic()
    res = engine("apply", "--auto-approve", "--wait", "--timeout", "20")
    assert res.code == 1
    assert time.monotonic() - t0 < 15
    st = status(engine, "sleepy")
    assert st["phase"] == "Failed" and st["reason"] == "maxDuration 1s exceeded"


def test_worktree_path_taken_by_someone_else_is_refused(repo: Path, engine) -> None:
    grove(repo, "    - name: a\n      task: 'true'\n")
    taken = repo / ".engine/worktrees/demo/a"
    taken.mkdir(parents=True)
    (taken / "mine.txt").write_text("not the engine's\n")
    res = engine("apply", "--auto-approve")
    assert res.code == 1
    assert "already exists and is not this agent's workspace" in res.out
    assert (taken / "mine.txt").read_text() == "not the engine's\n"


def test_missing_base_branch_is_reported(repo: Path, engine) -> None:
    text = GROVE.format(agents="    - name: a\n      task: 'true'\n").replace(
        "spec:\n", "spec:\n  baseRef: nope\n")
    write_grove(repo, "demo", text)
    res = engine("apply", "--auto-approve")
    assert res.code == 1
    assert res.err.startswith("error: base ref 'nope' not found")
    assert not (repo / ".engine/worktrees").exists()


def test_second_apply_while_locked_names_the_holder(repo: Path, engine) -> None:
    grove(repo, "    - name: a\n      task: 'true'\n")
    holder = subprocess.Popen(["sleep", "30"])
    try:
        lock = repo / ".engine/state/demo.lock"
        lock.parent.mkdir(parents=True)
        lock.write_text(json.dumps({"id": "abc123", "operation": "apply", "who": "ci",
                                    "pid": holder.pid, "host": "ci-runner",
                                    "created": "2026-01-01T00:00:00Z"}))
        res = engine("apply", "--auto-approve")
        assert res.code == 1
        assert "grove demo is locked: apply by ci" in res.err and "abc123" in res.err
        assert engine("force-unlock", "wrong", "-g", "demo").code == 1
        assert engine("force-unlock", "abc123", "-g", "demo").code == 0
        assert engine("apply", "--auto-approve").code == 0
    finally:
        holder.kill()
        holder.wait()


def test_saved_plan_is_applied_exactly_or_refused_when_stale(repo: Path, engine,
                                                              tmp_path: Path) -> None:
    grove(repo, "    - name: a\n      task: 'true'\n")
    planfile = tmp_path / "p.json"
    assert engine("plan", "--out", str(planfile)).code == 0
    grove(repo, "    - name: a\n      task: 'true'\n    - name: b\n      task: 'true'\n")
    res = engine("apply", str(planfile))
    assert res.code == 1 and "stale: the manifests changed" in res.err
    assert engine("plan", "--out", str(planfile)).code == 0
    assert engine("apply", str(planfile)).code == 0
    assert set(status(engine)) == {"a", "b"}
    res = engine("apply", str(planfile))
    assert res.code == 1 and "stale: the state changed" in res.err


def test_apply_without_tty_needs_auto_approve(repo: Path, engine) -> None:
    grove(repo, "    - name: a\n      task: 'true'\n")
    res = engine("apply")
    assert res.code == 1 and "--auto-approve" in res.err


def test_logs_look_message_diff_merge(repo: Path, engine) -> None:
    grove(repo, "    - name: chat\n      task: |\n        echo ready\n"
                "        IFS= read -r line; echo \"got: $line\"\n"
                "        echo \"$line\" > MSG && git add MSG && git commit -qm msg\n")
    assert engine("apply", "--auto-approve").code == 0
    deadline = time.monotonic() + 60
    while "ready" not in engine("look", "chat").out:
        assert time.monotonic() < deadline, "the agent never printed ready"
        time.sleep(0.1)
    res = engine("message", "chat", "hello 'there' $HOME `x`")
    assert res.code == 0, res
    assert wait_phase(engine, "chat", {"Succeeded", "Failed"})["phase"] == "Succeeded"
    logs = engine("logs", "chat").out
    assert "got: hello 'there' $HOME `x`" in logs
    diff = engine("diff", "chat")
    assert "+hello 'there' $HOME `x`" in diff.out
    res = engine("merge", "chat")
    assert res.code == 0, res
    assert (repo / "MSG").read_text() == "hello 'there' $HOME `x`\n"


def test_merge_conflict_is_refused_naming_files(repo: Path, engine) -> None:
    grove(repo, "    - name: a\n      task: echo agent > README.md && git commit -qam a\n")
    assert engine("apply", "--auto-approve", "--wait").code == 0
    (repo / "README.md").write_text("human\n")
    git(repo, "commit", "-qam", "human")
    res = engine("merge", "a")
    assert res.code == 1 and "conflicts in: README.md" in res.err
    assert (repo / "README.md").read_text() == "human\n"
    assert git(repo, "status", "--porcelain", "--untracked-files=no") == ""


@pytest.mark.parametrize("point", ["after-worktree", "after-runtime", "after-first-agent"])
def test_sigkill_during_apply_then_reapply_converges(repo: Path, point: str) -> None:
    """Kill a real `engine apply` process at several points; a re-apply converges with no
    duplicate sessions, no orphaned worktrees and no lost work."""
    grove(repo, "".join(f"    - name: a{i}\n      task: echo {i} > F && git add F && "
                        f"git commit -qm c{i}\n" for i in range(6)))
    env_hook = {"after-worktree": "worktree", "after-runtime": "runtime",
                "after-first-agent": "record"}[point]
    import os
    import sys
    env = {**os.environ, "ENGINE_FAILPOINT": env_hook}
    p = subprocess.run([sys.executable, "-m", "engine", "apply", "--auto-approve",
                        "--parallelism", "1"], cwd=repo, env=env, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == -9, p.stderr
    p = subprocess.run([sys.executable, "-m", "engine", "apply", "--auto-approve", "--wait"],
                       cwd=repo, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    p = subprocess.run([sys.executable, "-m", "engine", "plan", "--detailed-exitcode"],
                       cwd=repo, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout
    made = sorted(p.name for p in (repo / ".engine/worktrees/demo").iterdir())
    assert made == [f"a{i}" for i in range(6)]  # one per agent, nothing half-made left
    assert all((repo / ".engine/worktrees/demo" / n / ".git").is_dir() for n in made)
    for i in range(6):
        assert git(repo, "log", "-1", "--format=%s", f"engine/demo/a{i}") == f"c{i}"


def test_clone_mode_fetches_the_work_back_to_the_agent_branch(repo: Path, engine) -> None:
    text = GROVE.format(agents="    - name: c\n      task: echo cloned > C && git add C && "
                               "git commit -qm cloned\n").replace(
        "spec:\n", "spec:\n  workspace: clone\n")
    write_grove(repo, "demo", text)
    assert engine("apply", "--auto-approve", "--wait").code == 0
    clone = repo / ".engine/worktrees/demo/c"
    assert (clone / ".git").is_dir()  # a clone of its own, not a worktree
    assert len(git(repo, "worktree", "list").splitlines()) == 1
    assert git(repo, "show", "engine/demo/c:C") == "cloned"
    assert "+cloned" in engine("diff", "c").out
    (clone / "DIRTY").write_text("x\n")
    write_grove(repo, "demo", text.replace("name: c", "name: d"))
    res = engine("apply", "--auto-approve")
    assert res.code == 0 and "refs/engine/archive/demo/c/1" in res.out
    assert not clone.exists()
    assert git(repo, "show", "refs/engine/archive/demo/c/1:DIRTY") == "x"
    assert engine("restore", "demo/c").code == 0
    assert (clone / ".git").is_dir() and (clone / "DIRTY").read_text() == "x\n"
    write_grove(repo, "demo", text)  # c is back in the manifests: apply reuses the clone
    assert engine("apply", "--auto-approve").code == 0


def test_shared_mode_works_in_the_repository_itself(repo: Path, engine) -> None:
    text = GROVE.format(agents="    - name: s\n      task: pwd > WHERE\n").replace(
        "spec:\n", "spec:\n  workspace: shared\n")
    write_grove(repo, "demo", text)
    assert engine("apply", "--auto-approve", "--wait").code == 0
    assert (repo / "WHERE").read_text().strip() == str(repo)
    assert engine("destroy", "--auto-approve").code == 0
    assert (repo / "WHERE").exists()  # shared mode never removes the repository's files


def test_state_dir_is_kept_out_of_git_without_a_gitignore(repo: Path, engine) -> None:
    (repo / ".gitignore").unlink()
    git(repo, "commit", "-qam", "no ignore file")
    grove(repo, "    - name: a\n      task: 'true'\n")
    assert engine("apply", "--auto-approve", "--wait").code == 0
    assert ".engine" not in git(repo, "status", "--porcelain")
    assert engine("apply", "--auto-approve").code == 0
    exclude = (repo / ".git/info/exclude").read_text()
    assert exclude.count("/.engine/") == 1


def test_wait_returns_behind_a_failure_two_levels_up(repo: Path, engine) -> None:
    grove(repo, "    - name: bad\n      task: exit 3\n"
                "    - name: after\n      dependsOn: [bad]\n      task: 'true'\n"
                "    - name: after2\n      dependsOn: [after]\n      task: 'true'\n")
    t0 = time.monotonic()
    res = engine("apply", "--auto-approve", "--wait", "--timeout", "60")
    assert res.code == 1
    assert time.monotonic() - t0 < 30, "apply --wait hung behind the failed dependency"
    assert "after Blocked, after2 Blocked, bad Failed" in res.out
    rows = status(engine)
    assert rows["after2"]["phase"] == "Pending"
    assert rows["after2"]["reason"] == "blocked: dependency bad failed"


def test_agents_do_not_inherit_the_engine_users_environment(repo: Path, engine,
                                                            monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    monkeypatch.setenv("SENTINEL_TOKEN", "s3cr3t-sentinel")
    text = GROVE.format(agents="    - name: a\n      profile: keyed\n      task: env > ENV\n"
                               "    - name: b\n      task: env > ENV\n").replace(
        "    local: {runtime: local, spawn: {allowProfiles: [local]}}",
        "    local: {runtime: local, spawn: {allowProfiles: [local]}}\n"
        "    keyed: {runtime: local, credentials: {MY_TOKEN: {fromEnv: SENTINEL_TOKEN}}}")
    write_grove(repo, "demo", text)
    assert engine("apply", "--auto-approve", "--wait").code == 0
    env_a = (repo / ".engine/worktrees/demo/a/ENV").read_text()
    env_b = (repo / ".engine/worktrees/demo/b/ENV").read_text()
    assert "MY_TOKEN=s3cr3t-sentinel" in env_a  # its own credential, by its own name
    assert "SENTINEL_TOKEN" not in env_a and "s3cr3t-sentinel" not in env_b
    show = subprocess.run(["tmux", "-S", str(repo / ".engine/tmux.sock"), "show-environment",
                           "-g"], capture_output=True, text=True).stdout
    assert "s3cr3t-sentinel" not in show
    assert "s3cr3t-sentinel" not in (repo / ".engine/run/demo/a/run.sh").read_text()


def test_archive_keeps_a_branch_tip_that_is_not_checked_out(repo: Path, engine) -> None:
    grove(repo, "    - name: a\n      task: |\n"
                "        echo 1 > F && git add F && git commit -qm on-branch\n"
                "        git checkout -q --detach HEAD~1\n"
                "        echo 2 > G && git add G && git commit -qm detached\n")
    assert engine("apply", "--auto-approve", "--wait").code == 0
    on_branch = git(repo, "rev-parse", "engine/demo/a")
    assert engine("destroy", "--auto-approve").code == 0
    assert git(repo, "for-each-ref", "--contains", on_branch, "--format=%(refname)") \
        == "refs/engine/archive/demo/a/1"


def test_clone_archive_keeps_other_branches_and_the_stash(repo: Path, engine) -> None:
    text = GROVE.format(agents="    - name: c\n      task: |\n"
                               "        git checkout -qb feature\n"
                               "        echo f > F && git add F && git commit -qm feature\n"
                               "        git checkout -q engine/demo/c\n"
                               "        echo s > S && git add S && git stash -q\n").replace(
        "spec:\n", "spec:\n  workspace: clone\n")
    write_grove(repo, "demo", text)
    assert engine("apply", "--auto-approve", "--wait").code == 0
    assert engine("destroy", "--auto-approve").code == 0
    # every tip of the agent's repository is a parent of the archive: nothing unreachable
    parents = git(repo, "rev-list", "--parents", "-n1", "refs/engine/archive/demo/c/1"
                  ).split()[1:]
    subjects = {git(repo, "log", "-1", "--format=%s", p) for p in parents}
    assert "feature" in subjects
    assert any(s.startswith(("WIP on", "On ")) for s in subjects)  # the stash
    feature = next(p for p in parents if git(repo, "log", "-1", "--format=%s", p) ==
                   "feature")
    assert git(repo, "show", f"{feature}:F") == "f"


def test_unrecorded_agent_is_archived_when_removed(repo: Path) -> None:
    """The engine died between starting an agent and recording it; the agent is then
    removed from the manifests: its work is archived like any other's."""
    import os
    import sys
    grove(repo, "    - name: a\n      task: echo x > X && git add X && git commit -qm x "
                "&& echo wip > WIP\n")
    p = subprocess.run([sys.executable, "-m", "engine", "apply", "--auto-approve"], cwd=repo,
                       env={**os.environ, "ENGINE_FAILPOINT": "runtime"}, capture_output=True)
    assert p.returncode == -9
    time.sleep(1)
    grove(repo, "    - name: b\n      task: 'true'\n")
    p = subprocess.run([sys.executable, "-m", "engine", "plan"], cwd=repo,
                       capture_output=True, text=True)
    assert "work archived first: 1 uncommitted file, 1 commit not on base" in p.stdout
    p = subprocess.run([sys.executable, "-m", "engine", "apply", "--auto-approve"], cwd=repo,
                       capture_output=True, text=True)
    assert p.returncode == 0 and "refs/engine/archive/demo/a/1" in p.stdout
    assert not (repo / ".engine/worktrees/demo/a").exists()
    assert git(repo, "show", "refs/engine/archive/demo/a/1:WIP") == "wip"


def test_plan_names_ignored_files_the_archive_does_not_keep(repo: Path, engine) -> None:
    (repo / ".gitignore").write_text(".engine/\nbuild/\n")
    git(repo, "commit", "-qam", "ignore build")
    grove(repo, "    - name: a\n      task: mkdir -p build && echo x > build/out.o\n")
    assert engine("apply", "--auto-approve", "--wait").code == 0
    grove(repo, "    - name: b\n      task: 'true'\n")
    res = engine("plan")
    assert "not kept: 1 ignored path (.gitignore)" in res.out


def test_half_made_workspace_is_rebuilt_not_reused(repo: Path) -> None:
    """SIGKILL while a workspace is being made (its branch and refs written, its files not
    yet checked out): the next apply never hands the half-made copy to the agent, which
    would then see every file deleted and could commit that."""
    import os
    import sys
    grove(repo, "    - name: a\n      task: git status --porcelain > STATUS && "
                "test -f README.md && echo seen > SEEN\n")
    p = subprocess.run([sys.executable, "-m", "engine", "apply", "--auto-approve"], cwd=repo,
                       env={**os.environ, "ENGINE_FAILPOINT": "workspace-half-made"},
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == -9, p.stderr
    left = sorted(x.name for x in (repo / ".engine/worktrees/demo").iterdir())
    assert left and all(n.startswith(".a.new-") for n in left)  # nothing at the real path
    p = subprocess.run([sys.executable, "-m", "engine", "apply", "--auto-approve", "--wait"],
                       cwd=repo, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    wt = repo / ".engine/worktrees/demo/a"
    assert sorted(x.name for x in wt.parent.iterdir()) == ["a"]  # the leftover is gone
    assert (wt / "SEEN").read_text() == "seen\n"
    assert (wt / "STATUS").read_text() == "?? STATUS\n"  # nothing looked deleted
