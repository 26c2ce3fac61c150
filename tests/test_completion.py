"""Shell completion: the real bash, zsh and fish load `engine completion SHELL` (argcomplete's
scripts) and complete command names, grove names and agent names from a real repository."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import write_grove

BIN = Path(sys.executable).parent  # the environment's `engine` console script

GROVE = """\
apiVersion: engine/v1alpha1
kind: Grove
metadata: {{name: {name}}}
spec:
  agents:
{agents}
"""


def _env() -> dict[str, str]:
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}


def _grove(root: Path, name: str, *agents: str) -> None:
    write_grove(root, name, GROVE.format(
        name=name, agents="".join(f"    - {{name: {a}, task: 'true'}}\n" for a in agents)))


def bash_complete(line: str, cwd: Path, script: str = "source <(engine completion bash)",
                  function: str = "_python_argcomplete") -> list[str]:
    """What bash offers for `line` (cursor at its end), through the sourced script's own
    completion function, as the shell calls it on TAB."""
    res = subprocess.run(
        ["bash", "--norc", "--noprofile", "-c",
         f'{script} || exit 9; COMP_LINE="$LINE"; COMP_POINT=${{#LINE}}; '
         f'COMP_WORDS=($LINE); COMP_CWORD=${{#COMP_WORDS[@]}}; {function} engine; '
         'printf "%s\\n" "${COMPREPLY[@]}"'],
        cwd=cwd, env={**_env(), "LINE": line}, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stderr == "", res
    return sorted(w.strip() for w in res.stdout.splitlines() if w.strip())


def test_bash_completes_command_names(tmp_path: Path) -> None:
    assert bash_complete("engine va", tmp_path) == ["validate"]
    assert bash_complete("engine de", tmp_path) == ["deny", "destroy"]
    assert "--version" in bash_complete("engine --v", tmp_path)
    assert bash_complete("engine status --js", tmp_path) == ["--json"]
    assert bash_complete("engine completion ", tmp_path) == ["--help", "-h", "bash", "fish", "zsh"]


def test_bash_completes_grove_names(repo: Path, tmp_path: Path) -> None:
    _grove(repo, "alpha", "a1")
    _grove(repo, "beta", "b1")
    (repo / "groves" / "not_a_grove").mkdir()  # not a grove name: never offered
    assert bash_complete("engine status -g ", repo) == ["alpha", "beta"]
    assert bash_complete("engine plan --grove b", repo) == ["beta"]
    # -C names the repository from elsewhere
    assert bash_complete(f"engine -C {repo} status -g ", tmp_path) == ["alpha", "beta"]


def test_bash_completes_agent_names(repo: Path) -> None:
    _grove(repo, "alpha", "coder", "reviewer")
    _grove(repo, "beta", "coder", "tester")
    (repo / "groves/beta/spawned.yaml").write_text(
        "apiVersion: engine/v1alpha1\nkind: Agent\nmetadata: {name: helper}\n"
        "spec: {task: 'true'}\n---\n"
        "apiVersion: engine/v1alpha1\nkind: Agent\n"
        "metadata: {name: \"evil\\e]0;owned\\a\"}\nspec: {task: 'true'}\n")
    assert bash_complete("engine logs r", repo) == ["reviewer"]
    # a name in several groves is offered bare and as GROVE/NAME
    assert bash_complete("engine explain c", repo) == ["coder"]
    assert bash_complete("engine explain alpha/", repo) == ["alpha/coder", "alpha/reviewer"]
    in_beta = set(bash_complete("engine logs -g beta ", repo))  # with logs' options
    assert {"coder", "helper", "tester"} <= in_beta and "reviewer" not in in_beta
    names = bash_complete("engine diff ", repo)
    assert {"coder", "helper", "reviewer", "tester", "alpha/coder", "beta/coder"} <= set(names)
    assert not any("evil" in n or "\x1b" in n for n in names)  # agent-written, not a name
    assert bash_complete("engine spawn x --depends-on t", repo) == ["tester"]


def test_bash_script_is_argcompletes_own(tmp_path: Path) -> None:
    ours = subprocess.run(["engine", "completion", "bash"], env=_env(), capture_output=True,
                          text=True, check=True, cwd=tmp_path).stdout
    theirs = subprocess.run([str(BIN / "register-python-argcomplete"), "engine"], env=_env(),
                            capture_output=True, text=True, check=True).stdout
    assert ours == theirs
    assert "complete " in ours and "_python_argcomplete" in ours


def test_global_completion_finds_the_marker(tmp_path: Path) -> None:
    """argcomplete's global completion (activate-global-python-argcomplete) completes only
    programs whose entry module carries PYTHON_ARGCOMPLETE_OK."""
    for check in (["argcomplete._check_console_script", str(BIN / "engine")],
                  ["argcomplete._check_module", "engine"]):
        res = subprocess.run([sys.executable, "-W", "ignore", "-m", *check],
                             capture_output=True, text=True)
        assert res.returncode == 0, res
    import argcomplete

    script = Path(argcomplete.__file__).parent / "bash_completion.d" / "_python-argcomplete"
    assert bash_complete("engine va", tmp_path, script=f"source {script}",
                         function="_python_argcomplete_global") == ["validate"]


def test_completion_costs_nothing_otherwise(repo: Path) -> None:
    _grove(repo, "alpha", "a1")
    for args in (["--version"], ["validate"]):
        res = subprocess.run([sys.executable, "-X", "importtime", "-m", "engine", *args],
                             cwd=repo, capture_output=True, text=True, env=_env())
        assert res.returncode == 0, res
        assert "argcomplete" not in res.stderr and "engine.commands.completion" not in res.stderr


@pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh is not installed (.ci/run "
                    "installs it)")
def test_zsh_loads_the_script(tmp_path: Path) -> None:
    res = subprocess.run(
        ["zsh", "-f", "-c", "autoload -U compinit && compinit -D && "
         "source <(engine completion zsh) && print -r -- ${_comps[engine]}"],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stderr == "", res
    assert res.stdout.strip() == "_python_argcomplete"


@pytest.mark.skipif(shutil.which("fish") is None, reason="fish is not installed (.ci/run "
                    "installs it)")
def test_fish_loads_the_script_and_completes(repo: Path) -> None:
    _grove(repo, "alpha", "coder")

    def fish(line: str) -> list[str]:
        res = subprocess.run(
            ["fish", "--no-config", "-c",
             f"engine completion fish | source; and complete -C '{line}'"],
            cwd=repo, env=_env(), capture_output=True, text=True, timeout=60)
        assert res.returncode == 0 and res.stderr == "", res
        return res.stdout.splitlines()

    assert fish("engine va") == ["validate\tcheck grove manifests"]
    assert fish("engine status -g ") == ["alpha"]
    assert fish("engine logs c") == ["coder"]


def test_unknown_shell_is_a_usage_error(engine) -> None:
    res = engine("completion", "tcsh")
    assert res.code == 2 and res.err.startswith("error: engine completion: argument SHELL:")


def test_nothing_is_offered_inside_an_agent_workspace_nor_from_a_fifo(repo: Path) -> None:
    """Inside an agent's workspace every file is the agent's: no names are read there. A
    FIFO where a state file belongs never hangs a TAB (nor `engine status`)."""
    _grove(repo, "alpha", "coder")
    ws = repo / ".engine" / "worktrees" / "alpha" / "coder"
    (ws / "groves" / "alpha").mkdir(parents=True)
    (ws / "groves" / "alpha" / "grove.yaml").write_text(
        (repo / "groves" / "alpha" / "grove.yaml").read_text())
    (ws / ".engine" / "state").mkdir(parents=True)
    os.mkfifo(ws / ".engine" / "state" / "alpha.json")
    subprocess.run(["git", "init", "-q", str(ws)], check=True)
    assert bash_complete("engine logs ", ws) == ["--follow", "--grove", "--help", "--previous",
                                                 "--tail", "-f", "-g", "-h", "-p"]
    assert bash_complete("engine status -g ", ws) == []
    state = repo / ".engine" / "state"
    state.mkdir(parents=True, exist_ok=True)
    os.mkfifo(state / "alpha.json")
    assert bash_complete("engine logs ", repo)[-1] == "coder"  # from the manifests
    res = subprocess.run([str(BIN / "engine"), "status"], cwd=repo, env=_env(),
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 1 and "is a FIFO, not a regular file" in res.stderr, res
