"""`engine validate [PATH...]`: schema, references, cycles, policy; every problem at once."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from engine import desired, manifest, ui
from engine.commands import _common
from engine.errors import Diagnostic, EngineError, InvalidManifests


def register(sub: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(
        "validate", help="check grove manifests", description="Check grove manifests: "
        "schema, references, dependency cycles, policy and credentials.")
    p.add_argument("paths", nargs="*", metavar="PATH",
                   help="grove directories or files in them (default: every grove)")
    p.add_argument("--json", action="store_true", help="print a JSON report")
    p.add_argument("--no-secrets", action="store_true",
                   help="do not check that credential sources exist (for CI and pre-commit)")
    _common.add_set_arg(p)
    return p


def _targets(root: Path, paths: list[str]) -> list[Path]:
    if not paths:
        return manifest.select_groves(root, None)
    out: list[Path] = []
    for raw in paths:
        p = Path(raw).resolve()
        if not p.exists():
            raise EngineError(f"{raw}: no such file or directory")
        if p.is_file():
            p = p.parent
        if (p / manifest.GROVES_DIR).is_dir():
            out.extend(manifest.grove_dirs(p))
        elif p.name == manifest.GROVES_DIR:
            out.extend(manifest.grove_dirs(p.parent))
        else:
            out.append(p)
    return sorted(set(out))


def run(args: argparse.Namespace) -> int:
    r = _common.repo(inside_agent_ok=True)  # read-only: a pre-commit hook may run it there
    diags: list[Diagnostic] = []
    summary: list[dict[str, Any]] = []
    try:
        opts = _common.options(r, args, resolve_secrets=not args.no_secrets)
        # --no-secrets checks what a pull request wrote: no environment value reaches its
        # templates (nor, through a template error, the output)
        opts = dataclasses.replace(opts, host_env=not args.no_secrets)
    except InvalidManifests as e:  # the user config: reported like any manifest problem
        diags, targets = list(e.diagnostics), []
    else:
        targets = _targets(r.root, args.paths)
    for d in targets:
        try:
            g = desired.build(manifest.load_grove(d, r.root), opts)
            summary.append({"grove": g.name, "agents": len(g.agents),
                            "profiles": len(g.profiles)})
        except InvalidManifests as e:
            diags.extend(e.diagnostics)
    diags.sort()
    if args.json:
        ui.print_json({"valid": not diags, "groves": summary,
                       "errors": [d.to_json() for d in diags]})
        return 1 if diags else 0
    if diags:
        raise InvalidManifests(diags)
    n = sum(int(s["agents"]) for s in summary)
    names = ", ".join(str(s["grove"]) for s in summary)
    ui.out(f"valid: {len(summary)} grove{'s' if len(summary) != 1 else ''} ({names}), "
           f"{n} agent{'s' if n != 1 else ''}")
    return 0
