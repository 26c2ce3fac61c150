"""`engine init [DIR]`: scaffold `groves/<name>/grove.yaml`, write the schemas editors read
offline into `groves/.schemas/` (refreshed on every run) and ignore `.engine/`. An existing
grove is left as it is."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

from engine import manifest, schema, ui, yamlio
from engine.errors import EngineError
from engine.fsutil import atomic_write

# groves/.schemas/: a dot-directory, which is never a grove (manifest.grove_dirs skips it)
SCHEMAS_DIR = ".schemas/v1alpha1"
SCHEMA_REF = f"../{SCHEMAS_DIR}/grove.json"  # relative to groves/<name>/
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
    grove = root / manifest.GROVES_DIR / name / "grove.yaml"
    schemas = root / manifest.GROVES_DIR / SCHEMAS_DIR
    for d in (grove.parent.parent, schemas.parent, schemas):
        if d.is_symlink() or (d.exists() and not d.is_dir()):
            raise EngineError(f"init: {d.relative_to(root)} is not a directory; nothing written")
    if grove.parent.is_symlink() or (grove.parent.exists() and not grove.parent.is_dir()):
        raise EngineError(f"grove {name}: {grove.parent.relative_to(root)} is not a directory; "
                          "nothing written")
    ignore = root / ".gitignore"
    try:  # the repository's file: never through a link, never a FIFO or a device
        lines = yamlio.read_regular(ignore, 1 << 20, follow_symlinks=False) \
            .decode("utf-8", "replace").splitlines()
    except FileNotFoundError:
        lines = []
    except (OSError, yamlio.NotReadable) as e:
        raise EngineError(f".gitignore: {getattr(e, 'strerror', None) or e}; "
                          "nothing written") from None
    files = schema_files()
    stale = [f for f, data in files.items() if (schemas / f).is_symlink()
             or not (schemas / f).is_file() or (schemas / f).read_bytes() != data]
    for f in stale:
        atomic_write(schemas / f, files[f])
    if stale:
        ui.out(f"wrote {schemas.relative_to(root)}/ (the manifest schemas, for editors)")
    existed = grove.parent.exists()
    if not existed:
        grove.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(grove, TEMPLATE.format(schema=SCHEMA_REF, name=name).encode())
    if not {".engine/", ".engine", "/.engine/", "/.engine"} & {x.strip() for x in lines}:
        atomic_write(ignore, ("\n".join([*lines, ".engine/"]) + "\n").encode())
    if existed:
        ui.out(f"{grove.parent.relative_to(root)}/ already exists, left as it is (a new grove: "
               "--name)")
    else:
        ui.out(f"created {grove.relative_to(root)}; next: engine validate && engine plan")
    return 0


def schema_files() -> dict[str, bytes]:
    """File name -> content of the self-contained schemas `init` writes (one per kind)."""
    return {file: (json.dumps(schema.bundled(file), indent=2) + "\n").encode()
            for file in sorted(schema.KINDS.values())}
