"""`engine init`: a scaffolded grove that validates, the editor modeline and the schemas it
names, `.engine/` ignored once, and never an overwrite: run again, init leaves the grove as
it is and only refreshes the schemas (tests/test_editors.py drives editors on them)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import git


def tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and ".git" not in p.parts}


def test_init_scaffolds_a_grove_that_validates(engine: Any, repo: Path) -> None:
    r = engine("init", "--name", "team")
    assert (r.code, r.err) == (0, "")
    assert r.out == ("wrote groves/.schemas/v1alpha1/ (the manifest schemas, for editors)\n"
                     "created groves/team/grove.yaml; next: engine validate && engine plan\n")
    text = (repo / "groves" / "team" / "grove.yaml").read_text()
    assert text.splitlines()[0] == ("# yaml-language-server: $schema="
                                    "../.schemas/v1alpha1/grove.json")
    assert (repo / "groves" / "team" / text.splitlines()[0].partition("=")[2]).is_file()
    assert "name: team" in text
    v = engine("validate")
    assert (v.code, v.out) == (0, "valid: 1 grove (team), 1 agent\n"), v
    assert engine("explain", "hello", "--json").code == 0


def test_init_names_the_grove_after_the_directory(engine: Any, tmp_path: Path) -> None:
    d = tmp_path / "My Project_2"
    d.mkdir()
    assert engine("init", str(d)).code == 0
    assert (d / "groves" / "my-project-2" / "grove.yaml").is_file()


def test_gitignore_gets_engine_once(engine: Any, repo: Path) -> None:
    (repo / ".gitignore").write_text("*.pyc")  # no final newline
    assert engine("init", "--name", "one").code == 0
    assert (repo / ".gitignore").read_text() == "*.pyc\n.engine/\n"
    assert engine("init", "--name", "two").code == 0
    assert (repo / ".gitignore").read_text() == "*.pyc\n.engine/\n"
    git(repo, "add", "-A")  # the scaffold is committable and .engine/ stays out of git
    (repo / ".engine").mkdir()
    (repo / ".engine" / "state.json").write_text("{}")
    assert ".engine" not in git(repo, "status", "--porcelain", "--untracked-files=all")


def test_gitignore_created_when_missing(engine: Any, tmp_path: Path) -> None:
    assert engine("init", str(tmp_path), "--name", "x").code == 0
    assert (tmp_path / ".gitignore").read_text() == ".engine/\n"


def test_init_never_overwrites_a_grove(engine: Any, repo: Path) -> None:
    assert engine("init", "--name", "team").code == 0
    grove = repo / "groves" / "team" / "grove.yaml"
    grove.write_text(grove.read_text().replace("hello", "mine"))
    before = tree(repo)
    r = engine("init", "--name", "team")
    assert (r.code, r.err) == (0, "")
    assert r.out == "groves/team/ already exists, left as it is (a new grove: --name)\n"
    assert tree(repo) == before
    (repo / "groves" / "other").mkdir()  # a directory without grove.yaml is left alone too
    assert engine("init", "--name", "other").code == 0
    assert not (repo / "groves" / "other" / "grove.yaml").exists()


@pytest.mark.parametrize("where", ["groves", "groves/.schemas", "groves/.schemas/v1alpha1",
                                   "groves/team"])
def test_init_refuses_a_symlink_on_its_way(engine: Any, repo: Path, tmp_path: Path,
                                           where: str) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (repo / where).parent.mkdir(parents=True, exist_ok=True)
    (repo / where).symlink_to(elsewhere)
    before = tree(repo)
    r = engine("init", "--name", "team")
    assert r.code == 1 and r.err.startswith("error: ") and "is not a directory; nothing " \
        "written" in r.err, r
    assert list(elsewhere.iterdir()) == [] and tree(repo) == before


@pytest.mark.parametrize("name", ["../x", "A B", "a" * 41, "-x"])
def test_init_refuses_unsafe_names(engine: Any, repo: Path, name: str) -> None:
    before = tree(repo)
    r = engine("init", f"--name={name}")
    assert r.code == 1 and r.err.startswith(f"error: grove {name!r}: not a valid name")
    assert tree(repo) == before
    assert not (repo / "groves").exists()


def test_init_needs_a_directory(engine: Any, tmp_path: Path) -> None:
    r = engine("init", str(tmp_path / "nope"))
    assert (r.code, r.err) == (1, f"error: init: {tmp_path / 'nope'} is not a directory\n")


def test_init_never_reads_gitignore_through_a_link(engine: Any, repo: Path,
                                                   tmp_path: Path) -> None:
    secret = tmp_path / "outside"
    secret.write_text("SECRET-KEY-MATERIAL\n")
    (repo / ".gitignore").unlink(missing_ok=True)
    (repo / ".gitignore").symlink_to(secret)
    r = engine("init", str(repo), "--name", "demo")
    assert (r.code, r.err) == (1, "error: .gitignore: is a symbolic link, not a regular file; "
                                  "nothing written\n")
    assert (repo / ".gitignore").is_symlink() and not (repo / "groves").exists()
