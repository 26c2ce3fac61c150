"""Stage 1, loading: a grove directory -> `GroveSource` (checked documents, still raw data).

Called by `desired` (and through it by every command that reads manifests). Reads every
`*.yaml` file of `groves/<grove>/` (regular files only: a symlink, FIFO, device or
directory named `*.yaml`, or a grove directory that is a symlink, is an error), checks each
document against the JSON Schemas, and indexes profiles, harnesses and agents by name with
the file:line each came from. All problems are collected and raised together as
`InvalidManifests`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine import schema
from engine.errors import Diagnostic, EngineError, InvalidManifests
from engine.yamlio import Document, YamlError, bulk, load_file, load_text

GROVES_DIR = "groves"
_NAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?")
SPAWNED_FILE = "spawned.yaml"


@dataclass(frozen=True)
class Entry:
    """A named profile, harness or agent, with the document and path it came from."""

    name: str
    data: dict[str, Any]
    doc: Document
    path: tuple[str | int, ...]  # path of `data` inside doc

    def where(self, *sub: str | int) -> str:
        line, _ = self.doc.where((*self.path, *sub))
        return f"{self.doc.file}:{line}"

    def diag(self, message: str, *sub: str | int) -> Diagnostic:
        return self.doc.diag((*self.path, *sub), message)


@dataclass
class GroveSource:
    """Everything one grove directory declares, checked against the schemas."""

    name: str
    directory: Path
    grove: Entry
    profiles: dict[str, Entry] = field(default_factory=dict)
    harnesses: dict[str, Entry] = field(default_factory=dict)
    agents: dict[str, Entry] = field(default_factory=dict)

    @property
    def spec(self) -> dict[str, Any]:
        spec: dict[str, Any] = self.grove.data.get("spec") or {}
        return spec


def find_repo_root(start: Path) -> Path:
    """The nearest directory at or above `start` that holds `groves/` or `.git`."""
    start = start.resolve()
    for d in (start, *start.parents):
        if (d / GROVES_DIR).is_dir() or (d / ".git").exists():
            return d
    return start


def grove_dirs(root: Path) -> list[Path]:
    """The directories of `groves/`; a dot-directory (`groves/.schemas/`) is not a grove."""
    base = root / GROVES_DIR
    return sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")) \
        if base.is_dir() else []


def load_grove(directory: Path, display_root: Path | None = None,
               texts: dict[str, str] | None = None) -> GroveSource:
    """Load one grove directory. `texts` (file name -> content) replaces reading the disk,
    for manifests taken from a git revision."""
    with bulk():
        return _load(directory, _display(directory, display_root), texts)


def _load(directory: Path, rel: str, texts: dict[str, str] | None) -> GroveSource:
    docs: list[Document] = []
    diags: list[Diagnostic] = []
    if texts is None and directory.is_symlink():
        raise InvalidManifests([Diagnostic(rel, 0, 0, f"grove {directory.name}: {rel} is a "
                                                      "symbolic link, not a directory")])
    # every *.yaml entry, whatever it is: a FIFO, device, directory or symlink named like a
    # manifest is reported (by load_file, without blocking), never silently skipped
    files = sorted(texts) if texts is not None else sorted(
        p.name for p in directory.glob("*.yaml"))
    for name in files:
        try:
            if texts is not None:
                docs.extend(load_text(texts[name], f"{rel}/{name}"))
            else:
                docs.extend(load_file(directory / name, f"{rel}/{name}",
                                      follow_symlinks=False))
        except YamlError as e:
            diags.append(e.diagnostic)
    for doc in docs:
        diags.extend(schema.check_document(doc))
    if diags:
        raise InvalidManifests(diags + _name_problems(directory, rel, docs, files))
    return _index(directory, rel, docs, [f"{rel}/{n}" for n in files])


def _name_problems(directory: Path, rel: str, docs: list[Document], files: list[str]
                   ) -> list[Diagnostic]:
    """With schema problems present, still report duplicate and misnamed documents, so
    one run shows them all; best effort over data the schema has not vouched for."""
    usable = [d for d in docs if isinstance(d.data, dict)
              and d.data.get("kind") in schema.KINDS
              and isinstance(d.data.get("metadata"), dict)
              and isinstance(d.data["metadata"].get("name"), str)
              and _NAME.fullmatch(d.data["metadata"]["name"])]  # bad names: said already
    if not any(d.data["kind"] == "Grove" for d in usable):
        return []
    try:
        _index(directory, rel, usable, [f"{rel}/{n}" for n in files])
    except InvalidManifests as e:
        return e.diagnostics
    except (AttributeError, KeyError, TypeError):
        return []
    return []


def _display(directory: Path, root: Path | None) -> str:
    """`directory` relative to the repository root: as written (a symlinked grove
    directory is named where it is, not where it points), else resolved."""
    base = root or Path.cwd()
    for d, r in ((Path(os.path.abspath(directory)), Path(os.path.abspath(base))),
                 (directory.resolve(), base.resolve())):
        try:
            return str(d.relative_to(r))
        except ValueError:
            continue
    return str(directory)


def _index(directory: Path, rel: str, docs: list[Document], files: list[str]
           ) -> GroveSource:
    diags: list[Diagnostic] = []
    groves = [d for d in docs if d.data["kind"] == "Grove"]
    if not groves:
        what = f"grove {directory.name}: no kind: Grove document in {rel}/ (a grove " \
               "directory needs exactly one)"
        raise InvalidManifests([Diagnostic(files[0], 1, 1, what) if files else
                                Diagnostic(rel, 0, 0, f"grove {directory.name}: no *.yaml "
                                                      f"files in {rel}/")])
    gdoc = groves[0]
    name = gdoc.data["metadata"]["name"]
    for extra in groves[1:]:
        diags.append(extra.diag(("kind",), f"grove {name}: a grove directory holds exactly "
                                           f"one kind: Grove (the first is in {gdoc.file})"))
    if name != directory.name:
        diags.append(gdoc.diag(("metadata", "name"), f"grove {name}: metadata.name must "
                                                     f"match its directory {directory.name!r}"))
    src = GroveSource(name, directory, Entry(name, gdoc.data, gdoc, ()))
    spec = src.spec
    tables = {"Profile": src.profiles, "Harness": src.harnesses, "Agent": src.agents}
    for key, kind in (("profiles", "Profile"), ("harnesses", "Harness")):
        for n, data in (spec.get(key) or {}).items():
            _add(tables[kind], Entry(n, data or {}, gdoc, ("spec", key, n)), kind, diags)
    for i, data in enumerate(spec.get("agents") or []):
        body = {k: v for k, v in data.items() if k != "name"}
        _add(src.agents, Entry(data["name"], body, gdoc, ("spec", "agents", i)), "Agent", diags)
    for doc in docs:
        kind = doc.data["kind"]
        if kind in tables:
            n = doc.data["metadata"]["name"]
            _add(tables[kind], Entry(n, doc.data.get("spec") or {}, doc, ("spec",)), kind, diags,
                 ("metadata", "name"))
    if diags:
        raise InvalidManifests(diags)
    return src


def _add(table: dict[str, Entry], entry: Entry, kind: str, diags: list[Diagnostic],
         name_at: tuple[str | int, ...] = ()) -> None:
    if entry.name in table:
        diags.append(entry.doc.diag(name_at or entry.path, f"{kind.lower()} {entry.name}: "
                                    f"duplicate name (first defined at "
                                    f"{table[entry.name].where()})"))
        return
    table[entry.name] = entry


def select_groves(root: Path, names: list[str] | None) -> list[Path]:
    """The grove directories a command works on: the named ones, or all of them."""
    dirs = grove_dirs(root)
    if not names:
        if not dirs:
            raise EngineError(f"no groves found under {root / GROVES_DIR}",
                              "create one with `engine init`")
        return dirs
    by_name = {d.name: d for d in dirs}
    missing = [n for n in names if n not in by_name]
    if missing:
        known = ", ".join(by_name) or "none"
        raise EngineError(f"grove {missing[0]!r} not found under {root / GROVES_DIR} "
                          f"(groves: {known}){schema.did_you_mean(missing[0], by_name)}")
    return [by_name[n] for n in names]
