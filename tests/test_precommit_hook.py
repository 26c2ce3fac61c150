"""`.pre-commit-hooks.yaml`: real pre-commit, installing this checkout as a hook repository
into its own environment (from PyPI, like any user's), run on a scratch repository."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, git, write_grove

PRE_COMMIT = Path(sys.executable).parent / "pre-commit"
VALID = """\
apiVersion: engine/v1alpha1
kind: Grove
metadata: {name: demo}
spec:
  agents:
    - name: lead
      task: echo lead
"""


def test_hook_definition_is_what_other_repositories_expect() -> None:
    hooks = yaml.safe_load((ROOT / ".pre-commit-hooks.yaml").read_text())
    hook = {h["id"]: h for h in hooks}["engine-validate"]
    assert hook["entry"] == "engine validate --no-secrets"
    assert hook["language"] == "python"
    assert hook["files"] == r"^groves/.*\.ya?ml$"
    assert hook["pass_filenames"] is True


def hook_repo(dest: Path) -> str:
    """This working tree (not just its last commit) as a git repository pre-commit can use."""
    files = git(ROOT, "ls-files", "-z", "--cached", "--others", "--exclude-standard")
    for name in files.split("\0"):
        src = ROOT / name
        if name and src.is_file() and "__pycache__" not in name:
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    git(dest, "init", "-q", "-b", "main")
    git(dest, "add", "-A")
    git(dest, "commit", "-qm", "hook repository")
    return git(dest, "rev-parse", "HEAD")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_pre_commit_runs_engine_validate(repo: Path, tmp_path: Path) -> None:
    assert PRE_COMMIT.exists(), "pre-commit is a dev dependency: pip install -e '.[dev]'"
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    rev = hook_repo(hooks)
    (repo / ".pre-commit-config.yaml").write_text(yaml.safe_dump({"repos": [{
        "repo": str(hooks), "rev": rev, "hooks": [{"id": "engine-validate"}]}]}))
    write_grove(repo, "demo", VALID)
    git(repo, "add", "-A")
    env = {**os.environ, "PRE_COMMIT_HOME": str(tmp_path / "pre-commit-home"),
           "PIP_DISABLE_PIP_VERSION_CHECK": "1"}

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(PRE_COMMIT), "run", "--all-files", "--color", "never"],
                              cwd=repo, env=env, capture_output=True, text=True, timeout=840)

    ok = run()
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "validate grove manifests" in ok.stdout and "Passed" in ok.stdout
    (repo / "groves" / "demo" / "grove.yaml").write_text(VALID + "      colour: red\n")
    git(repo, "add", "-A")
    bad = run()
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "Failed" in bad.stdout
    assert "error: groves/demo/grove.yaml:8:7: agent lead: unknown field 'colour'" in bad.stdout
    (repo / "README.md").write_text("only docs change\n")
    write_grove(repo, "demo", VALID)
    git(repo, "add", "-A")
    skipped = subprocess.run([str(PRE_COMMIT), "run", "--files", "README.md", "--color",
                              "never"], cwd=repo, env=env, capture_output=True, text=True,
                             timeout=300)
    assert skipped.returncode == 0 and "(no files to check)Skipped" in skipped.stdout
