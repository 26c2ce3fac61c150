"""The in-container end of the egress gateway. Runs inside an agent's container (uid
1000, `python3 -S`, standard library only, no engine imports), started by the image's
entrypoint before the harness; the container has no network, only the gateway's socket
mounted at /run/engine/egress.

- 127.0.0.1:--proxy-port (3128): every connection is carried raw over the gateway's
  socket; the gateway speaks HTTP proxy (HTTPS_PROXY/HTTP_PROXY point here).
- each `--forward host:port` with a loopback host: listens on that same address and port
  in the container and tunnels each connection with `CONNECT host:port` through the
  gateway, so `http://127.0.0.1:PORT` works for clients without proxy support.
- `--ready FILE` is written once every listener is bound; `--lo-up` first brings the
  loopback interface up (a fresh network namespace, as the local runtime makes).

One thread, one small event loop (selectors): each direction of a connection moves bytes
with non-blocking os.splice through a pipe where the kernel allows (else recv/send); at
most 512 live connections; nothing blocks on a client. One line on stderr per error;
nothing else.

    python3 -S forwarder.py --socket /run/engine/egress/gw.sock --proxy-port 3128 \
        [--forward HOST:PORT ...] [--ready FILE] [--lo-up]
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import os
import selectors
import socket
import struct
import sys
import time
from collections.abc import Callable

PIPE_MAX = 1 << 20  # a pipe that fills in one splice grows to this (bulk transfers)
COPY_BUFFER = 64 * 1024  # where splice is missing
MAX_LIVE = 512
HEAD_MAX = 16384
HANDSHAKE_TIMEOUT = 30.0
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
QUIET = {errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.ESHUTDOWN, errno.EBADF}


def say(message: str) -> None:
    clean = "".join(c if c.isprintable() else "?" for c in message)[:300]
    try:
        sys.stderr.write(f"egress forwarder: {clean}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def parse_forward(text: str) -> tuple[str, int, list[tuple[int, str]]]:
    """`host:port` with a loopback host -> (host as sent in CONNECT, port, addresses to
    listen on as (family, address)); ValueError otherwise."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isascii() or not port_text.isdigit() \
            or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"--forward {text!r}: expected host:port")
    port = int(port_text)
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if bare.lower() == "localhost":
        return "localhost", port, [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")]
    try:
        if ":" in bare:
            socket.inet_pton(socket.AF_INET6, bare)
            if socket.inet_pton(socket.AF_INET6, bare) == socket.inet_pton(
                    socket.AF_INET6, "::1"):
                return f"[{bare}]", port, [(socket.AF_INET6, "::1")]
        else:
            socket.inet_pton(socket.AF_INET, bare)
            if bare.split(".")[0] == "127" and bare.count(".") == 3:
                return bare, port, [(socket.AF_INET, bare)]
    except OSError:
        pass
    raise ValueError(f"--forward {text!r}: not a loopback endpoint")


def lo_up() -> None:
    """Bring the `lo` interface up (SIOCGIFFLAGS/SIOCSIFFLAGS); nothing if already up."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        got = fcntl.ioctl(s, SIOCGIFFLAGS, struct.pack("16sH22x", b"lo", 0))
        flags = struct.unpack("16sH22x", got)[1]
        if not flags & IFF_UP:
            fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH22x", b"lo", flags | IFF_UP))


def connect_gateway(path: str) -> socket.socket:
    """A non-blocking connection to the gateway's socket; OSError if it is not there or
    its backlog is full (never waits)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.setblocking(False)
        with contextlib.suppress(OSError):  # uploads: more in flight than 208 KiB
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        if len(os.fsencode(path)) < 100:
            s.connect(path)
        else:  # too long for a socket address: through a descriptor of its directory
            fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY)
            try:
                s.connect(f"/proc/self/fd/{fd}/{os.path.basename(path)}")
            finally:
                os.close(fd)
    except BaseException:
        s.close()
        raise
    return s


class Reactor:
    """A minimal event loop: per descriptor one read and one write callback."""

    def __init__(self) -> None:
        self.sel = selectors.DefaultSelector()
        self.cbs: dict[int, list[Callable[[], None] | None]] = {}

    def want(self, fd: int, read: Callable[[], None] | bool | None = True,
             write: Callable[[], None] | bool | None = True) -> None:
        """Set (a callback), clear (None) or keep (True) each of fd's two callbacks."""
        old = self.cbs.get(fd)
        cb: list[Callable[[], None] | None] = list(old) if old else [None, None]
        if read is not True:
            cb[0] = read or None
        if write is not True:
            cb[1] = write or None
        mask = (selectors.EVENT_READ if cb[0] else 0) | (selectors.EVENT_WRITE if cb[1] else 0)
        if old is None:
            if mask:
                self.sel.register(fd, mask)
                self.cbs[fd] = cb
        elif not mask:
            self.sel.unregister(fd)
            del self.cbs[fd]
        elif cb != old:
            self.sel.modify(fd, mask)
            self.cbs[fd] = cb

    def forget(self, fd: int) -> None:
        if fd in self.cbs:
            self.sel.unregister(fd)
            del self.cbs[fd]

    def run_once(self, timeout: float) -> None:
        for key, mask in self.sel.select(timeout):
            fd = key.fd
            cb = self.cbs.get(fd)
            if cb and mask & selectors.EVENT_READ and cb[0]:
                cb[0]()
            cb = self.cbs.get(fd)
            if cb and mask & selectors.EVENT_WRITE and cb[1]:
                cb[1]()


class Pump:
    """One direction src -> dst: os.splice through a pipe (or recv/send through a
    buffer), driven by the reactor; at EOF the write side of dst is shut down."""

    def __init__(self, link: Link, src: socket.socket, dst: socket.socket) -> None:
        self.link, self.r = link, link.reactor
        self.src_sock, self.dst_sock, self.src, self.dst = src, dst, src.fileno(), dst.fileno()
        self.pending = self.offset = 0
        self.eof = self.done = False
        self.pipe: tuple[int, int] | None = None
        self.buf: memoryview | None = None
        self.size = COPY_BUFFER
        if hasattr(os, "splice"):
            try:
                self.pipe = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
                self.size = fcntl.fcntl(self.pipe[1], fcntl.F_GETPIPE_SZ)
            except OSError:
                self.close()
        if self.pipe is None:
            self.buf = memoryview(bytearray(COPY_BUFFER))

    def close(self) -> None:
        if self.pipe is not None:
            for fd in self.pipe:
                os.close(fd)
            self.pipe = None

    def readable(self) -> None:
        try:
            if self.pipe is not None:
                try:
                    n = os.splice(self.src, self.pipe[1], self.size,
                                  flags=os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK)
                except OSError as e:
                    if e.errno not in (errno.EINVAL, errno.ENOSYS):
                        raise
                    self.close()  # this kernel cannot splice these: copy instead
                    self.buf = memoryview(bytearray(COPY_BUFFER))
                    return
                if n == self.size < PIPE_MAX:  # filled at once: a bulk transfer
                    with contextlib.suppress(OSError):
                        self.size = fcntl.fcntl(self.pipe[1], fcntl.F_SETPIPE_SZ, PIPE_MAX)
            else:
                assert self.buf is not None
                n, self.offset = self.src_sock.recv_into(self.buf), 0
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self.link.fail(e)
            return
        if n == 0:
            self.eof = True
            self.r.want(self.src, read=None)
        else:
            self.pending = n
        self.flush()

    def flush(self) -> None:
        try:
            while self.pending:
                if self.pipe is not None:
                    m = os.splice(self.pipe[0], self.dst, self.pending,
                                  flags=os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK)
                else:
                    assert self.buf is not None
                    m = self.dst_sock.send(self.buf[self.offset:self.offset + self.pending])
                    self.offset += m
                self.pending -= m
        except (BlockingIOError, InterruptedError):
            self.r.want(self.src, read=None)
            self.r.want(self.dst, write=self.flush)
            return
        except OSError as e:
            self.link.fail(e)
            return
        if self.link.closed:
            return
        self.r.want(self.dst, write=None)
        if not self.eof:
            self.r.want(self.src, read=self.readable)
        elif not self.done:
            self.done = True
            with contextlib.suppress(OSError):
                self.dst_sock.shutdown(socket.SHUT_WR)  # half-close: the peer sees EOF
            self.link.pump_done()


class Link:
    """A client and its gateway connection, spliced both ways; closed when both
    directions have ended or either failed."""

    def __init__(self, fw: Forwarder, client: socket.socket,
                 gateway: socket.socket) -> None:
        self.fw, self.reactor = fw, fw.reactor
        self.client, self.gateway = client, gateway
        self.closed = False
        self.pumps = (Pump(self, client, gateway), Pump(self, gateway, client))
        for p in self.pumps:
            self.reactor.want(p.src, read=p.readable)

    def pump_done(self) -> None:
        if all(p.done for p in self.pumps):
            self.close()

    def fail(self, error: OSError) -> None:
        if error.errno not in QUIET:
            say(f"connection: {error.strerror or error}")
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for sock in (self.client, self.gateway):
            self.reactor.forget(sock.fileno())
            sock.close()
        for p in self.pumps:
            p.close()
        self.fw.live -= 1


class Forwarder:
    """Accepts on every listener; each connection goes to the gateway (raw, or through a
    CONNECT for a forwarded port), at most MAX_LIVE at once."""

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self.reactor = Reactor()
        self.live = 0
        self.handshakes: dict[socket.socket, tuple[float, socket.socket, str, bytes]] = {}

    def listen(self, lsock: socket.socket, target: str | None) -> None:
        lsock.setblocking(False)
        self.reactor.want(lsock.fileno(), read=lambda: self.accept(lsock, target))

    def accept(self, lsock: socket.socket, target: str | None) -> None:
        try:
            client, _ = lsock.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            say(f"accept: {e.strerror or e}")
            time.sleep(0.05)  # out of descriptors: let live connections end
            return
        if self.live >= MAX_LIVE:
            say(f"more than {MAX_LIVE} connections: one refused")
            client.close()
            return
        client.setblocking(False)
        try:
            gateway = connect_gateway(self.socket_path)
        except OSError as e:
            say(f"{target or 'proxy'}: gateway {self.socket_path}: {e.strerror or e}")
            client.close()
            return
        self.live += 1
        if target is None:
            Link(self, client, gateway)
            return
        try:
            gateway.send(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        except OSError as e:
            say(f"{target}: gateway: {e.strerror or e}")
            self.drop(gateway, client)
            return
        self.handshakes[gateway] = (time.monotonic() + HANDSHAKE_TIMEOUT, client, target, b"")
        self.reactor.want(gateway.fileno(), read=lambda: self.answer(gateway))

    def answer(self, gateway: socket.socket) -> None:
        """The gateway's reply to a CONNECT: on 200 the link starts, else the client is
        closed (and the reason said)."""
        deadline, client, target, head = self.handshakes[gateway]
        try:
            chunk = gateway.recv(HEAD_MAX + 1 - len(head))
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            say(f"{target}: gateway: {e.strerror or e}")
            self.drop(gateway, client)
            return
        head += chunk
        if b"\r\n\r\n" not in head:
            if not chunk or len(head) > HEAD_MAX:
                say(f"{target}: no answer from the gateway")
                self.drop(gateway, client)
            else:
                self.handshakes[gateway] = (deadline, client, target, head)
            return
        del self.handshakes[gateway]
        self.reactor.forget(gateway.fileno())
        head, _, rest = head.partition(b"\r\n\r\n")
        status = head.split(b"\r\n", 1)[0]
        if status.split(b" ")[1:2] != [b"200"]:
            why = rest.split(b"\n", 1)[0].decode("ascii", "replace")
            say(f"{target}: {status.decode('ascii', 'replace')}: {why}")
            self.drop(gateway, client, pending=False)
            return
        if rest:  # what the upstream said first (a banner): small, the client's buffer empty
            try:
                client.settimeout(5)
                client.sendall(rest)
                client.setblocking(False)
            except OSError:
                self.drop(gateway, client, pending=False)
                return
        Link(self, client, gateway)

    def drop(self, gateway: socket.socket, client: socket.socket, pending: bool = True) -> None:
        if pending:
            self.handshakes.pop(gateway, None)
            self.reactor.forget(gateway.fileno())
        gateway.close()
        client.close()
        self.live -= 1

    def run(self) -> None:
        while True:
            self.reactor.run_once(1.0)
            if self.handshakes:
                t = time.monotonic()
                for gateway, (deadline, client, target, _) in list(self.handshakes.items()):
                    if t > deadline:
                        say(f"{target}: no answer from the gateway")
                        self.drop(gateway, client)


def listen(family: int, address: str, port: int) -> socket.socket:
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind((address, port))
        s.listen(128)
    except BaseException:
        s.close()
        raise
    return s


def write_ready(path: str) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    try:
        os.write(fd, f"{os.getpid()}\n".encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="forwarder.py")
    ap.add_argument("--socket", required=True)
    ap.add_argument("--proxy-port", type=int, default=3128)
    ap.add_argument("--forward", action="append", default=[])
    ap.add_argument("--ready")
    ap.add_argument("--lo-up", action="store_true")
    args = ap.parse_args(argv)
    try:
        if args.lo_up:
            lo_up()
        listeners: list[tuple[socket.socket, str | None]] = [
            (listen(socket.AF_INET, "127.0.0.1", args.proxy_port), None)]
        for text in args.forward:
            try:
                target, port, addresses = parse_forward(text)
            except ValueError as e:
                say(f"{e}: not forwarded")
                continue
            if port == args.proxy_port:
                say(f"--forward {text}: the proxy port: not forwarded")
                continue
            for family, address in addresses:
                try:
                    listeners.append((listen(family, address, port), f"{target}:{port}"))
                except OSError as e:
                    if family != socket.AF_INET6:
                        raise
                    say(f"--forward {text}: cannot listen on [{address}]: {e.strerror}")
        if args.ready:
            write_ready(args.ready)
    except OSError as e:
        say(f"cannot start: {e.strerror or e}")
        return 1
    fw = Forwarder(args.socket)
    for sock, forward_to in listeners:
        fw.listen(sock, forward_to)
    try:
        fw.run()
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
