"""Agent images: the Dockerfiles shipped under images/, and the offline bootstrap of the base.

Called by `engine image build|bootstrap` (engine/commands/image.py) and by the Docker
runtime (which bind-mounts `entrypoint()` into every container). Talks to Docker only
through an `ImageEngine` (the Docker runtime), so this module never imports the SDK.
Returns image tags.
"""

from __future__ import annotations

import collections
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Protocol

from engine import harness_install
from engine.errors import EngineError
from engine.trust.reader import for_terminal

PREFIX = "grove-engine"
ROOTFS_TAG = f"{PREFIX}/rootfs:bookworm"
BASE = "base"
PACKAGES = ("bash", "git", "python3", "tmux", "ca-certificates")
SUITE = "bookworm"
TAIL = 15  # lines of the failed step's output an error quotes
_STEP = re.compile(r"Step (\d+/\d+) : (.*)")
_EXIT = re.compile(r"returned a non-zero code: (\d+)")


class ImageEngine(Protocol):
    def has_image(self, tag: str) -> bool: ...
    def remove_image(self, tag: str) -> None: ...
    def build_image(self, context: Path, tag: str, buildargs: dict[str, str],
                    network: str | None, output: Callable[[str], None]) -> None: ...
    def import_image(self, chunks: Iterable[bytes], tag: str) -> None: ...


def images_dir() -> Path:
    """Installed wheels carry images/ inside the package; a checkout has it at the top."""
    here = Path(__file__).resolve().parent
    for cand in (here / "images", here.parent / "images"):
        if (cand / BASE / "Dockerfile").is_file():
            return cand
    raise FileNotFoundError("grove-engine images/ not found")  # a broken install: a bug


def entrypoint() -> Path:
    """The container entrypoint the Docker runtime mounts into every agent container."""
    return images_dir() / BASE / "entrypoint.sh"


def names() -> list[str]:
    return sorted(p.parent.name for p in images_dir().glob("*/Dockerfile"))


def tag(name: str) -> str:
    return f"{PREFIX}/{name}:latest"


def guess_name(image: str) -> str:
    """The images/ name an image reference was probably built from (for hints)."""
    repo = image.rsplit(":", 1)[0] if ":" in image.rsplit("/", 1)[-1] else image
    if repo.startswith(PREFIX + "/") and repo.removeprefix(PREFIX + "/") in names():
        return repo.removeprefix(PREFIX + "/")
    return "NAME"


def hint(image: str) -> str:
    """How to make `image` when an engine lacks it: the command that builds exactly that
    image, or, for an image this project does not ship, that it must be built or pulled."""
    name = guess_name(image)
    if name == BASE and image == tag(BASE):
        return ("build it with `engine image bootstrap` (offline) or `engine image build "
                "base`")
    if name != "NAME" and image == tag(name):
        return f"build it with `engine image build {name}`"
    return (f"build or pull it there (`engine image build` makes only {PREFIX}/NAME:latest "
            f"for NAME in {', '.join(names())})")


Show = Callable[[str], None]  # one line of build output, terminal-safe, as it arrives


def log_path(name: str) -> Path:
    """Where the last build of image `name` keeps its whole output."""
    return harness_install.cache_root().parent / "logs" / f"image-{name}.log"


def build(engine: ImageEngine, name: str, network: str | None = "host",
          buildargs: dict[str, str] | None = None, show: Show | None = None) -> str:
    """docker build of images/<name>/Dockerfile as grove-engine/<name>:latest, its output
    shown line by line as it arrives and kept in `log_path(name)`."""
    if name not in names():
        raise EngineError(f"image {name}: no images/{name}/Dockerfile (images: "
                          f"{', '.join(names())})")
    t = tag(name)
    parent = _parent(name)
    if parent and not engine.has_image(tag(parent)):
        build(engine, parent, network, show=show)  # e.g. grove-engine/base under a harness
    if name in harness_install.names():
        return _build_harness(engine, name, t, show)
    try:
        build_logged(engine, name, images_dir() / name, buildargs or {}, network, show)
    except EngineError as e:
        if name == BASE and not buildargs:
            raise EngineError(f"{e.summary} (no registry reachable? `engine image bootstrap` "
                              "builds the base image offline)", e.detail) from None
        raise
    return t


def build_logged(engine: ImageEngine, name: str, context: Path, buildargs: dict[str, str],
                 network: str | None, show: Show | None = None) -> None:
    """Build `context` as grove-engine/<name>:latest through a `BuildLog`: a failure is
    one line naming the step that failed, its last lines of output and the log file."""
    log = BuildLog(log_path(name), show or (lambda _line: None))
    try:
        engine.build_image(context, tag(name), buildargs, network, log.write)
    except EngineError as e:
        log.close()
        raise log.failure(name, e) from None
    log.close()


class BuildLog:
    """The output of one build as it arrives: written whole to a file, split into lines
    (made terminal-safe: a Dockerfile's RUN can print anything) that are shown, and the
    current step's last lines kept for the error if it fails."""

    def __init__(self, path: Path, show: Show) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.show = show
        try:  # never through a link planted in a shared cache directory
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise EngineError(f"build log {path}: {e.strerror}") from None
        self.file = os.fdopen(fd, "w", encoding="utf-8", errors="replace")
        self.step = ""  # "N/M : INSTRUCTION" of the step running now
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL)
        self._part = ""

    def write(self, text: str) -> None:
        self.file.write(text)
        self.file.flush()
        *lines, self._part = (self._part + text).split("\n")
        for line in lines:
            self._line(line)

    def close(self) -> None:
        if self._part:
            self._line(self._part)
            self._part = ""
        self.file.close()

    def _line(self, raw: str) -> None:
        line = for_terminal(raw).rstrip()
        m = _STEP.match(line)
        if m:
            self.step = f"{m[1]} : {m[2]}"
            self.tail.clear()
        elif line.strip() and not line.startswith((" ---> ", "Removing intermediate")):
            self.tail.append(line)
        self.show(line)

    def failure(self, name: str, e: EngineError) -> EngineError:
        reason = e.summary.split("build failed: ", 1)[-1]
        code = _EXIT.search(reason)
        num, _, instruction = self.step.partition(" : ")
        where = f" at step {num} ({_short(instruction)})" if self.step else ""
        why = f"exit code {code[1]}" if code else _short(for_terminal(reason), 200)
        detail = ["last output of the step:", *(f"  {t}" for t in self.tail)] \
            if self.tail and self.step else []
        return EngineError(f"image {name}: build failed{where}: {why}",
                           "\n".join([*detail, f"full build log: {self.path}"]))


def _short(text: str, limit: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _build_harness(engine: ImageEngine, name: str, t: str, show: Show | None) -> str:
    """A harness image, offline: images/<name>/Dockerfile with the program from the
    install cache copied into the build context (symlinks kept, they are relative)."""
    program = harness_install.installed(name)
    if program is None:
        raise EngineError(f"image {name}: {harness_install.missing_message(name)}; the "
                          "image is built from the installed program, offline")
    with tempfile.TemporaryDirectory(prefix="engine-image-") as tmp:
        ctx = Path(tmp)
        shutil.copy2(images_dir() / name / "Dockerfile", ctx / "Dockerfile")
        shutil.copytree(program.root, ctx / "program", symlinks=True)
        build_logged(engine, name, ctx, {"VERSION": program.version}, "none", show)
    return t


def _parent(name: str) -> str:
    """The shipped image an image's Dockerfile starts FROM, or "" when it starts from
    another (the base starts from a build argument)."""
    for line in (images_dir() / name / "Dockerfile").read_text().splitlines():
        if line.startswith("FROM "):
            ref = line.split()[1]
            if ref.startswith(PREFIX + "/") and ref.endswith(":latest"):
                parent = ref.removeprefix(PREFIX + "/").removesuffix(":latest")
                return parent if parent in names() and parent != name else ""
            return ""
    return ""


def bootstrap(engine: ImageEngine, force: bool = False, show: Show | None = None
              ) -> tuple[str, bool]:
    """Build grove-engine/base:latest without a registry: a Debian root filesystem from
    mmdebstrap imported as grove-engine/rootfs:bookworm, then images/base/Dockerfile on
    top of it. Cached by tag; returns (tag, whether anything was built)."""
    t = tag(BASE)
    if not force and engine.has_image(t):
        return t, False
    if force or not engine.has_image(ROOTFS_TAG):
        import_rootfs(engine)
    build(engine, BASE, network="none", buildargs={"BASE": ROOTFS_TAG}, show=show)
    return t, True


def mmdebstrap_argv() -> list[str]:
    return ["mmdebstrap", "--quiet", "--variant=apt", f"--include={','.join(PACKAGES)}",
            SUITE, "-"]


def import_rootfs(engine: ImageEngine, tag: str = ROOTFS_TAG) -> None:
    """mmdebstrap ... - | docker import: streamed, nothing large written to disk."""
    if shutil.which("mmdebstrap") is None:
        raise EngineError("image bootstrap: mmdebstrap is not installed "
                          "(apt-get install mmdebstrap)")
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(mmdebstrap_argv(), stdout=subprocess.PIPE, stderr=err,
                                stdin=subprocess.DEVNULL)
        assert proc.stdout is not None
        failed: EngineError | None = None
        try:
            engine.import_image(_chunks(proc.stdout), tag)
        except EngineError as e:
            failed = e
        finally:
            proc.stdout.close()
            code = proc.wait()
        if code != 0:
            engine.remove_image(tag)
            err.seek(0)
            tail = err.read().decode(errors="replace").strip().splitlines()[-5:]
            if failed is not None:
                tail.append(f"docker import: {failed.summary}")
            raise EngineError(f"image bootstrap: mmdebstrap failed (exit {code})",
                              "\n".join(tail))
        if failed is not None:
            raise failed


def _chunks(stream: IO[bytes]) -> Iterator[bytes]:
    while chunk := stream.read(1 << 20):
        yield chunk
