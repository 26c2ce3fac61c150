"""Bad input to the state around the manifests: one line, exit 1 (2 for usage), no
traceback, nothing changed."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tests.conftest import write_grove

GROVE = """\
apiVersion: engine/v1alpha1
kind: Grove
metadata: {name: g}
spec:
  agents:
    - {name: a, task: 'true'}
"""


def test_damaged_secret_key(repo: Path, engine) -> None:
    write_grove(repo, "g", GROVE)
    (repo / ".engine").mkdir()
    (repo / ".engine/secret-key").write_text("not-hex\n")
    res = engine("plan")
    assert res.code == 1 and "secret-key is damaged" in res.err
    assert (repo / ".engine/secret-key").read_text() == "not-hex\n"


def test_chdir_to_nowhere(repo: Path, engine) -> None:
    res = engine("-C", str(repo / "nope"), "status")
    assert res.code == 1 and res.err.startswith("error: -C ")


def test_destroy_of_an_unknown_grove(repo: Path, engine) -> None:
    write_grove(repo, "g", GROVE)
    res = engine("destroy", "-g", "nope", "--auto-approve")
    assert res.code == 1 and "grove 'nope' not found" in res.err
    assert not (repo / ".engine/state/nope.lock").exists()


def test_hand_edited_plan_file_is_refused(repo: Path, engine, tmp_path: Path) -> None:
    write_grove(repo, "g", GROVE)
    planfile = tmp_path / "p.json"
    assert engine("plan", "--out", str(planfile)).code == 0
    doc = json.loads(planfile.read_text())
    doc["groves"][0]["changes"][0]["waitsFor"] = ["nobody"]
    planfile.write_text(json.dumps(doc))
    res = engine("apply", str(planfile))
    assert res.code == 1 and "does not match the manifests" in res.err
    doc["groves"][0]["changes"][0].update(waitsFor=[], action="delete")
    planfile.write_text(json.dumps(doc))
    res = engine("apply", str(planfile))
    assert res.code == 1 and "does not match the manifests" in res.err
    assert not (repo / ".engine/worktrees").exists()


def test_plan_base_usage_errors(repo: Path, engine, tmp_path: Path) -> None:
    write_grove(repo, "g", GROVE)
    assert engine("plan", "--head", "HEAD").code == 2
    assert engine("plan", "--base", "HEAD", "--out", str(tmp_path / "x")).code == 2


def test_user_config_that_is_a_fifo(repo: Path, engine) -> None:
    """The user config is read like a manifest: a FIFO there is refused, never waited on."""
    write_grove(repo, "g", GROVE)
    cfg = Path(os.environ["XDG_CONFIG_HOME"]) / "engine" / "config.yaml"
    cfg.parent.mkdir(parents=True)
    os.mkfifo(cfg)
    res = engine("validate")
    assert res.code == 1
    assert res.err.splitlines() == [f"error: {cfg}:1:1: file is a FIFO, not a regular file",
                                    "1 problem found"]
