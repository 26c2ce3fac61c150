"""`engine harness install NAME[@VERSION]`, `engine harness list [--json]` and
`engine harness uninstall NAME[@VERSION]`: the agent programs' host cache.

install: npm-installs the pinned CLI of a built-in harness (the `install:` entry of
engine/harnesses/NAME.yaml; another VERSION on request) into the versioned cache the runtimes
use (engine.harness_install); an install already there is reused. list: each installable
harness, its pinned version and the versions in the cache.
"""

from __future__ import annotations

import argparse
from typing import Any

from engine import harness_install, ui
from engine.trust.reader import for_terminal


def register(sub: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(
        "harness", help="install agent programs (claude, codex, gemini, opencode)",
        description="Install the agent programs of the built-in harnesses into the engine's "
        "cache, which Docker agents mount read-only and local agents run from (no registry "
        "at image build time).")
    verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True,
                             parser_class=type(p))
    i = verbs.add_parser("install", help="install a harness's program with npm",
                         description="Install NAME's pinned program (or VERSION) with npm "
                         "into the cache; an existing install is reused. Cache: "
                         "$GROVE_ENGINE_CACHE/harnesses, as root /var/cache/grove-engine/"
                         "harnesses, else ~/.cache/grove-engine/harnesses.")
    i.add_argument("names", nargs="+", metavar="NAME[@VERSION]",
                   help="harness to install: claude, codex, gemini or opencode "
                   "(`engine harness list`)")
    u = verbs.add_parser("uninstall", help="remove an installed version",
                         description="Remove NAME at VERSION (default: the pinned one) "
                         "from the cache.")
    u.add_argument("names", nargs="+", metavar="NAME[@VERSION]",
                   help="harness to remove, at VERSION (default: the pinned one)")
    ls = verbs.add_parser("list", help="pinned and installed versions",
                          description="Each installable harness: program, pinned version, "
                          "versions in the cache.")
    ls.add_argument("--json", action="store_true", help="print JSON")
    return p


def _split(arg: str) -> tuple[str, str | None]:
    name, at, version = arg.partition("@")
    return name, (version if at else None)


def run(args: argparse.Namespace) -> int:
    if args.verb == "list":
        return _list(args.json)
    targets = [_split(a) for a in args.names]
    for name, version in targets:  # every argument checked before anything is installed
        e = harness_install.entry(name)
        harness_install.check_version(version if version is not None else e.version)
    for name, version in targets:
        if args.verb == "install":
            harness_install.install(name, version, ui.err)
        else:
            v = version or harness_install.entry(name).version
            gone = harness_install.uninstall(name, version)
            ui.out(f"removed {name} {v}" if gone else f"{name} {v} is not installed")
    return 0


def _list(as_json: bool) -> int:
    rows = [harness_install.describe(n) for n in harness_install.names()]
    root = str(harness_install.cache_root())
    if as_json:
        ui.print_json({"apiVersion": "engine/v1alpha1", "kind": "HarnessList",
                       "formatVersion": 1, "cache": root, "harnesses": rows})
        return 0
    table = [[r["name"], r["program"], r["pinned"],
              ", ".join(i["version"] for i in r["installed"]) or "-"] for r in rows]
    cols = ["NAME", "PROGRAM", "PINNED", "INSTALLED"]
    widths = [max([len(c)] + [len(row[k]) for row in table]) for k, c in enumerate(cols)]
    for row in [cols, *table]:
        ui.out("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
    ui.out(f"cache: {for_terminal(root)}")
    return 0
