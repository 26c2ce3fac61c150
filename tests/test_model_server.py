"""The scripted model server (tests/model_server.py), and the real agent CLIs against it.

Fast tests drive the server with a plain HTTP client playing each provider's client side:
SSE framing, the script advancing one shell call per tool result, idempotent retries,
side requests that do not advance it, credential redaction, the loopback proxy.

The slow tests run each real CLI (claude, codex, gemini, opencode), installed under
$ENGINE_TEST_CLI_DIR (default /tmp/clis; see `model_server.cli_bin`), with the engine's own
harness command line, as uid 1000 (Claude Code refuses --dangerously-skip-permissions as
root), in a scratch git repository: the "model" asks for three shell commands, the last of
which commits, and the test checks that each ran and the commit exists. They are skipped
when the CLI is not installed.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import subprocess
import tempfile
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from engine import harnesses
from tests.model_server import (
    HARNESS_PROVIDER,
    PROVIDERS,
    LoggingProxy,
    ModelServer,
    cli_bin,
    cli_env,
    cli_setup,
    tool_arguments,
)

SCRIPT = ["cat NOTES.md", "echo hi > out.txt", "echo third-step"]


# --- a plain HTTP client ------------------------------------------------------------------

def request(url: str, method: str, path: str, body: Any = None,
            headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname or "", u.port, timeout=10)
    try:
        data = None if body is None else json.dumps(body)
        conn.request(method, path, data, {"Content-Type": "application/json", **(headers or {})})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def sse(raw: bytes) -> list[tuple[str | None, str]]:
    """(event, data) per SSE event; every event ends with a blank line."""
    text = raw.decode().replace("\r\n", "\n")
    assert text.endswith("\n\n"), text[-80:]
    out: list[tuple[str | None, str]] = []
    for block in text[:-2].split("\n\n"):
        event, data = None, []
        for line in block.split("\n"):
            key, sep, value = line.partition(": ")
            assert sep, f"not an SSE field line: {line!r}"
            if key == "event":
                event = value
            else:
                assert key == "data", line
                data.append(value)
        out.append((event, "\n".join(data)))
    return out


Reply = tuple[Any, ...]  # ("call", id, tool name, args) or ("text", text)


class Client:
    """The client side of one provider's API, just enough to play a conversation."""

    def __init__(self, provider: str, stream: bool, with_shell: bool = True) -> None:
        self.provider, self.stream = provider, stream
        cmd: dict[str, Any] = {"type": "object", "properties": {"command": {"type": "string"}},
               "required": ["command"]}
        p = provider
        tools: list[dict[str, Any]]
        if p == "anthropic":
            self.path = "/v1/messages?beta=true"
            tools = [{"name": "Read", "input_schema": {"type": "object"}},
                     {"name": "Bash", "input_schema": cmd}]
            self.body: dict[str, Any] = {"model": "m", "max_tokens": 100, "stream": stream,
                                         "messages": [{"role": "user", "content": "go"}]}
        elif p == "openai-responses":
            self.path = "/v1/responses"
            tools = [{"type": "function", "name": "exec_command", "parameters": {
                "type": "object", "properties": {"cmd": {"type": "string"}},
                "required": ["cmd"]}}, {"type": "web_search"}]
            self.body = {"model": "m", "stream": stream, "input": [
                {"type": "message", "role": "user",
                 "content": [{"type": "input_text", "text": "go"}]}]}
        elif p == "gemini":
            verb = "streamGenerateContent?alt=sse" if stream else "generateContent"
            self.path = f"/v1beta/models/gemini-test:{verb}"
            tools = [{"functionDeclarations": [
                {"name": "read_file", "parametersJsonSchema": {"type": "object"}},
                {"name": "run_shell_command", "parametersJsonSchema": {
                    **cmd, "properties": {**cmd["properties"],
                                          "description": {"type": "string"}},
                    "required": ["command", "description"]}}]}]
            self.body = {"contents": [{"role": "user", "parts": [{"text": "go"}]}]}
        else:
            self.path = "/v1/chat/completions"
            tools = [{"type": "function", "function": {"name": "bash", "parameters": cmd}}]
            self.body = {"model": "m", "stream": stream,
                         "messages": [{"role": "user", "content": "go"}]}
        if with_shell:
            self.body["tools"] = tools

    def send(self, url: str, headers: dict[str, str] | None = None) -> Reply:
        status, hdrs, raw = request(url, "POST", self.path, self.body, headers)
        assert status == 200, raw
        if self.stream:
            assert hdrs["content-type"] == "text/event-stream"
            reply: Reply = getattr(self, "_stream_" + self.provider.replace("-", "_"))(sse(raw))
            return reply
        assert hdrs["content-type"] == "application/json"
        reply = getattr(self, "_json_" + self.provider.replace("-", "_"))(json.loads(raw))
        return reply

    # Anthropic Messages
    def _stream_anthropic(self, events: list[tuple[str | None, str]]) -> Reply:
        datas = [json.loads(d) for _, d in events]
        assert [e for e, _ in events] == [d["type"] for d in datas]  # event: names its data
        kinds = [d["type"] for d in datas]
        assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
        assert kinds[1] == "content_block_start" and kinds[-3] == "content_block_stop"
        block = datas[1]["content_block"]
        deltas = [d["delta"] for d in datas if d["type"] == "content_block_delta"]
        stop = datas[-2]["delta"]["stop_reason"]
        if block["type"] == "tool_use":
            assert stop == "tool_use"
            args = json.loads("".join(d["partial_json"] for d in deltas))
            return ("call", block["id"], block["name"], args)
        assert stop == "end_turn"
        return ("text", "".join(d["text"] for d in deltas))

    def _json_anthropic(self, msg: dict[str, Any]) -> Reply:
        assert msg["type"] == "message" and msg["role"] == "assistant"
        b = msg["content"][0]
        if b["type"] == "tool_use":
            assert msg["stop_reason"] == "tool_use"
            return ("call", b["id"], b["name"], b["input"])
        assert msg["stop_reason"] == "end_turn"
        return ("text", b["text"])

    # OpenAI Responses
    def _stream_openai_responses(self, events: list[tuple[str | None, str]]) -> Reply:
        datas = [json.loads(d) for _, d in events]
        assert [e for e, _ in events] == [d["type"] for d in datas]
        assert [d["sequence_number"] for d in datas] == list(range(len(datas)))
        assert datas[0]["type"] == "response.created"
        assert datas[-1]["type"] == "response.completed"
        assert datas[-1]["response"]["usage"]["total_tokens"] > 0
        item = next(d["item"] for d in datas if d["type"] == "response.output_item.done")
        if item["type"] == "function_call":
            delta = "".join(d["delta"] for d in datas
                            if d["type"] == "response.function_call_arguments.delta")
            assert delta == item["arguments"]
            return ("call", item["call_id"], item["name"], json.loads(item["arguments"]))
        text = "".join(d["delta"] for d in datas if d["type"] == "response.output_text.delta")
        assert text == item["content"][0]["text"]
        return ("text", text)

    def _json_openai_responses(self, resp: dict[str, Any]) -> Reply:
        assert resp["status"] == "completed"
        item = resp["output"][0]
        if item["type"] == "function_call":
            return ("call", item["call_id"], item["name"], json.loads(item["arguments"]))
        return ("text", item["content"][0]["text"])

    # Gemini
    def _stream_gemini(self, events: list[tuple[str | None, str]]) -> Reply:
        assert all(e is None for e, _ in events)  # data-only chunks
        parts = [p for _, d in events for p in json.loads(d)["candidates"][0]["content"]["parts"]]
        return self._parts(parts)

    def _json_gemini(self, resp: dict[str, Any]) -> Reply:
        assert resp["usageMetadata"]["totalTokenCount"] > 0
        return self._parts(resp["candidates"][0]["content"]["parts"])

    @staticmethod
    def _parts(parts: list[dict[str, Any]]) -> Reply:
        for p in parts:
            if "functionCall" in p:
                fc = p["functionCall"]
                return ("call", fc["id"], fc["name"], fc["args"])
        return ("text", "".join(p["text"] for p in parts))

    # OpenAI Chat Completions
    def _stream_openai_chat(self, events: list[tuple[str | None, str]]) -> Reply:
        assert all(e is None for e, _ in events)
        assert events[-1][1] == "[DONE]"
        chunks = [json.loads(d) for _, d in events[:-1]]
        assert all(c["object"] == "chat.completion.chunk" for c in chunks)
        choices = [c["choices"][0] for c in chunks if c["choices"]]
        assert choices[0]["delta"]["role"] == "assistant"
        finish = [c["finish_reason"] for c in choices if c["finish_reason"]]
        calls: dict[int, dict[str, str]] = {}
        text = ""
        for c in choices:
            text += c["delta"].get("content") or ""
            for tc in c["delta"].get("tool_calls") or []:
                acc = calls.setdefault(tc["index"], {"id": "", "name": "", "arguments": ""})
                acc["id"] = tc.get("id") or acc["id"]
                acc["name"] = tc.get("function", {}).get("name") or acc["name"]
                acc["arguments"] += tc.get("function", {}).get("arguments") or ""
        assert chunks[-1]["usage"]["total_tokens"] > 0  # the include_usage chunk
        if calls:
            assert finish == ["tool_calls"]
            c0 = calls[0]
            return ("call", c0["id"], c0["name"], json.loads(c0["arguments"]))
        assert finish == ["stop"]
        return ("text", text)

    def _json_openai_chat(self, resp: dict[str, Any]) -> Reply:
        msg = resp["choices"][0]["message"]
        if msg.get("tool_calls"):
            fn = msg["tool_calls"][0]["function"]
            return ("call", msg["tool_calls"][0]["id"], fn["name"], json.loads(fn["arguments"]))
        return ("text", msg["content"])

    def add_result(self, call: Reply, output: str) -> None:
        """Append the call and its result to the history, as the provider's client does."""
        _, cid, name, args = call
        p = self.provider
        if p == "anthropic":
            self.body["messages"] += [
                {"role": "assistant", "content": [{"type": "tool_use", "id": cid,
                                                   "name": name, "input": args}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": cid,
                                              "content": [{"type": "text", "text": output}]}]}]
        elif p == "openai-responses":
            self.body["input"] += [
                {"type": "function_call", "call_id": cid, "name": name,
                 "arguments": json.dumps(args)},
                {"type": "function_call_output", "call_id": cid, "output": output}]
        elif p == "gemini":
            self.body["contents"] += [
                {"role": "model", "parts": [{"functionCall": {"id": cid, "name": name,
                                                              "args": args}}]},
                {"role": "user", "parts": [{"functionResponse": {
                    "id": cid, "name": name, "response": {"output": output}}}]}]
        else:
            self.body["messages"] += [
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": cid, "type": "function",
                     "function": {"name": name, "arguments": json.dumps(args)}}]},
                {"role": "tool", "tool_call_id": cid, "content": output}]


SHELL = {"anthropic": ("Bash", "command"), "openai-responses": ("exec_command", "cmd"),
         "gemini": ("run_shell_command", "command"), "openai-chat": ("bash", "command")}


# --- the server, fast ---------------------------------------------------------------------

@pytest.mark.parametrize("stream", [True, False], ids=["stream", "json"])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_script_plays_one_shell_call_per_result_then_the_final_text(
        provider: str, stream: bool) -> None:
    tool, key = SHELL[provider]
    with ModelServer(provider, SCRIPT, final_text="all done") as s:
        c = Client(provider, stream)
        for i, cmd in enumerate(SCRIPT):
            reply = c.send(s.url)
            assert reply[0] == "call", reply
            assert reply[2] == tool and reply[3][key] == cmd
            assert s.commands_run() == SCRIPT[:i]
            c.add_result(reply, f"output {i}")
        assert c.send(s.url) == ("text", "all done")
        assert s.commands_run() == SCRIPT
        assert s.tool_results() == ["output 0", "output 1", "output 2"]
        assert s.finished()
        assert [r.step for r in s.requests] == [0, 1, 2, 3]
        assert all(r.kind == "main" and r.stream == stream for r in s.requests)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_retried_request_gets_the_same_answer(provider: str) -> None:
    with ModelServer(provider, SCRIPT) as s:
        c = Client(provider, stream=True)
        first = c.send(s.url)
        c.add_result(first, "x")
        again = [c.send(s.url) for _ in range(3)]  # a CLI retrying after a dropped stream
        assert again[0][0] == "call" and again[0][3][SHELL[provider][1]] == SCRIPT[1]
        assert again[0] == again[1] == again[2]
        assert again[0][1] != first[1]  # a new call id per step, the same one per retry
        assert s.commands_run() == SCRIPT[:1] and not s.finished()
        assert [r.step for r in s.requests] == [0, 1, 1, 1]


@pytest.mark.parametrize("provider", PROVIDERS)
def test_requests_without_the_shell_tool_get_text_and_do_not_advance(provider: str) -> None:
    with ModelServer(provider, SCRIPT, side_text="A short title") as s:
        side = Client(provider, stream=True, with_shell=False)
        assert side.send(s.url) == ("text", "A short title")
        assert Client(provider, stream=False, with_shell=False).send(s.url)[0] == "text"
        main = Client(provider, stream=True).send(s.url)
        assert main[0] == "call" and main[3][SHELL[provider][1]] == SCRIPT[0]
        assert [r.kind for r in s.requests] == ["side", "side", "main"]


def test_side_requests_that_want_json_get_an_instance_of_their_schema() -> None:
    schema = {"type": "OBJECT", "properties": {
        "complexity_reasoning": {"type": "STRING"}, "complexity_score": {"type": "INTEGER"},
        "mode": {"type": "STRING", "enum": ["fast", "slow"]}},
        "required": ["complexity_reasoning", "complexity_score", "mode"]}
    with ModelServer("gemini", SCRIPT) as s:  # gemini-cli's model router asks for this
        c = Client("gemini", stream=False, with_shell=False)
        c.body["generationConfig"] = {"responseMimeType": "application/json",
                                      "responseJsonSchema": schema}
        kind, text = c.send(s.url)
        assert kind == "text"
        assert json.loads(text) == {"complexity_reasoning": "ok", "complexity_score": 1,
                                    "mode": "fast"}
    with ModelServer("openai-chat", SCRIPT) as s:
        c = Client("openai-chat", stream=True, with_shell=False)
        c.body["response_format"] = {"type": "json_schema", "json_schema": {
            "name": "t", "schema": {"type": "object", "properties": {
                "title": {"type": "string"}, "ok": {"type": "boolean"}}}}}
        assert json.loads(c.send(s.url)[1]) == {"title": "ok", "ok": False}


def test_token_counting_model_lists_and_probes_are_answered() -> None:
    with ModelServer("anthropic", SCRIPT) as s:
        st, _, raw = request(s.url, "POST", "/v1/messages/count_tokens?beta=true",
                             {"model": "m", "messages": []})
        assert st == 200 and json.loads(raw) == {"input_tokens": 100}
        st, _, raw = request(s.url, "GET", "/v1/models")
        assert st == 200 and json.loads(raw)["data"][0]["id"]
        st, _, raw = request(s.url, "HEAD", "/")
        assert st == 200 and raw == b""
        st, _, raw = request(s.url, "POST", "/v1/complete", {"prompt": "x"})
        assert st == 404 and b"scripted model server" in raw
        assert [r.kind for r in s.requests] == ["count", "models", "probe", "unknown"]
    with ModelServer("gemini", SCRIPT) as s:
        st, _, raw = request(s.url, "POST", "/v1beta/models/g:countTokens", {"contents": []})
        assert json.loads(raw) == {"totalTokens": 100}
        st, _, raw = request(s.url, "GET", "/v1beta/models")
        assert json.loads(raw)["models"][0]["name"].startswith("models/")


def test_credentials_are_redacted_in_the_record() -> None:
    with ModelServer("gemini", SCRIPT) as s:
        c = Client("gemini", stream=False)
        c.path += "?key=sekret"
        c.send(s.url, {"x-goog-api-key": "sekret", "Authorization": "Bearer sekret",
                       "User-Agent": "GeminiCLI/0"})
        r = s.requests[0]
        assert r.query == {"key": "<redacted>"}
        assert r.headers["x-goog-api-key"] == "<redacted>"
        assert r.headers["authorization"] == "Bearer <redacted>"
        assert r.headers["user-agent"] == "GeminiCLI/0"
        assert "sekret" not in repr(r.headers) + repr(r.query)
        assert r.path == "/v1beta/models/gemini-test:generateContent"


def test_tool_arguments_follow_the_declared_schema() -> None:
    assert tool_arguments({"properties": {"command": {"type": "array"}}}, "ls -l") == \
        {"command": ["bash", "-lc", "ls -l"]}
    assert tool_arguments({"properties": {"cmd": {"type": "string"}}}, "ls") == {"cmd": "ls"}
    assert tool_arguments({"properties": {"command": {"type": "string"},
                                          "description": {"type": "string"},
                                          "background": {"type": "boolean"}},
                           "required": ["command", "description", "background"]}, "ls") == \
        {"command": "ls", "description": "scripted step", "background": False}


def test_the_proxy_forwards_to_loopback_only() -> None:
    with ModelServer("openai-chat", SCRIPT) as s:
        port = int(s.url.rsplit(":", 1)[1])
        with LoggingProxy(forward_port=port) as proxy:
            pu = urlsplit(proxy.url)
            conn = http.client.HTTPConnection(pu.hostname or "", pu.port, timeout=10)
            try:  # absolute-form, a host that does not resolve: reachable only via the proxy
                body = Client("openai-chat", stream=False).body
                conn.request("POST", f"http://model.invalid:{port}/v1/chat/completions",
                             json.dumps(body), {"Content-Type": "application/json"})
                resp = conn.getresponse()
                assert resp.status == 200 and json.loads(resp.read())["choices"]
            finally:
                conn.close()
            conn = http.client.HTTPConnection(pu.hostname or "", pu.port, timeout=10)
            conn.set_tunnel("example.invalid", 443)
            try:
                with pytest.raises(OSError, match="403"):
                    conn.request("GET", "/")
            finally:
                conn.close()
            deadline = time.monotonic() + 5
            while len(proxy.seen) < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
        assert [line.rsplit(" ", 1)[0] for line in proxy.seen] == [
            f"POST http://model.invalid:{port}/v1/chat/completions",
            "CONNECT example.invalid:443"]
        assert s.requests[0].path == "/v1/chat/completions"


def test_cli_setup_writes_each_harness_config(tmp_path: Path) -> None:
    url = "http://127.0.0.1:9"
    for h in HARNESS_PROVIDER:
        cli_setup(h, url, tmp_path / h)
        assert (tmp_path / h / ".tmp").is_dir()
    assert cli_env("claude", url, tmp_path)["ANTHROPIC_BASE_URL"] == url
    codex = tomllib.loads((tmp_path / "codex" / ".codex" / "config.toml").read_text())
    assert codex["model_provider"] == "scripted"
    assert codex["model_providers"]["scripted"] == {
        "name": "scripted", "base_url": f"{url}/v1", "env_key": "CODEX_API_KEY",
        "wire_api": "responses"}
    gem = json.loads((tmp_path / "gemini" / ".gemini" / "settings.json").read_text())
    assert gem["security"]["auth"]["selectedType"] == "gemini-api-key"
    oc = json.loads((tmp_path / "opencode" / ".config" / "opencode" / "opencode.json")
                    .read_text())
    assert oc["provider"]["scripted"]["options"]["baseURL"] == f"{url}/v1"
    env = cli_env("opencode", url, tmp_path / "opencode")
    assert Path(env["OPENCODE_CONFIG"]).is_file()


# --- the real CLIs, slow ------------------------------------------------------------------

INSTRUCTIONS = "Follow the scripted steps.\n"
E2E_SCRIPT = ["cat {instructions}",
              "echo hi > out.txt && git add out.txt && git commit -qm 'add out.txt'",
              "echo third-step"]
AGENT_UID = 1000  # Claude Code refuses --dangerously-skip-permissions as root


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "safe.directory=*", *args], cwd=repo, check=True,
                          capture_output=True, text=True).stdout


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A directory the agent's uid owns (pytest's tmp_path is private to root)."""
    root = Path(tempfile.mkdtemp(prefix="cli-e2e-"))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _argv(harness: str, binary: Path, task: str) -> list[str]:
    """The engine's own command line for `harness` (the catalog's command and task flag)."""
    spec = harnesses.spec(harness)
    assert spec is not None
    flag = str(spec["taskFlag"])
    task_args = [flag + task] if flag.endswith("=") else [flag, task]
    return [str(binary), *spec["command"][1:], *task_args]


@pytest.mark.slow
@pytest.mark.parametrize("harness", list(HARNESS_PROVIDER))
def test_real_cli_runs_the_scripted_shell_calls(harness: str, scratch: Path) -> None:
    binary = cli_bin(harness)
    if binary is None:
        pytest.skip(f"{harness} is not installed under $ENGINE_TEST_CLI_DIR "
                    f"(default /tmp/clis): npm install --prefix DIR/{harness} ...")
    as_root = os.geteuid() == 0
    if as_root and not shutil.which("setpriv"):
        pytest.skip("setpriv is needed to run the CLI as an unprivileged user")
    spec = harnesses.spec(harness)
    assert spec is not None
    instructions = str(spec["instructionsFile"])
    home, repo = scratch / "home", scratch / "repo"
    repo.mkdir()
    (repo / instructions).write_text(INSTRUCTIONS)
    _git(repo, "init", "-q", "-b", "main")
    _git(repo, "add", ".")
    _git(repo, "commit", "-qm", "init")
    script = [c.format(instructions=instructions) for c in E2E_SCRIPT]
    with ModelServer(HARNESS_PROVIDER[harness], script, final_text="scripted run done") as s:
        cli_setup(harness, s.url, home)
        env = cli_env(harness, s.url, home)
        if harness == "gemini" and not shutil.which("node", path=env["PATH"]):
            pytest.skip("gemini needs Node >= 20 on PATH")
        prefix: list[str] = []
        if as_root:
            subprocess.run(["chown", "-R", f"{AGENT_UID}:{AGENT_UID}", str(scratch)],
                           check=True)
            prefix = ["setpriv", f"--reuid={AGENT_UID}", f"--regid={AGENT_UID}",
                      "--clear-groups"]
        # stdin must not be an open pipe: `codex exec` reads it to EOF before starting
        p = subprocess.run([*prefix, *_argv(harness, binary, "Run the scripted steps.")],
                           cwd=repo, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                           text=True, timeout=240)
        log = f"rc={p.returncode}\nstdout:\n{p.stdout[-3000:]}\nstderr:\n{p.stderr[-3000:]}"
        assert p.returncode == 0, log
        assert s.commands_run() == script, log
        results = s.tool_results()
        assert INSTRUCTIONS.strip() in results[0] and "third-step" in results[2], results
        assert s.finished() and "scripted run done" in p.stdout, log
        assert not [r.path for r in s.requests if r.kind == "unknown"]
    assert _git(repo, "log", "-1", "--format=%s").strip() == "add out.txt"
    assert _git(repo, "show", "HEAD:out.txt") == "hi\n"
