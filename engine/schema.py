"""Stage 1, checking: the JSON Schemas in `schemas/` are the one source of truth for the format.

Called by `manifest` (every document), `harnesses` (the built-in catalog) and `inbox`
(spawn requests). Returns diagnostics located at file:line:col, each starting with the
object it concerns (`agent coder: unknown field 'colour'`); never raises for invalid input.
Valid documents pass through `schema_fast` (the same schemas compiled to predicates);
jsonschema runs only when that pre-check fails, to find and word every error.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine import schema_fast
from engine.errors import Diagnostic
from engine.yamlio import Document, Path_, format_path

if TYPE_CHECKING:
    import jsonschema

API_VERSION = "engine/v1alpha1"
KINDS = {"Grove": "grove.json", "Agent": "agent.json", "Profile": "profile.json",
         "Harness": "harness.json"}
ID_BASE = "https://grove-engine.dev/schemas/v1alpha1/"
_NAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?\Z")
_SINGULAR = {"profiles": "profile", "harnesses": "harness"}
_JSON_TYPES = {"str": "string", "int": "integer", "float": "number", "bool": "boolean",
               "NoneType": "null", "dict": "object", "list": "array"}


def schema_dir() -> Path:
    """Installed wheels carry the schemas inside the package; a checkout has them at the top."""
    here = Path(__file__).resolve().parent
    for cand in (here / "schemas" / "v1alpha1", here.parent / "schemas" / "v1alpha1"):
        if cand.is_dir():
            return cand
    raise FileNotFoundError("grove-engine schemas not found")  # a broken install: a bug


@functools.cache
def _schemas() -> dict[str, dict[str, Any]]:
    return {p.name: json.loads(p.read_text()) for p in sorted(schema_dir().glob("*.json"))}


def _pattern(validator: Any, pattern: str, instance: Any, _schema: Any
             ) -> Iterator[Any]:
    """`pattern` with ECMA-262's `$` (no match before a trailing newline)."""
    from jsonschema.exceptions import ValidationError
    if isinstance(instance, str) and not re.search(schema_fast.python_pattern(pattern),
                                                   instance):
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


@functools.cache
def validator(file: str, pointer: str = "") -> jsonschema.Draft202012Validator:
    """A jsonschema validator for a schema file, or for a `$defs` entry (`pointer` = name)."""
    import jsonschema
    from referencing import Registry, Resource

    schemas = _schemas()
    registry: Registry[Any] = Registry().with_resources(
        [(ID_BASE + n, Resource.from_contents(s)) for n, s in schemas.items()])
    schema: dict[str, Any] = schemas[file]
    if pointer:
        schema = {"$ref": f"{ID_BASE}{file}#/$defs/{pointer}"}
    cls = jsonschema.validators.extend(jsonschema.Draft202012Validator, {"pattern": _pattern})
    v: jsonschema.Draft202012Validator = cls(schema, registry=registry)
    return v


def is_valid(data: Any, file: str, pointer: str = "") -> bool:
    fast = schema_fast.checker(schema_dir(), file, pointer)
    if fast is not None and fast(data):
        return True
    return not any(True for _ in validator(file, pointer).iter_errors(data))


@functools.cache
def _setting_schemas() -> dict[str, str]:
    """Every setting an agent can have (agent, profile and harness fields) -> the pointer of
    its schema, for checking layers that are not manifests: user config and --set."""
    out: dict[str, str] = {}
    for file, definition in (("harness.json", "spec"), ("profile.json", "spec"),
                             ("agent.json", "fields")):
        for key in _schemas()[file]["$defs"][definition]["properties"]:
            out[key] = f"{file}#{definition}/properties/{key}"
    return out


def setting_errors(data: dict[str, Any]) -> list[tuple[Path_, str]]:
    """(path, message) for each unknown or ill-typed setting in `data`, each message
    starting with the setting's dotted path (`null` deletes a lower layer's value, so it is
    always allowed)."""
    known = _setting_schemas()
    out: list[tuple[Path_, str]] = []
    for key, value in data.items():
        if key not in known:
            out.append(((key,), f"{key}: unknown setting{did_you_mean(key, known)}"))
            continue
        if value is None:
            continue
        file, _, pointer = known[key].partition("#")
        for err in validator(file, pointer).iter_errors(value):
            path: Path_ = (key, *err.absolute_path)
            out.append((path, _message(err, path)))
    return out


def check_document(doc: Document) -> list[Diagnostic]:
    """Schema diagnostics for one manifest document (all of them, most relevant first)."""
    data = doc.data
    if not isinstance(data, dict):
        return [doc.diag((), "document: a manifest document must be a mapping with "
                             "apiVersion, kind, metadata and spec")]
    api, kind = data.get("apiVersion"), data.get("kind")
    if api != API_VERSION:
        return [doc.diag(("apiVersion",) if "apiVersion" in data else (),
                         f"document: unknown apiVersion {api!r}; expected {API_VERSION!r}")]
    if kind not in KINDS:
        return [doc.diag(("kind",) if "kind" in data else (),
                         f"document: unknown kind {kind!r}; expected one of "
                         f"{', '.join(KINDS)}")]
    fast = schema_fast.checker(schema_dir(), KINDS[kind])
    if fast is not None and fast(data):
        return []
    spec = data.get("spec")
    if not isinstance(spec, dict):
        spec = {}
    agents = spec.get("agents") if kind == "Grove" else None
    entry = schema_fast.checker(schema_dir(), "agent.json", "entry")
    if isinstance(agents, list) and len(agents) > 20 and entry is not None:
        # A big grove with a few bad agents: let jsonschema read only those (it takes
        # seconds over 10,000 good ones), then put the errors back at their real index.
        bad = [i for i, a in enumerate(agents) if not entry(a)]
        reduced = {**data, "spec": {**spec, "agents": [agents[i] for i in bad]}}
        return errors_for(validator(KINDS[kind]), reduced, doc, agents_at=bad)
    return errors_for(validator(KINDS[kind]), data, doc)


def errors_for(v: jsonschema.Draft202012Validator, data: Any, doc: Document,
               prefix: Path_ = (), agents_at: list[int] | None = None) -> list[Diagnostic]:
    """Every schema error of `data` (found at `prefix` inside `doc`), worded for people.
    `agents_at` maps the index of each entry in data's spec.agents to its index in `doc`."""
    import jsonschema

    out = []
    root = doc.data if prefix or agents_at is not None else data
    for err in v.iter_errors(data):
        best = jsonschema.exceptions.best_match([err])
        path: Path_ = (*prefix, *best.absolute_path)
        if agents_at is not None and path[:2] == ("spec", "agents") and len(path) > 2 \
                and isinstance(path[2], int):
            path = ("spec", "agents", agents_at[path[2]], *path[3:])
        subject, rest = subject_of(root, path)
        at, message = path, _message(best, rest)
        if best.validator in ("additionalProperties", "unevaluatedProperties"):
            extra = sorted(_unexpected(best))
            at = (*path, extra[0]) if extra else path  # point at the unknown key itself
        elif "propertyNames" in best.absolute_schema_path and isinstance(best.instance, str):
            at = (*path, best.instance)  # a bad key: say it at the key, as its object
            subject, rest = subject_of(root, at)
            message = _message(best, ()).replace(" is not valid", " is not a valid name", 1)
        out.append(doc.diag(at, f"{subject}: {message}"))
    return out


def subject_of(data: Any, path: Path_) -> tuple[str, Path_]:
    """The object a path inside a document concerns, and the path inside that object:
    (`agent coder`, ('resources', 'memory')) for spec.agents[3].resources.memory."""
    data = data if isinstance(data, dict) else {}
    kind = data.get("kind")
    meta = data.get("metadata")
    name = meta.get("name") if isinstance(meta, dict) else None
    label = (name if _NAME.match(name) else _short(name)) if isinstance(name, str) \
        else "(unnamed)"
    spec = data.get("spec") if isinstance(data.get("spec"), dict) else {}
    if kind == "Grove" and len(path) >= 3 and path[0] == "spec":
        if path[1] == "agents" and isinstance(path[2], int):
            agents = spec.get("agents")
            entry = agents[path[2]] if isinstance(agents, list) and path[2] < len(agents) \
                else None
            aname = entry.get("name") if isinstance(entry, dict) else None
            if isinstance(aname, str) and _NAME.match(aname):
                return f"agent {aname}", path[3:]
            return f"agent at spec.agents[{path[2]}]", path[3:]
        if path[1] in ("profiles", "harnesses"):
            return f"{_SINGULAR[str(path[1])]} {path[2]}", path[3:]
    if kind in ("Agent", "Profile", "Harness"):
        return f"{str(kind).lower()} {label}", path[1:] if path[:1] == ("spec",) else path
    return f"grove {label}", path


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 50 else f"{text[:45]}...' ({len(value)} characters)" \
        if isinstance(value, str) else text[:47] + "..."


def _message(err: jsonschema.ValidationError, rest: Path_) -> str:
    field = format_path(rest)
    where = f"{field}: " if field else ""
    desc = err.schema.get("description", "") if isinstance(err.schema, dict) else ""
    if err.validator in ("additionalProperties", "unevaluatedProperties"):
        extra = sorted(_unexpected(err))
        if extra:
            s = "s" if len(extra) > 1 else ""
            return f"{where}unknown field{s} {', '.join(map(repr, extra))}" \
                f"{_hints(extra, _known(err))}"
    if err.validator == "pattern":
        rule = desc.rstrip(".") if desc else f"must match {err.validator_value}"
        return f"{where}{_short(err.instance)} is not valid ({rule[:1].lower()}{rule[1:]})"
    if err.validator == "enum":
        return f"{where}{_short(err.instance)} is not one of " \
               f"{', '.join(map(str, err.validator_value))}"
    if err.validator == "type":
        expected = err.validator_value
        expected = " or ".join(expected) if isinstance(expected, list) else expected
        got = _JSON_TYPES.get(type(err.instance).__name__, type(err.instance).__name__)
        return f"{where}expected {expected}, got {got}"
    if err.validator == "required":
        missing = re.match(r"'([^']*)'", err.message)
        return f"{where}missing required field {missing.group(1)!r}" if missing \
            else f"{where}{err.message}"
    if err.validator in ("oneOf", "anyOf") and desc:
        return f"{where}{_short(err.instance)} is not valid ({desc.rstrip('.')})"
    return f"{where}{err.message}"


def _known(err: jsonschema.ValidationError) -> set[str]:
    """The fields the object of an additional/unevaluatedProperties error may have."""
    schema = err.schema if isinstance(err.schema, dict) else {}
    known = set(schema.get("properties", {}))
    if "$ref" in schema and err.validator == "unevaluatedProperties":
        known |= _ref_properties(schema["$ref"])
    return known


def _unexpected(err: jsonschema.ValidationError) -> list[str]:
    inst = err.instance if isinstance(err.instance, dict) else {}
    known = _known(err)
    return [k for k in inst if k not in known]


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """` (did you mean 'X'?)` for the one of `choices` closest to `word` (difflib's
    ratio at least 0.6), "" when none is that close. Only on an error's path: `difflib`
    is imported here, not by every validate."""
    import difflib

    close = difflib.get_close_matches(word, sorted(set(choices) - {word}), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _hints(words: list[str], choices: set[str]) -> str:
    """The suggestion for one unknown field, or for each of several that has one."""
    if len(words) == 1:
        return did_you_mean(words[0], choices)
    pairs = [(w, did_you_mean(w, choices)) for w in words]
    found = [f"{h[len(' (did you mean '):-2]} for {w!r}" for w, h in pairs if h]
    return f" (did you mean {', '.join(found)}?)" if found else ""


def _ref_properties(ref: str) -> set[str]:
    file, _, frag = ref.partition("#")
    target: Any = _schemas().get(file.rsplit("/", 1)[-1] or "agent.json", {})
    for part in frag.strip("/").split("/"):
        target = target.get(part, {}) if part else target
    return set(target.get("properties", {}))


def bundled(file: str) -> dict[str, Any]:
    """Schema `file` (`grove.json`, ...) made self-contained for editors and other tools:
    every definition it reaches in the other files (`common.json#/$defs/name`) is copied
    under its own `$defs` (as `common.name`) and every `$ref` points inside the document
    (`#/$defs/common.name`), so it validates the same with nothing else to fetch. It keeps
    the `$id` of the file it is made from."""
    schemas = _schemas()
    stem = file.removesuffix(".json")
    todo: list[tuple[str, str]] = []

    def key(owner: str, name: str) -> str:
        return name if owner == file else f"{owner.removesuffix('.json')}.{name}"

    def rewrite(node: Any, owner: str) -> Any:
        if isinstance(node, list):
            return [rewrite(x, owner) for x in node]
        if not isinstance(node, dict):
            return node
        out = {k: rewrite(v, owner) for k, v in node.items() if k != "$ref"}
        if "$ref" in node:
            target, _, frag = str(node["$ref"]).partition("#")
            target = target.rsplit("/", 1)[-1] or owner
            parts = frag.split("/")
            if target not in schemas or len(parts) < 3 or parts[:2] != ["", "$defs"]:
                raise ValueError(f"{owner}: cannot bundle $ref {node['$ref']!r}")
            if target != file and (target, parts[2]) not in todo:
                todo.append((target, parts[2]))
            out = {"$ref": "/".join(["#", "$defs", key(target, parts[2]), *parts[3:]]),
                   **out}
        return out

    root: dict[str, Any] = {}
    for k, v in schemas[file].items():
        if k != "$defs":
            root[k] = rewrite(v, file)
        if k == "$id":
            root["$comment"] = (f"grove-engine's {stem}.json with the definitions it uses "
                                "from the other schemas embedded; `engine init` writes and "
                                "refreshes it: do not edit")
    defs = {name: rewrite(sub, file) for name, sub in schemas[file].get("$defs", {}).items()}
    i = 0
    while i < len(todo):  # rewriting a definition may add more to copy
        owner, name = todo[i]
        defs[key(owner, name)] = rewrite(schemas[owner]["$defs"][name], owner)
        i += 1
    root["$defs"] = dict(sorted(defs.items()))
    return root
