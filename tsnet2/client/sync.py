"""The blocking face: :class:`Server` and :class:`Listener`."""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
import time
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv6Address
from types import TracebackType
from typing import Any

from tsnet2 import proto
from tsnet2.client import _base
from tsnet2.client._base import (
    BACKOFF_INITIAL,
    RECONNECT_BACKOFF_MAX,
    REPARK_BACKOFF_MAX,
    REPARK_CONNECT_TIMEOUT,
    RPC_TIMEOUT,
    SHUTDOWN_RPC_TIMEOUT,
    SLOT_CONNECT_TIMEOUT,
    START_TIMEOUT,
    ServerBase,
    State,
    Status,
)
from tsnet2.client._control_sync import SyncControl
from tsnet2.client._sockets import (
    HeaderEOF,
    TailnetSocket,
    close_quietly,
    connect_channel,
    read_header_line,
)
from tsnet2.client.errors import (
    ClosedError,
    DaemonError,
    DaemonUnavailableError,
    DeadlineExceededError,
    Error,
    NotSupportedError,
    PermissionDeniedError,
    ProtocolError,
)
from tsnet2.client.local import LocalClient

__all__ = ["Listener", "Server"]


class Server(ServerBase):
    """A tailnet node for this process, run by the tsnet2d daemon (blocking API).

    Construct it with keyword fields (all optional; mutable until the server starts)::

        dir               returned by get_root_path(); the daemon keeps the real state
        hostname          node name in the tailnet ("" lets the daemon choose)
        control_url       coordination server ("" = the daemon's TS_CONTROL_URL)
        auth_key          auth key ("" = the daemon's TS_AUTHKEY, then TS_AUTH_KEY)
        ephemeral         remove the node when it goes offline
        socket_path       tsnet2d's Unix socket (default: $TSNET2_SOCKET)
        traffic_log_path  informational: the daemon's --traffic-log decides the path
        advertise_tags    ACL tags to request, like ["tag:web"]
        port              ignored: the daemon owns the WireGuard port
        store             ignored: the daemon owns the state
        logf              callable(str) receiving this library's log lines
        user_logf         accepted; auth URLs stay in the daemon's log
        tun               must be None (the daemon owns the device)
        connect_timeout   seconds start() retries connecting to the socket (default 10)
        accept_slots      accept connections each Listener keeps parked (default 2)
        reconnect_timeout seconds a call waits for a restarted daemon (default 10; 0: never
                          reconnect, fail with DaemonUnavailableError)
        join              True (default): start() asks the daemon to start the node and
                          holds it until close(). False: use the node the daemon already
                          runs and never start or hold it (read-only tools, `tsnet2 ping`)

    The node belongs to the daemon, which may serve several Servers (processes,
    containers, the CLI): close() releases this Server's listeners and its hold on
    the node; the node stays up while tsnet2d runs with --up or another Server holds
    it. If the node goes away (its device died, or its last holder closed it), calls
    raise NodeDownError and a blocked ``Listener.accept()`` raises it once; the next
    ``accept()`` reconnects and registers the listener again, as after a restart.

    If the daemon restarts, the next call (or a blocked ``Listener.accept()``)
    reconnects, sends ``start`` again and re-registers every open listener on the
    same address; see docs/client.md, "Reconnection". Several threads may share
    one Server: one of them reconnects, the others wait for it.

    Every method that needs the daemon starts the server first. Without a socket
    path those methods raise NotSupportedError (a NotImplementedError). Use it
    as a context manager to close it.
    """

    def _setup(self) -> None:
        self._start_lock = threading.Lock()
        self._closing = threading.Event()
        self._control: SyncControl | None = None
        self._pending_control: SyncControl | None = None
        self._gen = 0
        self._listeners: set[Listener] = set()

    # -- lifecycle ------------------------------------------------------------

    def start(self) -> None:
        """Connect to the daemon and send ``start`` (idempotent once it succeeded).

        Retries the connect for ``connect_timeout`` seconds (backoff 50 ms doubling
        to 1 s), then raises DaemonUnavailableError. Does not wait for the node to
        be running (``up()`` does). A failed start can be retried.
        """
        op = "tsnet2.start"
        with self._start_lock:
            if self._state is State.STARTED:
                return
            self._check_startable(op)
            deadline = time.monotonic() + self.connect_timeout
            sock = connect_channel(self.socket_path, int(proto.ChannelKind.CONTROL), op, deadline)
            control = SyncControl(sock, self.socket_path)
            try:
                if self.join:
                    _base.rpc_result(
                        op, "start",
                        control.call(op, "start", self._start_params(), START_TIMEOUT),
                    )
            except BaseException:
                control.close()
                raise
            self._control = control
            self._mark_started()
        self._log(f"tsnet2: connected to the daemon at {self.socket_path}")

    def _rpc(
        self, op: str, method: str, params: dict[str, Any] | None, timeout: float | None
    ) -> dict[str, Any]:
        """One RPC; if the channel dies during it, reconnect and send it once more."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for attempt in (1, 2):
            control = self._live_control(op)
            remaining = None if deadline is None else max(0.001, deadline - time.monotonic())
            try:
                resp = control.call(op, method, params, remaining)
            except DaemonUnavailableError:
                if attempt == 2 or not self.reconnects or self._state is State.CLOSED:
                    raise
                continue
            return _base.rpc_result(op, method, resp)
        raise AssertionError("unreachable")  # pragma: no cover

    def _live_control(self, op: str) -> SyncControl:
        """The control channel, reconnected first if the daemon went away."""
        control = self._control
        if self._state is State.CLOSED or control is None:
            raise ClosedError(f"{op}: server is closed")
        if self.reconnects and not control.alive():
            return self._revive(op)
        return control

    # -- reconnection -----------------------------------------------------------

    def _revive(self, op: str) -> SyncControl:
        """Return a live control channel, reconnecting if it is dead.

        One thread reconnects at a time; the others wait on the lock and then
        find the channel alive. Raises DaemonUnavailableError if the daemon does
        not come back within ``reconnect_timeout`` (or reconnection is disabled).
        """
        with self._start_lock:
            control = self._control
            if self._state is State.CLOSED or control is None:
                raise ClosedError(f"{op}: server is closed")
            if control.alive():
                return control
            if not self.reconnects:
                raise DaemonUnavailableError(_base.gone_message(op, self.socket_path))
            return self._reconnect_locked(op, control)

    def _reconnect_locked(self, op: str, old: SyncControl) -> SyncControl:
        path = self.socket_path
        reason = old.broken or "the daemon closed the control channel"
        old.discard(reason)
        self._log(
            f"tsnet2: lost the control channel to the daemon at {path} ({reason}); "
            f"reconnecting (up to {self.reconnect_timeout:g}s)"
        )
        t0 = time.monotonic()
        control = self._connect_and_start(op, t0 + self.reconnect_timeout)
        self._control = control
        self._gen += 1
        again, lost = self._relisten(op, control, list(self._listeners))
        note = f", {len(lost)} lost ({'; '.join(lost)})" if lost else ""
        self._log(
            f"tsnet2: reconnected to the daemon at {path} in {time.monotonic() - t0:.2f}s; "
            f"{again} listener(s) registered again{note}"
        )
        return control

    def _connect_and_start(self, op: str, deadline: float) -> SyncControl:
        path = self.socket_path
        delays = _base.backoff_delays()
        while True:
            try:
                sock = connect_channel(
                    path,
                    int(proto.ChannelKind.CONTROL),
                    op,
                    deadline,
                    max_delay=RECONNECT_BACKOFF_MAX,
                    cancel=self._closing,
                )
            except DaemonUnavailableError as exc:
                raise DaemonUnavailableError(
                    _base.reconnect_failed_message(op, path, self.reconnect_timeout, exc)
                ) from exc
            control = SyncControl(sock, path)
            self._pending_control = control
            try:
                if self.join:
                    _base.rpc_result(
                        op, "start",
                        control.call(op, "start", self._start_params(), START_TIMEOUT),
                    )
                if any(not ln._closed for ln in self._listeners):
                    # Listeners need the node's addresses: wait until it runs.
                    _base.rpc_result(op, "up", control.call(op, "up", None, START_TIMEOUT))
                return control
            except PermissionDeniedError:
                control.close()
                raise  # waiting does not change our uid
            except DaemonUnavailableError as exc:  # it went away again (still shutting down?)
                control.close()
                if self._closing.is_set():
                    raise ClosedError(f"{op}: server is closed") from None
                if time.monotonic() >= deadline:
                    raise DaemonUnavailableError(
                        _base.reconnect_failed_message(op, path, self.reconnect_timeout, exc)
                    ) from exc
                self._closing.wait(min(next(delays), max(0.0, deadline - time.monotonic())))
            except DaemonError as exc:
                control.close()
                raise DaemonUnavailableError(_base.restart_refused_message(op, path, exc)) from exc
            except BaseException:
                control.close()
                if self._closing.is_set():
                    raise ClosedError(f"{op}: server is closed") from None
                raise
            finally:
                self._pending_control = None

    def _ensure_bound(self, op: str, ln: Listener) -> None:
        """Register ``ln`` on the current connection if a reconnect missed it (a race
        with listen()); a no-op when it is already bound or lost."""
        b = ln._binding
        if b.gen == self._gen or b.lost is not None:
            return
        with self._start_lock:
            control = self._control
            if b.gen != self._gen and b.lost is None and control is not None:
                self._relisten(op, control, [ln])

    def _relisten(
        self, op: str, control: SyncControl, listeners: list[Listener]
    ) -> tuple[int, list[str]]:
        """Register listeners again on their bound addresses; return (ok, lost addrs)."""
        again, lost = 0, []
        for ln in listeners:
            if ln._closed:
                continue
            b = ln._binding
            params = _base.relisten_params(b.network, b.addr)
            try:
                result = control.call(op, "register_listener", params, RPC_TIMEOUT)
                listener_id, bound = _base.parse_register_result(
                    _base.rpc_result(op, "register_listener", result)
                )
                _base.check_relisten_addr(b.addr, bound)
            except DaemonUnavailableError:
                break  # gone again: the listeners' accept() will reconnect once more
            except Error as exc:
                b.lose(_base.relisten_failed_message(self.socket_path, b.addr, exc))
                lost.append(b.addr)
            else:
                b.rebind(listener_id, bound, self._gen)
                again += 1
            ln._wake()
        return again, lost

    def up(self, timeout: float | None = None) -> Status:
        """Start, wait until the node is running, and return its Status.

        ``timeout`` (seconds) bounds the wait; None waits as long as it takes
        (for example, until an interactive login completes in the daemon).
        """
        op = "tsnet2.up"
        deadline = None if timeout is None else time.monotonic() + timeout
        self.start()
        result = self._rpc(op, "up", None, timeout)
        client = self._local(op, deadline)
        return _base.build_status(result, client.status())

    def _local(self, op: str, deadline: float | None) -> LocalClient:
        timeout = _base.LOCALAPI_TIMEOUT
        if deadline is not None:
            timeout = max(0.001, deadline - time.monotonic())
        return LocalClient(self.socket_path, timeout=timeout, connect_timeout=self.connect_timeout)

    def close(self) -> None:
        """Close listeners, tell the daemon ``close``, and drop the connection.

        Closing a server that never started is fine. A second call raises
        ClosedError.
        """
        op = "tsnet2.close"
        self._closing.set()  # interrupts a reconnect in progress
        pending = self._pending_control
        if pending is not None:
            pending.close()
        with self._start_lock:
            if self._state is State.CLOSED:
                raise ClosedError(f"{op}: server already closed")
            self._state = State.CLOSED
        control = self._control
        for ln in list(self._listeners):
            ln.close()
        self._control = None
        if control is None:
            return
        try:
            control.call(op, "close", None, SHUTDOWN_RPC_TIMEOUT, lock_timeout=SHUTDOWN_RPC_TIMEOUT)
        except Error as exc:
            self._log(f"tsnet2: close RPC failed (ignored): {exc}")
        finally:
            control.close()

    def __enter__(self) -> Server:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self.closed:
            self.close()

    # -- inbound ----------------------------------------------------------------

    def listen(self, network: str, addr: str) -> Listener:
        """Listen on the tailnet: ``network`` is tcp, tcp4 or tcp6; ``addr`` like ``":8080"``.

        Arguments are validated before the daemon is contacted. Port 0 lets the
        daemon pick a port (see ``Listener.addr``).
        """
        op = "tsnet2.listen"
        _base.check_listen_args(op, network, addr)
        self.start()
        result = self._rpc(op, "register_listener", {"network": network, "addr": addr}, RPC_TIMEOUT)
        listener_id, bound = _base.parse_register_result(result)
        binding = _base.ListenerBinding(network, bound, listener_id, self._gen)
        ln = Listener(self, binding, self.accept_slots)
        self._listeners.add(ln)
        try:
            ln._park_initial()
        except BaseException:
            ln.close()
            raise
        return ln

    def listen_tls(self, network: str, addr: str) -> Listener:
        """Not implemented: always raises NotSupportedError."""
        raise NotSupportedError("tsnet2.listen_tls: not implemented")

    def _unregister(self, listener_id: str) -> None:
        control = self._control
        if control is None:
            return
        op = "tsnet2.Listener.close"
        try:
            control.call(
                op,
                "unregister_listener",
                {"listener_id": listener_id},
                SHUTDOWN_RPC_TIMEOUT,
                lock_timeout=SHUTDOWN_RPC_TIMEOUT,
            )
        except Error as exc:
            self._log(f"tsnet2: unregister_listener {listener_id} failed (ignored): {exc}")

    def _control_alive(self) -> bool:
        control = self._control
        return control is not None and control.alive()

    # -- outbound ---------------------------------------------------------------

    def dial(self, network: str, addr: str, timeout: float | None = None) -> TailnetSocket:
        """Connect to ``addr`` (``"host:port"``; host may be a tailnet name) through the daemon.

        ``timeout`` bounds both connecting to the daemon socket and waiting for the
        daemon's reply; None means ``connect_timeout`` for the connect and no bound
        for the reply (the daemon gives up on its own after 30 s). Returns a
        connected TailnetSocket. Raises DialError if the daemon could not connect
        (NoSuchPeerError, PeerOfflineError when it knows why), NodeDownError while
        the node is not running.
        """
        op = "tsnet2.dial"
        _base.check_dial_args(op, network, addr)
        self.start()
        if not self._control_alive():
            self._revive(op)  # DaemonUnavailableError if the daemon does not come back
        now = time.monotonic()
        connect_deadline = now + (self.connect_timeout if timeout is None else timeout)
        reply_deadline = None if timeout is None else now + timeout
        sock = connect_channel(
            self.socket_path,
            int(proto.ChannelKind.DIAL),
            op,
            connect_deadline,
            payload=proto.encode_dial_request(network, addr),
        )
        try:
            try:
                line = read_header_line(sock, op, reply_deadline)
            except HeaderEOF:
                raise DaemonUnavailableError(
                    f"{op}: the daemon closed the connection without a reply"
                ) from None
            try:
                reply = proto.decode_dial_reply(line)
            except proto.ProtocolError as exc:
                raise ProtocolError(f"{op}: bad dial reply: {exc}") from None
            if not reply.ok:
                raise _base.dial_error(op, reply)
            local = _base.parse_tailnet_addr(reply.local or "")
            remote = _base.parse_tailnet_addr(reply.remote or "")
            return TailnetSocket._adopt(sock, local, remote)
        finally:
            if sock.fileno() != -1:
                sock.close()

    # -- queries ----------------------------------------------------------------

    def local_client(self) -> LocalClient:
        """Start, then return a LocalClient for the daemon's LocalAPI."""
        self.start()
        return self._local("tsnet2.local_client", None)

    def tailscale_ips(self) -> tuple[IPv4Address | None, IPv6Address | None]:
        """The node's (IPv4, IPv6) tailnet addresses, asked fresh; (None, None) before start."""
        if self._state is not State.STARTED:
            return None, None
        return _base.parse_tailscale_ips(
            self._rpc("tsnet2.tailscale_ips", "tailscale_ips", None, RPC_TIMEOUT)
        )

    def cert_domains(self) -> list[str] | None:
        """DNS names this node can get TLS certificates for; None before start."""
        if self._state is not State.STARTED:
            return None
        return _base.parse_cert_domains(
            self._rpc("tsnet2.cert_domains", "cert_domains", None, RPC_TIMEOUT)
        )


class Listener(_base.ListenerBase):
    """A tailnet TCP listener (from ``Server.listen``).

    Keeps ``accept_slots`` connections parked in the daemon; each inbound flow
    arrives on one of them. ``accept()`` returns TailnetSockets; iterating yields
    connections until the listener is closed. Use it as a context manager.

    If the daemon restarts, the server registers the listener again on the same
    address (``listener_id`` changes) and ``accept()`` parks new slots by itself.

    Attributes:
        network: "tcp", "tcp4" or "tcp6".
        addr: the bound address as the daemon reported it, like ``":8080"``.
        listener_id: the daemon's id for this listener.
    """

    def __init__(self, server: Server, binding: _base.ListenerBinding, slots: int) -> None:
        self._binding = binding
        self._server = server
        self._k = slots
        self._slots: dict[socket.socket, str] = {}  # slot -> the listener id it was parked for
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ)
        self._lock = threading.Lock()
        self._closed = False
        self._retry_at = 0.0
        self._backoff = BACKOFF_INITIAL
        self._reported: set[str] = set()  # registrations whose loss accept() has raised

    # -- slots ------------------------------------------------------------------

    def _park_one(self, op: str, timeout: float) -> None:
        listener_id = self._binding.listener_id
        sock = connect_channel(
            self._server.socket_path,
            int(proto.ChannelKind.ACCEPT),
            op,
            time.monotonic() + timeout,
            payload=proto.encode_accept_request(listener_id),
        )
        sock.setblocking(False)
        self._slots[sock] = listener_id
        self._sel.register(sock, selectors.EVENT_READ)

    def _park_initial(self) -> None:
        while len(self._slots) < self._k:
            self._park_one("tsnet2.listen", SLOT_CONNECT_TIMEOUT)

    def _wake(self) -> None:
        """Make a blocked accept() look at the listener's state again."""
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    def _drain_wake(self) -> None:
        with contextlib.suppress(OSError):
            while self._wake_r.recv(64):
                pass

    def _gone(self, op: str) -> DaemonUnavailableError:
        return DaemonUnavailableError(
            f"{op}: the daemon went away, so listener {self.addr} is gone and "
            "reconnect_timeout is 0; start a new Server (or set reconnect_timeout > 0)"
        )

    def _revive(self, op: str) -> None:
        """The daemon went away: wait for the server to reconnect (and re-register us)."""
        if not self._server.reconnects:
            raise self._gone(op)
        self._server._revive(op)
        self._server._ensure_bound(op, self)

    def _check_binding(self, op: str) -> None:
        """Raise if the listener was lost; drop slots parked for an earlier registration."""
        b = self._binding
        if b.lost is not None:
            raise DaemonUnavailableError(b.lost)
        if b.slots_stale():
            for sock in list(self._slots):
                self._drop(sock)
                close_quietly(sock)
            b.mark_slots_current()
            self._retry_at = 0.0
            self._backoff = BACKOFF_INITIAL

    def _refill(self, op: str, *, revive: bool = True) -> None:
        """Park slots up to K, unless a retry is scheduled for later."""
        while len(self._slots) < self._k and time.monotonic() >= self._retry_at:
            try:
                self._park_one(op, REPARK_CONNECT_TIMEOUT)
            except DaemonUnavailableError:
                self._schedule_retry()
                if revive and not self._server._control_alive():
                    self._revive(op)
                return

    def _schedule_retry(self) -> None:
        self._retry_at = time.monotonic() + self._backoff
        self._backoff = min(self._backoff * 2, REPARK_BACKOFF_MAX)

    def _drop(self, sock: socket.socket) -> str:
        self._sel.unregister(sock)
        return self._slots.pop(sock)

    def _take(self, sock: socket.socket, op: str) -> TailnetSocket | None:
        """Read the accept header from a readable slot; None if the daemon dropped it."""
        slot_id = self._drop(sock)
        try:
            try:
                line = read_header_line(sock, op, time.monotonic() + SLOT_CONNECT_TIMEOUT)
            except (HeaderEOF, DaemonUnavailableError):
                self._server._log(
                    f"tsnet2: daemon dropped an accept slot of {self.addr}; re-parking"
                )
                self._schedule_retry()
                if not self._server._control_alive():
                    self._revive(op)
                else:
                    self._server._ensure_bound(op, self)
                return None
            except DeadlineExceededError:
                raise ProtocolError(f"{op}: daemon sent an incomplete accept header") from None
            try:
                header = proto.decode_accept_header(line)
            except proto.ChannelRefused as exc:
                # The daemon closed the slot with a reason (its node went away): say so once
                # per registration; the next accept() reconnects and registers again.
                self._schedule_retry()
                if slot_id in self._reported:
                    return None
                self._reported.add(slot_id)
                raise (_base.refused_error(f"{op}: {exc}", exc.code)
                       or DaemonUnavailableError(f"{op}: {exc}")) from None
            except proto.ProtocolError as exc:
                raise ProtocolError(f"{op}: bad accept header: {exc}") from None
            if header.listener_id and header.listener_id != slot_id:
                raise ProtocolError(
                    f"{op}: accept header names listener {header.listener_id}, want {slot_id}"
                )
            local = _base.parse_tailnet_addr(header.local)
            remote = _base.parse_tailnet_addr(header.remote)
            self._backoff = BACKOFF_INITIAL
            return TailnetSocket._adopt(sock, local, remote)
        finally:
            if sock.fileno() != -1:
                sock.close()

    # -- public -------------------------------------------------------------------

    def accept(self, timeout: float | None = None) -> TailnetSocket:
        """Wait for the next inbound connection and return it as a TailnetSocket.

        ``timeout`` in seconds (None waits forever) raises DeadlineExceededError.
        Raises ClosedError once the listener (or its server) is closed. If the
        daemon restarts, accept() waits for the server to reconnect and goes on
        (a reconnect in progress may hold it up to ``reconnect_timeout``); it raises
        DaemonUnavailableError if the daemon does not come back in time or the
        listener could not be registered again.
        """
        op = "tsnet2.accept"
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while True:
                if self._closed:
                    raise ClosedError(f"{op}: listener {self.addr} is closed")
                self._check_binding(op)
                self._refill(op)
                wait = None if deadline is None else max(0.0, deadline - time.monotonic())
                if len(self._slots) < self._k:
                    until_retry = max(0.0, self._retry_at - time.monotonic())
                    wait = until_retry if wait is None else min(wait, until_retry)
                for key, _ in self._sel.select(wait):
                    if self._closed:
                        break
                    if key.fileobj is self._wake_r:
                        self._drain_wake()
                        continue
                    assert isinstance(key.fileobj, socket.socket)
                    if key.fileobj not in self._slots:
                        continue  # dropped earlier in this round
                    conn = self._take(key.fileobj, op)
                    if conn is None:
                        break  # a dropped slot (perhaps a restart): look again
                    with contextlib.suppress(DaemonUnavailableError):
                        self._refill(op, revive=False)  # on failure the next accept() sees it
                    return conn
                if deadline is not None and time.monotonic() >= deadline and not self._closed:
                    raise DeadlineExceededError(f"{op}: no connection within {timeout}s")

    def __iter__(self) -> Iterator[TailnetSocket]:
        """Yield accepted connections until the listener is closed."""
        while True:
            try:
                yield self.accept()
            except ClosedError:
                return

    def close(self) -> None:
        """Unregister the listener and release every parked slot (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._wake()
        self._server._unregister(self.listener_id)
        with self._lock:
            for sock in list(self._slots):
                self._drop(sock)
                close_quietly(sock)
            self._sel.close()
            close_quietly(self._wake_r)
            close_quietly(self._wake_w)
        self._server._listeners.discard(self)

    def __enter__(self) -> Listener:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
