"""Editors offline: a grove made by `engine init` is checked by the real yaml-language-server
(npm, driven over stdio as an editor drives it) and by plain `check-jsonschema`, with no
network: both read the self-contained schemas `init` writes into `groves/.schemas/`. The
docs site publishes the schemas at their `$id` URLs (a real `mkdocs build`)."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from engine import schema
from engine.commands import init
from tests import npm_tools
from tests.conftest import ROOT, git

YLS = "yaml-language-server@2.0.0"
NO_NETWORK = "http://127.0.0.1:9"  # a proxy that refuses: any fetch fails at once
SETTINGS = {"yaml": {"validate": True, "schemaStore": {"enable": False}},
            "http": {"proxy": NO_NETWORK, "proxyStrictSSL": True}}
TYPO = "      profle: local\n"  # inserted after `- name: hello` (line 14, 0-based 13)


class Lsp:
    """A language server on stdio: JSON-RPC messages with Content-Length framing."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: Path, log: Path) -> None:
        self.log = log.open("wb")
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, env=env, cwd=cwd)
        self.inbox: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.next_id = 0
        self.settings: dict[str, Any] = SETTINGS
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        out = self.proc.stdout
        assert out is not None
        while True:
            length = None
            while (line := out.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode("ascii").partition(":")
                if name.lower() == "content-length":
                    length = int(value)
            if not line or length is None:
                self.inbox.put(None)
                return
            self.inbox.put(json.loads(out.read(length)))

    def send(self, message: dict[str, Any]) -> None:
        body = json.dumps({"jsonrpc": "2.0", **message}).encode()
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"Content-Length: %d\r\n\r\n%b" % (len(body), body))
        self.proc.stdin.flush()

    def notify(self, method: str, params: Any) -> None:
        self.send({"method": method, "params": params})

    def request(self, method: str, params: Any, timeout: float = 60) -> Any:
        self.next_id += 1
        self.send({"id": self.next_id, "method": method, "params": params})
        reply = self.wait(lambda m: m.get("id") == self.next_id and "method" not in m, timeout)
        assert "error" not in reply, reply
        return reply.get("result")

    def wait(self, match: Any, timeout: float) -> dict[str, Any]:
        """The next message `match` accepts; requests from the server are answered."""
        end = time.monotonic() + timeout
        while (left := end - time.monotonic()) > 0:
            try:
                m = self.inbox.get(timeout=left)
            except queue.Empty:
                break
            if m is None:
                pytest.fail(f"language server exited: {self.stderr()}")
            if "id" in m and "method" in m:
                self._answer(m)
            elif match(m):
                return m
        pytest.fail(f"no answer from the language server in {timeout} s: {self.stderr()}")

    def _answer(self, m: dict[str, Any]) -> None:
        result: Any = None
        if m["method"] == "workspace/configuration":
            result = [self.settings.get(item.get("section", ""))
                      for item in m["params"]["items"]]
        self.send({"id": m["id"], "result": result})

    def configure(self, settings: dict[str, Any]) -> None:
        self.settings = settings
        self.notify("workspace/didChangeConfiguration", {"settings": settings})

    def diagnostics(self, uri: str, timeout: float = 60) -> list[dict[str, Any]]:
        m = self.wait(lambda m: m.get("method") == "textDocument/publishDiagnostics"
                      and m["params"]["uri"] == uri, timeout)
        found: list[dict[str, Any]] = m["params"]["diagnostics"]
        return found

    def stderr(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")[-2000:]

    def close(self) -> None:
        try:
            self.request("shutdown", None, timeout=10)
            self.notify("exit", None)
            self.proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired, pytest.fail.Exception):
            pass
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(timeout=10)
            self.reader.join(timeout=10)
            for pipe in (self.proc.stdin, self.proc.stdout):
                if pipe is not None:
                    with contextlib.suppress(OSError):
                        pipe.close()
            self.log.close()


@pytest.fixture(scope="module")
def yls_prefix() -> Path:
    return npm_tools.install(YLS)


@pytest.fixture
def server(yls_prefix: Path, repo: Path, tmp_path: Path) -> Iterator[Lsp]:
    script = yls_prefix / "node_modules" / "yaml-language-server" / "bin" / \
        "yaml-language-server"
    env = {**npm_tools.env(yls_prefix), "HTTP_PROXY": NO_NETWORK, "HTTPS_PROXY": NO_NETWORK,
           "http_proxy": NO_NETWORK, "https_proxy": NO_NETWORK}
    lsp = Lsp([str(npm_tools.node(yls_prefix)), str(script), "--stdio"], env, tmp_path,
              tmp_path / "yls.log")
    try:
        lsp.request("initialize", {
            "processId": os.getpid(), "rootUri": repo.as_uri(),
            "workspaceFolders": [{"uri": repo.as_uri(), "name": repo.name}],
            "capabilities": {"workspace": {"configuration": True},
                             "textDocument": {"publishDiagnostics": {}}}})
        lsp.notify("initialized", {})
        lsp.configure(SETTINGS)
        yield lsp
    finally:
        lsp.close()


def scaffold(engine: Any, repo: Path) -> Path:
    assert engine("init", "--name", "team").code == 0
    return repo / "groves" / "team" / "grove.yaml"


def with_typo(text: str) -> str:
    lines = text.splitlines(keepends=True)
    at = lines.index("    - name: hello\n") + 1
    assert at == 13
    return "".join([*lines[:at], TYPO, *lines[at:]])


def test_language_server_reports_a_typo_offline(server: Lsp, engine: Any, repo: Path) -> None:
    grove = scaffold(engine, repo)
    uri, clean = grove.as_uri(), grove.read_text()
    assert clean.splitlines()[0] == \
        "# yaml-language-server: $schema=../.schemas/v1alpha1/grove.json"
    server.notify("textDocument/didOpen", {"textDocument": {
        "uri": uri, "languageId": "yaml", "version": 1, "text": clean}})
    assert server.diagnostics(uri) == []
    server.notify("textDocument/didChange", {"textDocument": {"uri": uri, "version": 2},
                                             "contentChanges": [{"text": with_typo(clean)}]})
    found = server.diagnostics(uri)
    assert [(d["message"], d["range"]["start"]) for d in found] == \
        [("Property profle is not allowed.", {"line": 13, "character": 6})], found
    wrong_type = clean.replace("maxDepth: 3", "maxDepth: three")
    server.notify("textDocument/didChange", {"textDocument": {"uri": uri, "version": 3},
                                             "contentChanges": [{"text": wrong_type}]})
    found = server.diagnostics(uri)
    line = next(i for i, t in enumerate(wrong_type.splitlines()) if "maxDepth: three" in t)
    assert [(d["message"], d["range"]["start"]["line"]) for d in found] == \
        [('Incorrect type. Expected "integer".', line)], found
    server.notify("textDocument/didChange", {"textDocument": {"uri": uri, "version": 4},
                                             "contentChanges": [{"text": clean}]})
    assert server.diagnostics(uri) == []


def test_language_server_maps_files_to_the_schemas(server: Lsp, engine: Any,
                                                   repo: Path) -> None:
    """No modeline: the settings map file patterns to the schema files (docs/editors.md)."""
    grove = scaffold(engine, repo)
    text = with_typo(grove.read_text()).split("\n", 1)[1]
    spawned = grove.with_name("spawned.yaml")
    spawned.write_text("apiVersion: engine/v1alpha1\nkind: Agent\nmetadata: {name: two}\n"
                       "spec: {task: hi, harnes: shell}\n")
    server.configure({**SETTINGS, "yaml": {**SETTINGS["yaml"], "schemas": {
        "./groves/.schemas/v1alpha1/grove.json": "groves/*/grove.yaml",
        "./groves/.schemas/v1alpha1/agent.json": "groves/*/spawned.yaml"}}})
    for doc, body, line, field in ((grove, text, 12, "profle"),
                                   (spawned, spawned.read_text(), 3, "harnes")):
        server.notify("textDocument/didOpen", {"textDocument": {
            "uri": doc.as_uri(), "languageId": "yaml", "version": 1, "text": body}})
        found = server.diagnostics(doc.as_uri())
        assert [(d["message"], d["range"]["start"]["line"]) for d in found] == \
            [(f"Property {field} is not allowed.", line)], found


def test_language_server_offline_cannot_use_the_https_modeline(server: Lsp, engine: Any,
                                                               repo: Path) -> None:
    """What init wrote before (and what the test above proves gone): a schema URL fetched
    over the network gives only "Unable to load schema" offline, and no typo is found."""
    grove = scaffold(engine, repo)
    text = with_typo(grove.read_text()).replace(
        init.SCHEMA_REF, "https://grove-engine.dev/schemas/v1alpha1/grove.json")
    server.notify("textDocument/didOpen", {"textDocument": {
        "uri": grove.as_uri(), "languageId": "yaml", "version": 1, "text": text}})
    found = server.diagnostics(grove.as_uri())
    assert [d["message"][:len("Unable to load schema")] for d in found] == \
        ["Unable to load schema"], found


def check_jsonschema(schemafile: Path, *files: Path) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).parent / "check-jsonschema"
    assert exe.exists(), "check-jsonschema is a dev dependency: pip install -e '.[dev]'"
    env = {**os.environ, "HTTP_PROXY": NO_NETWORK, "HTTPS_PROXY": NO_NETWORK,
           "http_proxy": NO_NETWORK, "https_proxy": NO_NETWORK}
    return subprocess.run([str(exe), "--schemafile", str(schemafile), *map(str, files)],
                          capture_output=True, text=True, timeout=120, env=env)


def test_check_jsonschema_without_flags(engine: Any, repo: Path) -> None:
    grove = scaffold(engine, repo)
    schemafile = repo / "groves" / ".schemas" / "v1alpha1" / "grove.json"
    r = check_jsonschema(schemafile, grove)
    assert r.returncode == 0, r.stdout + r.stderr
    grove.write_text(with_typo(grove.read_text()))
    r = check_jsonschema(schemafile, grove)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "'profle' was unexpected" in r.stdout and "$.spec.agents[0]" in r.stdout, r.stdout
    assert "Unresolvable" not in r.stdout + r.stderr


def test_check_jsonschema_reads_the_other_kinds(engine: Any, repo: Path) -> None:
    scaffold(engine, repo)
    schemas = repo / "groves" / ".schemas" / "v1alpha1"
    docs = repo / "groves" / "team"
    (docs / "agent.yaml").write_text("apiVersion: engine/v1alpha1\nkind: Agent\n"
                                     "metadata: {name: two}\nspec: {task: hi, profile: local}\n")
    (docs / "profile.yaml").write_text("apiVersion: engine/v1alpha1\nkind: Profile\n"
                                       "metadata: {name: p}\nspec: {runtime: local}\n")
    (docs / "harness.yaml").write_text("apiVersion: engine/v1alpha1\nkind: Harness\n"
                                       "metadata: {name: h}\nspec: {command: [sh, -c, x]}\n")
    assert engine("validate").code == 0
    for kind in ("agent", "profile", "harness"):
        r = check_jsonschema(schemas / f"{kind}.json", docs / f"{kind}.yaml")
        assert r.returncode == 0, r.stdout + r.stderr
    (docs / "agent.yaml").write_text((docs / "agent.yaml").read_text().replace("task", "tsk"))
    r = check_jsonschema(schemas / "agent.json", docs / "agent.yaml")
    assert r.returncode == 1 and "'tsk' was unexpected" in r.stdout, r.stdout


def test_written_schemas_are_the_generated_ones(engine: Any, repo: Path) -> None:
    scaffold(engine, repo)
    schemas = repo / "groves" / ".schemas" / "v1alpha1"
    assert sorted(p.name for p in schemas.iterdir()) == sorted(schema.KINDS.values())
    for name, data in init.schema_files().items():
        assert (schemas / name).read_bytes() == data
        assert json.loads(data) == schema.bundled(name)


def refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        if "$ref" in node:
            yield node["$ref"]
        for v in node.values():
            yield from refs(v)
    elif isinstance(node, list):
        for v in node:
            yield from refs(v)


@pytest.mark.parametrize("file", sorted(schema.KINDS.values()))
def test_bundled_schema_is_self_contained(file: str) -> None:
    bundle = schema.bundled(file)
    source = json.loads((ROOT / "schemas" / "v1alpha1" / file).read_text())
    assert bundle["$id"] == source["$id"] and bundle["$schema"] == source["$schema"]
    jsonschema.Draft202012Validator.check_schema(bundle)
    found = list(refs(bundle))
    assert found and all(r.startswith("#/$defs/") for r in found)
    for r in found:  # every reference lands on a definition of the bundle itself
        target: Any = bundle
        for part in r.removeprefix("#/").split("/"):
            target = target[part]
        assert isinstance(target, dict)


def test_bundled_schema_judges_like_the_engine() -> None:
    """The examples of the repository pass, and a typo, a bad name and a wrong type deep in
    common.json's and agent.json's definitions fail, under the bundle alone (no registry)."""
    bundle = jsonschema.Draft202012Validator(schema.bundled("grove.json"))
    for path in sorted((ROOT / "groves").glob("*/grove.yaml")):
        data = yaml.safe_load(path.read_text())
        assert list(bundle.iter_errors(data)) == [], path
        assert schema.is_valid(data, "grove.json")
        agent = data["spec"]["agents"][0]
        for bad in ({**agent, "profle": "x"}, {**agent, "name": "Bad Name"},
                    {**agent, "resources": {"memory": [1]}}, {**agent, "env": {"1X": "y"}}):
            broken = {**data, "spec": {**data["spec"], "agents": [bad]}}
            assert list(bundle.iter_errors(broken)) != [], bad
            assert not schema.is_valid(broken, "grove.json")


def test_init_refreshes_stale_schemas_and_keeps_the_grove(engine: Any, repo: Path) -> None:
    grove = scaffold(engine, repo)
    grove.write_text(grove.read_text().replace("hello", "mine"))
    mine = grove.read_bytes()
    stale = repo / "groves" / ".schemas" / "v1alpha1" / "agent.json"
    stale.write_text("{}\n")
    r = engine("init", "--name", "team")
    assert (r.code, r.err) == (0, "")
    assert r.out == ("wrote groves/.schemas/v1alpha1/ (the manifest schemas, for editors)\n"
                     "groves/team/ already exists, left as it is (a new grove: --name)\n")
    assert stale.read_bytes() == init.schema_files()["agent.json"]
    assert grove.read_bytes() == mine


def test_the_schemas_directory_is_not_a_grove(engine: Any, repo: Path) -> None:
    """groves/.schemas/ is skipped wherever groves are found: on disk, at a revision and in
    the history."""
    scaffold(engine, repo)
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "a grove")
    v = engine("validate")
    assert (v.code, v.out) == (0, "valid: 1 grove (team), 1 agent\n"), v
    p = engine("plan", "--json")
    assert p.code == 0 and [g["grove"] for g in json.loads(p.out)["groves"]] == ["team"], p
    h = engine("history")
    assert h.code == 0 and ".schemas" not in h.out + h.err, h
    d = engine("graph", "--base", "HEAD", "--head", "HEAD", "--format", "json")
    assert d.code == 0 and ".schemas" not in d.out + d.err, d
    missing = engine("plan", "-g", ".schemas")
    assert missing.code == 1 and "not found" in missing.err, missing


@pytest.mark.timeout(300)
def test_site_publishes_the_schemas_at_their_ids(tmp_path: Path) -> None:
    mkdocs = Path(sys.executable).parent / "mkdocs"
    site = tmp_path / "site"
    r = subprocess.run([str(mkdocs), "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
                        "-d", str(site)], capture_output=True, text=True, timeout=280)
    assert r.returncode == 0, r.stderr
    sources = sorted((ROOT / "schemas").rglob("*.json"))
    assert len(sources) >= 10
    for source in sources:
        sid = json.loads(source.read_text())["$id"]
        assert sid.startswith("https://grove-engine.dev/schemas/")
        published = site / sid.removeprefix("https://grove-engine.dev/")
        assert published.read_bytes() == source.read_bytes(), sid
    assert not (site / "hooks_schemas.py").exists()
