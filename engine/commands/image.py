"""`engine image build [NAME]` and `engine image bootstrap`: the images agent profiles name.

build: docker build of images/<NAME>/Dockerfile (every image without NAME) tagged
grove-engine/<NAME>:latest, its output streamed as it arrives and kept in a log file that
a failure names with the step that failed. bootstrap: grove-engine/base:latest offline,
from Debian packages (mmdebstrap | docker import), skipped when the tag exists unless
--force.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, cast

from engine import images, runtimes, ui


def register(sub: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(
        "image", help="build agent images",
        description="Build the agent images that profiles name (grove-engine/NAME:latest).")
    verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True,
                             parser_class=type(p))
    b = verbs.add_parser("build", help="docker build images/NAME/Dockerfile",
                         description="Build images/NAME/Dockerfile as grove-engine/NAME:latest "
                         "(needs a registry for its FROM image; offline, use bootstrap).")
    b.add_argument("names", nargs="*", metavar="NAME",
                   help=f"image to build (default: all of {', '.join(images.names())})")
    b.add_argument("--network", default="host",
                   help="network for the build's RUN steps (default: host)")
    s = verbs.add_parser("bootstrap", help="build the base image offline from Debian packages",
                         description="Build grove-engine/base:latest without a registry: "
                         "mmdebstrap | docker import, then images/base/Dockerfile on top. "
                         "Skipped when the image exists.")
    s.add_argument("--force", action="store_true", help="rebuild even if the image exists")
    for q in (b, s):
        q.add_argument("--host", metavar="URL",
                       help="Docker engine to build on (default: DOCKER_HOST or the local one)")
    return p


def run(args: argparse.Namespace) -> int:
    engine = cast(images.ImageEngine, runtimes.get("docker", Path.cwd(), args.host))
    show = _shower()
    if args.verb == "bootstrap":
        tag, built = images.bootstrap(engine, force=args.force, show=show)
        ui.out(f"built {tag}" if built else f"{tag} exists (--force rebuilds it)")
        return 0
    for name in args.names or images.names():
        ui.err(f"building {images.tag(name)} (log: {images.log_path(name)})")
        ui.out(f"built {images.build(engine, name, network=args.network, show=show)}")
    return 0


def _shower() -> images.Show:
    """Each line of build output as it arrives (already terminal-safe): on a terminal
    with the step lines bold, else plain lines, flushed so a pipe sees them at once."""
    if not sys.stdout.isatty():
        def plain(line: str) -> None:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()
        return plain
    from rich.text import Text

    console = ui.console()

    def styled(line: str) -> None:
        step = line.startswith("Step ") and " : " in line
        console.print(Text(line, style="bold" if step else "dim" if line.startswith(
            " ---> ") else ""), soft_wrap=True)
    return styled
