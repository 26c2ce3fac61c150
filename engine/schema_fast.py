"""Stage 1, checking (fast path): the JSON Schemas compiled into plain Python predicates.

Called by `schema` only. `checker(file, pointer)` turns a schema from `schemas/` into a
function that answers "is this instance valid?" for the keywords in `_KEYWORDS`. It is a
pre-check: True must always mean jsonschema finds no error, so anything it cannot judge
exactly (an unsupported keyword at compile time, an instance it is unsure about at run time)
makes it answer False, and `schema` runs jsonschema, which also writes the messages. The
two are compared on generated documents in tests/test_manifests.py.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

Check = Callable[[Any], bool]

_ANNOTATIONS = {"description", "title", "$schema", "$id", "$defs", "$comment", "default",
                "examples", "deprecated", "readOnly", "writeOnly"}
_KEYWORDS = {"type", "properties", "additionalProperties", "required", "const", "enum",
             "pattern", "minLength", "maxLength", "minimum", "maximum", "exclusiveMinimum",
             "exclusiveMaximum", "items", "minItems", "maxItems", "uniqueItems",
             "propertyNames", "minProperties", "maxProperties", "oneOf", "anyOf", "allOf",
             "$ref", "unevaluatedProperties"} | _ANNOTATIONS
# Keywords that can evaluate properties; a schema reached from `unevaluatedProperties`
# through `$ref` may only use `properties` for that, or the static key set would be wrong.
_EVALUATING = {"additionalProperties", "patternProperties", "unevaluatedProperties", "oneOf",
               "anyOf", "allOf", "if", "dependentSchemas"}


class Unsupported(Exception):
    """The schema uses something the fast path does not implement exactly."""


class _Unsure(Exception):
    """This instance needs the full validator to judge."""


def python_pattern(pattern: str) -> str:
    """An ECMA-262 pattern as Python `re` reads it: a final `$` must not match before a
    trailing newline (Python's `$` does), or `name: "ok\\n"` would pass `^[a-z]+$`."""
    if pattern.endswith("$") and not pattern.endswith("\\$"):
        return pattern[:-1] + r"\Z"
    return pattern


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


_TYPES: dict[str, Check] = {
    "object": lambda x: isinstance(x, dict),
    "array": lambda x: isinstance(x, list),
    "string": lambda x: isinstance(x, str),
    "null": lambda x: x is None,
    "boolean": lambda x: isinstance(x, bool),
    "number": _is_number,
    "integer": lambda x: (isinstance(x, int) and not isinstance(x, bool))
    or (isinstance(x, float) and x.is_integer()),
}


def _all(checks: list[Check]) -> Check:
    if not checks:
        return lambda _x: True
    if len(checks) == 1:
        return checks[0]
    return lambda x: all(c(x) for c in checks)


class _Compiler:
    def __init__(self, schemas: dict[str, Any]) -> None:
        self.schemas = schemas
        self.done: dict[tuple[str, str], Check] = {}

    def target(self, file: str, ref: str) -> tuple[str, str, Any]:
        name, _, frag = ref.partition("#")
        file = name.rsplit("/", 1)[-1] if name else file
        node = self.schemas[file]
        for part in frag.strip("/").split("/") if frag.strip("/") else []:
            node = node[part.replace("~1", "/").replace("~0", "~")]
        return file, frag, node

    def ref(self, file: str, ref: str) -> Check:
        file, frag, node = self.target(file, ref)
        key = (file, frag)
        if key not in self.done:
            slot: list[Check] = []
            self.done[key] = lambda x: slot[0](x)  # a recursive schema reaches itself
            try:
                slot.append(self.compile(node, file))
            except Unsupported:  # never leave the placeholder for the next schema to reach
                del self.done[key]
                raise
            self.done[key] = slot[0]
        return self.done[key]

    def known_properties(self, s: Any, file: str, top: bool = False) -> set[str]:
        evaluating = _EVALUATING - {"unevaluatedProperties"} if top else _EVALUATING
        if not isinstance(s, dict) or set(s) & evaluating:
            raise Unsupported("unevaluatedProperties over a dynamic schema")
        keys = set(s.get("properties", {}))
        if "$ref" in s:
            rfile, _, node = self.target(file, s["$ref"])
            keys |= self.known_properties(node, rfile)
        return keys

    def compile(self, s: Any, file: str) -> Check:
        if s is True:
            return lambda _x: True
        if s is False:
            return lambda _x: False
        if not isinstance(s, dict):
            raise Unsupported(f"schema {s!r}")
        if set(s) - _KEYWORDS:
            raise Unsupported(f"keywords {sorted(set(s) - _KEYWORDS)}")
        checks: list[Check] = []
        if "type" in s:
            types = [_TYPES[t] for t in ([s["type"]] if isinstance(s["type"], str)
                                         else s["type"])]
            checks.append(types[0] if len(types) == 1 else lambda x: any(t(x) for t in types))
        if "$ref" in s:
            checks.append(self.ref(file, s["$ref"]))
        checks += self._strings(s) + self._numbers(s) + self._arrays(s, file)
        checks += self._objects(s, file) + self._combinators(s, file)
        return _all(checks)

    def _strings(self, s: dict[str, Any]) -> list[Check]:
        out: list[Check] = []
        for key in ("const", "enum"):
            if key in s:
                values = [s[key]] if key == "const" else s[key]
                if not all(isinstance(v, str) for v in values):
                    raise Unsupported(f"{key} with non-string values")
                out.append(_one_of(frozenset(values)))
        if "pattern" in s:
            rx = re.compile(python_pattern(s["pattern"]))
            out.append(lambda x: not isinstance(x, str) or rx.search(x) is not None)
        lo, hi = s.get("minLength", 0), s.get("maxLength")
        if lo or hi is not None:
            out.append(lambda x: not isinstance(x, str)
                       or (len(x) >= lo and (hi is None or len(x) <= hi)))
        return out

    def _numbers(self, s: dict[str, Any]) -> list[Check]:
        ops: dict[str, Callable[[Any, Any], bool]] = {
            "minimum": lambda x, b: x >= b, "maximum": lambda x, b: x <= b,
            "exclusiveMinimum": lambda x, b: x > b, "exclusiveMaximum": lambda x, b: x < b}
        return [_bounded(op, s[key]) for key, op in ops.items() if key in s]

    def _arrays(self, s: dict[str, Any], file: str) -> list[Check]:
        out: list[Check] = []
        if "items" in s:
            item = self.compile(s["items"], file)
            out.append(lambda x: not isinstance(x, list) or all(item(v) for v in x))
        lo, hi = s.get("minItems", 0), s.get("maxItems")
        if lo or hi is not None:
            out.append(lambda x: not isinstance(x, list)
                       or (len(x) >= lo and (hi is None or len(x) <= hi)))
        if s.get("uniqueItems"):
            out.append(_unique)
        return out

    def _objects(self, s: dict[str, Any], file: str) -> list[Check]:
        out: list[Check] = []
        props = {k: self.compile(v, file) for k, v in s.get("properties", {}).items()}
        required = tuple(s.get("required", ()))
        lo, hi = s.get("minProperties", 0), s.get("maxProperties")
        extra = self.compile(s["additionalProperties"], file) \
            if "additionalProperties" in s else None
        names = self.compile(s["propertyNames"], file) if "propertyNames" in s else None
        known: frozenset[str] | None = None
        if s.get("unevaluatedProperties", True) is not True:
            if s["unevaluatedProperties"] is not False or extra is not None:
                raise Unsupported("unevaluatedProperties other than false")
            known = frozenset(self.known_properties(s, file, top=True))
        if not (props or required or lo or hi is not None or extra or names or known):
            return out

        def check(x: Any) -> bool:
            if not isinstance(x, dict):
                return True
            if any(k not in x for k in required) or len(x) < lo or (hi is not None
                                                                   and len(x) > hi):
                return False
            for k, v in x.items():
                c = props.get(k)
                if c is not None:
                    if not c(v):
                        return False
                elif (extra is not None and not extra(v)) or (known is not None
                                                              and k not in known):
                    return False
                if names is not None and not names(k):
                    return False
            return True
        out.append(check)
        return out

    def _combinators(self, s: dict[str, Any], file: str) -> list[Check]:
        out: list[Check] = []
        if "allOf" in s:
            out.append(_all([self.compile(b, file) for b in s["allOf"]]))
        if "anyOf" in s:
            anyof = [self.compile(b, file) for b in s["anyOf"]]
            out.append(lambda x: any(c(x) for c in anyof))
        if "oneOf" in s:
            oneof = [self.compile(b, file) for b in s["oneOf"]]
            out.append(lambda x: sum(1 for c in oneof if c(x)) == 1)
        return out


def _one_of(allowed: frozenset[str]) -> Check:
    return lambda x: isinstance(x, str) and x in allowed


def _bounded(op: Callable[[Any, Any], bool], bound: Any) -> Check:
    return lambda x: not _is_number(x) or op(x, bound)


def _unique(x: Any) -> bool:
    if not isinstance(x, list):
        return True
    if not all(isinstance(v, str) for v in x):
        raise _Unsure  # jsonschema's equality (1 vs True vs 1.0) is subtle; let it judge
    return len(set(x)) == len(x)


@functools.cache
def _compiler(directory: Path) -> _Compiler:
    return _Compiler({p.name: json.loads(p.read_text()) for p in directory.glob("*.json")})


@functools.cache
def checker(directory: Path, file: str, pointer: str = "") -> Check | None:
    """A predicate for a schema file (or its `$defs` entry `pointer`), None if the schema
    uses something the fast path does not implement."""
    try:
        fn = _compiler(directory).ref(file, f"{file}#/$defs/{pointer}" if pointer else file)
    except Unsupported:
        return None

    def safe(x: Any) -> bool:
        try:
            return fn(x)
        except _Unsure:
            return False
    return safe
