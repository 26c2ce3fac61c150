"""`engine init [DIR]`: scaffold `groves/<name>/grove.yaml` and ignore `.engine/`."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from engine import ui
from engine.errors import EngineError
from engine.fsutil import atomic_write

SCHEMA_URL = "https://grove-engine.dev/schemas/v1alpha1/grove.json"
TEMPLATE = """\
# yaml-language-server: $schema={schema}
apiVersion: engine/v1alpha1
kind: Grove
metadata:
  name: {name}
spec:
  workspace: worktree
  defaults: {{profile: local, harness: shell}}
  policy: {{maxAgents: 50, maxDepth: 3, maxChildren: 10}}
  profiles:
    local: {{runtime: local, spawn: {{allowProfiles: [local]}}}}
  agents:
    - name: hello
      task: echo "hello from $ENGINE_AGENT" > HELLO.txt && git add HELLO.txt && git commit -qm hello
"""


def register(sub: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser("init", help="scaffold a grove")
    p.add_argument("dir", nargs="?", default=".", metavar="DIR",
                   help="repository directory (default: .)")
    p.add_argument("--name", help="grove name (default: the directory's name)")
    return p


def run(args: argparse.Namespace) -> int:
    root = Path(args.dir).resolve()
    if not root.is_dir():
        raise EngineError(f"init: {args.dir} is not a directory")
    name = args.name or re.sub(r"[^a-z0-9-]+", "-", root.name.lower()).strip("-")[:40] \
        .strip("-") or "main"
    if not re.fullmatch(r"[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?", name):
        raise EngineError(f"grove {name!r}: not a valid name: use lower-case letters, digits "
                          "and '-', at most 40 characters")
    grove = root / "groves" / name / "grove.yaml"
    if grove.parent.exists():
        raise EngineError(f"grove {name}: {grove.parent.relative_to(root)}/ already exists; "
                          "nothing written (choose another name with --name)")
    grove.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(grove, TEMPLATE.format(schema=SCHEMA_URL, name=name).encode())
    ignore = root / ".gitignore"
    lines = ignore.read_text().splitlines() if ignore.exists() else []
    if not {".engine/", ".engine", "/.engine/", "/.engine"} & {x.strip() for x in lines}:
        atomic_write(ignore, ("\n".join([*lines, ".engine/"]) + "\n").encode())
    ui.out(f"created {grove.relative_to(root)}; next: engine validate && engine plan")
    return 0
