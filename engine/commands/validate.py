"""`engine validate [PATH...]`: schema, references, cycles, policy; every problem at once.

`engine validate -` checks one grove read from standard input, on its own (a pre-commit
hook or an editor passes a grove file's text; `git show REV:groves/g/grove.yaml | engine
validate -` checks a past revision): its documents are the whole grove, none of the
repository's grove files are read, and problems name `<stdin>:line:col`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

from engine import desired, manifest, schema, ui, yamlio
from engine.commands import _common
from engine.errors import Diagnostic, EngineError, InvalidManifests, UsageError

STDIN = "<stdin>"


def register(sub: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(
        "validate", help="check grove manifests", description="Check grove manifests: "
        "schema, references, dependency cycles, policy and credentials. `engine validate -` "
        "checks one grove read from standard input, on its own (problems name "
        "<stdin>:line:col).")
    p.add_argument("paths", nargs="*", metavar="PATH",
                   help="grove directories or files in them (default: every grove); `-` "
                   "reads one grove's documents from standard input and checks them alone")
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


def _read_stdin() -> str:
    data = sys.stdin.buffer.read(yamlio.MAX_FILE_BYTES + 1)
    if len(data) > yamlio.MAX_FILE_BYTES:
        raise InvalidManifests([Diagnostic(STDIN, 1, 1, "standard input is larger than "
                                           f"{yamlio.MAX_FILE_BYTES} bytes")])
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidManifests([Diagnostic(STDIN, 1, 1, f"not UTF-8 text: {e.reason}")]
                               ) from None


def _stdin_grove(opts: desired.Options) -> desired.DesiredGrove:
    """The grove standard input holds, alone; InvalidManifests naming `<stdin>`."""
    text = _read_stdin()
    try:
        docs = yamlio.load_text(text, STDIN)
    except yamlio.YamlError as e:
        raise InvalidManifests([e.diagnostic]) from None
    names = [d.data["metadata"].get("name") for d in docs if isinstance(d.data, dict)
             and d.data.get("kind") == "Grove" and isinstance(d.data.get("metadata"), dict)]
    if not names:
        diags = [x for d in docs for x in schema.check_document(d)]
        raise InvalidManifests([*diags, Diagnostic(
            STDIN, 1, 1, "no kind: Grove document on standard input (`validate -` reads "
            "one whole grove: its Grove document and any others)")])
    # the first good name (a bad one is reported by the schema check)
    name = next((n for n in names if isinstance(n, str) and _common._GROVE_NAME.fullmatch(n)),
                "stdin")
    try:
        # a directory that is never read: the texts stand in for its files
        src = manifest.load_grove(Path(STDIN, name), Path(STDIN), texts={STDIN: text})
        return desired.build(src, opts)
    except InvalidManifests as e:
        raise InvalidManifests([_unprefixed(d) for d in e.diagnostics]) from None


def _unprefixed(d: Diagnostic) -> Diagnostic:
    """`<name>/<stdin>`, the loader's name for the text, said as `<stdin>`."""
    if not d.file.endswith("/" + STDIN):
        return d
    return dataclasses.replace(d, file=STDIN, message=d.message.replace(d.file, STDIN))


def run(args: argparse.Namespace) -> int:
    r = _common.repo(inside_agent_ok=True)  # read-only: a pre-commit hook may run it there
    diags: list[Diagnostic] = []
    summary: list[dict[str, Any]] = []
    stdin = args.paths.count("-")
    if stdin > 1:
        raise UsageError("validate: `-` (standard input) can be given once")
    paths = [p for p in args.paths if p != "-"]
    try:
        opts = _common.options(r, args, resolve_secrets=not args.no_secrets)
        # --no-secrets checks what a pull request wrote: no environment value reaches its
        # templates (nor, through a template error, the output)
        opts = dataclasses.replace(opts, host_env=not args.no_secrets)
    except InvalidManifests as e:  # the user config: reported like any manifest problem
        diags, targets, stdin = list(e.diagnostics), [], 0
    else:
        targets = _targets(r.root, paths) if paths or not stdin else []
    sources: list[Path | None] = [None] * stdin + targets  # None: standard input
    for d in sources:
        try:
            g = _stdin_grove(opts) if d is None else \
                desired.build(manifest.load_grove(d, r.root), opts)
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
