"""Load generators for `make bench`: one role per process, started inside a lab namespace.

``python -m tests.bench.loadgen ROLE [options]``. An endpoint is one of

- ``tcp:HOST:PORT``       a plain TCP socket (``SO_MARK`` 0x7473 with ``--mark``), or
- ``ts:SOCKET@HOST:PORT`` a flow through tsnet2: ``Server.dial`` / ``Server.listen`` on the
  daemon socket ``SOCKET`` (HOST is ignored when listening).

Every role prints ``READY ...`` once it listens (or is connected), optional ``HELD {json}``
lines, and ``RESULT {json}`` at the end. Roles that need a common start wait for a line on
stdin after READY. ``--max-seconds`` arms SIGALRM, so a process never outlives its run.

A tsnet2 app here never calls ``Server.close()``: that RPC takes the daemon's node down for
every app. Exiting drops the control connection, which releases this process's listeners.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import tsnet2

MARK = 0x7473  # the daemon's SO_MARK: a marked direct socket stays valid under the guard
SO_MARK = getattr(socket, "SO_MARK", 36)
CHUNK = 256 * 1024
RECV_BUF = 1024 * 1024
IO_TIMEOUT = 30.0  # seconds any single blocking socket call may take
DIAL_TIMEOUT = 15.0

Dialer = Callable[[], socket.socket]


class BenchError(Exception):
    """A load generator was misconfigured or its peer misbehaved."""


@dataclass(frozen=True)
class Endpoint:
    """Where to dial or listen: plain TCP (``socket_path`` empty) or tsnet2."""

    host: str
    port: int
    socket_path: str = ""
    mark: bool = False

    @property
    def via_tsnet2(self) -> bool:
        """True when the endpoint goes through a tsnet2d socket."""
        return bool(self.socket_path)


def parse_endpoint(text: str, mark: bool = False) -> Endpoint:
    """Parse ``tcp:HOST:PORT`` or ``ts:SOCKET@HOST:PORT`` (HOST may be empty)."""
    kind, _, rest = text.partition(":")
    path = ""
    if kind == "ts":
        path, at, rest = rest.rpartition("@")
        if not at or not path:
            raise BenchError(f"endpoint {text!r}: want ts:SOCKET@HOST:PORT")
    elif kind != "tcp":
        raise BenchError(f"endpoint {text!r}: want tcp:HOST:PORT or ts:SOCKET@HOST:PORT")
    host, _, port = rest.rpartition(":")
    if not port.isdigit():
        raise BenchError(f"endpoint {text!r}: bad port")
    return Endpoint(host=host.strip("[]"), port=int(port), socket_path=path, mark=mark)


def _server(path: str, slots: int = 2) -> tsnet2.Server:
    srv = tsnet2.Server(socket_path=path, accept_slots=slots)
    srv.start()
    return srv


def _tcp_socket(ep: Endpoint) -> socket.socket:
    fam = socket.AF_INET6 if ":" in ep.host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    if ep.mark:
        s.setsockopt(socket.SOL_SOCKET, SO_MARK, MARK)
    return s


def make_dialer(ep: Endpoint) -> Dialer:
    """A function that opens one connected, blocking stream socket to ``ep``."""
    if ep.via_tsnet2:
        srv = _server(ep.socket_path)
        target = f"[{ep.host}]:{ep.port}" if ":" in ep.host else f"{ep.host}:{ep.port}"

        def dial_ts() -> socket.socket:
            return srv.dial("tcp", target, timeout=DIAL_TIMEOUT)

        return dial_ts

    def dial_tcp() -> socket.socket:
        s = _tcp_socket(ep)
        try:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.settimeout(DIAL_TIMEOUT)
            s.connect((ep.host, ep.port))
            s.settimeout(None)
        except BaseException:
            s.close()
            raise
        return s

    return dial_tcp


class Acceptor:
    """Accepts stream sockets on ``ep``: a kernel listener, or a tsnet2 Listener."""

    def __init__(self, ep: Endpoint, slots: int = 2) -> None:
        self.ep = ep
        self._ln: Any = None
        self._sock: socket.socket | None = None
        if ep.via_tsnet2:
            self._ln = _server(ep.socket_path, slots).listen("tcp", f":{ep.port}")
        else:
            s = _tcp_socket(ep)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((ep.host, ep.port))
            s.listen(4096)
            self._sock = s

    def accept(self, timeout: float | None) -> socket.socket:
        """The next connection (blocking); TimeoutError / tsnet2 errors after ``timeout``."""
        if self._ln is not None:
            conn: socket.socket = self._ln.accept(timeout=timeout)
            return conn
        assert self._sock is not None
        self._sock.settimeout(timeout)
        conn, _ = self._sock.accept()
        conn.settimeout(None)
        if self.ep.mark:
            conn.setsockopt(socket.SOL_SOCKET, SO_MARK, MARK)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn

    def close(self) -> None:
        """Stop listening."""
        if self._ln is not None:
            self._ln.close()
        if self._sock is not None:
            self._sock.close()


def emit(tag: str, payload: Any = None) -> None:
    """Print one protocol line for the orchestrator."""
    line = tag if payload is None else f"{tag} {json.dumps(payload)}"
    print(line, flush=True)


def wait_go() -> str:
    """Block until the orchestrator writes a line (or closes stdin)."""
    return sys.stdin.readline()


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    """Read exactly ``n`` bytes or raise BenchError on EOF."""
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise BenchError(f"EOF after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


def raise_nofile() -> tuple[int, int]:
    """Raise this process's soft open-files limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


# ---- bulk -------------------------------------------------------------------------------


def role_sink(ep: Endpoint, conns: int) -> None:
    """Accept ``conns`` streams, count bytes to EOF, close; report bytes and the time span."""
    acc = Acceptor(ep)
    emit("READY")
    spans: list[tuple[int, float, float]] = []
    lock = threading.Lock()

    def drain(conn: socket.socket) -> None:
        buf = bytearray(RECV_BUF)
        total, first, last = 0, 0.0, 0.0
        with conn:
            conn.settimeout(IO_TIMEOUT)
            while n := conn.recv_into(buf):
                last = time.monotonic()
                if not total:
                    first = last
                total += n
        with lock:
            spans.append((total, first, last))

    threads = []
    for _ in range(conns):
        conn = acc.accept(IO_TIMEOUT)
        t = threading.Thread(target=drain, args=(conn,), daemon=True)
        t.start()
        threads.append(t)
    for t in threads:
        t.join()
    acc.close()
    if len(spans) != conns:
        raise BenchError(f"only {len(spans)} of {conns} streams finished")
    emit("RESULT", {
        "bytes": sum(s[0] for s in spans),
        "first": min(s[1] for s in spans if s[0]),
        "last": max(s[2] for s in spans),
        "per_stream": [s[0] for s in spans],
    })


def role_source(ep: Endpoint, conns: int, duration: float) -> None:
    """Open ``conns`` streams, send 256 KiB chunks on each for ``duration`` s, half-close,
    wait for the sink's EOF (everything delivered)."""
    dial = make_dialer(ep)
    t0 = time.monotonic()
    socks = [dial() for _ in range(conns)]
    connect_s = time.monotonic() - t0
    chunk = memoryview(os.urandom(CHUNK))
    sent = [0] * conns
    barrier = threading.Barrier(conns)
    errors: list[str] = []

    def pump(i: int, s: socket.socket) -> None:
        try:
            barrier.wait(IO_TIMEOUT)
            end = time.monotonic() + duration
            s.settimeout(IO_TIMEOUT)
            while time.monotonic() < end:
                s.sendall(chunk)
                sent[i] += CHUNK
            s.shutdown(socket.SHUT_WR)
            while s.recv(65536):
                pass
        except Exception as exc:
            errors.append(f"stream {i}: {exc!r}")
        finally:
            s.close()

    emit("READY")
    threads = [threading.Thread(target=pump, args=(i, s), daemon=True)
               for i, s in enumerate(socks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    emit("RESULT", {"bytes": sum(sent), "connect_s": connect_s, "errors": errors})


# ---- echo, latency, flow rate ---------------------------------------------------------


def role_echo(eps: list[Endpoint], slots: int) -> None:
    """Echo every connection on every endpoint (a thread per connection) until SIGTERM."""
    stop = threading.Event()
    served = [0]

    def echo(conn: socket.socket) -> None:
        with contextlib.suppress(OSError), conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    def serve(acc: Acceptor) -> None:
        while not stop.is_set():
            try:
                conn = acc.accept(1.0)
            except (TimeoutError, tsnet2.DeadlineExceededError):
                continue
            except (OSError, tsnet2.Error):
                if stop.is_set():
                    return
                raise
            served[0] += 1
            threading.Thread(target=echo, args=(conn,), daemon=True).start()

    accs = [Acceptor(ep, slots) for ep in eps]
    for acc in accs:
        threading.Thread(target=serve, args=(acc,), daemon=True).start()
    signal.signal(signal.SIGTERM, lambda _s, _f: stop.set())
    emit("READY")
    while not stop.wait(0.5):
        pass
    emit("RESULT", {"served": served[0]})


def _connect_rtt(dial: Dialer) -> float:
    t0 = time.perf_counter()
    s = dial()
    try:
        s.sendall(b"x")
        recv_exactly(s, 1)
        return time.perf_counter() - t0
    finally:
        s.close()


def _pingpong(s: socket.socket) -> float:
    t0 = time.perf_counter()
    s.sendall(b"x")
    recv_exactly(s, 1)
    return time.perf_counter() - t0


def _interleave(names: list[str], iters: int, block: int, warmup: int,
                once: Callable[[str], float]) -> dict[str, list[float]]:
    """``iters`` timed calls of ``once(name)`` per name (ms), names taking turns in blocks."""
    for name in names:
        for _ in range(warmup):
            once(name)
    samples: dict[str, list[float]] = {n: [] for n in names}
    turn = 0
    while any(len(v) < iters for v in samples.values()):
        k = turn % len(names)
        turn += 1
        for name in names[k:] + names[:k]:
            for _ in range(min(block, iters - len(samples[name]))):
                samples[name].append(once(name) * 1000.0)
    return samples


def role_latency(targets: list[tuple[str, Endpoint]], iters: int, block: int,
                 warmup: int) -> None:
    """connect+1-byte echo, then 1-byte echo on an open flow, ``iters`` times per target;
    the targets take turns in blocks of ``block`` iterations, so drift hits all alike."""
    dialers = {name: make_dialer(ep) for name, ep in targets}
    names = [name for name, _ in targets]
    emit("READY")
    out: dict[str, dict[str, list[float]]] = {}
    conns: dict[str, socket.socket] = {}
    try:
        out["connect"] = _interleave(names, iters, block, warmup,
                                     lambda n: _connect_rtt(dialers[n]))
        conns = {n: dialers[n]() for n in names}
        for s in conns.values():
            s.settimeout(IO_TIMEOUT)
        out["pingpong"] = _interleave(names, iters, block, warmup,
                                      lambda n: _pingpong(conns[n]))
    finally:
        for s in conns.values():
            s.close()
    emit("RESULT", out)


def role_flows(ep: Endpoint, duration: float, threads: int = 1) -> None:
    """After the GO line: ``threads`` threads each connect, send 1 byte, read the echo and
    close, one flow after another, as often as they can for ``duration`` seconds."""
    dial = make_dialer(ep)
    emit("READY")
    wait_go()
    lat: list[list[float]] = [[] for _ in range(threads)]
    errors = [0] * threads
    first_errors: list[str] = []
    t0, cpu0 = time.monotonic(), time.process_time()
    end = t0 + duration

    def loop(i: int) -> None:
        while time.monotonic() < end:
            try:
                lat[i].append(_connect_rtt(dial) * 1000.0)
            except (OSError, tsnet2.Error, BenchError) as exc:
                errors[i] += 1
                if not first_errors:
                    first_errors.append(repr(exc))
                if errors[i] > 100:
                    break

    if threads == 1:
        loop(0)
    else:
        workers = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    all_lat = sorted(x for xs in lat for x in xs)
    emit("RESULT", {"flows": len(all_lat), "errors": sum(errors),
                    "first_error": first_errors[0] if first_errors else "",
                    "elapsed": time.monotonic() - t0, "cpu_s": time.process_time() - cpu0,
                    "lat_ms": all_lat})


# ---- many open flows --------------------------------------------------------------------


def role_hold_accept(ep: Endpoint, count: int, slots: int) -> None:
    """Accept ``count`` flows and echo their 1-byte hello; hold them until stdin says so."""
    limits = raise_nofile()
    acc = Acceptor(ep, slots)
    emit("READY", {"nofile": limits})
    held: list[socket.socket] = []
    t0 = time.monotonic()
    try:
        while len(held) < count:
            conn = acc.accept(IO_TIMEOUT)
            held.append(conn)
            conn.settimeout(IO_TIMEOUT)
            conn.sendall(recv_exactly(conn, 1))
        emit("HELD", {"flows": len(held), "seconds": time.monotonic() - t0})
        wait_go()
    finally:
        for s in held:
            s.close()
        acc.close()
    emit("RESULT", {"flows": len(held)})


def role_hold_dial(ep: Endpoint, count: int, threads: int) -> None:
    """Dial ``count`` flows (``threads`` at a time), wait for the echo of a 1-byte hello on
    each (so dials never outrun the acceptor), hold them until stdin says so."""
    limits = raise_nofile()
    dial = make_dialer(ep)
    emit("READY", {"nofile": limits})
    held: list[socket.socket] = []
    lock = threading.Lock()
    errors: list[str] = []
    t0 = time.monotonic()

    def worker(n: int) -> None:
        for _ in range(n):
            try:
                s = dial()
                s.settimeout(IO_TIMEOUT)
                s.sendall(b"x")
                recv_exactly(s, 1)  # the acceptor has it: never outrun its accept rate
            except (OSError, tsnet2.Error, BenchError) as exc:
                with lock:
                    errors.append(repr(exc))
                return
            with lock:
                held.append(s)

    share = [count // threads + (1 if i < count % threads else 0) for i in range(threads)]
    workers = [threading.Thread(target=worker, args=(n,), daemon=True) for n in share]
    try:
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        emit("HELD", {"flows": len(held), "seconds": time.monotonic() - t0,
                      "errors": errors[:5], "error_count": len(errors)})
        wait_go()
    finally:
        for s in held:
            s.close()
    emit("RESULT", {"flows": len(held)})


# ---- command line -----------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The load generator's argument parser."""
    p = argparse.ArgumentParser(prog="loadgen", description=__doc__.split("\n")[0])
    p.add_argument("--max-seconds", type=int, default=120,
                   help="hard limit: the process is killed by SIGALRM after this")
    p.add_argument("--mark", action="store_true", help="SO_MARK 0x7473 on plain TCP sockets")
    sub = p.add_subparsers(dest="role", required=True)
    s = sub.add_parser("sink")
    s.add_argument("listen")
    s.add_argument("--conns", type=int, default=1)
    s = sub.add_parser("source")
    s.add_argument("target")
    s.add_argument("--conns", type=int, default=1)
    s.add_argument("--duration", type=float, default=5.0)
    s = sub.add_parser("echo")
    s.add_argument("listen", nargs="+")
    s.add_argument("--slots", type=int, default=2)
    s = sub.add_parser("latency")
    s.add_argument("target", nargs="+", help="NAME=ENDPOINT")
    s.add_argument("--iters", type=int, default=1000)
    s.add_argument("--block", type=int, default=50)
    s.add_argument("--warmup", type=int, default=20)
    s = sub.add_parser("flows")
    s.add_argument("target")
    s.add_argument("--duration", type=float, default=5.0)
    s.add_argument("--threads", type=int, default=1)
    s = sub.add_parser("hold-accept")
    s.add_argument("listen")
    s.add_argument("--count", type=int, required=True)
    s.add_argument("--slots", type=int, default=32)
    s = sub.add_parser("hold-dial")
    s.add_argument("target")
    s.add_argument("--count", type=int, required=True)
    s.add_argument("--threads", type=int, default=4)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one role; exit code 0 on success, 1 with a message on stderr otherwise."""
    args = build_parser().parse_args(argv)
    signal.alarm(max(1, args.max_seconds))

    def ep(text: str) -> Endpoint:
        return parse_endpoint(text, args.mark)

    try:
        if args.role == "sink":
            role_sink(ep(args.listen), args.conns)
        elif args.role == "source":
            role_source(ep(args.target), args.conns, args.duration)
        elif args.role == "echo":
            role_echo([ep(x) for x in args.listen], args.slots)
        elif args.role == "latency":
            pairs = [t.split("=", 1) for t in args.target]
            role_latency([(n, ep(e)) for n, e in pairs], args.iters, args.block, args.warmup)
        elif args.role == "flows":
            role_flows(ep(args.target), args.duration, args.threads)
        elif args.role == "hold-accept":
            role_hold_accept(ep(args.listen), args.count, args.slots)
        else:
            role_hold_dial(ep(args.target), args.count, args.threads)
    except (BenchError, OSError, tsnet2.Error, threading.BrokenBarrierError) as exc:
        print(f"loadgen {args.role}: {exc!r}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
