"""mkdocs hook: publish the JSON Schemas with the site, each at the path of its `$id`.

`https://grove-engine.dev/schemas/v1alpha1/grove.json` is served from
`schemas/v1alpha1/grove.json` of the built site, byte for byte the file of the repository's
`schemas/`, so the relative `$ref`s between them (`common.json#/$defs/name`) resolve on the
site too. The build fails if a schema's `$id` lies outside the site.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files

SITE = "https://grove-engine.dev/"
SCHEMAS = Path(__file__).resolve().parent.parent / "schemas"


def on_files(files: Files, config: Any) -> Files:
    for path in sorted(SCHEMAS.rglob("*.json")):
        data = path.read_bytes()
        sid = json.loads(data).get("$id", "")
        if not sid.startswith(SITE + "schemas/"):
            raise PluginError(f"{path}: $id {sid!r} is not under {SITE}schemas/")
        uri = sid.removeprefix(SITE)
        if files.get_file_from_path(uri) is not None:
            raise PluginError(f"{path}: the site already has a file {uri}")
        files.append(File.generated(config, uri, content=data))
    return files
