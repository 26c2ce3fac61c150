"""Agent images: the shipped Dockerfiles, `engine image build|bootstrap`, and the offline
root-filesystem import. The bootstrap itself runs for real in the Docker fixtures (cached by
tag); here a stand-in `mmdebstrap` script (named so, on PATH) feeds a tiny tar through the
same streaming import, so its success and failure paths run in seconds.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine import images
from engine.errors import EngineError
from engine.runtimes import docker as docker_rt
from tests.docker_fixtures import IMAGE, docker_cli

STAND_IN = """#!/bin/sh
# stand-in for mmdebstrap: a tiny root filesystem as a tar on stdout, or a failure
echo "stand-in mmdebstrap $*" >&2
[ -n "$FAIL" ] && { echo "E: cannot reach the mirror" >&2; exit 3; }
d=$(mktemp -d); mkdir -p "$d/etc"; echo tiny > "$d/etc/hello"
tar -C "$d" -cf - .
"""


def test_shipped_images_and_names() -> None:
    assert "base" in images.names()
    assert images.tag("base") == "grove-engine/base:latest" == IMAGE
    assert images.entrypoint().is_file()
    assert (images.images_dir() / "base" / "Dockerfile").is_file()
    assert images.guess_name("grove-engine/base:latest") == "base"
    assert images.guess_name("example.org/other:1") == "NAME"
    argv = images.mmdebstrap_argv()
    assert argv[0] == "mmdebstrap" and argv[-2:] == ["bookworm", "-"]
    assert "--include=bash,git,python3,tmux,ca-certificates" in argv


def test_unknown_image_name(engine) -> None:  # type: ignore[no-untyped-def]
    r = engine("image", "build", "nosuch")
    assert r.code == 1 and "no images/nosuch/Dockerfile" in r.err and "base" in r.err


@pytest.mark.docker
def test_bootstrap_is_cached_by_tag(engine, base_image: str) -> None:  # type: ignore[no-untyped-def]
    r = engine("image", "bootstrap")
    assert r.code == 0 and r.out.strip() == f"{base_image} exists (--force rebuilds it)"


@pytest.mark.docker
def test_base_image_contents(base_image: str) -> None:
    out = docker_cli("run", "--rm", "--network", "none", "--entrypoint", "bash", base_image,
                     "-c", "command -v git tmux python3 >/dev/null && id -un && id -u && "
                     "echo $HOME && test -f /usr/local/lib/engine/entrypoint.sh && "
                     "ls /etc/ssl/certs/ca-certificates.crt")
    assert out.split() == ["agent", "1000", "/home/agent", "/etc/ssl/certs/ca-certificates.crt"]


@pytest.fixture
def stand_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "mmdebstrap"
    script.write_text(STAND_IN)
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    yield f"grove-engine-test/rootfs:{uuid.uuid4().hex[:8]}"


@pytest.mark.docker
def test_rootfs_import_streams_and_fails_cleanly(stand_in: str, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch,
                                                docker_client: object) -> None:
    rt = docker_rt.make(tmp_path, None)
    try:
        images.import_rootfs(rt, stand_in)
        assert rt.has_image(stand_in)
        rt.remove_image(stand_in)
        monkeypatch.setenv("FAIL", "1")
        with pytest.raises(EngineError) as e:
            images.import_rootfs(rt, stand_in)
        assert e.value.summary == "image bootstrap: mmdebstrap failed (exit 3)"
        assert "cannot reach the mirror" in e.value.detail
        assert not rt.has_image(stand_in)
    finally:
        rt.remove_image(stand_in)
        rt.close()


def test_bootstrap_without_mmdebstrap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(EngineError, match=r"mmdebstrap is not installed \(apt-get install"):
        images.import_rootfs(None)  # type: ignore[arg-type]  # never reaches the engine


def test_harness_images_build_on_the_base_image() -> None:
    """`engine image build claude` builds grove-engine/base first when it is missing."""
    for name in ("claude", "gemini", "codex", "opencode"):
        assert images._parent(name) == "base"
    assert images._parent("base") == ""  # FROM a build argument (the offline rootfs)
