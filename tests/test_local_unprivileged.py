"""The local runtime as root: agents run as their profile's uid (1000), never as root, with
a private home; a repository under a directory only root may search (a 0700 mktemp
directory, /root) is reached through a search-only ACL, recorded as an event."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import git, write_grove

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the engine must run as root")

GROVE = """\
apiVersion: engine/v1alpha1
kind: Grove
metadata: {name: u}
spec:
  defaults: {profile: local, harness: shell}
  profiles:
    local: {runtime: local}
  agents:
    - name: a
      task: |
        id -u > UID.txt && echo "$HOME" > HOME.txt && git add -A && git commit -qm ids
"""


def test_agent_runs_as_uid_1000_and_reaches_a_private_repository(tmp_path: Path) -> None:
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    private.chmod(0o700)
    for d in [tmp_path, *tmp_path.parents]:  # as the repo fixture does, up to `private`
        if d in (Path("/tmp"), Path("/")):
            break
        d.chmod(d.stat().st_mode | 0o001)
    repo = private / "repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    (repo / ".gitignore").write_text(".engine/\n")
    write_grove(repo, "u", GROVE)
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "grove")
    p = subprocess.run([sys.executable, "-m", "engine", "apply", "--auto-approve", "--wait",
                        "--timeout", "60"], cwd=repo, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert git(repo, "show", "engine/u/a:UID.txt") == "1000"
    assert git(repo, "show", "engine/u/a:HOME.txt") == str(repo / ".engine/home/u/a")
    assert private.stat().st_mode & 0o707 == 0o700  # others still cannot (group: the ACL mask)
    events = [json.loads(ln) for ln in (repo / ".engine/events.jsonl").read_text()
              .splitlines()]
    assert any(e.get("event") == "SearchGranted" and e.get("path") == str(private)
               and e.get("uid") == 1000 for e in events)
    subprocess.run([sys.executable, "-m", "engine", "destroy", "--auto-approve"], cwd=repo,
                   capture_output=True, timeout=120)
