"""`engine ui [-g GROVE] [--port P] [--host H]`: serve the web UI of the groves here.

Binds 127.0.0.1 and the same port of ::1 (`--host` widens it, with a warning), names the
server `g<random>.localhost` (a fresh origin each start), makes a fresh access token,
prints the address with the token once, and serves until interrupted. The token is never written
anywhere: it lives in this process and in what it printed. Needs the `ui` extra
(starlette, uvicorn). The app itself is `engine.web.app`.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import ipaddress
import logging
import secrets
import signal
import socket
import sys
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
        "It prints an address with an access token that signs one browser in; open it. "
        "The address names a host of its own under .localhost (a fresh one each start), "
        "so nothing else on 127.0.0.1 shares its cookies, cache or storage.")
    _common.add_grove_arg(p)
    p.add_argument("--port", type=int, default=0, metavar="PORT",
                   help="port to listen on (default: a free one, different each start)")
    p.add_argument("--host", default="127.0.0.1", metavar="ADDRESS",
                   help="address to listen on (default 127.0.0.1; another one lets other "
                   "machines try the token, and is warned about)")
    p.add_argument("--plain-address", action="store_true",
                   help="print http://127.0.0.1:PORT/ instead of a name under .localhost "
                   "(for a browser that does not resolve .localhost names; other programs "
                   "on 127.0.0.1 then share the dashboard's origin's cache and storage)")
    return p


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from engine.web.app import Server
    except ImportError as e:
        from engine import __version__
        git_url = f"git+https://github.com/grove-engine/grove-engine@v{__version__}"
        raise EngineError(f"engine ui needs the ui extra ({e.name} is missing): from a clone, "
                          "pip install -e '.[ui]'; else pip install "
                          f"'grove-engine[ui] @ {git_url}'") from None
    if not 0 <= args.port <= 65535:
        raise UsageError("--port must be between 0 and 65535")
    r = _common.repo()
    names = [d.name for d in manifest.select_groves(r.root, args.groves)]
    _common.load(r, argparse.Namespace(groves=names, set=[]), resolve_secrets=False)
    socks, host = _bind(args.host, args.port)
    port = socks[0].getsockname()[1]
    hosts: set[str] | None
    if _loopback(host):
        # a name no other program has served before: no cache entry, service worker or
        # storage of another port of 127.0.0.1 can be waiting for the dashboard there
        shown = f"[{host}]" if ":" in host else host
        if host == "127.0.0.1" and not args.plain_address:  # and ::1: both are bound
            shown = f"g{secrets.token_hex(8)}.localhost"
        hosts = {f"{shown}:{port}"}  # and no other name: DNS rebinding finds nothing
    else:
        ui.err(f"warning: listening on {host}, not only this machine: anyone who can reach "
               f"it can try the token; use an SSH tunnel to 127.0.0.1 instead")
        wildcard = ipaddress.ip_address(host).is_unspecified if _is_ip(host) else False
        shown = socket.gethostname() if wildcard else f"[{host}]" if ":" in host else host
        hosts = None  # reached by names it cannot know; the session is never ambient
    token = secrets.token_urlsafe(24)
    server = Server(r.root, names, token, hosts, port)
    server.watch()
    ui.out(f"grove-engine UI for {', '.join(names)}: http://{shown}:{port}/?token={token}")
    ui.out("(the address signs in one browser; press Ctrl-C to stop)")
    sys.stdout.flush()  # the address now, not when the server ends (stdout may be a pipe)
    config = uvicorn.Config(server.guard, log_level="warning", access_log=False,
                            lifespan="off", timeout_graceful_shutdown=2)

    class Uvicorn(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            server.closing.set()  # open streams end, so the shutdown is graceful
            super().handle_exit(sig, frame)

    # a page too slow to take its last bytes is cancelled at shutdown: not an error
    logging.getLogger("uvicorn.error").addFilter(_NotCancelled())
    # uvicorn ends on SIGINT and SIGTERM alike, then raises the signal again: as
    # KeyboardInterrupt for both, so the clean-up below runs (saved plans removed)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        Uvicorn(config).run(sockets=socks)
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
        for sock in socks:
            sock.close()
    return 0


class _NotCancelled(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, asyncio.CancelledError) and \
            "graceful shutdown exceeded" not in record.getMessage()


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _listen(family: socket.AddressFamily, addr: tuple[Any, ...]) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # not a second listener
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(addr)
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


def _bind(host: str, port: int, tries: int = 20) -> tuple[list[socket.socket], str]:
    """The listening sockets and the address they are on. On 127.0.0.1 the same port of
    ::1 is taken too (where the machine has IPv6): a browser may try ::1 first for a
    .localhost name, and another program listening there would get the token."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise EngineError(f"--host {host}: {e.strerror}") from None
    family, _, _, _, addr = infos[0]
    for _ in range(tries):
        try:
            first = _listen(family, addr)
        except OSError as e:
            raise EngineError(f"cannot listen on {host}:{port}: {e.strerror}") from None
        if not (family == socket.AF_INET and _loopback(host)):
            return [first], str(addr[0])
        got = first.getsockname()[1]
        try:
            return [first, _listen(socket.AF_INET6, ("::1", got, 0, 0))], str(addr[0])
        except OSError as e:
            if e.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
                return [first], str(addr[0])  # no IPv6 loopback: nobody can listen there
            first.close()
            if port:
                raise EngineError(f"cannot listen on {host}:{port}: [::1]:{port} is "
                                  "taken by another program") from None
    raise EngineError(f"cannot listen on {host}: no port free on both 127.0.0.1 and ::1")
