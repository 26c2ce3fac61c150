"""`engine image build` on the real Docker engine: its output streams while the build runs,
a failed step is one error naming the step with its last output and the full log's path,
and every missing-image error names the command that builds exactly that image.

The images built here come from small Dockerfiles in a temporary directory, FROM
grove-engine/base:latest (bootstrapped offline by the fixture): the command runs in a
subprocess whose `images.images_dir()` points there, so no registry is reached.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine import images
from engine.errors import EngineError
from tests.conftest import ROOT
from tests.docker_fixtures import IMAGE, Agents, docker_cli

pytestmark = pytest.mark.docker

# the CLI with its images/ directory elsewhere (argv[1]); everything else as shipped
LAUNCHER = ("import sys; from pathlib import Path; from engine import images; "
            "images.images_dir = lambda: Path(sys.argv[1]); from engine.cli import main; "
            "sys.exit(main(sys.argv[2:]))")


@pytest.fixture
def image_dir(tmp_path: Path, base_image: str) -> Iterator[tuple[Path, str]]:
    """(an images/ directory, the name of one image in it, whose tag is removed after)."""
    name = f"t{uuid.uuid4().hex[:10]}"
    (tmp_path / "images" / name).mkdir(parents=True)
    yield tmp_path / "images", name
    subprocess.run(["docker", "rmi", "-f", images.tag(name)], capture_output=True)


def launch(images_root: Path, cache: Path, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "GROVE_ENGINE_CACHE": str(cache)}
    return subprocess.Popen([sys.executable, "-c", LAUNCHER, str(images_root), *args],
                            cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def test_failed_run_step_names_the_step_and_its_output(image_dir: tuple[Path, str],
                                                        tmp_path: Path) -> None:
    root, name = image_dir
    token = uuid.uuid4().hex  # never cached: the step runs every time
    (root / name / "Dockerfile").write_text(
        f"FROM {IMAGE}\n"
        f"RUN echo preparing {token}\n"
        f"RUN echo first-line {token}; printf 'painted \\033[31mred\\033[0m\\n'; "
        "echo last-words >&2; exit 7\n")
    with launch(root, tmp_path / "cache", "image", "build", name) as p:
        out, err = p.communicate(timeout=240)
    assert p.returncode == 1, (out, err)
    first = err.splitlines()[1]  # after "building ... (log: ...)"
    assert first.startswith(f"error: image {name}: build failed at step 3/3 "
                            f"(RUN echo first-line {token}"), err
    assert first.endswith(": exit code 7"), err
    assert "returned a non-zero code" not in err
    detail = err.split(first, 1)[1]
    assert "last output of the step:" in detail
    assert f"first-line {token}" in detail and "last-words" in detail
    assert "painted red" in detail and "preparing" not in detail  # that step's lines only
    assert "\x1b" not in out + err and "Traceback" not in err
    log = Path(detail.split("full build log: ", 1)[1].strip())
    assert log == tmp_path / "cache" / "logs" / f"image-{name}.log"
    text = log.read_text()
    assert f"preparing {token}" in text and "painted \x1b[31mred" in text  # kept whole
    # streamed to stdout as plain lines (piped), step headers included
    assert f"Step 2/3 : RUN echo preparing {token}" in out
    assert f"first-line {token}" in out
    assert subprocess.run(["docker", "image", "inspect", images.tag(name)],
                          capture_output=True).returncode != 0


def test_build_output_streams_while_the_build_runs(image_dir: tuple[Path, str],
                                                   tmp_path: Path) -> None:
    root, name = image_dir
    token = uuid.uuid4().hex
    (root / name / "Dockerfile").write_text(
        f"FROM {IMAGE}\nRUN echo before-the-pause {token} && sleep 3 && echo after-it\n")
    arrivals: list[tuple[float, str]] = []
    with launch(root, tmp_path / "cache", "image", "build", name) as p:

        def read() -> None:
            assert p.stdout is not None
            for line in p.stdout:  # as the pipe delivers it
                arrivals.append((time.monotonic(), line.rstrip("\n")))

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            p.wait(timeout=240)
        finally:
            if p.poll() is None:
                p.kill()
        ended = time.monotonic()
        reader.join(timeout=10)
        err = p.stderr.read() if p.stderr else ""
    assert p.returncode == 0, err
    seen = {text: at for at, text in arrivals}
    before = next(at for text, at in seen.items() if text == f"before-the-pause {token}")
    after = next(at for text, at in seen.items() if text == "after-it")
    assert after - before >= 2.0, arrivals  # the first line came before the pause
    assert ended - before >= 2.0
    assert arrivals[-1][1] == f"built {images.tag(name)}"
    assert docker_cli("image", "inspect", "--format", "{{.Id}}", images.tag(name)).strip()


def test_missing_image_errors_name_the_command_for_that_image(agents: Agents) -> None:
    assert images.hint(images.tag("base")) == (
        "build it with `engine image bootstrap` (offline) or `engine image build base`")
    assert images.hint("grove-engine/codex:latest") == (
        "build it with `engine image build codex`")
    for other in ("grove-engine/base:dev", "example.org/team/agent:1"):
        hint = images.hint(other)
        assert hint.startswith("build or pull it there") and "bootstrap" not in hint
    absent = [n for n in images.names() if n != images.BASE
              and not agents.runtime().has_image(images.tag(n))]
    assert absent, "every harness image is built: no missing image to ask for"
    name = absent[0]
    g = agents.grove(f"""\
apiVersion: engine/v1alpha1
kind: Grove
metadata: {{name: g}}
spec:
  defaults: {{profile: box, harness: shell}}
  profiles:
    box: {{runtime: docker, image: "{images.tag(name)}"}}
  agents:
    - {{name: x, task: "true"}}
""")
    with pytest.raises(EngineError) as e:
        agents.runtime().check_image(g.agent("x"))
    assert e.value.summary.endswith(f"; build it with `engine image build {name}`"), e.value
    assert "bootstrap" not in e.value.summary
