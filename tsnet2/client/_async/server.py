"""The app's tailnet node: :class:`AsyncServer` and :class:`AsyncListener`."""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import AsyncIterator, Sequence
from ipaddress import IPv4Address, IPv6Address
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, overload

from tsnet2 import proto
from tsnet2.client import _backend_async as backend
from tsnet2.client import _base
from tsnet2.client._async.channel import (
    HeaderEOF,
    close_quietly,
    connect_channel,
    read_header_line,
    remaining,
)
from tsnet2.client._async.control import AsyncControlChannel
from tsnet2.client._async.local import AsyncLocalClient
from tsnet2.client._async.packet import AsyncPacketConn, AsyncPacketListener, dial_packet
from tsnet2.client._backend_async import AsyncConn

# unasync: async-only
from tsnet2.client._backend_sync import TailnetSocket  # AsyncServer.dial_socket's type

# unasync: end
from tsnet2.client._base import (
    BACKOFF_INITIAL,
    LISTEN_TLS_TIMEOUT,
    RECONNECT_BACKOFF_MAX,
    REPARK_BACKOFF_MAX,
    REPARK_CONNECT_TIMEOUT,
    RPC_TIMEOUT,
    SHUTDOWN_RPC_TIMEOUT,
    SLOT_CONNECT_TIMEOUT,
    START_TIMEOUT,
    ServerBase,
    ServerState,
    Status,
    TailnetAddr,
)
from tsnet2.client.errors import (
    AddressError,
    ClosedError,
    DaemonError,
    DaemonUnavailableError,
    DeadlineExceededError,
    Error,
    NotSupportedError,
    PermissionDeniedError,
    ProtocolError,
)

if TYPE_CHECKING:
    import httpx

__all__ = ["AsyncListener", "AsyncServer", "AsyncSocketListener"]

START, UP, CLOSE = proto.Method.START, proto.Method.UP, proto.Method.CLOSE
WATCH_POLL = 0.05  # seconds a socket listener's watcher waits while another call reads
TAILSCALE_IPS, CERT_DOMAINS = proto.Method.TAILSCALE_IPS, proto.Method.CERT_DOMAINS
REGISTER_LISTENER = proto.Method.REGISTER_LISTENER
UNREGISTER_LISTENER = proto.Method.UNREGISTER_LISTENER


class AsyncServer(ServerBase):
    """A tailnet node for this process, run by the tsnet2d daemon.

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
    same address; see docs/client.md, "Reconnection". Calls may run concurrently
    (from several threads, or several asyncio tasks): they share one control
    connection, each bounded by its own timeout, and while one of them reconnects
    the others wait for it. Nothing runs in the background, except one watcher per
    ``listen_socket`` (which has no accept() to notice a restart).

    Every method that needs the daemon starts the server first. Without a socket
    path those methods raise NotSupportedError (a NotImplementedError). Use it
    as a context manager to close it.
    """

    def _setup(self) -> None:
        self._start_lock = backend.Lock()
        self._closing = backend.Event()
        self._control: AsyncControlChannel | None = None
        self._pending_control: AsyncControlChannel | None = None
        self._gen = 0
        self._listeners: set[AsyncListener | AsyncSocketListener | AsyncPacketListener] = set()

    # -- lifecycle ------------------------------------------------------------

    async def start(self) -> None:
        """Connect to the daemon and send ``start`` (idempotent once it succeeded).

        Retries the connect for ``connect_timeout`` seconds (backoff 50 ms doubling
        to 1 s), then raises DaemonUnavailableError. Does not wait for the node to
        be running (``up()`` does). A failed start can be retried.
        """
        await self._start(None)

    async def _start(self, deadline: float | None) -> None:
        op = "tsnet2.start"
        async with self._start_lock:
            if self._state is ServerState.STARTED:
                return
            self._check_startable(op)
            connect_by = time.monotonic() + self.connect_timeout
            sock = await connect_channel(
                self.socket_path,
                int(proto.ChannelKind.CONTROL),
                op,
                connect_by if deadline is None else min(connect_by, deadline),
            )
            control = AsyncControlChannel(sock, self.socket_path)
            try:
                if self.join:
                    timeout = START_TIMEOUT
                    if deadline is not None:
                        timeout = min(timeout, max(0.001, deadline - time.monotonic()))
                    await control.request(op, START, self._start_params(), timeout)
            except BaseException:
                await control.aclose()
                raise
            self._control = control
            self._mark_started()
        self._log(f"tsnet2: connected to the daemon at {self.socket_path}")

    async def _rpc(
        self, op: str, method: proto.Method, params: proto.WireDocument | None,
        timeout: float | None,
    ) -> Any:
        """One RPC; if the channel dies during it, reconnect and send it once more."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for attempt in (1, 2):
            control = await self._live_control(op)
            left = None if deadline is None else max(0.001, deadline - time.monotonic())
            try:
                return await control.request(op, method, params, left)
            except DaemonUnavailableError:
                if attempt == 2 or not self.reconnects or self._state is ServerState.CLOSED:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def _live_control(self, op: str) -> AsyncControlChannel:
        """The control channel, reconnected first if the daemon went away."""
        control = self._control
        if self._state is ServerState.CLOSED or control is None:
            raise ClosedError(f"{op}: server is closed")
        if self.reconnects and not await control.alive():
            return await self._revive(op)
        return control

    # -- reconnection -----------------------------------------------------------

    async def _revive(self, op: str) -> AsyncControlChannel:
        """Return a live control channel, reconnecting if it is dead.

        One caller reconnects at a time; the others wait on the lock and then
        find the channel alive. Raises DaemonUnavailableError if the daemon does
        not come back within ``reconnect_timeout`` (or reconnection is disabled).
        """
        async with self._start_lock:
            control = self._control
            if self._state is ServerState.CLOSED or control is None:
                raise ClosedError(f"{op}: server is closed")
            if await control.alive():
                return control
            if not self.reconnects:
                raise DaemonUnavailableError(_base.gone_message(op, self.socket_path))
            return await self._reconnect_locked(op, control)

    async def _reconnect_locked(
        self, op: str, old: AsyncControlChannel
    ) -> AsyncControlChannel:
        path = self.socket_path
        reason = old.broken or "the daemon closed the control channel"
        await old.discard(reason)
        self._log(
            f"tsnet2: lost the control channel to the daemon at {path} ({reason}); "
            f"reconnecting (up to {self.reconnect_timeout:g}s)"
        )
        t0 = time.monotonic()
        control = await self._connect_and_start(op, t0 + self.reconnect_timeout)
        self._control = control
        self._gen += 1
        again, lost = await self._relisten(op, control, list(self._listeners))
        note = f", {len(lost)} lost ({'; '.join(lost)})" if lost else ""
        self._log(
            f"tsnet2: reconnected to the daemon at {path} in {time.monotonic() - t0:.2f}s; "
            f"{again} listener(s) registered again{note}"
        )
        return control

    async def _connect_and_start(self, op: str, deadline: float) -> AsyncControlChannel:
        path = self.socket_path
        delays = _base.backoff_delays()
        while True:
            try:
                sock = await connect_channel(
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
            control = AsyncControlChannel(sock, path)
            self._pending_control = control
            try:
                if self.join:
                    await control.request(op, START, self._start_params(), START_TIMEOUT)
                if any(not ln._closed for ln in self._listeners):
                    # Listeners need the node's addresses: wait until it runs.
                    await control.request(op, UP, None, START_TIMEOUT)
                return control
            except PermissionDeniedError:
                await control.aclose()
                raise  # waiting does not change our uid
            except DaemonUnavailableError as exc:  # it went away again (still shutting down?)
                await control.aclose()
                if self._closing.is_set():
                    raise ClosedError(f"{op}: server is closed") from None
                if time.monotonic() >= deadline:
                    raise DaemonUnavailableError(
                        _base.reconnect_failed_message(op, path, self.reconnect_timeout, exc)
                    ) from exc
                await self._closing.wait(
                    min(next(delays), max(0.0, deadline - time.monotonic()))
                )
            except DaemonError as exc:
                await control.aclose()
                raise DaemonUnavailableError(_base.restart_refused_message(op, path, exc)) from exc
            except BaseException:
                await control.aclose()
                if self._closing.is_set():
                    raise ClosedError(f"{op}: server is closed") from None
                raise
            finally:
                self._pending_control = None

    async def _ensure_bound(
        self, op: str, ln: AsyncListener | AsyncSocketListener | AsyncPacketListener
    ) -> None:
        """Register ``ln`` on the current connection if a reconnect missed it (a race
        with listen()); a no-op when it is already bound or lost."""
        b = ln._binding
        if b.gen == self._gen or b.lost is not None:
            return
        async with self._start_lock:
            control = self._control
            if b.gen != self._gen and b.lost is None and control is not None:
                await self._relisten(op, control, [ln])

    async def _relisten(
        self, op: str, control: AsyncControlChannel,
        listeners: list[AsyncListener | AsyncSocketListener | AsyncPacketListener],
    ) -> tuple[int, list[str]]:
        """Register listeners again on their bound addresses; return (ok, lost addrs)."""
        again, lost = 0, []
        for ln in listeners:
            if ln._closed:
                continue
            b = ln._binding
            params = _base.relisten_params(b.network, b.addr, b.forward_socket,
                                           b.forward_mode, b.tls, b.alpn)
            try:
                result = await control.request(op, REGISTER_LISTENER, params,
                                               LISTEN_TLS_TIMEOUT if b.tls else RPC_TIMEOUT)
                listener_id, bound = _base.parse_register_result(result)
                if b.tls and not result.tls:
                    await self._unregister(listener_id)
                    _base.check_tls_echo(op, self.socket_path, result)
                _base.check_relisten_addr(b.addr, bound)
            except DaemonUnavailableError:
                break  # gone again: the listeners' accept() will reconnect once more
            except Error as exc:
                b.lose(_base.relisten_failed_message(self.socket_path, b.addr, exc))
                lost.append(b.addr)
            else:
                b.rebind(listener_id, bound, self._gen)
                again += 1
            ln._wakeup.set()
        return again, lost

    async def up(self, timeout: float | None = None) -> Status:
        """Start, wait until the node is running, and return its Status.

        ``timeout`` (seconds) bounds the whole call, start included; None waits as long
        as it takes (for example, until an interactive login completes in the daemon).
        """
        op = "tsnet2.up"
        deadline = None if timeout is None else time.monotonic() + timeout
        await self._start(deadline)
        result = await self._rpc(op, UP, None, remaining(deadline))
        status = await self._local(deadline).status()
        return _base.build_status(result, status)

    def _local(self, deadline: float | None) -> AsyncLocalClient:
        timeout = _base.LOCALAPI_TIMEOUT
        if deadline is not None:
            timeout = max(0.001, deadline - time.monotonic())
        return AsyncLocalClient(
            self.socket_path, timeout=timeout, connect_timeout=self.connect_timeout
        )

    async def close(self) -> None:
        """Close listeners, tell the daemon ``close``, and drop the connection.

        Closing a server that never started is fine. A second call raises
        ClosedError. A call blocked in another thread or task fails with ClosedError.
        """
        op = "tsnet2.close"
        self._closing.set()  # interrupts a reconnect in progress
        pending = self._pending_control
        if pending is not None:
            await pending.aclose()
        async with self._start_lock:
            if self._state is ServerState.CLOSED:
                raise ClosedError(f"{op}: server already closed")
            self._state = ServerState.CLOSED
        control = self._control
        for ln in list(self._listeners):
            await ln.aclose()
        self._control = None
        if control is None:
            return
        try:
            await control.request(op, CLOSE, None, SHUTDOWN_RPC_TIMEOUT)
        except Error as exc:
            self._log(f"tsnet2: close RPC failed (ignored): {exc}")
        finally:
            await control.aclose()

    # unasync: async-only
    async def aclose(self) -> None:
        """Alias of close()."""
        await self.close()
    # unasync: end

    async def __aenter__(self) -> AsyncServer:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self.closed:
            await self.close()

    # -- inbound ----------------------------------------------------------------

    @overload
    async def listen(  # type: ignore[overload-overlap]
        self, network: Literal["udp", "udp4", "udp6"], addr: str
    ) -> AsyncPacketListener: ...

    @overload
    async def listen(self, network: str, addr: str) -> AsyncListener: ...

    async def listen(self, network: str, addr: str) -> AsyncListener | AsyncPacketListener:
        """Listen on the tailnet: ``network`` is tcp, tcp4 or tcp6; ``addr`` like ``":8080"``.

        Arguments are validated before the daemon is contacted. Port 0 lets the
        daemon pick a port (see ``Listener.addr``). With udp, udp4 or udp6 this is
        :meth:`listen_packet`.
        """
        op = "tsnet2.listen"
        if network in _base.UDP_NETWORKS:
            return await self.listen_packet(network, addr)
        _base.check_listen_args(op, network, addr)
        await self.start()
        result = await self._rpc(
            op, REGISTER_LISTENER, proto.RegisterListenerParams(network, addr), RPC_TIMEOUT
        )
        listener_id, bound = _base.parse_register_result(result)
        binding = _base.ListenerBinding(network, bound, listener_id, self._gen)
        return await self._park_listener(binding)

    async def listen_packet(self, network: str, addr: str) -> AsyncPacketListener:
        """Listen for UDP on the tailnet: ``network`` is udp, udp4 or udp6; ``addr`` like
        ``":53"`` (port 0: the daemon picks one). Returns an :class:`AsyncPacketListener`
        (``recvfrom``/``sendto``; docs/udp.md)::

            async with await srv.listen_packet("udp", ":5353") as pl:
                data, peer = await pl.recvfrom()
                await pl.sendto(data, peer)

        Raises NotSupportedError if the daemon does not relay UDP.
        """
        op = "tsnet2.listen_packet"
        _base.check_listen_args(op, network, addr, udp=True)
        await self.start()
        result = await self._rpc(
            op, REGISTER_LISTENER, proto.RegisterListenerParams(network, addr), RPC_TIMEOUT
        )
        listener_id, bound = _base.parse_register_result(result)
        if not result.max_datagram:
            await self._unregister(listener_id)
            raise _base.udp_unsupported(op, self.socket_path)
        binding = _base.ListenerBinding(network, bound, listener_id, self._gen)
        ln = AsyncPacketListener(self, binding, result.max_datagram)
        self._listeners.add(ln)
        try:
            await ln._attach(op)
        except BaseException:
            await ln.aclose()
            raise
        return ln

    async def listen_socket(
        self, network: str, addr: str, *, identity: str = "http"
    ) -> AsyncSocketListener:
        """Listen on the tailnet through a real listening Unix socket, for servers that
        accept connections themselves (uvicorn, hypercorn, gunicorn, socketserver).

        The library binds an ``AF_UNIX`` socket (mode 0600) under a unique name in the
        daemon's socket directory (the directory of ``socket_path``) and registers it:
        the daemon connects each inbound tailnet flow to it, logging the flow as any
        other. ``identity`` says what the daemon tells the app about the caller:

        - ``"http"`` (default): HTTP/1.x requests get ``Tailscale-User-Login``,
          ``Tailscale-User-Name``, ``Tsnet2-Node-Name``, ``Tsnet2-Node-Id``,
          ``X-Forwarded-For``, ``X-Forwarded-Proto`` and ``Forwarded`` headers (and any
          the caller sent under those names are removed); read them with
          :func:`tsnet2.identity_from_asgi_scope` / :func:`tsnet2.identity_from_wsgi_environ`;
        - ``"proxy"``: a PROXY protocol v2 header (caller address, identity TLVs) first;
        - ``"http+proxy"``: both (gunicorn's ``--proxy-protocol`` then sees the caller's
          address and the handler the headers);
        - ``"tcp"``: the bytes as they are.

        Returns an :class:`AsyncSocketListener`: ``.socket`` (the listening socket),
        ``.fileno()``, ``.path``, ``.port``; close it (or use it as a context manager) to
        unregister and unlink. If the daemon restarts, a background watcher registers the
        socket again on the same port. Raises NotSupportedError if the daemon is too old
        to forward to sockets, PermissionDeniedError if it refuses the socket.
        """
        op = "tsnet2.listen_socket"
        _base.check_listen_args(op, network, addr)
        if identity not in _base.SOCKET_IDENTITIES:
            raise AddressError(f"{op}: identity={identity!r}: want one of "
                               f"{', '.join(_base.SOCKET_IDENTITIES)}")
        await self.start()
        sock, path = _base.bind_forward_socket(op, self.socket_path)
        try:
            result = await self._rpc(
                op, REGISTER_LISTENER,
                proto.RegisterListenerParams(network, addr, forward_socket=path,
                                             forward_mode=identity),
                RPC_TIMEOUT,
            )
            listener_id, bound = _base.parse_register_result(result)
            if result.forward_socket != path:
                await self._unregister(listener_id)
                raise NotSupportedError(
                    f"{op}: the daemon at {self.socket_path} does not forward to sockets "
                    "(an older tsnet2d, or the prototype's); use listen() instead")
        except BaseException:
            sock.close()
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
        binding = _base.ListenerBinding(network, bound, listener_id, self._gen,
                                        forward_socket=path, forward_mode=identity)
        ln = AsyncSocketListener(self, binding, sock)
        self._listeners.add(ln)
        return ln

    async def listen_tls(
        self, network: str, addr: str, *, alpn: Sequence[str] | None = None
    ) -> AsyncListener:
        """Listen on the tailnet with TLS that the daemon terminates with the node's
        certificate (for its FQDN, issued by the tailnet CA): accepted connections carry
        plaintext, the daemon's traffic log keeps the plaintext, and this process never
        holds a key.

        ``network``/``addr`` as for :meth:`listen` (``":443"``); ``alpn`` lists the
        application protocols to offer, in preference order (``["h2", "http/1.1"]``;
        None: no ALPN). Each accepted connection's ``.tls`` is the session
        (:class:`~tsnet2.TLSInfo`: ``version``, ``cipher``, the ``sni`` the client asked
        for and the negotiated ``alpn``). Clients verify the node with the tailnet CA
        (``tailnet-ca.pem`` next to the daemon's socket; docs/tls.md)::

            ln = await srv.listen_tls("tcp", ":443", alpn=["http/1.1"])
            conn = await ln.accept()
            print(conn.tls.alpn, conn.tls.sni)   # http/1.1 web.tailnet.example
            # conn carries plaintext; the daemon decrypted it

        Raises NoCertificateError while the node has no certificate (the control server
        issues none yet), NotSupportedError if the daemon is too old to terminate TLS.
        """
        op = "tsnet2.listen_tls"
        _base.check_listen_args(op, network, addr)
        protocols = _base.check_alpn(op, alpn)
        await self.start()
        result = await self._rpc(
            op, REGISTER_LISTENER,
            proto.RegisterListenerParams(network, addr, tls=True, alpn=protocols),
            LISTEN_TLS_TIMEOUT,
        )
        listener_id, bound = _base.parse_register_result(result)
        if not result.tls:
            await self._unregister(listener_id)
            _base.check_tls_echo(op, self.socket_path, result)
        binding = _base.ListenerBinding(network, bound, listener_id, self._gen, tls=True,
                                        alpn=protocols)
        return await self._park_listener(binding)

    async def _park_listener(self, binding: _base.ListenerBinding) -> AsyncListener:
        """A new listener for a registered binding, its first accept slots parked (closed
        again if parking fails)."""
        ln = AsyncListener(self, binding, self.accept_slots)
        self._listeners.add(ln)
        try:
            await ln._park_initial()
        except BaseException:
            await ln.aclose()
            raise
        return ln

    async def _unregister(self, listener_id: str) -> None:
        control = self._control
        if control is None:
            return
        try:
            await control.request(
                "tsnet2.Listener.close",
                UNREGISTER_LISTENER,
                proto.UnregisterListenerParams(listener_id),
                SHUTDOWN_RPC_TIMEOUT,
            )
        except Error as exc:
            self._log(f"tsnet2: unregister_listener {listener_id} failed (ignored): {exc}")

    async def _control_alive(self) -> bool:
        control = self._control
        return control is not None and await control.alive()

    # -- outbound ---------------------------------------------------------------

    @overload
    async def dial(  # type: ignore[overload-overlap]
        self, network: Literal["udp", "udp4", "udp6"], addr: str, timeout: float | None = None
    ) -> AsyncPacketConn: ...

    @overload
    async def dial(self, network: str, addr: str, timeout: float | None = None) -> AsyncConn: ...

    async def dial(
        self, network: str, addr: str, timeout: float | None = None
    ) -> AsyncConn | AsyncPacketConn:
        """Connect to ``addr`` (``"host:port"``; host may be a tailnet name) through the daemon.

        With network udp, udp4 or udp6 the result is an :class:`AsyncPacketConn`, a UDP
        flow to the peer (``send``/``recv`` of whole datagrams; docs/udp.md).

        ``timeout`` bounds both connecting to the daemon socket and waiting for the
        daemon's reply; None means ``connect_timeout`` for the connect and no bound
        for the reply (the daemon gives up on its own after 30 s). Returns the
        connection: AsyncConn. Raises DialError if the daemon could not connect
        (NoSuchPeerError, PeerOfflineError when it knows why), NodeDownError while
        the node is not running.
        """
        if network in _base.UDP_NETWORKS:
            return await dial_packet(self, "tsnet2.dial", network, addr, timeout)
        sock, local, remote = await self._dial("tsnet2.dial", network, addr, timeout)
        try:
            return await backend.make_conn(sock, local, remote)
        finally:
            if sock.fileno() != -1:
                close_quietly(sock)

    async def dial_tls(
        self, network: str, addr: str, *, server_name: str | None = None,
        alpn: Sequence[str] | None = None, timeout: float | None = None,
    ) -> AsyncConn:
        """Connect to ``addr`` with TLS that the daemon originates: it verifies the peer's
        certificate against the tailnet CA, for ``server_name`` or else the dialled node's
        FQDN, and the connection carries plaintext (the traffic log keeps it, and records
        the session on the flow's ``open`` record).

        ``alpn`` lists protocols to offer; ``timeout`` as for :meth:`dial` (it bounds the
        handshake too). The connection's ``.tls`` is the session (:class:`~tsnet2.TLSInfo`,
        ``peer_name`` the verified name)::

            conn = await srv.dial_tls("tcp", "web:443", alpn=["http/1.1"])
            print(conn.tls.peer_name, conn.tls.version)   # web.tailnet.example TLSv1.3
            # conn carries plaintext; the daemon encrypts it

        Raises TLSError (a DialError) when the handshake or the verification fails (the
        message says why, like ``certificate verify failed: Hostname mismatch``), the
        errors of :meth:`dial` otherwise, NotSupportedError if the daemon is too old to
        originate TLS.
        """
        op = "tsnet2.dial_tls"
        options = _base.tls_dial_options(op, server_name, alpn)
        sock, reply, local, remote = await self._dial_flow(op, network, addr, timeout,
                                                           options)
        try:
            return await backend.make_conn(sock, local, remote, reply.tls)
        finally:
            if sock.fileno() != -1:
                close_quietly(sock)

    # unasync: async-only
    async def dial_socket(
        self, network: str, addr: str, timeout: float | None = None
    ) -> TailnetSocket:
        """Like dial(), but return the connected flow as a non-blocking TailnetSocket.

        For event-loop code that wants its own protocol on the flow, as in
        ``await loop.create_connection(factory, sock=sock, ssl=...)`` (the aiohttp
        connector in :mod:`tsnet2.integrations.aiohttp` does that). The caller owns
        the socket and must close it (handing it to a transport does).
        """
        sock, local, remote = await self._dial("tsnet2.dial", network, addr, timeout)
        try:
            conn = TailnetSocket._adopt(sock, local, remote)
        finally:
            if sock.fileno() != -1:
                close_quietly(sock)
        conn.setblocking(False)
        return conn
    # unasync: end

    async def _dial(
        self, op: str, network: str, addr: str, timeout: float | None
    ) -> tuple[socket.socket, TailnetAddr | None, TailnetAddr | None]:
        """Dial through the daemon; return the channel (its header read) and the flow's
        tailnet ends. The caller owns the socket."""
        sock, _, local, remote = await self._dial_flow(op, network, addr, timeout, None)
        return sock, local, remote

    async def _dial_flow(
        self, op: str, network: str, addr: str, timeout: float | None,
        tls: proto.TLSDialOptions | None, *, udp: bool = False,
    ) -> tuple[socket.socket, proto.DialReply, TailnetAddr | None, TailnetAddr | None]:
        """Dial through the daemon; return the channel (its header read), the daemon's
        successful reply and the flow's tailnet ends. ``tls``: a TLS dial (the reply must
        carry the session); ``udp``: a UDP dial (a udp ``network``; the reply must carry
        ``max_datagram``). The caller owns the socket."""
        _base.check_dial_args(op, network, addr, udp=udp)
        await self.start()
        if not await self._control_alive():
            await self._revive(op)  # DaemonUnavailableError if the daemon does not come back
        now = time.monotonic()
        connect_deadline = now + (self.connect_timeout if timeout is None else timeout)
        reply_deadline = None if timeout is None else now + timeout
        sock = await connect_channel(
            self.socket_path,
            int(proto.ChannelKind.DIAL),
            op,
            connect_deadline,
            payload=proto.encode_dial_request(network, addr, tls),
        )
        try:
            try:
                line = await read_header_line(sock, op, reply_deadline)
            except HeaderEOF:
                raise DaemonUnavailableError(
                    f"{op}: the daemon closed the connection without a reply"
                ) from None
            except DeadlineExceededError:
                raise DeadlineExceededError(f"{op}: no reply from the daemon in time") from None
            try:
                reply = proto.decode_dial_reply(line)
            except proto.WireError as exc:
                raise ProtocolError(f"{op}: bad dial reply: {exc}") from None
            if not reply.ok:
                raise _base.dial_error(op, reply)
            if tls is not None:
                _base.check_tls_reply(op, self.socket_path, reply)
            if udp and not reply.max_datagram:
                raise _base.udp_unsupported(op, self.socket_path)
            local = _base.parse_tailnet_addr(reply.local or "")
            remote = _base.parse_tailnet_addr(reply.remote or "")
        except BaseException:
            close_quietly(sock)
            raise
        return sock, reply, local, remote

    def http_client(self, **kwargs: Any) -> httpx.AsyncClient:
        """An ``httpx.AsyncClient`` whose connections are dials through this server.

        ``await srv.http_client().get("http://web:8080/")``: host names are tailnet names.
        ``kwargs`` go to ``httpx.AsyncClient`` (``timeout``, ``headers``, ``base_url``...),
        except the transport's (``verify``, ``cert``, ``trust_env``, ``http1``, ``http2``,
        ``limits``, ``retries``). Needs the ``httpx`` extra (``pip install
        'tsnet2[httpx]'``); see :mod:`tsnet2.integrations.httpx`. Close the client when
        done (it is a context manager); that does not close the server.
        """
        try:
            import httpx

            from tsnet2.integrations.httpx import AsyncTailnetTransport, split_client_options
        except ImportError as exc:
            raise ImportError(
                f"{type(self).__name__}.http_client() needs the 'httpx' extra ({exc}): "
                "pip install 'tsnet2[httpx]'",
                name=exc.name,
            ) from exc
        transport_options, client_options = split_client_options(kwargs)
        return httpx.AsyncClient(
            transport=AsyncTailnetTransport(self, **transport_options), **client_options
        )

    # -- queries ----------------------------------------------------------------

    async def local_client(self) -> AsyncLocalClient:
        """Start, then return a LocalClient for the daemon's LocalAPI."""
        await self.start()
        return self._local(None)

    async def tailscale_ips(self) -> tuple[IPv4Address | None, IPv6Address | None]:
        """The node's (IPv4, IPv6) tailnet addresses, asked fresh; (None, None) before start."""
        if self._state is not ServerState.STARTED:
            return None, None
        return _base.parse_tailscale_ips(
            await self._rpc("tsnet2.tailscale_ips", TAILSCALE_IPS, None, RPC_TIMEOUT)
        )

    async def cert_domains(self) -> list[str] | None:
        """DNS names this node can get TLS certificates for; None before start."""
        if self._state is not ServerState.STARTED:
            return None
        return _base.parse_cert_domains(
            await self._rpc("tsnet2.cert_domains", CERT_DOMAINS, None, RPC_TIMEOUT)
        )


class AsyncListener(_base.ListenerBase):
    """A tailnet TCP listener (from ``Server.listen``).

    Keeps ``accept_slots`` connections parked in the daemon; each inbound flow
    arrives on one of them. ``accept()`` returns connections; iterating yields
    them until the listener is closed. Use it as a context manager.

    If the daemon restarts, the server registers the listener again on the same
    address (``listener_id`` changes) and ``accept()`` parks new slots by itself.

    Attributes:
        network: "tcp", "tcp4" or "tcp6".
        addr: the bound address as the daemon reported it, like ``":8080"``.
        listener_id: the daemon's id for this listener.
        tls: True for a ``listen_tls`` listener (connections carry plaintext and ``.tls``).
    """

    def __init__(
        self, server: AsyncServer, binding: _base.ListenerBinding, slots: int
    ) -> None:
        self._binding = binding
        self._server = server
        self._k = slots
        self._slots: dict[socket.socket, str] = {}  # slot -> the listener id it was parked for
        self._wakeup = backend.Wakeup()  # makes a waiting accept() look at the state again
        self._lock = backend.Lock()
        self._closed = False
        self._retry_at = 0.0
        self._backoff = BACKOFF_INITIAL
        self._reported: set[str] = set()  # registrations whose loss accept() has raised

    # -- slots ------------------------------------------------------------------

    async def _park_one(self, op: str, timeout: float) -> None:
        listener_id = self._binding.listener_id
        sock = await connect_channel(
            self._server.socket_path,
            int(proto.ChannelKind.ACCEPT),
            op,
            time.monotonic() + timeout,
            payload=proto.encode_accept_request(listener_id),
        )
        self._slots[sock] = listener_id

    async def _park_initial(self) -> None:
        while len(self._slots) < self._k:
            await self._park_one("tsnet2.listen", SLOT_CONNECT_TIMEOUT)

    def _gone(self, op: str) -> DaemonUnavailableError:
        return DaemonUnavailableError(
            f"{op}: the daemon went away, so listener {self.addr} is gone and "
            "reconnect_timeout is 0; start a new Server (or set reconnect_timeout > 0)"
        )

    async def _revive(self, op: str) -> None:
        """The daemon went away: have the server reconnect (and re-register us)."""
        if not self._server.reconnects:
            raise self._gone(op)
        await self._server._revive(op)
        await self._server._ensure_bound(op, self)

    def _check_binding(self) -> None:
        """Raise if the listener was lost; drop slots parked for an earlier registration."""
        b = self._binding
        if b.lost is not None:
            raise DaemonUnavailableError(b.lost)
        if b.slots_stale():
            for sock in list(self._slots):
                del self._slots[sock]
                close_quietly(sock)
            b.mark_slots_current()
            self._retry_at = 0.0
            self._backoff = BACKOFF_INITIAL

    async def _refill(self, op: str, *, revive: bool = True) -> None:
        """Park slots up to K, unless a retry is scheduled for later."""
        while len(self._slots) < self._k and time.monotonic() >= self._retry_at:
            try:
                await self._park_one(op, REPARK_CONNECT_TIMEOUT)
            except DaemonUnavailableError:
                self._schedule_retry()
                if revive and not await self._server._control_alive():
                    await self._revive(op)
                return

    def _schedule_retry(self) -> None:
        self._retry_at = time.monotonic() + self._backoff
        self._backoff = min(self._backoff * 2, REPARK_BACKOFF_MAX)

    async def _take(self, sock: socket.socket, op: str) -> AsyncConn | None:
        """Read the accept header from a readable slot; None if the daemon dropped it."""
        slot_id = self._slots.pop(sock)
        try:
            try:
                line = await read_header_line(
                    sock, op, time.monotonic() + SLOT_CONNECT_TIMEOUT
                )
            except (HeaderEOF, DaemonUnavailableError):
                self._server._log(
                    f"tsnet2: daemon dropped an accept slot of {self.addr}; re-parking"
                )
                self._schedule_retry()
                if not await self._server._control_alive():
                    await self._revive(op)
                else:
                    await self._server._ensure_bound(op, self)
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
            except proto.WireError as exc:
                raise ProtocolError(f"{op}: bad accept header: {exc}") from None
            if header.listener_id and header.listener_id != slot_id:
                raise ProtocolError(
                    f"{op}: accept header names listener {header.listener_id}, want {slot_id}"
                )
            local = _base.parse_tailnet_addr(header.local)
            remote = _base.parse_tailnet_addr(header.remote)
            self._backoff = BACKOFF_INITIAL
            return await backend.make_conn(sock, local, remote, header.tls)
        finally:
            if sock.fileno() != -1:
                close_quietly(sock)

    # -- public -------------------------------------------------------------------

    async def accept(self, timeout: float | None = None) -> AsyncConn:
        """Wait for the next inbound connection and return it.

        ``timeout`` in seconds (None waits forever) raises DeadlineExceededError.
        Raises ClosedError once the listener (or its server) is closed. If the
        daemon restarts, accept() waits for the server to reconnect and goes on
        (a reconnect in progress may hold it up to ``reconnect_timeout``); it raises
        DaemonUnavailableError if the daemon does not come back in time or the
        listener could not be registered again.
        """
        op = "tsnet2.accept"
        deadline = None if timeout is None else time.monotonic() + timeout
        async with self._lock:
            while True:
                if self._closed:
                    raise ClosedError(f"{op}: listener {self.addr} is closed")
                self._check_binding()
                await self._refill(op)
                wait = remaining(deadline)
                if len(self._slots) < self._k:
                    until_retry = max(0.0, self._retry_at - time.monotonic())
                    wait = until_retry if wait is None else min(wait, until_retry)
                ready = await backend.wait_readable(list(self._slots), wait, self._wakeup)
                for sock in ready:
                    if self._closed:
                        break
                    if sock not in self._slots:
                        continue  # dropped earlier in this round
                    conn = await self._take(sock, op)
                    if conn is None:
                        break  # a dropped slot (perhaps a restart): look again
                    with contextlib.suppress(DaemonUnavailableError):
                        await self._refill(op, revive=False)  # else the next accept() sees it
                    return conn
                if deadline is not None and time.monotonic() >= deadline and not self._closed:
                    raise DeadlineExceededError(f"{op}: no connection within {timeout}s")

    def __aiter__(self) -> AsyncIterator[AsyncConn]:
        """Yield accepted connections until the listener is closed."""
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[AsyncConn]:
        while True:
            try:
                yield await self.accept()
            except ClosedError:
                return

    async def aclose(self) -> None:
        """Unregister the listener and release every parked slot (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._wakeup.set()
        await self._server._unregister(self.listener_id)
        async with self._lock:
            for sock in list(self._slots):
                del self._slots[sock]
                close_quietly(sock)
            self._wakeup.close()
        self._server._listeners.discard(self)

    # unasync: async-only
    async def close(self) -> None:
        """Alias of aclose()."""
        await self.aclose()
    # unasync: end

    async def __aenter__(self) -> AsyncListener:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


class AsyncSocketListener(_base.ListenerBase):
    """A tailnet port whose flows the daemon connects to a Unix socket this process
    listens on (from ``Server.listen_socket``): give ``.socket`` (or ``.fileno()``, or
    ``.path``) to a server that accepts connections itself.

    While it is open, a background watcher (a task in the asyncio face, a daemon thread
    in the sync face) notices when the daemon goes away and registers the socket again
    once it is back, as ``accept()`` does for a :class:`AsyncListener`.

    Attributes:
        socket: the listening ``AF_UNIX`` socket (``socket.socket``), mode 0600.
        path: its path, in the daemon's socket directory.
        identity: what the daemon adds to each flow: "http", "proxy", "http+proxy", "tcp".
        network, addr, port, listener_id: as for a Listener.
    """

    def __init__(self, server: AsyncServer, binding: _base.ListenerBinding,
                 sock: socket.socket) -> None:
        self._binding = binding
        self._server = server
        self._slots: tuple[()] = ()
        self._closed = False
        self._wakeup = backend.Wakeup()
        self.socket = sock
        self.path = binding.forward_socket
        self.identity = binding.forward_mode
        self._watcher = backend.Background(self._watch, f"tsnet2 listen_socket {self.path}")

    def fileno(self) -> int:
        """The listening socket's descriptor (for ``fd://N`` style options)."""
        return self.socket.fileno()

    async def _watch(self) -> None:
        """Wait for the control channel to end; then reconnect and register again."""
        op = "tsnet2.listen_socket"
        server = self._server
        delay = BACKOFF_INITIAL
        while not self._closed:
            control = server._control
            if control is None:
                return
            ready = await backend.wait_readable([control._sock], None, self._wakeup)
            if self._closed:
                return
            if not ready:
                continue  # woken: registered again, or closing
            if await control.alive():
                await backend.sleep(WATCH_POLL)  # a reply another call will read
                continue
            try:
                await self._server._revive(op)
                await self._server._ensure_bound(op, self)
                delay = BACKOFF_INITIAL
            except ClosedError:
                return
            except Error as exc:
                if self._binding.lost is not None:
                    server._log(f"tsnet2: {self._binding.lost}")
                    return
                server._log(f"tsnet2: {op} {self.addr}: {exc}; trying again in {delay:g}s")
                await backend.sleep(delay)
                delay = min(delay * 2, REPARK_BACKOFF_MAX)

    async def aclose(self) -> None:
        """Unregister the port, close the socket and remove its file (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._wakeup.set()
        self._server._listeners.discard(self)
        if self._binding.lost is None and await self._server._control_alive():
            await self._server._unregister(self.listener_id)
        self.socket.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        await self._watcher.join()
        self._wakeup.close()

    # unasync: async-only
    async def close(self) -> None:
        """Alias of aclose()."""
        await self.aclose()
    # unasync: end

    async def __aenter__(self) -> AsyncSocketListener:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
