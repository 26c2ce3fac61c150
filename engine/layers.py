"""Stage 2, layering: ordered layers of settings -> one resolved map, with provenance.

Called by `desired`. Layers, lowest first: built-in defaults < user config < grove
`spec.defaults` < profile < harness < agent < `--set`. Maps merge deeply, lists replace,
`null` deletes. With provenance on, every leaf remembers the layer (file:line) it came from.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from engine import schema
from engine.errors import Diagnostic, InvalidManifests, UsageError
from engine.yamlio import Document, YamlError, load_file

Key = tuple[str, ...]

BUILTIN_DEFAULTS: dict[str, Any] = {
    "runtime": "local",
    "access": "read-write",
    "network": "none",
    "restart": "never",
    "resources": {"cpus": 1, "memory": "2Gi", "pids": 512},
    "user": 1000,
    "readOnlyRoot": True,
    "privileged": False,
    "taskArg": "position",
}


@dataclass(frozen=True)
class Layer:
    """One layer of settings; `where(key)` names the file:line a value came from (only asked
    for when provenance is wanted). `doc` and `base` locate it in a manifest, if it is one."""

    name: str
    data: dict[str, Any]
    where: Callable[[Key], str]
    doc: Document | None = None
    base: tuple[str | int, ...] = ()

    def diag(self, key: tuple[str | int, ...], message: str) -> Diagnostic:
        """A diagnostic at `key` of this layer (file:line:col when it is a manifest)."""
        if self.doc is None:
            return Diagnostic(message=f"{message} (set by {self.name})")
        return self.doc.diag((*self.base, *key), message)


def fixed(name: str, data: dict[str, Any]) -> Layer:
    return Layer(name, data, lambda _k: name)


def from_document(name: str, doc: Document, base: tuple[str | int, ...],
                  data: dict[str, Any]) -> Layer:
    def where(key: Key) -> str:
        line, _ = doc.where((*base, *key))
        return f"{doc.file}:{line}"
    return Layer(name, data, where, doc, base)


def merge(layers: Iterable[Layer], provenance: bool = False,
          start: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[Key, str]]:
    """Resolve layers into one map; with `provenance`, also key path -> source. `start` is a
    map already merged from lower layers (copied, never changed): callers that share lower
    layers between many agents merge those once."""
    out: dict[str, Any] = copy_tree(start) if start else {}
    prov: dict[Key, str] = {}
    for layer in layers:
        if provenance:
            _merge_into(out, layer.data, (), layer, prov)
        else:
            merge_into(out, layer.data)
    return out, prov


def overlay(base: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    """`base` with one more layer merged on top, as a new map: only the maps `data` reaches
    into are copied, the rest is shared with `base` (so treat nested values as read-only).
    The same result as merging onto a deep copy, without copying every agent's base."""
    out = dict(base)
    for k, v in data.items():
        if v is None:
            out.pop(k, None)
        elif isinstance(v, dict):
            cur = out.get(k)
            out[k] = overlay(cur if isinstance(cur, dict) else {}, v)
        else:
            out[k] = list(v) if isinstance(v, list) else v
    return out


def copy_tree(data: dict[str, Any]) -> dict[str, Any]:
    """A copy of a merged map deep enough that merging into it leaves `data` unchanged."""
    return {k: copy_tree(v) if isinstance(v, dict) else list(v) if isinstance(v, list) else v
            for k, v in data.items()}


def merge_into(dst: dict[str, Any], src: dict[str, Any]) -> None:
    """Merge one layer's data into `dst` (no provenance): the path every agent takes."""
    for k, v in src.items():
        if v is None:
            dst.pop(k, None)
        elif isinstance(v, dict):
            cur = dst.get(k)
            if not isinstance(cur, dict):
                cur = dst[k] = {}
            merge_into(cur, v)
        else:
            dst[k] = list(v) if isinstance(v, list) else v


def _merge_into(dst: dict[str, Any], src: dict[str, Any], base: Key,
                layer: Layer | None, prov: dict[Key, str]) -> None:
    for k, v in src.items():
        key = (*base, k)
        if v is None:
            dst.pop(k, None)
            if layer:
                _drop(prov, key)
        elif isinstance(v, dict):
            cur = dst.get(k)
            if not isinstance(cur, dict):
                cur = dst[k] = {}
                if layer:
                    _drop(prov, key)
            _merge_into(cur, v, key, layer, prov)
        else:
            dst[k] = list(v) if isinstance(v, list) else v
            if layer:
                _drop(prov, key)
                prov[key] = layer.where(key)


def _drop(prov: dict[Key, str], key: Key) -> None:
    n = len(key)
    for k in [k for k in prov if k[:n] == key]:
        del prov[k]


def parse_sets(pairs: list[str]) -> dict[str, Any]:
    """`--set a.b=value` pairs -> a nested map; values are YAML scalars or flow lists
    (`null` deletes), checked against the schemas like any other layer."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        parts = key.split(".")
        if not sep or not all(parts):
            raise UsageError(f"--set {pair!r}: expected KEY=VALUE (KEY may be dotted: "
                             "resources.memory=4Gi)")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        if isinstance(value, dict):
            value = raw  # maps are written as dotted keys; a list replaces, like any layer
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise UsageError(f"--set {pair!r}: {p} is set twice")
        node[parts[-1]] = value
    problems = schema.setting_errors(out)
    if problems:
        raise UsageError(f"--set {problems[0][1]}")
    return out


def user_config_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "engine" / "config.yaml"


@functools.cache
def user_config_keys() -> dict[str, tuple[str, ...]]:
    """The keys the user config may have and the security switches it may set, as
    schemas/v1alpha1/common.json#/$defs/userConfig declares them."""
    data = json.loads((schema.schema_dir() / "common.json").read_text())
    props = data["$defs"]["userConfig"]["properties"]
    return {"top": tuple(props), "security": tuple(props["security"]["properties"])}


@dataclass(frozen=True)
class UserConfig:
    """The user's own settings: agent defaults and what the security gate may allow."""

    defaults: Layer
    allow_privileged: bool = False
    allow_host_mounts: bool = False
    allow_root_agents: bool = False


def load_user_config(path: Path | None = None) -> UserConfig:
    """The user config (`defaults:` for every agent, `security:` switches), checked: every
    problem is reported as file:line:col, like a manifest's."""
    path = path or user_config_path()
    empty = UserConfig(fixed("user config", {}))
    if not path.exists():
        return empty
    try:
        docs = load_file(path)
    except YamlError as e:
        raise InvalidManifests([e.diagnostic]) from None
    if not docs:
        return empty
    doc, data = docs[0], docs[0].data
    if not isinstance(data, dict):
        raise InvalidManifests([doc.diag((), "user config: expected a map with 'defaults' "
                                             "and 'security'")])
    diags = _user_config_problems(doc, data)
    if diags:
        raise InvalidManifests(diags)
    defaults, security = data.get("defaults") or {}, data.get("security") or {}
    return UserConfig(from_document("user config", doc, ("defaults",), defaults),
                      security.get("allowPrivileged") is True,
                      security.get("allowHostMounts") is True,
                      security.get("allowRootAgents") is True)


def _user_config_problems(doc: Document, data: dict[str, Any]) -> list[Diagnostic]:
    keys = user_config_keys()
    diags = [doc.diag((k,), f"user config: unknown key {k!r} (keys: {', '.join(keys['top'])})")
             for k in data if k not in keys["top"]]
    defaults, security = data.get("defaults") or {}, data.get("security") or {}
    for key, value in (("defaults", defaults), ("security", security)):
        if not isinstance(value, dict):
            diags.append(doc.diag((key,), f"user config: {key}: expected a map"))
    if isinstance(defaults, dict):
        diags += [doc.diag(("defaults", *p), f"user config: defaults.{m}")
                  for p, m in schema.setting_errors(defaults)]
    if isinstance(security, dict):
        for k, v in security.items():
            if k not in keys["security"]:
                diags.append(doc.diag(("security", k), f"user config: unknown security key "
                                                       f"{k!r} (keys: "
                                                       f"{', '.join(keys['security'])})"))
            elif not isinstance(v, bool):
                diags.append(doc.diag(("security", k), f"user config: security.{k}: expected "
                                                       "true or false"))
    return diags
