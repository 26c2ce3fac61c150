"""Generate docs/reference.md, the manifest reference, from schemas/v1alpha1/*.json.

    python docs/gen_reference.py          # rewrite docs/reference.md
    python docs/gen_reference.py --check  # exit 1 if docs/reference.md is stale

One table per kind: every field with its type, allowed values, default and description.
References to another kind's spec (a Grove's inline profiles, harnesses and agents) link
to that kind's section instead of repeating it; shared definitions are expanded.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SCHEMAS = ROOT / "schemas" / "v1alpha1"
OUT = ROOT / "docs" / "reference.md"
KINDS = [("Grove", "grove.json"), ("Agent", "agent.json"), ("Profile", "profile.json"),
         ("Harness", "harness.json")]
LINKS = {"agent.json#/$defs/entry": "Agent", "agent.json#/$defs/spec": "Agent",
         "profile.json#/$defs/spec": "Profile", "harness.json#/$defs/spec": "Harness"}
# Defaults the engine applies when no layer sets a value (engine/layers.py BUILTIN_DEFAULTS
# and the desired-state builder); the schemas describe fields, these say what "unset" means.
DEFAULTS = {
    "runtime": "local", "access": "read-write", "network": "none", "restart": "never",
    "resources.cpus": "1", "resources.memory": "2Gi", "resources.pids": "512",
    "user": "1000", "readOnlyRoot": "true", "privileged": "false", "taskArg": "position",
    "taskFlag": "-p", "workspace": "worktree", "defaults.profile": "local",
    "defaults.harness": "shell", "profile": "spec.defaults.profile, else local",
    "harness": "spec.defaults.harness, else shell", "policy.maxAgents": "50",
    "policy.maxDepth": "3", "policy.maxChildren": "10", "writeBack.commit": "false",
}

Row = tuple[str, str, str, str, str]


def _load() -> dict[str, dict[str, Any]]:
    return {p.name: json.loads(p.read_text()) for p in sorted(SCHEMAS.glob("*.json"))}


def _resolve(schemas: dict[str, dict[str, Any]], ref: str, here: str
             ) -> tuple[dict[str, Any], str]:
    file, _, frag = ref.partition("#")
    file = file.rsplit("/", 1)[-1] or here
    node: Any = schemas[file]
    for part in frag.strip("/").split("/"):
        if part:
            node = node[part]
    return node, file


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


class _Walker:
    def __init__(self, schemas: dict[str, dict[str, Any]]) -> None:
        self.schemas = schemas
        self.rows: list[Row] = []

    def flat(self, node: dict[str, Any], file: str) -> tuple[dict[str, Any], str, str]:
        """Merge a node with what its $ref points to (the node's own keys win); returns the
        node, the file its properties live in, and a link target if it is another kind."""
        ref = node.get("$ref")
        if not ref:
            return node, file, ""
        ref_file, _, frag = ref.partition("#")
        key = f"{ref_file.rsplit('/', 1)[-1] or file}#{frag}"
        if ref_file and key in LINKS:  # another kind's fields: link, do not repeat
            return node, file, LINKS[key]
        target, tfile = _resolve(self.schemas, ref, file)
        target, tfile, link = self.flat(target, tfile)
        merged = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
        if "properties" in target and "properties" in node:
            merged["properties"] = {**target["properties"], **node["properties"]}
        return merged, tfile, link

    def walk(self, node: dict[str, Any], file: str, path: str, depth: int = 0) -> None:
        node, file, _ = self.flat(node, file)
        for name, sub in (node.get("properties") or {}).items():
            if not isinstance(sub, dict):
                continue
            self.field(sub, file, f"{path}.{name}" if path else name, depth)

    def field(self, sub: dict[str, Any], file: str, path: str, depth: int) -> None:
        sub, sfile, link = self.flat(sub, file)
        desc = sub.get("description", "")
        for inner in (sub.get("additionalProperties"), sub.get("items")):
            if isinstance(inner, dict) and not link:
                link = self.flat(inner, sfile)[2]
        if link:
            desc = (desc + " " if desc else "") + f"Fields: see [{link}](#{link.lower()})."
        self.rows.append((f"`{path}`", _type(sub, link), _allowed(sub), _default(sub, path),
                          _cell(desc)))
        if link or depth > 6:
            return
        if "properties" in sub:
            self.walk(sub, sfile, path, depth + 1)
        extra = sub.get("additionalProperties")
        if isinstance(extra, dict) and extra:
            inner, ifile, ilink = self.flat(extra, sfile)
            if "properties" in inner and not ilink:
                self.walk(inner, ifile, f"{path}.<name>", depth + 1)
        items = sub.get("items")
        if isinstance(items, dict):
            inner, ifile, ilink = self.flat(items, sfile)
            if "properties" in inner and not ilink:
                self.walk(inner, ifile, f"{path}[]", depth + 1)


def _type(s: dict[str, Any], link: str) -> str:
    if link and "items" not in s and "additionalProperties" not in s:
        return "object"
    if "oneOf" in s:
        return " or ".join(sorted({_type(o, "") for o in s["oneOf"] if isinstance(o, dict)}))
    t = s.get("type")
    if isinstance(t, list):
        base = " or ".join(t)
    elif t:
        base = str(t)
    elif "enum" in s or "const" in s or "$ref" in s:
        base = "string"
    else:
        base = "any"
    if base.startswith("array") and isinstance(s.get("items"), dict):
        item = s["items"]
        kind = item.get("type") or ("name" if "name" in str(item.get("$ref", "")) else "")
        if kind == "object" or "properties" in item or "entry" in str(item.get("$ref", "")):
            kind = "object"
        base = f"array of {kind}" if kind else base
    if base.startswith("object") and isinstance(s.get("additionalProperties"), dict) \
            and "properties" not in s:
        base = "map" + base[len("object"):]
    return base


def _allowed(s: dict[str, Any]) -> str:
    if "const" in s:
        return f"`{s['const']}`"
    if "enum" in s:
        return ", ".join(f"`{v}`" for v in s["enum"])
    if "oneOf" in s:
        return "; ".join(a for a in (_allowed(o) for o in s["oneOf"]) if a)
    parts = []
    if "pattern" in s:
        parts.append(f"matches `{s['pattern']}`")
    lo, hi = s.get("minimum", s.get("exclusiveMinimum")), s.get("maximum")
    strict = "exclusiveMinimum" in s
    if lo is not None and hi is not None:
        parts.append(f"{'more than ' if strict else ''}{lo} to {hi}")
    elif lo is not None:
        parts.append(f"{'>' if strict else '>='} {lo}")
    elif hi is not None:
        parts.append(f"<= {hi}")
    if "maxLength" in s:
        parts.append(f"at most {s['maxLength']} characters")
    return _cell("; ".join(parts))


def _default(s: dict[str, Any], path: str) -> str:
    if "default" in s:
        return f"`{json.dumps(s['default'])}`"
    key = path.split("spec.", 1)[-1]
    if key not in DEFAULTS:
        key = key.replace("defaults.", "").replace("profiles.<name>.", "")
    return f"`{DEFAULTS[key]}`" if key in DEFAULTS else ""


def render() -> str:
    schemas = _load()
    out = ["# Manifest reference", "",
           "<!-- Generated from schemas/v1alpha1/*.json by docs/gen_reference.py: do not edit "
           "by hand; run `python docs/gen_reference.py`. -->", "",
           "Every document of a grove directory (`groves/<grove>/*.yaml`) is one of the kinds "
           "below, with `apiVersion: engine/v1alpha1`. Each is checked against its JSON "
           "Schema; errors name the file, line and column. The schemas have stable `$id`s "
           "under `https://grove-engine.dev/schemas/v1alpha1/` (see [Editors](editors.md)). "
           "A default marked here is what the engine uses when no layer (grove "
           "`spec.defaults`, profile, harness, agent, `--set`) sets the field; see "
           "[Concepts](concepts.md#layers).", ""]
    for kind, file in KINDS:
        schema = schemas[file]
        walker = _Walker(schemas)
        walker.walk(schema, file, "")
        out += [f"## {kind}", "", _cell(schema.get("description", "")), "",
                f"Schema: `{schema['$id']}`", "",
                "| field | type | allowed values | default | description |",
                "|---|---|---|---|---|"]
        out += ["| " + " | ".join(row) + " |" for row in walker.rows]
        out.append("")
    return "\n".join(out)


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT.relative_to(ROOT)} is stale: run python docs/gen_reference.py",
                  file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
