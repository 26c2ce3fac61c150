"""`engine ui [-g GROVE] [--port P] [--host H]`: serve the web UI of the groves here.

Binds 127.0.0.1 (`--host` widens it, with a warning), makes a fresh access token, prints
the address with the token once, and serves until interrupted. The token is never written
anywhere: it lives in this process and in what it printed. Needs the `ui` extra
(starlette, uvicorn). The app itself is `engine.web.app`.
"""

from __future__ import annotations

import argparse
import ipaddress
import secrets
import signal
import socket
from typing import Any

from engine import manifest, ui
from engine.commands import _common
from engine.errors import EngineError, UsageError


def register(sub: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(
        "ui", help="serve a web dashboard of the groves (needs grove-engine[ui])",
        description="Serve a local web dashboard: the spawn graph live, each agent's logs, "
        "screen, commits and cost, the inbox of agents waiting for a person and spawn "
        "requests waiting for approval, the plan with an apply button, and the history. "
        "It prints an address with a one-time access token; open it in a browser.")
    _common.add_grove_arg(p)
    p.add_argument("--port", type=int, default=8757, metavar="PORT",
                   help="port to listen on (default 8757; 0 picks a free one)")
    p.add_argument("--host", default="127.0.0.1", metavar="ADDRESS",
                   help="address to listen on (default 127.0.0.1; another one lets other "
                   "machines try the token, and is warned about)")
    return p


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from engine.web.app import Server
    except ImportError as e:
        raise EngineError(f"engine ui needs the ui extra ({e.name} is missing): pip "
                          "install 'grove-engine[ui]' (from a clone: pip install -e "
                          "'.[ui]')") from None
    if not 0 <= args.port <= 65535:
        raise UsageError("--port must be between 0 and 65535")
    r = _common.repo()
    names = [d.name for d in manifest.select_groves(r.root, args.groves)]
    _common.load(r, argparse.Namespace(groves=names, set=[]), resolve_secrets=False)
    sock, host = _bind(args.host, args.port)
    port = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    hosts = {f"{shown}:{port}"}
    if _loopback(host):
        hosts |= {f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}"}
    else:
        ui.err(f"warning: listening on {host}, not only this machine: anyone who can reach "
               f"it can try the token; use an SSH tunnel to 127.0.0.1 instead")
    token = secrets.token_urlsafe(24)
    server = Server(r.root, names, token, hosts, port)
    server.watch()
    ui.out(f"grove-engine UI for {', '.join(names)}: http://{shown}:{port}/?token={token}")
    ui.out("(the token is shown only here; press Ctrl-C to stop)")
    config = uvicorn.Config(server.guard, log_level="warning", access_log=False,
                            lifespan="off", timeout_graceful_shutdown=2)
    # uvicorn ends on SIGINT and SIGTERM alike, then raises the signal again: as
    # KeyboardInterrupt for both, so the clean-up below runs (saved plans removed)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
        sock.close()
    return 0


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _bind(host: str, port: int) -> tuple[socket.socket, str]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise EngineError(f"--host {host}: {e.strerror}") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise EngineError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    return sock, str(addr[0])
