"""Stage 1, checking: the JSON Schemas in `schemas/` are the one source of truth for the format.

Called by `manifest` (every document) and `inbox` (spawn requests). Returns diagnostics
located at file:line:col; never raises for invalid input.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import jsonschema
from referencing import Registry, Resource

from engine.errors import Diagnostic
from engine.yamlio import Document

API_VERSION = "engine/v1alpha1"
KINDS = {"Grove": "grove.json", "Agent": "agent.json", "Profile": "profile.json",
         "Harness": "harness.json"}
ID_BASE = "https://grove-engine.dev/schemas/v1alpha1/"


def schema_dir() -> Path:
    """Installed wheels carry the schemas inside the package; a checkout has them at the top."""
    here = Path(__file__).resolve().parent
    for cand in (here / "schemas" / "v1alpha1", here.parent / "schemas" / "v1alpha1"):
        if cand.is_dir():
            return cand
    raise FileNotFoundError("grove-engine schemas not found")  # a broken install: a bug


@functools.cache
def _registry() -> tuple[Registry, dict[str, dict[str, Any]]]:
    schemas = {p.name: json.loads(p.read_text()) for p in sorted(schema_dir().glob("*.json"))}
    resources = [(ID_BASE + n, Resource.from_contents(s)) for n, s in schemas.items()]
    return Registry().with_resources(resources), schemas


@functools.cache
def validator(file: str, pointer: str = "") -> jsonschema.Draft202012Validator:
    """A validator for a schema file, or for a `$defs` entry of it (`pointer` = name)."""
    registry, schemas = _registry()
    schema: dict[str, Any] = schemas[file]
    if pointer:
        schema = {"$ref": f"{ID_BASE}{file}#/$defs/{pointer}"}
    return jsonschema.Draft202012Validator(schema, registry=registry)


def check_document(doc: Document) -> list[Diagnostic]:
    """Schema diagnostics for one manifest document (all of them, most relevant first)."""
    data = doc.data
    if not isinstance(data, dict):
        return [doc.diag((), "a manifest document must be a mapping")]
    api, kind = data.get("apiVersion"), data.get("kind")
    if api != API_VERSION:
        return [doc.diag(("apiVersion",) if "apiVersion" in data else (),
                         f"unknown apiVersion {api!r}; expected {API_VERSION!r}")]
    if kind not in KINDS:
        return [doc.diag(("kind",) if "kind" in data else (),
                         f"unknown kind {kind!r}; expected one of {', '.join(KINDS)}")]
    return errors_for(validator(KINDS[kind]), data, doc)


def errors_for(v: jsonschema.Draft202012Validator, data: Any, doc: Document,
               prefix: tuple[str | int, ...] = ()) -> list[Diagnostic]:
    out = []
    for err in v.iter_errors(data):
        best = jsonschema.exceptions.best_match([err])
        path = (*prefix, *best.absolute_path)
        out.append(doc.diag(path, _message(best, path)))
    return out


def _message(err: jsonschema.ValidationError, path: tuple[str | int, ...]) -> str:
    where = ".".join(str(p) for p in path) or "document"
    if err.validator in ("additionalProperties", "unevaluatedProperties"):
        extra = sorted(set(_unexpected(err)))
        if extra:
            return f"{where}: unknown field {', '.join(map(repr, extra))}"
    if err.validator == "pattern":
        return f"{where}: {err.instance!r} is not a valid name or value " \
               f"(must match {err.validator_value})"
    if err.validator == "enum":
        return f"{where}: {err.instance!r} is not one of " \
               f"{', '.join(map(str, err.validator_value))}"
    if err.validator == "type":
        return f"{where}: expected {err.validator_value}, got {type(err.instance).__name__}"
    return f"{where}: {err.message}"


def _unexpected(err: jsonschema.ValidationError) -> list[str]:
    inst = err.instance if isinstance(err.instance, dict) else {}
    schema = err.schema if isinstance(err.schema, dict) else {}
    known = set(schema.get("properties", {}))
    if "$ref" in schema and err.validator == "unevaluatedProperties":
        known |= _ref_properties(schema["$ref"])
    return [k for k in inst if k not in known]


def _ref_properties(ref: str) -> set[str]:
    _, schemas = _registry()
    file, _, frag = ref.partition("#")
    target = schemas.get(file.rsplit("/", 1)[-1] or "agent.json", {})
    for part in frag.strip("/").split("/"):
        target = target.get(part, {}) if part else target
    return set(target.get("properties", {}))
