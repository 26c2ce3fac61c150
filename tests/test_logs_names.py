"""Agent names as people type them, and `engine logs --tail/--previous`: real git, real tmux
(local runtime), real Docker, the real CLI.

Short names resolve wherever one grove has (or had) the agent, GROVE/NAME and -g always;
an ambiguous name lists its candidates, an unknown one gets the closest name of the groves
looked in (never one of another grove as if it were there), and a mistyped manifest field
the closest field. `logs --tail N` reads from the end of the log, `--previous` the run
before a restart, and a silent agent gets a note on stderr only.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.errors import EngineError
from engine.runtimes import logfile
from tests.conftest import LOCAL_GROVE, git, write_grove
from tests.docker_fixtures import Agents

FIVE = "for i in 1 2 3 4 5; do echo \"line $i\"; done"


def grove(repo: Path, name: str, agents: dict[str, str]) -> None:
    text = "".join(f"    - name: {n}\n      task: {t!r}\n" for n, t in agents.items())
    write_grove(repo, name, LOCAL_GROVE.replace("{{name: demo}}", f"{{{{name: {name}}}}}")
                .format(agents=text))


def wait_for(engine, check, what: str, timeout: float = 60) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def lines(out: str) -> list[str]:
    return out.splitlines()


def test_short_names_ambiguity_and_did_you_mean(repo: Path, engine) -> None:
    grove(repo, "demo", {"talker": FIVE, "reviewer": "echo r"})
    grove(repo, "other", {"talker": "echo other", "solo": "echo solo-said"})
    assert engine("apply", "--auto-approve", "--wait", "--timeout", "60").code == 0
    # a name two groves have: refused, with both candidates
    for cmd in (("logs", "talker"), ("explain", "talker"), ("restart", "talker"),
                ("cost", "talker"), ("restore", "--list", "talker")):
        res = engine(*cmd)
        assert (res.code, res.err) == (1, "error: agent talker: in several groves "
                                          "(demo/talker, other/talker); say GROVE/talker\n"), cmd
    # GROVE/NAME and -g GROVE NAME always; NAME when one grove has it
    assert lines(engine("logs", "demo/talker").out)[-1] == "line 5"
    assert lines(engine("logs", "-g", "demo", "talker").out)[-1] == "line 5"
    assert "solo-said" in engine("logs", "solo").out
    assert engine("explain", "solo").out.startswith("agent other/solo ")
    assert engine("cost", "solo").code == 0
    res = engine("stop", "solo")
    assert res.code == 0 and "other/solo" in res.out
    # unknown: the closest name of where it looked, qualified when several groves were
    res = engine("logs", "revewer")
    assert res.err == "error: agent revewer: not found in demo, other (did you mean " \
                      "'demo/reviewer'?)\n"
    res = engine("logs", "talkr")
    assert res.err.endswith("(did you mean 'demo/talker' or 'other/talker'?)\n")
    res = engine("explain", "other/revewer")  # reviewer is demo's: never offered for other
    assert res.code == 1 and res.err == "error: agent other/revewer: not found in other\n"
    res = engine("explain", "-g", "demo", "revewer")
    assert res.err == "error: agent revewer: not found in demo (did you mean 'reviewer'?)\n"
    res = engine("logs", "dmeo/talker")
    assert res.code == 1 and res.err.startswith("error: grove 'dmeo' not found")
    assert res.err.endswith("(did you mean 'demo'?)\n")
    res = engine("plan", "-g", "othre")
    assert res.code == 1 and res.err.endswith("(did you mean 'other'?)\n")
    git(repo, "add", "groves")
    git(repo, "commit", "-qm", "groves")
    res = engine("history", "--agent", "slo")
    assert res.err == "error: agent slo: never appears in the git history of demo, other " \
                      "(did you mean 'other/solo'?)\n"


def test_restore_and_archive_list_take_a_removed_agents_short_name(repo: Path,
                                                                   engine) -> None:
    grove(repo, "demo", {"keep": "true",
                         "gone": "echo c > C && git add C && git commit -qm c && echo u > U"})
    assert engine("apply", "--auto-approve", "--wait").code == 0
    grove(repo, "demo", {"keep": "true"})
    res = engine("apply", "--auto-approve")
    assert res.code == 0 and "refs/engine/archive/demo/gone/1" in res.out
    # gone is in no manifest and no inventory now: its archive is what names it
    assert engine("restore", "--list", "gone").out == "refs/engine/archive/demo/gone/1\n"
    assert "demo/gone" in engine("archive", "list", "gone").out
    res = engine("restore", "--list", "gnoe")
    assert res.err == "error: agent gnoe: not found in demo (did you mean 'gone'?)\n"
    # another grove with an agent of that name: the short name is ambiguous
    grove(repo, "other", {"gone": "true"})
    res = engine("restore", "--list", "gone")
    assert res.err == "error: agent gone: in several groves (demo/gone, other/gone); " \
                      "say GROVE/gone\n"
    assert engine("restore", "--list", "-g", "demo", "gone").code == 0
    res = engine("restore", "gone", "-g", "demo")
    assert res.code == 0, res
    assert (repo / ".engine/worktrees/demo/gone/U").read_text() == "u\n"


def test_unknown_field_suggests_the_closest(repo: Path, engine) -> None:
    grove(repo, "demo", {"a": "true"})
    res = engine("plan", "--set", "harnes=shell")
    assert res.err == "error: --set harnes: unknown setting (did you mean 'harness'?)\n"
    path = repo / "groves/demo/grove.yaml"
    path.write_text(path.read_text() + "      profle: local\n      zzzz: 1\n")
    res = engine("validate")
    assert res.code == 1
    assert "groves/demo/grove.yaml:12:7: agent a: unknown fields 'profle', 'zzzz' (did " \
           "you mean 'profile' for 'profle'?)" in res.err
    path.write_text(path.read_text().replace("      zzzz: 1\n", ""))
    res = engine("validate")
    assert "groves/demo/grove.yaml:12:7: agent a: unknown field 'profle' (did you mean " \
           "'profile'?)" in res.err


def test_logs_tail_previous_and_a_silent_agent(repo: Path, engine) -> None:
    grove(repo, "demo", {"talker": FIVE, "quiet": "sleep 60"})
    assert engine("apply", "--auto-approve").code == 0
    wait_for(engine, lambda: "line 5" in engine("logs", "talker").out, "talker's output")
    assert lines(engine("logs", "talker").out) == [f"line {i}" for i in range(1, 6)]
    assert lines(engine("logs", "--tail", "2", "talker").out) == ["line 4", "line 5"]
    assert lines(engine("logs", "--tail", "9", "talker").out) == \
        [f"line {i}" for i in range(1, 6)]
    res = engine("logs", "--tail", "0", "talker")
    assert (res.code, res.out, res.err) == (0, "", "")
    res = engine("logs", "--tail", "-1", "talker")
    assert (res.code, res.err) == (2, "error: --tail: give a number of lines, 0 to 10000000\n")
    res = engine("logs", "--tail", "99999999999999999999", "talker")  # no traceback
    assert (res.code, res.err) == (2, "error: --tail: give a number of lines, 0 to 10000000\n")
    # no run before this one yet
    res = engine("logs", "--previous", "talker")
    assert (res.code, res.out) == (1, "")
    assert res.err == "error: agent demo/talker: no previous run (its log is kept once it " \
                      "has run again)\n"
    # a silent agent: stdout empty (pipes stay clean), a note on stderr, exit 0
    res = engine("logs", "quiet")
    assert (res.code, res.out) == (0, "")
    assert res.err.startswith("engine: demo/quiet has printed nothing yet (phase Running, "
                              "started ")
    assert res.err.endswith("s ago)\n")
    # a restart: the earlier run's log is kept, the new run's is its own
    path = repo / ".engine/logs/demo/talker.log"
    path.write_text(path.read_text() + "from the first run\n")
    assert engine("restart", "talker").code == 0
    wait_for(engine, lambda: "line 5" in engine("logs", "talker").out, "the second run")
    assert lines(engine("logs", "talker").out) == [f"line {i}" for i in range(1, 6)]
    prev = engine("logs", "--previous", "talker")
    assert prev.code == 0 and lines(prev.out)[-2:] == ["line 5", "from the first run"]
    assert lines(engine("logs", "-p", "--tail", "1", "talker").out) == ["from the first run"]
    # the note for a previous run that printed nothing
    assert engine("restart", "quiet").code == 0
    res = engine("logs", "--previous", "quiet")
    assert (res.code, res.out, res.err) == \
        (0, "", "engine: demo/quiet printed nothing in its previous run\n")


def test_logs_follow_with_tail_then_what_comes(repo: Path, engine) -> None:
    grove(repo, "demo", {"slow": "for i in 1 2 3 4; do echo \"early $i\"; done; "
                                 "while [ ! -f GO ]; do sleep 0.1; done; echo late; echo end"})
    assert engine("apply", "--auto-approve").code == 0
    wait_for(engine, lambda: "early 4" in engine("logs", "slow").out, "the early lines")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    proc = subprocess.Popen([sys.executable, "-m", "engine", "logs", "-f", "--tail", "1",
                             "slow"], cwd=repo, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline() == "early 4\n"  # the tail, before anything new comes
    (repo / ".engine/worktrees/demo/slow/GO").touch()
    out, err = proc.communicate(timeout=60)
    assert (proc.returncode, out, err) == (0, "late\nend\n", "")


def test_tail_reads_a_huge_log_from_its_end(repo: Path, engine, tmp_path: Path) -> None:
    """A 64 MiB log: --tail 3 reads a small part of it (the process's read byte count,
    /proc/PID/io rchar, stays far under the log's size); a restart keeps only the last
    PREVIOUS_MAX bytes of it, from a line start."""
    grove(repo, "demo", {"big": "true"})
    assert engine("apply", "--auto-approve", "--wait").code == 0
    log = repo / ".engine/logs/demo/big.log"
    row = ("x" * 99 + "\n").encode()
    with log.open("wb") as f:
        for i in range(64):
            f.write(row * ((1 << 20) // len(row)))
            f.write(f"mark {i}\n".encode())
    size = log.stat().st_size
    assert size > 63 << 20
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    argv = [sys.executable, "-m", "engine", "logs", "--tail", "3", "big"]
    subprocess.run(argv, cwd=repo, env=env, capture_output=True, check=True)  # bytecode
    proc = subprocess.Popen(argv, cwd=repo, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=60)
    assert (proc.returncode, err) == (0, b"")
    assert out.decode().splitlines() == ["x" * 99, "x" * 99, "mark 63"]
    rchar = _rchar(argv, repo, env)
    assert rchar < 16 << 20, f"read {rchar} bytes of a {size}-byte log"
    # a restart keeps the end of it as the previous run's log, bounded
    assert engine("restart", "big").code == 0
    prev = logfile.previous(log)
    assert prev.stat().st_size <= logfile.PREVIOUS_MAX
    assert prev.read_bytes().startswith(row) and prev.read_bytes().endswith(b"mark 63\n")
    assert lines(engine("logs", "--previous", "--tail", "1", "big").out) == ["mark 63"]


def _rchar(argv: list[str], cwd: Path, env: dict[str, str]) -> int:
    """Bytes the command read (rchar of /proc/PID/io, taken once it exited, before it is
    reaped)."""
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
    io = Path(f"/proc/{proc.pid}/io").read_text()
    proc.wait()
    return int(next(ln.split()[1] for ln in io.splitlines() if ln.startswith("rchar:")))


def test_tail_start_counts_lines_from_the_end(tmp_path: Path) -> None:
    p = tmp_path / "log"
    for text, n, want in ((b"a\nb\nc\n", 2, b"b\nc\n"), (b"a\nb\nc", 2, b"b\nc"),
                          (b"a\nb\nc\n", 5, b"a\nb\nc\n"), (b"", 3, b""),
                          (b"a\n\n\n", 2, b"\n\n"), (b"a\nb\n", 0, b"")):
        p.write_bytes(text)
        fd = os.open(p, os.O_RDONLY)
        try:
            assert text[logfile.tail_start(fd, n):] == want, (text, n)
        finally:
            os.close(fd)
    # a symlink planted at the log is removed by the rotation, never followed
    secret = tmp_path / "secret"
    secret.write_text("TOP-SECRET\n")
    (tmp_path / "log").unlink()
    (tmp_path / "log").symlink_to(secret)
    (tmp_path / "log.1").write_text("older\n")
    logfile.rotate(tmp_path / "log")
    assert not os.path.lexists(tmp_path / "log") and not (tmp_path / "log.1").exists()
    assert secret.read_text() == "TOP-SECRET\n"


def test_docker_logs_tail_and_previous(agents: Agents,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.test_docker_runtime import GROVE, agent_entry

    monkeypatch.setenv("TEST_TOKEN", "x")
    g = agents.grove(GROVE + agent_entry("d", FIVE + "; echo \"run $(cat RUNS 2>/dev/null)\""
                                                 "; echo again > RUNS"))
    rt = agents.start(agents.launch(g.agent("d")))
    agents.wait(rt, "g", "d")
    assert list(rt.logs("g", "d", tail=2)) == ["line 5", "run "]
    with pytest.raises(EngineError, match="no previous run"):
        list(rt.logs("g", "d", previous=True))
    rt.create(agents.launch(g.agent("d")))  # a second run of the same agent
    agents.wait(rt, "g", "d")
    assert list(rt.logs("g", "d", tail=1)) == ["run again"]
    assert list(rt.logs("g", "d", previous=True, tail=1)) == ["run "]
    assert list(rt.logs("g", "d")).count("line 1") == 1  # this run's only
    assert list(rt.logs("g", "d", previous=True)).count("line 1") == 1


def test_a_name_declared_elsewhere_but_not_run_is_ambiguous_too(repo: Path, engine) -> None:
    """demo/talker runs; grove other only declares a talker (not applied). Every command
    says the bare name is ambiguous: none silently picks the running one."""
    grove(repo, "demo", {"talker": "sleep 60"})
    assert engine("apply", "--auto-approve", "-g", "demo").code == 0
    try:
        grove(repo, "other", {"talker": "echo other"})
        for cmd in (("logs", "talker"), ("look", "talker"), ("explain", "talker"),
                    ("diff", "talker"), ("message", "talker", "hi")):
            res = engine(*cmd)
            assert (res.code, res.err) == (1, "error: agent talker: in several groves "
                                              "(demo/talker, other/talker); say "
                                              "GROVE/talker\n"), cmd
        assert engine("logs", "demo/talker").code == 0
    finally:
        engine("destroy", "--auto-approve", "-g", "demo")


def test_follow_ends_when_its_reader_goes_and_logs_are_private(repo: Path) -> None:
    """`engine logs -f A | head -1` ends once head has gone (it used to follow until the
    agent ended); the logs directories are the engine's user's only."""
    grove(repo, "demo", {"ticker": "while :; do echo tick; sleep 0.2; done"})
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    engine = [sys.executable, "-m", "engine"]
    subprocess.run([*engine, "apply", "--auto-approve"], cwd=repo, env=env, check=True,
                   capture_output=True, timeout=120)
    try:
        started = time.monotonic()
        res = subprocess.run(["bash", "-c", f"{' '.join(engine)} logs -f ticker | head -1; "
                              "echo \"rc=${PIPESTATUS[0]}\""], cwd=repo, env=env,
                             capture_output=True, text=True, timeout=60)
        assert res.stdout == "tick\nrc=0\n", res
        assert time.monotonic() - started < 20
        for d in (repo / ".engine" / "logs", repo / ".engine" / "logs" / "demo"):
            assert d.stat().st_mode & 0o777 == 0o700, d
    finally:
        subprocess.run([*engine, "destroy", "--auto-approve"], cwd=repo, env=env,
                       capture_output=True, timeout=120)
