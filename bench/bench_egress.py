"""Benchmark: what the egress gateway costs, each figure against direct loopback TCP to the
same upstream measured in the same run.

1. Latency: the median of N small HTTP GETs (a new connection each, as `curl` makes)
   through the forwarder's proxy port (plain HTTP in absolute form: forwarder -> the
   agent's Unix socket -> gateway -> upstream), against the same GET sent straight to the
   upstream (target: at most 2 ms added).
2. Throughput: a 200 MB download through a CONNECT tunnel opened directly on the agent's
   Unix socket, against the same download straight from the upstream, runs interleaved
   (target: the median tunnel rate at least 0.90 of the median direct rate). The same
   download through the forwarder's proxy port is shown for information.

Both figures are medians of interleaved runs: on a shared 2-core machine the other load
moves single runs by 2x either way.

The upstream is a separate process (threads, one per connection); the client is this
process. Gateway and forwarder are the real ones, started as the engine starts them.

    python bench/bench_egress.py [--n 300] [--mb 200] [--runs 9]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine import egress

UPSTREAM = r"""
import socket, sys, threading
size = int(sys.argv[1])
block = memoryview(b"x" * (1 << 20))
small = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"
def serve(c):
    with c:
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = c.recv(65536)
            if not chunk:
                return
            head += chunk
        if head.startswith(b"GET /bulk"):
            c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                      % size)
            left = size
            while left:
                n = min(left, len(block))
                c.sendall(block[:n])
                left -= n
        else:
            c.sendall(small)
s = socket.socket()
s.bind(("127.0.0.1", 0))
s.listen(512)
print(s.getsockname()[1], flush=True)
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""


def read_all(s: socket.socket, buf: bytearray) -> int:
    total = 0
    while True:
        n = s.recv_into(buf)
        if not n:
            return total
        total += n


def get_direct(port: int, path: str, buf: bytearray) -> int:
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
        return read_all(s, buf)


def get_proxy(proxy: int, port: int, path: str, buf: bytearray) -> int:
    with socket.create_connection(("127.0.0.1", proxy)) as s:
        s.sendall(f"GET http://127.0.0.1:{port}{path} HTTP/1.1\r\n"
                  f"Host: 127.0.0.1:{port}\r\n\r\n".encode())
        return read_all(s, buf)


def get_tunnel(sock_path: Path, port: int, path: str, buf: bytearray) -> int:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(sock_path))
        s.sendall(f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += s.recv(4096)
        if not head.startswith(b"HTTP/1.1 200"):
            raise SystemExit(f"tunnel refused: {head!r}")
        rest = len(head.partition(b"\r\n\r\n")[2])
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
        return rest + read_all(s, buf)


def verdict(name: str, value: str, baseline: str, ratio: float, target: str, ok: bool) -> bool:
    print(f"{name:<50} {value:>10}  baseline {baseline:>10}  ratio {ratio:5.2f}x  "
          f"target {target}  {'PASS' if ok else 'FAIL'}")
    return ok


def bench_latency(port: int, proxy: int, n: int) -> bool:
    """Median of n GETs each way, interleaved so that load elsewhere hits both alike."""
    buf = bytearray(65536)
    for _ in range(20):  # warm both paths
        get_direct(port, "/small", buf)
        get_proxy(proxy, port, "/small", buf)
    direct, via = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        get_direct(port, "/small", buf)
        t1 = time.perf_counter()
        get_proxy(proxy, port, "/small", buf)
        t2 = time.perf_counter()
        direct.append(t1 - t0)
        via.append(t2 - t1)
    d, v = statistics.median(direct), statistics.median(via)
    return verdict(f"GET via forwarder+gateway, added (median of {n})",
                   f"+{(v - d) * 1e3:.3f}ms", f"{d * 1e3:.3f}ms", v / d, "added < 2ms",
                   v - d < 0.002)


def bench_throughput(port: int, proxy: int, sock_path: Path, mb: int, runs: int) -> bool:
    """Rates of `runs` downloads each way, each tunnel run next to a direct one
    (alternating which goes first); the verdict compares the two median rates."""
    buf = bytearray(256 * 1024)
    size = mb * 1_000_000

    def rate(fn: Callable[[], int]) -> float:
        t0 = time.perf_counter()
        got = fn()
        dt = time.perf_counter() - t0
        if got < size:
            raise SystemExit(f"short download: {got} bytes")
        return size / dt

    def direct_one() -> int:
        return get_direct(port, "/bulk", buf)

    def tunnel_one() -> int:
        return get_tunnel(sock_path, port, "/bulk", buf)

    direct, tunnel, fwd = [], [], []
    for i in range(runs):
        if i % 2:
            t, d = rate(tunnel_one), rate(direct_one)
        else:
            d, t = rate(direct_one), rate(tunnel_one)
        direct.append(d)
        tunnel.append(t)
        fwd.append(rate(lambda: get_proxy(proxy, port, "/bulk", buf)) / d)
    d, t = statistics.median(direct), statistics.median(tunnel)
    ratio = t / d
    ok = verdict(f"{mb} MB through a CONNECT tunnel (median of {runs})",
                 f"{t / 1e6:.0f}MB/s", f"{d / 1e6:.0f}MB/s", ratio, ">= 0.90x", ratio >= 0.9)
    f = statistics.median(fwd)
    verdict(f"{mb} MB via forwarder+gateway (information)", f"{f * d / 1e6:.0f}MB/s",
            f"{d / 1e6:.0f}MB/s", f, "none", True)
    return ok


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--mb", type=int, default=200)
    ap.add_argument("--runs", type=int, default=9)
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="engine-bench-egress-"))
    procs: list[subprocess.Popen[str]] = []
    try:
        up = subprocess.Popen([sys.executable, "-c", UPSTREAM, str(args.mb * 1_000_000)],
                              stdout=subprocess.PIPE, text=True)
        procs.append(up)
        assert up.stdout is not None
        port = int(up.stdout.readline())
        egress.write_policy(base, "bench", "a", [f"127.0.0.1:{port}"])
        egress.ensure_running(base)
        sock_path = egress.socket_dir(base, "bench", "a") / egress.SOCKET_NAME
        proxy = free_port()
        ready = base / "ready"
        fwd = subprocess.Popen([sys.executable, "-S",
                                str(Path(egress.__file__).parent / "forwarder.py"),
                                "--socket", str(sock_path), "--proxy-port", str(proxy),
                                "--ready", str(ready)])
        procs.append(fwd)  # type: ignore[arg-type]
        deadline = time.monotonic() + 10
        while not ready.exists():
            if time.monotonic() > deadline or fwd.poll() is not None:
                raise SystemExit("the forwarder did not start")
            time.sleep(0.02)
        ok = bench_latency(port, proxy, args.n)
        ok &= bench_throughput(port, proxy, sock_path, args.mb, args.runs)
    finally:
        for p in procs:
            p.terminate()
            p.wait()
        egress.stop(base)
        shutil.rmtree(base, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    raise SystemExit(main())
