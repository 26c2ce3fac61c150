"""`network: egress` as a setting: validation (file:line, one line each, exit 1), how the
harness's endpoints and the profile's list combine, the spawn gate on endpoints, and what
the Docker runtime makes of it (the container's arguments, no secret in them). The gateway
itself is tested in test_egress_gateway.py, real agents through it in test_real_agents.py.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from engine import desired, manifest, policy
from engine.runtimes import Launch
from engine.runtimes import docker_spec as spec
from tests.conftest import write_grove


def grove(profile: dict[str, Any], harness: str = "shell",
          extra: dict[str, Any] | None = None) -> str:
    return json.dumps({
        "apiVersion": "engine/v1alpha1", "kind": "Grove", "metadata": {"name": "g"},
        "spec": {"profiles": {"box": {"runtime": "docker", "image": "grove-engine/base:latest",
                                      **profile}, **(extra or {})},
                 "agents": [{"name": "a", "profile": "box", "harness": harness,
                             "task": "t"}]}}, indent=2)


def build(repo: Path, text: str) -> desired.DesiredGrove:
    d = write_grove(repo, "g", text)
    return desired.build(manifest.load_grove(d, repo),
                         desired.Options(repo_root=repo, resolve_secrets=False))


def test_harness_endpoints_are_the_default_and_the_list_extends_or_narrows(repo: Path
                                                                            ) -> None:
    claude = {"credentials": {"ANTHROPIC_API_KEY": {"fromEnv": "K"}}}
    a = build(repo, grove({"network": "egress", **claude}, "claude")).agent("a")
    assert a.egress == ("api.anthropic.com:443",)
    assert a.network == "egress"
    a = build(repo, grove({"network": "egress", "egress": ["harness", "GitHub.com:443",
                                                          "[::1]:8080"], **claude},
                          "claude")).agent("a")
    assert a.egress == ("[::1]:8080", "api.anthropic.com:443", "github.com:443")
    a = build(repo, grove({"network": "egress", "egress": ["127.0.0.1:9000"], **claude},
                          "claude")).agent("a")
    assert a.egress == ("127.0.0.1:9000",)  # no `harness`: exactly the list


def test_bad_egress_is_one_line_per_problem_at_its_place(repo: Path, engine: Any) -> None:
    cases = {
        "not-host-port": ({"network": "egress", "egress": ["https://api.example.com"]},
                          r"egress\[0\]: 'https://api.example.com' is not valid"),
        "wildcard": ({"network": "egress", "egress": ["*.example.com:443"]},
                     "is not valid"),
        "bad-port": ({"network": "egress", "egress": ["example.com:99999"]},
                     "egress[0]"),
        "no-endpoint": ({"network": "egress"},
                        "network: egress with no endpoint: harness shell declares none"),
        "empty-list": ({"network": "egress", "egress": []},
                       "network: egress with no endpoint"),
        "without-egress": ({"egress": ["example.com:443"]},
                           "egress applies only with network: egress (network is none)"),
    }
    for name, (profile, message) in cases.items():
        write_grove(repo, "g", grove(profile))
        res = engine("validate", "--no-secrets")
        assert res.code == 1, (name, res)
        lines = [ln for ln in res.err.splitlines() if ln.startswith("error:")]
        assert len(lines) == 1, (name, res.err)
        assert lines[0].startswith("error: groves/g/grove.yaml:"), (name, lines)
        assert message in lines[0] or __import__("re").search(message, lines[0]), \
            (name, lines[0])
        assert "Traceback" not in res.err


def test_a_child_gets_only_endpoints_its_parent_has(repo: Path) -> None:
    g = build(repo, grove({"network": "egress", "egress": ["a.example:443", "b.example:443"]}))
    parent = g.agent("a")
    same = dataclasses.replace(parent, name="c", egress=("a.example:443",))
    assert policy.compare(parent, same) == []
    wider = dataclasses.replace(parent, name="c", egress=("a.example:443", "c.example:443"))
    assert policy.compare(parent, wider) == [
        "egress: would reach c.example:443, which the parent cannot"]
    host = dataclasses.replace(parent, name="c", network="host", egress=())
    assert policy.compare(parent, host) == ["network: would get host; the parent has egress"]
    none = dataclasses.replace(parent, name="c", network="none", egress=())
    assert policy.compare(parent, none) == []
    named = dataclasses.replace(parent, network="team-net", egress=())
    as_egress = dataclasses.replace(parent, name="c")
    assert policy.compare(named, as_egress) == [  # they reach different places
        "network: would get egress; the parent has network team-net"]


def test_docker_arguments_for_egress(repo: Path, tmp_path: Path) -> None:
    a = build(repo, grove({"network": "egress", "egress": ["api.example.com:443",
                                                          "127.0.0.1:8080"]})).agent("a")
    dirs = spec.HostDirs(ctl=tmp_path, secrets=tmp_path, log=tmp_path / "log",
                         inbox=tmp_path, client=tmp_path / "c", client_bin=tmp_path / "e",
                         entrypoint=tmp_path / "ep", egress=tmp_path / "sock",
                         forwarder=tmp_path / "fwd.py", harness=tmp_path / "prog")
    launch = Launch(agent=a, repo_root=repo, workdir=repo / "w", git_paths=(),
                    run_dir=tmp_path, inbox=tmp_path, log_file=tmp_path / "log",
                    client=tmp_path / "c", env={}, secrets={"TOKEN": "s3cret-value"})
    kw = spec.create_kwargs(launch, dirs, "grove-engine/base:latest")
    assert kw["network_mode"] == "none"  # the container itself has no network
    mounts = {m["Target"]: m for m in kw["mounts"]}
    assert mounts[spec.EGRESS]["Source"] == str(tmp_path / "sock")
    assert mounts[spec.EGRESS]["ReadOnly"] and mounts[spec.FORWARDER]["ReadOnly"]
    assert mounts[spec.HARNESS]["ReadOnly"]
    env = kw["environment"]
    assert env["HTTPS_PROXY"] == env["https_proxy"] == "http://127.0.0.1:3128"
    assert env["ENGINE_EGRESS_FORWARD"] == "127.0.0.1:8080"  # loopback: listened on
    assert env["ENGINE_EGRESS_SOCKET"] == f"{spec.EGRESS}/gw.sock"
    assert "127.0.0.1" in env["NO_PROXY"]
    assert env["PATH"].startswith(f"{spec.HARNESS}/bin:")
    assert "s3cret-value" not in json.dumps(kw)


def test_engine_egress_prints_what_the_gateway_recorded(repo: Path, engine: Any) -> None:
    """`engine egress`: a real gateway, one allowed tunnel to a loopback server and two
    refusals (one with terminal escapes in what the agent sent), as a table, filtered,
    tailed and as JSON; nothing the agent sent reaches the terminal raw."""
    import socket
    import threading

    from engine import egress
    from tests.test_egress_gateway import connect

    write_grove(repo, "g", grove({"network": "egress", "egress": ["127.0.0.1:9"]}))
    upstream = socket.create_server(("127.0.0.1", 0))
    port = upstream.getsockname()[1]

    def serve() -> None:
        conn, _ = upstream.accept()
        with conn:
            conn.sendall(b"hello from upstream")

    threading.Thread(target=serve, daemon=True).start()
    egress.write_policy(repo, "g", "a", [f"127.0.0.1:{port}"])
    egress.ensure_running(repo)
    try:
        sock = egress.socket_dir(repo, "g", "a") / egress.SOCKET_NAME
        for target in (f"127.0.0.1:{port}", "example.com:443", "\x1b[31mevil\x07:443"):
            with connect(sock) as s:
                s.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                s.settimeout(10)
                data = b""
                while chunk := s.recv(4096):
                    data += chunk
                    if target.startswith("127.") and b"hello" in data:
                        break
        deadline = __import__("time").monotonic() + 10
        while len(egress.read_log(repo, "g", "a")) < 3:
            assert __import__("time").monotonic() < deadline, egress.read_log(repo)
            __import__("time").sleep(0.1)
        res = engine("egress", "a")
        assert res.code == 0, res
        lines = res.out.splitlines()
        assert lines[0].split() == ["TIME", "AGENT", "METHOD", "TARGET", "UP", "DOWN",
                                    "DURATION", "VERDICT"]
        assert any(f"127.0.0.1:{port}" in ln and "allowed" in ln and "19 B" in ln
                   for ln in lines), res.out
        assert any("example.com:443" in ln and "refused" in ln for ln in lines), res.out
        assert "\x1b" not in res.out and "\x07" not in res.out
        refused = engine("egress", "a", "--refused").out
        assert "allowed" not in refused and "example.com:443" in refused
        assert len(engine("egress", "--tail", "1").out.splitlines()) == 2
        doc = json.loads(engine("egress", "--json").out)
        assert doc["kind"] == "EgressLog" and len(doc["records"]) == 3
        assert engine("egress", "nosuch").code == 1
    finally:
        egress.stop(repo)
        upstream.close()
