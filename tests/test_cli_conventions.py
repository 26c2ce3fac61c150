"""Command-line conventions: help on every argument, "did you mean" for commands and
options, `validate -` reading standard input, NO_COLOR as no-color.org says (on a real
pseudo-terminal), and output errors (a full disk, a reader gone) as exit 1 / quiet 0."""

from __future__ import annotations

import argparse
import os
import pty
import subprocess
import sys
from pathlib import Path

from engine.cli import build_parser
from tests.conftest import local_grove, write_grove

ENGINE = [sys.executable, "-m", "engine"]

GROVE = """\
apiVersion: engine/v1alpha1
kind: Grove
metadata: {name: g}
spec:
  defaults: {profile: local, harness: shell}
  profiles:
    local: {runtime: local}
  agents:
    - {name: a, task: 'true'}
"""


def _walk(parser: argparse.ArgumentParser, path: str) -> list[str]:
    """Every argument and command of `parser` without help, as 'engine cmd ARG'."""
    missing = []
    for a in parser._actions:
        if isinstance(a, argparse._HelpAction):
            continue
        if isinstance(a, argparse._SubParsersAction):
            helps = {c.dest: c.help for c in a._choices_actions}
            for name, sub in a.choices.items():
                if not (helps.get(name) or "").strip():
                    missing.append(f"{path} {name}")
                missing += _walk(sub, f"{path} {name}")
            continue
        if not (a.help or "").strip() or a.help == argparse.SUPPRESS:
            missing.append(f"{path} {'/'.join(a.option_strings) or a.metavar or a.dest}")
    return missing


def test_every_command_and_argument_has_help() -> None:
    parser = build_parser()
    assert _walk(parser, "engine") == []
    # the walk reaches every command, nested commands and positionals
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert {"image", "spawn", "apply", "completion"} <= set(subs.choices)
    bare = argparse.ArgumentParser(prog="x")
    bare.add_argument("thing")
    bare.add_subparsers().add_parser("y", help="").add_argument("--z", help="")
    assert _walk(bare, "x") == ["x thing", "x y", "x y --z"]


def test_unknown_command_suggests_the_closest(engine) -> None:
    res = engine("statsu")
    assert (res.code, res.out) == (2, "")
    assert res.err == "error: engine: unknown command 'statsu' (did you mean 'status'?)\n"
    assert engine("dny").err == "error: engine: unknown command 'dny' (did you mean 'deny'?)\n"
    assert engine("force-unlok").err.endswith("(did you mean 'force-unlock'?)\n")
    res = engine("archive", "lst")  # a command's own commands
    assert res.err == "error: engine archive: unknown command 'lst' (did you mean 'list'?)\n"
    res = engine("zzzzzz")
    assert (res.code, res.err) == (2, "error: engine: unknown command 'zzzzzz'\n")


def test_unknown_option_suggests_the_closest(engine) -> None:
    res = engine("status", "--jsn")
    assert (res.code, res.err) == (
        2, "error: engine status: unrecognized arguments: --jsn (did you mean '--json'?)\n")
    res = engine("archive", "list", "--jsno")
    assert res.code == 2 and res.err == ("error: engine archive list: unrecognized "
                                         "arguments: --jsno (did you mean '--json'?)\n")
    res = engine("validate", "--no-secrest=1")
    assert res.code == 2 and res.err.endswith("(did you mean '--no-secrets'?)\n")
    res = engine("status", "--qqqqqq")
    assert (res.code, res.err) == (2, "error: engine status: unrecognized arguments: --qqqqqq\n")


def _run(args: list[str], cwd: Path, **kw: object) -> subprocess.CompletedProcess[str]:
    kw = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True, **kw}
    return subprocess.run([*ENGINE, *args], cwd=cwd, timeout=120, **kw)  # type: ignore


def test_validate_reads_stdin_alone(repo: Path, tmp_path: Path) -> None:
    text = GROVE.replace("name: g}", "name: piped}")
    res = _run(["validate", "-"], repo, input=text)
    assert (res.returncode, res.stdout, res.stderr) == (0, "valid: 1 grove (piped), 1 agent\n",
                                                        "")
    # the repository's own groves are not read (a broken one does not matter) ...
    write_grove(repo, "broken", "kind: [\n")
    assert _run(["validate", "-"], repo, input=text).returncode == 0
    # ... unless named beside `-`
    res = _run(["validate", "-", "groves/broken"], repo, input=text)
    assert res.returncode == 1 and "groves/broken/grove.yaml:2:1: invalid YAML" in res.stderr
    # outside any repository too
    elsewhere = tmp_path / "empty"
    elsewhere.mkdir()
    res = _run(["validate", "--json", "-"], elsewhere, input=text)
    assert res.returncode == 0 and '"grove": "piped"' in res.stdout


def test_validate_stdin_errors_name_stdin(tmp_path: Path) -> None:
    bad_yaml = "apiVersion: engine/v1alpha1\nkind: Grove\nmetadata: {name: g\n"
    res = _run(["validate", "-"], tmp_path, input=bad_yaml)
    assert res.returncode == 1 and res.stdout == ""
    first, *rest = res.stderr.splitlines()
    assert first.startswith("error: <stdin>:4:1: invalid YAML") and rest == ["1 problem found"]
    res = _run(["validate", "-"], tmp_path, input=GROVE.replace("task:", "tsk:"))
    assert res.returncode == 1
    assert res.stderr.startswith("error: <stdin>:9:") and "unknown field 'tsk'" in res.stderr
    res = _run(["validate", "-"], tmp_path, input=GROVE + "---\n" + GROVE.replace(
        "name: g}", "name: h}"))
    assert res.returncode == 1 and res.stderr.startswith("error: <stdin>:12:1: grove g: a "
                                                         "grove directory holds exactly one")
    res = _run(["validate", "-"], tmp_path, input="apiVersion: engine/v1alpha1\nkind: Agent\n"
               "metadata: {name: x}\nspec: {task: hi}\n")
    assert res.returncode == 1 and res.stderr.startswith("error: <stdin>:1:1: no kind: Grove "
                                                         "document on standard input")
    res = _run(["validate", "-"], tmp_path, input=b"kind: \xff\n".decode("latin-1"),
               encoding="latin-1")
    assert res.returncode == 1 and res.stderr.startswith("error: <stdin>:1:1: not UTF-8 text")
    res = _run(["validate", "-", "-"], tmp_path, input=GROVE)
    assert res.returncode == 2 and res.stderr.startswith("error: validate: `-`")


def _on_pty(args: list[str], cwd: Path, env: dict[str, str]) -> tuple[int, bytes]:
    """Run the engine with a real pseudo-terminal as its standard streams."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([*ENGINE, *args], cwd=cwd, env=env, stdin=slave, stdout=slave,
                            stderr=slave)
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    return proc.wait(timeout=60), out


def test_no_color_only_when_non_empty(repo: Path) -> None:
    local_grove(repo, "    - {name: a, task: 'true'}")
    env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    code, unset = _on_pty(["plan"], repo, env)
    assert code == 0 and b"\x1b[" in unset and b"+ a" in unset
    code, empty = _on_pty(["plan"], repo, {**env, "NO_COLOR": ""})
    assert code == 0 and empty == unset  # empty NO_COLOR: as if unset (no-color.org)
    code, off = _on_pty(["plan"], repo, {**env, "NO_COLOR": "1"})
    assert code == 0 and b"\x1b[" not in off and b"+ a" in off
    # not a terminal: never colour
    res = _run(["plan"], repo, env=env)
    assert res.returncode == 0 and "\x1b[" not in res.stdout and "+ a" in res.stdout


def _many(repo: Path, n: int = 400) -> None:
    """Grove `demo` with `n` agents: `status --json` prints far more than a pipe holds."""
    agents = "".join(f"    - {{name: agent-{i:03}, task: 'true'}}\n" for i in range(n))
    write_grove(repo, "demo", GROVE.replace("name: g}", "name: demo}").replace(
        "  agents:\n    - {name: a, task: 'true'}\n",
        f"  policy: {{maxAgents: {n}}}\n  agents:\n{agents}"))


def test_full_disk_on_output_is_exit_1(repo: Path) -> None:
    local_grove(repo, "    - {name: a, task: 'true'}")
    cases = [["status", "--json"], ["status"], ["plan"], ["validate"], ["graph"],
             ["--version"], ["completion", "bash"]]
    for args in cases:
        with open("/dev/full", "w") as full:
            res = _run(args, repo, stdout=full)
        # the command goes on to its end (plan's notes to stderr), then says it once
        assert res.returncode == 1, args
        assert res.stderr.endswith("error: cannot write output: No space left on device\n")
        assert res.stderr.count("error:") == 1 and "Traceback" not in res.stderr, args
    _many(repo)  # more than a buffer's worth: the write fails inside the command
    with open("/dev/full", "w") as full:
        res = _run(["status", "--json"], repo, stdout=full)
    assert (res.returncode, res.stderr) == (
        1, "error: cannot write output: No space left on device\n")


def test_reader_gone_is_quiet(repo: Path) -> None:
    local_grove(repo, "    - {name: a, task: 'true'}")
    for args in (["status", "--json"], ["status"], ["plan"], ["validate"], ["graph"],
                 ["--version"]):
        r, w = os.pipe()
        os.close(r)  # the reader has gone before the first write
        try:
            res = _run(args, repo, stdout=w)
        finally:
            os.close(w)
        assert res.returncode == 0, args
        assert "error" not in res.stderr and "Exception" not in res.stderr, (args, res.stderr)
    _many(repo)
    res = subprocess.run(["bash", "-c", f"{' '.join(ENGINE)} status --json | head -1; "
                          "echo \"rc=${PIPESTATUS[0]}\""], cwd=repo, capture_output=True,
                         text=True, timeout=120)
    assert res.stdout == "{\nrc=0\n" and res.stderr == "", res


def test_reader_gone_never_cuts_apply_short(repo: Path) -> None:
    """`apply | head -1`: the reader leaves after the first line, and apply still converges
    every agent and exits with its own status (output is not the work)."""
    local_grove(repo, "".join(f"    - {{name: a{i}, task: 'sleep 30'}}\n" for i in range(5)))
    res = subprocess.run(["bash", "-c", f"{' '.join(ENGINE)} apply --auto-approve | head -1; "
                          "echo \"rc=${PIPESTATUS[0]}\""], cwd=repo, capture_output=True,
                         text=True, timeout=300)
    try:
        assert res.stdout.endswith("rc=0\n") and len(res.stdout.splitlines()) == 2, res
        after = _run(["plan", "--detailed-exitcode"], repo)
        assert after.returncode == 0, after  # nothing left to do: every agent was created
    finally:
        _run(["destroy", "--auto-approve"], repo)
