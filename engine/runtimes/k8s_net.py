"""Kubernetes runtime, the git remote's addresses: its host name resolved on the engine's host.

Called by `engine.runtimes.kubernetes` (create) and by `engine render` before they build an
agent's objects: a NetworkPolicy cannot name a host, so the rule that lets git reach a remote
named by host name (`k8s_objects.resolve_target`: `network: none`, or a non-https remote with
`network: egress`) allows exactly the addresses this machine resolves for it, which
`remote_addresses` returns for `PodLaunch.remote_addresses`. `k8s_objects` stays pure; this
module does the I/O (one `getaddrinfo`, bounded in time). A host that does not resolve is a
one-line EngineError naming the agent, its profile and the remote: nothing is applied. So
is a host any of whose addresses is loopback, link-local, unspecified or multicast
(`k8s_objects.refuse_resolved`), even among public ones.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time

from engine.desired import DesiredAgent
from engine.errors import EngineError
from engine.runtimes import k8s_objects as objs

RESOLVE_SECONDS = 10.0  # getaddrinfo has no timeout of its own
CACHE_SECONDS = 30.0  # one apply of many agents asks once; a long-running controller again
_cache: dict[tuple[str, int], tuple[float, tuple[str, ...]]] = {}
_lock = threading.Lock()


def remote_addresses(agent: DesiredAgent, remote: str,
                     timeout: float = RESOLVE_SECONDS) -> tuple[str, ...]:
    """The addresses (sorted, IPv4 then IPv6, without duplicates) the agent's Pod may reach
    the remote at, when git reaches it directly by host name; () when nothing needs them
    (no NetworkPolicy, an IP address, a path, or git through the egress gateway)."""
    objs.check(agent, remote)  # a remote with a password is refused before it is shown
    target = objs.resolve_target(agent, remote)
    if target is None:
        return ()
    try:
        found = resolve(*target, timeout=timeout)
    except OSError as e:
        why = e.strerror or str(e) or type(e).__name__
        raise EngineError(f"agent {agent.grove}/{agent.name}: profile {agent.profile} "
                          f"(network: {agent.network}): cannot resolve the git remote's host "
                          f"{target[0]} ({remote}) on this machine: {why}; its "
                          "NetworkPolicy must name the remote's addresses") from None
    objs.refuse_resolved(agent, remote, target[0], found)
    return found


def resolve(host: str, port: int, timeout: float = RESOLVE_SECONDS) -> tuple[str, ...]:
    """`host`'s TCP addresses, sorted and de-duplicated; OSError when it has none or the
    resolver does not answer within `timeout` seconds."""
    key = (host.lower(), port)
    now = time.monotonic()
    with _lock:
        hit = _cache.get(key)
    if hit and now - hit[0] < CACHE_SECONDS:
        return hit[1]
    result: list[tuple[str, ...] | BaseException] = []

    def ask() -> None:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                       proto=socket.IPPROTO_TCP)
            ips = {ipaddress.ip_address(str(i[4][0]).split("%", 1)[0]) for i in infos}
            result.append(tuple(str(a) for a in sorted(ips, key=lambda a: (a.version,
                                                                          int(a)))))
        except (OSError, UnicodeError, ValueError) as e:
            result.append(e)

    worker = threading.Thread(target=ask, name=f"resolve {host}", daemon=True)
    worker.start()
    worker.join(timeout)
    if not result:  # the thread is left to the resolver's own timeout; it holds nothing
        raise OSError(f"no answer within {timeout:g}s")
    found = result[0]
    if isinstance(found, OSError):
        raise found
    if isinstance(found, BaseException):
        raise OSError(str(found) or type(found).__name__)
    if not found:
        raise OSError("no address")
    with _lock:
        _cache[key] = (now, found)
    return found
