"""Both client faces against a scripted daemon peer speaking the real wire protocol.

:class:`WirePeer` listens on a real Unix socket and answers with tsnet2.proto's own
server-side encoders (ControlServerCore, encode_dial_reply, encode_accept_header), so
these tests exercise the client's byte handling, RPC id matching, timeouts, slot
accounting and clean-up. Every test runs against both faces (``face``: the blocking
Server, and the AsyncServer behind the blocking proxies of tests/unit/faces.py), so
the two behave the same. End-to-end tests against tsnet2d live in tests/integration.
"""

from __future__ import annotations

import contextlib
import json
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterator
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path
from typing import Any

import pytest

import tsnet2
from tsnet2 import proto

HANG = object()
"""A method handler result meaning: never reply."""

Handler = Callable[[dict[str, Any] | None], Any]


def wait_until(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Poll ``check`` until true; fail naming ``what`` after ``timeout`` s (a hang check,
    not a timing bound)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.01)


def recv_line(sock: socket.socket, limit: int = 65536) -> bytes:
    """Read one line byte by byte (test side; b"" on EOF)."""
    buf = b""
    while not buf.endswith(b"\n"):
        c = sock.recv(1)
        if not c:
            return b""
        buf += c
        assert len(buf) <= limit
    return buf[:-1]


class Slot:
    """A parked accept connection as the peer sees it."""

    def __init__(self, sock: socket.socket, listener_id: str) -> None:
        self.sock = sock
        self.listener_id = listener_id

    def closed_by_client(self, timeout: float = 2.0) -> bool:
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(1) == b""
        except TimeoutError:
            return False


class WirePeer:
    """The daemon's side of the tsnet2 socket protocol, scripted by each test."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.methods: dict[str, Handler] = {
            "start": lambda p: {},
            "up": lambda p: {
                "tailscale_ips": ["100.64.0.7", "fd7a:115c:a1e0::7"],
                "node_name": "node-a",
                "cert_domains": ["node-a.tail.example"],
            },
            "close": lambda p: {},
            "tailscale_ips": lambda p: {"v4": "100.64.0.7", "v6": "fd7a:115c:a1e0::7"},
            "cert_domains": lambda p: {"domains": ["node-a.tail.example"]},
            "register_listener": lambda p: {"listener_id": "00112233445566ff", "addr": ":8080"},
            "unregister_listener": lambda p: {},
        }
        self.calls: list[tuple[str, dict[str, Any] | None]] = []
        self.kinds: list[int] = []
        self.hung: list[tuple[socket.socket, int]] = []
        self.slots: queue.Queue[Slot] = queue.Queue()
        self.on_dial: Callable[[socket.socket, proto.DialRequest], object] = self._default_dial
        self.localapi: Callable[[socket.socket, bytes], object] = self._default_localapi
        self.control_socks: list[socket.socket] = []
        self._socks: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self.stopping = threading.Event()
        self._lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._lsock.bind(self.path)
        self._lsock.listen(64)
        self._spawn(self._accept_loop)

    # -- plumbing --
    def _spawn(self, fn: Callable[..., None], *args: Any) -> None:
        t = threading.Thread(target=self._guard, args=(fn, *args), daemon=True)
        self._threads.append(t)
        t.start()

    @staticmethod
    def _guard(fn: Callable[..., None], *args: Any) -> None:
        # A client may hang up before its header line is complete (a listener closing while
        # it re-parks a slot): the peer's decode of the cut line is not a test failure.
        with contextlib.suppress(OSError, ValueError, proto.WireError):
            fn(*args)

    def _accept_loop(self) -> None:
        while True:
            sock, _ = self._lsock.accept()
            with self._lock:
                if self.stopping.is_set():  # accepted while close() ran: close it here
                    sock.close()
                    return
                self._socks.append(sock)
            self._spawn(self._serve, sock)

    def _serve(self, sock: socket.socket) -> None:
        kind = sock.recv(1)
        if not kind:
            return
        self.kinds.append(kind[0])
        {1: self._control, 2: self._local, 3: self._dial, 4: self._accept}[kind[0]](sock)

    def _control(self, sock: socket.socket) -> None:
        self.control_socks.append(sock)
        core = proto.ControlServerCore()
        while True:
            data = sock.recv(65536)
            for item in core.receive_data(data):
                assert isinstance(item, proto.ControlRequest), item
                self.calls.append((item.method, item.params))
                handler = self.methods.get(item.method)
                if handler is None:
                    sock.sendall(
                        core.reply_error(item.id, f'daemon: unknown method "{item.method}"')
                    )
                    continue
                try:
                    result = handler(item.params)
                except Exception as exc:
                    sock.sendall(core.reply_error(item.id, str(exc), getattr(exc, "code", None)))
                    continue
                if result is HANG:
                    self.hung.append((sock, item.id))
                else:
                    sock.sendall(core.reply(item.id, result))
            if not data:
                return

    def _accept(self, sock: socket.socket) -> None:
        line = recv_line(sock)
        self.slots.put(Slot(sock, proto.decode_accept_request(line)))

    def _dial(self, sock: socket.socket) -> None:
        self.on_dial(sock, proto.decode_dial_request(recv_line(sock)))

    def _local(self, sock: socket.socket) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(4096)
            if not chunk:
                return
            head += chunk
        self.localapi(sock, head)

    @staticmethod
    def _default_dial(sock: socket.socket, req: proto.DialRequest) -> None:
        sock.sendall(proto.encode_dial_reply(True, local="100.64.0.7:41000", remote=req.addr))
        while data := sock.recv(65536):  # echo until the client half-closes
            sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)

    @staticmethod
    def _default_localapi(sock: socket.socket, head: bytes) -> None:
        status = {"BackendState": "Running", "Self": {"HostName": "node-a"}, "Version": "t"}
        body = json.dumps(status).encode()
        sock.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
            + str(len(body)).encode()
            + b"\r\n\r\n"
            + body
        )

    def method_names(self) -> list[str]:
        return [m for m, _ in self.calls]

    def next_slot(self, timeout: float = 2.0) -> Slot:
        return self.slots.get(timeout=timeout)

    def close(self) -> None:
        self.stopping.set()
        with contextlib.suppress(OSError):
            self._lsock.shutdown(socket.SHUT_RDWR)
        self._lsock.close()
        with self._lock:
            for s in self._socks:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
        for t in self._threads:
            t.join(2)


@pytest.fixture
def peer(tmp_path: Path) -> Iterator[WirePeer]:
    p = WirePeer(tmp_path / "tsnet2.sock")
    try:
        yield p
    finally:
        p.close()


@pytest.fixture
def srv(face: Any, peer: WirePeer) -> Iterator[Any]:
    s = face.Server(socket_path=peer.path, hostname="node-a", connect_timeout=2)
    try:
        yield s
    finally:
        if not s.closed:
            s.close()


# -- lifecycle -------------------------------------------------------------------------


def test_start_sends_every_param(face: Any, peer: WirePeer) -> None:
    s = face.Server(socket_path=peer.path, hostname="h", auth_key="k", advertise_tags=["tag:a"])
    with s:
        s.start()
        s.start()  # idempotent: one start RPC
    assert peer.calls[0] == (
        "start",
        {
            "hostname": "h",
            "control_url": "",
            "auth_key": "k",
            "ephemeral": False,
            "advertise_tags": ["tag:a"],
        },
    )
    assert peer.method_names() == ["start", "close"]
    assert peer.kinds[0] == proto.ChannelKind.CONTROL


def test_fields_freeze_after_start(srv: Any) -> None:
    srv.hostname = "changed-before-start"
    srv.start()
    with pytest.raises(AttributeError, match="cannot change"):
        srv.hostname = "too-late"


def test_up_fills_status(srv: Any, peer: WirePeer) -> None:
    st = srv.up(timeout=5)
    assert st.tailscale_ips == [IPv4Address("100.64.0.7"), IPv6Address("fd7a:115c:a1e0::7")]
    assert st.node_name == "node-a"
    assert st.cert_domains == ["node-a.tail.example"]
    assert st.backend_state == "Running"
    assert st.self == {"HostName": "node-a"}
    assert st.raw["Version"] == "t"
    assert srv.tailscale_ips() == (IPv4Address("100.64.0.7"), IPv6Address("fd7a:115c:a1e0::7"))
    assert srv.cert_domains() == ["node-a.tail.example"]
    assert peer.method_names() == ["start", "up", "tailscale_ips", "cert_domains"]


def test_close_twice_and_after_close(srv: Any, peer: WirePeer) -> None:
    srv.start()
    srv.close()
    assert peer.method_names()[-1] == "close"
    with pytest.raises(tsnet2.ClosedError):
        srv.close()
    with pytest.raises(tsnet2.ClosedError):
        srv.start()  # no start after close (seed bug 5)
    with pytest.raises(tsnet2.ClosedError):
        srv.listen("tcp", ":1")
    assert srv.tailscale_ips() == (None, None)


def test_failed_start_can_be_retried(srv: Any, peer: WirePeer) -> None:
    def refuse(p: Any) -> Any:
        raise RuntimeError("daemon: control server unreachable")

    peer.methods["start"] = refuse
    with pytest.raises(tsnet2.DaemonError) as ei:
        srv.start()
    assert str(ei.value) == "tsnet2.start: daemon: control server unreachable"
    assert ei.value.method == "start"
    peer.methods["start"] = lambda p: {}
    srv.start()  # not sticky (seed bug 5)
    assert peer.method_names() == ["start", "start"]


# -- RPC ids, timeouts and errors -------------------------------------------------


def test_rpc_timeout_cancels_pending_id(srv: Any, peer: WirePeer) -> None:
    peer.methods["up"] = lambda p: HANG
    srv.start()
    t0 = time.monotonic()
    with pytest.raises(tsnet2.DeadlineExceededError) as ei:
        srv.up(timeout=0.3)  # the peer never answers: only the timeout can end the call
    assert time.monotonic() - t0 >= 0.25
    assert isinstance(ei.value, TimeoutError)
    control = srv._control
    assert control is not None
    assert control._core.pending == frozenset() and control._replies == {}
    # The daemon answers the abandoned request late; the next call still gets its own reply.
    sock, late_id = peer.hung[0]
    sock.sendall(proto.ControlServerCore().reply(late_id, {"tailscale_ips": ["100.64.9.9"]}))
    assert srv.tailscale_ips() == (IPv4Address("100.64.0.7"), IPv6Address("fd7a:115c:a1e0::7"))


def test_rpc_error_maps_to_daemon_error(srv: Any, peer: WirePeer) -> None:
    del peer.methods["cert_domains"]
    srv.start()
    with pytest.raises(tsnet2.DaemonError, match='unknown method "cert_domains"') as ei:
        srv.cert_domains()
    assert ei.value.method == "cert_domains"
    assert str(ei.value).startswith("tsnet2.cert_domains: ")


def test_malformed_result_is_protocol_error(srv: Any, peer: WirePeer) -> None:
    peer.methods["tailscale_ips"] = lambda p: {"v4": "fd7a::1"}
    srv.start()
    with pytest.raises(tsnet2.ProtocolError, match="IPv6 address as 'v4'"):
        srv.tailscale_ips()


def test_a_result_of_the_wrong_shape_is_protocol_error(srv: Any, peer: WirePeer) -> None:
    # Results are decoded by the one schema both ends use (tsnet2.proto.methods).
    peer.methods["up"] = lambda p: {"tailscale_ips": "100.64.0.7"}
    with pytest.raises(tsnet2.ProtocolError, match=r"tsnet2\.up: daemon sent a malformed result"):
        srv.up(timeout=5)
    peer.methods["register_listener"] = lambda p: {"listener_id": "", "addr": ":80"}
    with pytest.raises(tsnet2.ProtocolError, match="malformed register result"):
        srv.listen("tcp", ":80")


def test_daemon_going_away(srv: Any, peer: WirePeer) -> None:
    srv.reconnect_timeout = 0  # the fail-loudly mode (test_client_reconnect: default)
    peer.methods["up"] = lambda p: HANG
    srv.start()
    errors: list[BaseException] = []

    def call_up() -> None:
        try:
            srv.up()
        except tsnet2.Error as exc:
            errors.append(exc)

    t = threading.Thread(target=call_up)
    t.start()
    wait_until(lambda: len(peer.hung) == 1, "the up call to reach the daemon")
    peer.control_socks[0].shutdown(socket.SHUT_RDWR)  # the daemon dies mid-call
    t.join(5)
    assert len(errors) == 1 and isinstance(errors[0], tsnet2.DaemonUnavailableError)
    assert "closed" in str(errors[0])
    with pytest.raises(tsnet2.DaemonUnavailableError):
        srv.tailscale_ips()  # later calls fail at once
    with pytest.raises(tsnet2.DaemonUnavailableError):
        srv.dial("tcp", "100.64.0.1:80", timeout=1)
    srv.close()  # still closes cleanly


def test_close_interrupts_a_blocked_call(srv: Any, peer: WirePeer) -> None:
    peer.methods["up"] = lambda p: HANG
    srv.start()
    errors: list[BaseException] = []

    def call_up() -> None:
        try:
            srv.up()
        except tsnet2.Error as exc:
            errors.append(exc)

    t = threading.Thread(target=call_up)
    t.start()
    wait_until(lambda: len(peer.hung) == 1, "the up call to reach the daemon")
    srv.close()
    t.join(10)
    assert not t.is_alive(), "close() did not interrupt the blocked call"
    assert len(errors) == 1 and isinstance(errors[0], tsnet2.ClosedError)


# -- dial ------------------------------------------------------------------------------


def test_dial_echo_and_half_close(face: Any, srv: Any, peer: WirePeer) -> None:
    with srv.dial("tcp", "100.64.0.1:8080", timeout=5) as conn:
        assert isinstance(getattr(conn, "conn", conn), face.conn_type)
        assert conn.tailnet_local == (IPv4Address("100.64.0.7"), 41000)
        assert conn.tailnet_remote == (IPv4Address("100.64.0.1"), 8080)
        conn.sendall(b"hello tsnet2")
        conn.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := conn.recv(100):
            got += chunk
    assert got == b"hello tsnet2"
    assert peer.kinds.count(proto.ChannelKind.DIAL) == 1


def test_dial_bytes_after_reply_are_kept(srv: Any, peer: WirePeer) -> None:
    def reply_and_greet(sock: socket.socket, req: proto.DialRequest) -> None:
        sock.sendall(proto.encode_dial_reply(True) + b"220 greeting\r\n")
        sock.shutdown(socket.SHUT_WR)
        recv_line(sock)

    peer.on_dial = reply_and_greet
    with srv.dial("tcp", "db:25", timeout=5) as conn:
        assert conn.tailnet_local is None and conn.tailnet_remote is None
        data = b""
        while chunk := conn.recv(100):
            data += chunk
        assert data == b"220 greeting\r\n"


def test_dial_refused(srv: Any, peer: WirePeer) -> None:
    peer.on_dial = lambda sock, req: sock.sendall(
        proto.encode_dial_reply(False, err="dial tcp 100.64.0.1:9: connection refused")
    )
    with pytest.raises(tsnet2.DialError) as ei:
        srv.dial("tcp", "100.64.0.1:9", timeout=5)
    assert str(ei.value) == "tsnet2.dial: dial tcp 100.64.0.1:9: connection refused"
    assert isinstance(ei.value, ConnectionError)


def test_dial_timeout_bounds_the_reply(srv: Any, peer: WirePeer) -> None:
    peer.on_dial = lambda sock, req: peer.stopping.wait()  # never replies
    srv.start()
    t0 = time.monotonic()
    with pytest.raises(tsnet2.DeadlineExceededError):
        srv.dial("tcp", "100.64.0.1:80", timeout=0.3)  # only the timeout can end it
    assert time.monotonic() - t0 >= 0.25


def test_dial_validates_before_touching_the_socket(face: Any, peer: WirePeer) -> None:
    s = face.Server(socket_path=peer.path)
    with pytest.raises(tsnet2.AddressError):
        s.dial("tcp", "no-port")
    with pytest.raises(tsnet2.AddressError):
        s.dial("tcp", ":80")
    with pytest.raises(tsnet2.AddressError):
        s.dial("udp", "no-port")
    with pytest.raises(tsnet2.AddressError):
        s.listen("udp", ":dns")
    with pytest.raises(tsnet2.AddressError):
        s.listen("tcp4", "[fd7a::1]:80")
    with pytest.raises(tsnet2.AddressError):
        s.listen("unix", ":80")
    assert peer.kinds == []
    s.close()


# -- listen / accept ---------------------------------------------------------------------


def _deliver(slot: Any, payload: bytes = b"") -> None:
    slot.sock.sendall(
        proto.encode_accept_header(slot.listener_id, "100.64.0.7:8080", "100.64.0.9:50000")
        + payload
    )


def test_listen_parks_k_slots_and_accept_never_grows_them(
    srv: Any, peer: WirePeer
) -> None:
    ln = srv.listen("tcp", ":8080")
    assert (ln.addr, ln.port, ln.listener_id) == (":8080", 8080, "00112233445566ff")
    assert peer.calls[-1] == ("register_listener", {"network": "tcp", "addr": ":8080"})
    parked = [peer.next_slot(), peer.next_slot()]
    assert {s.listener_id for s in parked} == {"00112233445566ff"}
    for i in range(5):
        slot = parked.pop(0)
        _deliver(slot, b"first bytes %d" % i)
        conn = ln.accept(timeout=5)
        with conn:
            assert conn.tailnet_remote == (IPv4Address("100.64.0.9"), 50000)
            assert conn.tailnet_local == (IPv4Address("100.64.0.7"), 8080)
            assert conn.recv(100) == b"first bytes %d" % i  # nothing eaten by the header read
            conn.sendall(b"reply")
            assert slot.sock.recv(100) == b"reply"
        parked.append(peer.next_slot())  # exactly one replacement...
        with pytest.raises(queue.Empty):
            peer.next_slot(timeout=0.05)  # ...and no more (seed bug 1)
    assert len(ln._slots) == 2
    ln.close()
    assert all(s.closed_by_client() for s in parked)  # both sides released
    assert peer.calls[-1] == ("unregister_listener", {"listener_id": "00112233445566ff"})
    with pytest.raises(tsnet2.ClosedError):
        ln.accept(timeout=1)
    ln.close()  # idempotent


def test_accept_timeout(srv: Any, peer: WirePeer) -> None:
    with srv.listen("tcp", ":8080") as ln:
        t0 = time.monotonic()
        with pytest.raises(tsnet2.DeadlineExceededError):
            ln.accept(timeout=0.2)  # no flow ever comes: only the timeout can end it
        assert time.monotonic() - t0 >= 0.15


def test_dropped_slot_is_reparked(srv: Any, peer: WirePeer) -> None:
    with srv.listen("tcp", ":8080") as ln:
        a, b = peer.next_slot(), peer.next_slot()
        a.sock.close()  # the daemon drops one parked slot
        with pytest.raises(tsnet2.DeadlineExceededError):
            ln.accept(timeout=0.3)
        c = peer.next_slot()  # re-parked after a backoff
        _deliver(c)
        with ln.accept(timeout=5) as conn:
            assert conn.tailnet_remote is not None
        del b


def test_accept_fails_loudly_when_daemon_goes(srv: Any, peer: WirePeer) -> None:
    srv.reconnect_timeout = 0  # the fail-loudly mode (test_client_reconnect: default)
    with srv.listen("tcp", ":8080") as ln:
        slots = [peer.next_slot(), peer.next_slot()]
        peer.control_socks[0].shutdown(socket.SHUT_RDWR)
        for s in slots:
            s.sock.shutdown(socket.SHUT_RDWR)
        with pytest.raises(tsnet2.DaemonUnavailableError, match="went away"):
            ln.accept(timeout=5)


def test_close_from_another_thread_wakes_accept(srv: Any, peer: WirePeer) -> None:
    ln = srv.listen("tcp", ":8080")
    errors: list[BaseException] = []

    def run() -> None:
        try:
            ln.accept()
        except tsnet2.Error as exc:
            errors.append(exc)

    t = threading.Thread(target=run)
    t.start()
    time.sleep(0.2)
    srv.close()  # closes the listener too
    t.join(5)
    assert len(errors) == 1 and isinstance(errors[0], tsnet2.ClosedError)
    assert peer.method_names()[-2:] == ["unregister_listener", "close"]


def test_listener_iteration_stops_at_close(srv: Any, peer: WirePeer) -> None:
    ln = srv.listen("tcp", ":8080")
    _deliver(peer.next_slot())
    got = []
    for conn in ln:
        with conn:
            got.append(conn.tailnet_remote)
        ln.close()
    assert len(got) == 1


def test_bad_accept_header_is_protocol_error(srv: Any, peer: WirePeer) -> None:
    with srv.listen("tcp", ":8080") as ln:
        peer.next_slot().sock.sendall(b"not json\n")
        with pytest.raises(tsnet2.ProtocolError, match="bad accept header"):
            ln.accept(timeout=5)


# -- LocalAPI ------------------------------------------------------------------------


def test_local_client_whois_and_errors(srv: Any, peer: WirePeer) -> None:
    heads: list[bytes] = []

    def localapi(sock: socket.socket, head: bytes) -> None:
        heads.append(head)
        if b"whois" in head:
            body = b'{"Node":{"Name":"tsnet2-a.tail.example."},"UserProfile":{"LoginName":"u"}}'
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        else:
            sock.sendall(b"HTTP/1.1 404 Not Found\r\nConnection: close\r\n\r\nno such endpoint")
            sock.shutdown(socket.SHUT_WR)

    peer.localapi = localapi
    lc = srv.local_client()
    who = lc.whois("[fd7a:115c:a1e0::1]:8080")
    assert who["Node"]["Name"] == "tsnet2-a.tail.example."
    assert heads[0].startswith(
        b"GET /localapi/v0/whois?addr=%5Bfd7a%3A115c%3Aa1e0%3A%3A1%5D%3A8080 HTTP/1.1\r\n"
    )
    assert b"\r\nhost: local-tailscaled.sock\r\n" in heads[0].lower()
    with pytest.raises(tsnet2.LocalAPIError) as ei:
        lc.get("bogus")
    assert (ei.value.status, ei.value.body) == (404, "no such endpoint")


def test_local_client_body_is_bounded(srv: Any, peer: WirePeer) -> None:
    def huge(sock: socket.socket, head: bytes) -> None:
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (64 << 20))
        chunk = b"x" * (1 << 20)
        for _ in range(64):
            sock.sendall(chunk)

    peer.localapi = huge
    with pytest.raises(tsnet2.ProtocolError, match="larger than"):
        srv.local_client().status()


def test_watch_ipn_bus_streams(srv: Any, peer: WirePeer) -> None:
    release = threading.Event()

    def stream(sock: socket.socket, head: bytes) -> None:
        assert head.startswith(b"GET /localapi/v0/watch-ipn-bus?mask=3 ")
        sock.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for i in range(3):
            line = b'{"State":%d}\n' % i
            sock.sendall(b"%x\r\n%s\r\n" % (len(line), line))
            release.wait(5)  # the client must see each line before the next is sent
            release.clear()
        sock.sendall(b"0\r\n\r\n")

    peer.localapi = stream
    seen = []
    with srv.local_client().watch_ipn_bus(mask=3) as watch:
        for note in watch:
            seen.append(note)
            release.set()
    assert seen == [{"State": 0}, {"State": 1}, {"State": 2}]


# -- typed errors from the daemon's codes (issue 9) ------------------------------------


class Coded(Exception):
    """A scripted daemon error with its wire code."""

    def __init__(self, message: str, code: proto.ErrorCode) -> None:
        super().__init__(message)
        self.code = code


@pytest.mark.parametrize(("code", "cls"), [
    (proto.ErrorCode.ADDRESS_IN_USE, tsnet2.AddressInUseError),
    (proto.ErrorCode.LIMIT, tsnet2.LimitError),
    (proto.ErrorCode.NODE_DOWN, tsnet2.NodeDownError),
    (proto.ErrorCode.BAD_REQUEST, tsnet2.DaemonError),
    (proto.ErrorCode.OTHER, tsnet2.DaemonError),
])
def test_error_codes_become_typed_errors(srv: Any, peer: WirePeer,
                                         code: proto.ErrorCode, cls: type) -> None:
    def fail(p: Any) -> Any:
        raise Coded("daemon: port 8080 is in use on this node", code)
    peer.methods["register_listener"] = fail
    with pytest.raises(cls) as ei:
        srv.listen("tcp", ":8080")
    assert str(ei.value) == "tsnet2.listen: daemon: port 8080 is in use on this node"
    if cls is tsnet2.AddressInUseError:
        assert isinstance(ei.value, OSError) and ei.value.errno == 98


def test_start_errors_auth_and_hostname(srv: Any, peer: WirePeer) -> None:
    def fail(p: Any) -> Any:
        raise Coded("daemon: this daemon's node is 'web'", proto.ErrorCode.HOSTNAME_CONFLICT)
    peer.methods["start"] = fail
    with pytest.raises(tsnet2.HostnameConflictError, match="'web'"):
        srv.start()

    def bad_key(p: Any) -> Any:
        raise Coded("daemon: auth key not valid", proto.ErrorCode.AUTH_FAILED)
    peer.methods["start"] = bad_key
    with pytest.raises(tsnet2.AuthKeyError, match="auth key not valid"):
        srv.start()


def test_refusal_frame_is_a_permission_error(srv: Any, peer: WirePeer) -> None:
    def refuse(sock: socket.socket) -> None:
        sock.sendall(proto.ControlServerCore().refuse(
            "daemon: uid 1000 may not use this socket", proto.ErrorCode.PERMISSION_DENIED))
        sock.shutdown(socket.SHUT_WR)
    peer._control = refuse  # type: ignore[method-assign]
    with pytest.raises(tsnet2.PermissionDeniedError, match="uid 1000 may not") as ei:
        srv.start()
    assert isinstance(ei.value, PermissionError)


@pytest.mark.parametrize(("code", "cls"), [
    (proto.ErrorCode.PEER_OFFLINE, tsnet2.PeerOfflineError),
    (proto.ErrorCode.NO_SUCH_PEER, tsnet2.NoSuchPeerError),
    (proto.ErrorCode.NODE_DOWN, tsnet2.NodeDownError),
    (proto.ErrorCode.PERMISSION_DENIED, tsnet2.PermissionDeniedError),
    (proto.ErrorCode.DIAL_FAILED, tsnet2.DialError),
])
def test_dial_codes_become_typed_errors(srv: Any, peer: WirePeer,
                                        code: proto.ErrorCode, cls: type) -> None:
    peer.on_dial = lambda sock, req: sock.sendall(
        proto.encode_dial_reply(False, err="peer 'db' is offline", code=code))
    with pytest.raises(cls, match="peer 'db' is offline"):
        srv.dial("tcp", "db:5432", timeout=5)


def test_node_down_on_parked_slots_is_raised_once(srv: Any, peer: WirePeer) -> None:
    srv.reconnect_timeout = 0
    with srv.listen("tcp", ":8080") as ln:
        refusal = proto.encode_accept_refusal("daemon: the node went away",
                                              proto.ErrorCode.NODE_DOWN)
        a, b = peer.next_slot(), peer.next_slot()
        a.sock.sendall(refusal)
        b.sock.sendall(refusal)
        with pytest.raises(tsnet2.NodeDownError, match="the node went away"):
            ln.accept(timeout=5)
        # The second slot's refusal is the same news: not raised again. (Here the scripted
        # daemon keeps the control channel, so accept() waits for a flow on new slots.)
        with pytest.raises(tsnet2.DeadlineExceededError):
            ln.accept(timeout=0.5)


# -- several threads (or tasks) share one Server --------------------------------------


def _in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    """Run ``fn`` in a thread; the list gets its result or the exception it raised."""
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as exc:
            out.append(exc)

    t = threading.Thread(target=run)
    t.start()
    return t, out


def test_a_slow_up_does_not_hold_back_other_calls(srv: Any, peer: WirePeer) -> None:
    peer.methods["up"] = lambda p: HANG
    srv.start()
    t, up = _in_thread(lambda: srv.up())  # no timeout: it waits for the daemon
    wait_until(lambda: len(peer.hung) == 1, "the up call to reach the daemon")
    # Another thread's calls get their replies while up() is still waiting for its own
    # (each would raise DeadlineExceededError after 5 s if it queued behind up()).
    assert srv.tailscale_ips() == (IPv4Address("100.64.0.7"), IPv6Address("fd7a:115c:a1e0::7"))
    assert srv.cert_domains() == ["node-a.tail.example"]
    assert t.is_alive() and up == []
    sock, up_id = peer.hung[0]
    sock.sendall(proto.ControlServerCore().reply(up_id, {
        "tailscale_ips": ["100.64.0.7"], "node_name": "node-a"}))
    t.join(10)
    assert not t.is_alive() and isinstance(up[0], tsnet2.Status)
    assert up[0].node_name == "node-a"


def test_a_caller_timing_out_hands_the_reading_on(srv: Any, peer: WirePeer) -> None:
    peer.methods["up"] = lambda p: HANG
    srv.start()
    t1, first = _in_thread(lambda: srv._rpc("t", "up", None, 0.3))
    wait_until(lambda: len(peer.hung) == 1, "the first up to reach the daemon")
    t2, second = _in_thread(lambda: srv._rpc("t", "up", None, None))
    wait_until(lambda: len(peer.hung) == 2, "the second up to reach the daemon")
    t1.join(10)
    assert isinstance(first[0], tsnet2.DeadlineExceededError)
    # The caller that was reading gave up: the one still waiting reads its own reply.
    sock, up_id = peer.hung[1]
    sock.sendall(proto.ControlServerCore().reply(up_id, {"node_name": "late"}))
    t2.join(10)
    assert second == [proto.UpResult(node_name="late")]


def test_concurrent_calls_each_get_their_own_reply(srv: Any, peer: WirePeer) -> None:
    peer.methods["cert_domains"] = lambda p: {"domains": [f"n{len(peer.calls)}.example"]}
    srv.start()
    threads = [_in_thread(lambda: [srv.cert_domains() for _ in range(20)]) for _ in range(6)]
    for t, _ in threads:
        t.join(30)
    results = [r for _, out in threads for r in out[0]]
    assert len(results) == 120 and len({r[0] for r in results}) == 120  # nobody got another's


def test_two_flows_at_once_lose_no_header(srv: Any, peer: WirePeer) -> None:
    with srv.listen("tcp", ":8080") as ln:
        a, b = peer.next_slot(), peer.next_slot()
        _deliver(a, b"one")
        _deliver(b, b"two")
        got = set()
        for _ in range(2):
            with ln.accept(timeout=5) as conn:
                got.add(conn.recv(3))
        assert got == {b"one", b"two"}


def test_local_client_error_and_a_stream_ended_by_the_daemon(srv: Any, peer: WirePeer) -> None:
    def localapi(sock: socket.socket, head: bytes) -> None:
        if b"watch-ipn-bus" in head:
            sock.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
            sock.sendall(b'{"State":6}\n\n{"NetMap":{}}\n')
            sock.shutdown(socket.SHUT_WR)
        else:
            sock.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\n\r\nbusy")

    peer.localapi = localapi
    lc = srv.local_client()
    with lc.watch_ipn_bus() as watch:
        assert list(watch) == [{"State": 6}, {"NetMap": {}}]
    with pytest.raises(tsnet2.LocalAPIError) as ei:
        lc.whois("100.64.0.1")
    assert (ei.value.status, ei.value.body) == (503, "busy")


def test_closing_a_watch_from_another_thread_ends_the_iteration(
    srv: Any, peer: WirePeer
) -> None:
    def localapi(sock: socket.socket, head: bytes) -> None:
        sock.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        peer.stopping.wait()

    peer.localapi = localapi
    watch = srv.local_client().watch_ipn_bus()
    t, out = _in_thread(lambda: list(watch))
    wait_until(lambda: peer.kinds.count(proto.ChannelKind.LOCALAPI) == 1, "the watch")
    watch.close()
    t.join(10)
    assert out == [[]]
