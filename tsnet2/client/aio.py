"""The asyncio face: :class:`AsyncServer`, :class:`AsyncListener`, :class:`AsyncConn`."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from types import TracebackType
from typing import Any

from tsnet2 import proto
from tsnet2.client import _base
from tsnet2.client._aio_io import (
    AsyncControl,
    close_writer,
    open_channel,
    read_header,
)
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
    TailnetAddr,
)
from tsnet2.client.aio_local import AsyncLocalClient
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

__all__ = ["AsyncConn", "AsyncListener", "AsyncServer"]


class AsyncConn:
    """A connection to a tailnet peer as asyncio streams (from ``dial`` or ``accept``).

    Attributes:
        reader: an :class:`asyncio.StreamReader` of the peer's bytes.
        writer: an :class:`asyncio.StreamWriter`; ``writer.write_eof()`` half-closes.
        tailnet_local: our end as ``(ip_address, port)``, or None if unknown.
        tailnet_remote: the peer's end as ``(ip_address, port)``, or None if unknown.
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        tailnet_local: TailnetAddr | None,
        tailnet_remote: TailnetAddr | None,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.tailnet_local = tailnet_local
        self.tailnet_remote = tailnet_remote

    def __repr__(self) -> str:
        return (
            f"<AsyncConn tailnet_local={self.tailnet_local} tailnet_remote={self.tailnet_remote}>"
        )

    def close(self) -> None:
        """Start closing the connection (see wait_closed)."""
        self.writer.close()

    async def wait_closed(self) -> None:
        """Wait until the connection is closed (connection errors are ignored)."""
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()

    async def __aenter__(self) -> AsyncConn:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
        await self.wait_closed()


class AsyncServer(ServerBase):
    """asyncio version of :class:`tsnet2.Server`: same fields, awaitable methods.

    Fields (keyword arguments): dir, hostname, control_url, auth_key, ephemeral,
    socket_path (default $TSNET2_SOCKET), traffic_log_path, advertise_tags, port,
    store, logf, user_logf, tun, connect_timeout, accept_slots, reconnect_timeout, join;
    see ``help(tsnet2.Server)``. Use ``async with tsnet2.AsyncServer(...) as srv``.
    The control channel's reader task belongs to the server: created by start(),
    replaced (the old one awaited) when the server reconnects to a restarted
    daemon, cancelled and awaited by close(). Reconnection happens lazily, in the
    next call or in ``AsyncListener.accept()``; no task runs in the background.
    """

    def _setup(self) -> None:
        self._start_lock = asyncio.Lock()
        self._closing = asyncio.Event()
        self._control: AsyncControl | None = None
        self._pending_control: AsyncControl | None = None
        self._gen = 0
        self._listeners: set[AsyncListener] = set()

    async def start(self) -> None:
        """Connect to the daemon and send ``start`` (idempotent once it succeeded).

        Retries the connect for ``connect_timeout`` seconds, then raises
        DaemonUnavailableError. A failed start can be retried.
        """
        op = "tsnet2.start"
        async with self._start_lock:
            if self._state is State.STARTED:
                return
            self._check_startable(op)
            loop = asyncio.get_running_loop()
            reader, writer = await open_channel(
                self.socket_path,
                int(proto.ChannelKind.CONTROL),
                op,
                loop.time() + self.connect_timeout,
            )
            control = AsyncControl(reader, writer, self.socket_path)
            try:
                if self.join:
                    resp = await control.call(op, "start", self._start_params(), START_TIMEOUT)
                    _base.rpc_result(op, "start", resp)
            except BaseException:
                await control.aclose()
                raise
            self._control = control
            self._mark_started()
        self._log(f"tsnet2: connected to the daemon at {self.socket_path}")

    async def _rpc(
        self, op: str, method: str, params: dict[str, Any] | None, timeout: float | None
    ) -> dict[str, Any]:
        """One RPC; if the channel dies during it, reconnect and send it once more."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        for attempt in (1, 2):
            control = await self._live_control(op)
            remaining = None if deadline is None else max(0.001, deadline - loop.time())
            try:
                resp = await control.call(op, method, params, remaining)
            except DaemonUnavailableError:
                if attempt == 2 or not self.reconnects or self._state is State.CLOSED:
                    raise
                continue
            return _base.rpc_result(op, method, resp)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _live_control(self, op: str) -> AsyncControl:
        """The control channel, reconnected first if the daemon went away."""
        control = self._control
        if self._state is State.CLOSED or control is None:
            raise ClosedError(f"{op}: server is closed")
        if self.reconnects and control.broken is not None:
            return await self._revive(op)
        return control

    # -- reconnection -----------------------------------------------------------

    async def _revive(self, op: str) -> AsyncControl:
        """Return a live control channel, reconnecting if the reader task saw it die.

        One task reconnects at a time; others wait on the lock and then find the
        channel alive. Raises DaemonUnavailableError if the daemon does not come
        back within ``reconnect_timeout`` (or reconnection is disabled).
        """
        async with self._start_lock:
            control = self._control
            if self._state is State.CLOSED or control is None:
                raise ClosedError(f"{op}: server is closed")
            if control.broken is None:
                return control
            if not self.reconnects:
                raise DaemonUnavailableError(_base.gone_message(op, self.socket_path))
            return await self._reconnect_locked(op, control)

    async def _reconnect_locked(self, op: str, old: AsyncControl) -> AsyncControl:
        loop = asyncio.get_running_loop()
        path = self.socket_path
        reason = old.broken or "the daemon closed the control channel"
        await old.discard(reason)  # its reader task has ended; awaited here
        self._log(
            f"tsnet2: lost the control channel to the daemon at {path} ({reason}); "
            f"reconnecting (up to {self.reconnect_timeout:g}s)"
        )
        t0 = loop.time()
        control = await self._connect_and_start(op, t0 + self.reconnect_timeout)
        self._control = control
        self._gen += 1
        again, lost = await self._relisten(op, control, list(self._listeners))
        note = f", {len(lost)} lost ({'; '.join(lost)})" if lost else ""
        self._log(
            f"tsnet2: reconnected to the daemon at {path} in {loop.time() - t0:.2f}s; "
            f"{again} listener(s) registered again{note}"
        )
        return control

    async def _connect_and_start(self, op: str, deadline: float) -> AsyncControl:
        loop = asyncio.get_running_loop()
        path = self.socket_path
        delays = _base.backoff_delays()
        while True:
            try:
                reader, writer = await open_channel(
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
            control = AsyncControl(reader, writer, path)
            self._pending_control = control
            try:
                if self.join:
                    resp = await control.call(op, "start", self._start_params(), START_TIMEOUT)
                    _base.rpc_result(op, "start", resp)
                if any(not ln._closed for ln in self._listeners):
                    # Listeners need the node's addresses: wait until it runs.
                    _base.rpc_result(op, "up", await control.call(op, "up", None, START_TIMEOUT))
                return control
            except PermissionDeniedError:
                await control.aclose()
                raise  # waiting does not change our uid
            except DaemonUnavailableError as exc:  # it went away again (still shutting down?)
                await control.aclose()
                if self._closing.is_set():
                    raise ClosedError(f"{op}: server is closed") from None
                if loop.time() >= deadline:
                    raise DaemonUnavailableError(
                        _base.reconnect_failed_message(op, path, self.reconnect_timeout, exc)
                    ) from exc
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(next(delays), max(0.0, deadline - loop.time()))):
                        await self._closing.wait()
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

    async def _ensure_bound(self, op: str, ln: AsyncListener) -> None:
        """Register ``ln`` on the current connection if a reconnect missed it."""
        b = ln._binding
        if b.gen == self._gen or b.lost is not None:
            return
        async with self._start_lock:
            control = self._control
            if b.gen != self._gen and b.lost is None and control is not None:
                await self._relisten(op, control, [ln])

    async def _relisten(
        self, op: str, control: AsyncControl, listeners: list[AsyncListener]
    ) -> tuple[int, list[str]]:
        """Register listeners again on their bound addresses; return (ok, lost addrs)."""
        again, lost = 0, []
        for ln in listeners:
            if ln._closed:
                continue
            b = ln._binding
            params = _base.relisten_params(b.network, b.addr)
            try:
                resp = await control.call(op, "register_listener", params, RPC_TIMEOUT)
                listener_id, bound = _base.parse_register_result(
                    _base.rpc_result(op, "register_listener", resp)
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
        return again, lost

    async def up(self, timeout: float | None = None) -> Status:
        """Start, wait until the node is running, and return its Status (``timeout`` in s)."""
        op = "tsnet2.up"
        try:
            async with asyncio.timeout(timeout):
                await self.start()
                result = await self._rpc(op, "up", None, None)
                raw = await self._local().status()
        except TimeoutError as exc:
            if isinstance(exc, Error):
                raise
            raise DeadlineExceededError(f"{op}: node not running within {timeout}s") from None
        return _base.build_status(result, raw)

    def _local(self) -> AsyncLocalClient:
        return AsyncLocalClient(self.socket_path, connect_timeout=self.connect_timeout)

    async def close(self) -> None:
        """Close listeners, tell the daemon ``close``, stop the reader task, drop the connection.

        Closing a server that never started is fine; a second call raises ClosedError.
        """
        op = "tsnet2.close"
        self._closing.set()  # interrupts a reconnect in progress
        pending = self._pending_control
        if pending is not None:
            await pending.aclose()
        async with self._start_lock:
            if self._state is State.CLOSED:
                raise ClosedError(f"{op}: server already closed")
            self._state = State.CLOSED
        control = self._control
        for ln in list(self._listeners):
            await ln.close()
        self._control = None
        if control is None:
            return
        try:
            await control.call(op, "close", None, SHUTDOWN_RPC_TIMEOUT)
        except Error as exc:
            self._log(f"tsnet2: close RPC failed (ignored): {exc}")
        finally:
            await control.aclose()

    async def aclose(self) -> None:
        """Alias of close()."""
        await self.close()

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

    async def listen(self, network: str, addr: str) -> AsyncListener:
        """Listen on the tailnet (tcp/tcp4/tcp6, ``addr`` like ``":8080"``)."""
        op = "tsnet2.listen"
        _base.check_listen_args(op, network, addr)
        await self.start()
        result = await self._rpc(
            op, "register_listener", {"network": network, "addr": addr}, RPC_TIMEOUT
        )
        listener_id, bound = _base.parse_register_result(result)
        binding = _base.ListenerBinding(network, bound, listener_id, self._gen)
        ln = AsyncListener(self, binding, self.accept_slots)
        self._listeners.add(ln)
        try:
            await ln._park_initial()
        except BaseException:
            await ln.close()
            raise
        return ln

    async def listen_tls(self, network: str, addr: str) -> AsyncListener:
        """Not implemented: always raises NotSupportedError."""
        raise NotSupportedError("tsnet2.listen_tls: not implemented")

    async def _unregister(self, listener_id: str) -> None:
        control = self._control
        if control is None:
            return
        try:
            await control.call(
                "tsnet2.AsyncListener.close",
                "unregister_listener",
                {"listener_id": listener_id},
                SHUTDOWN_RPC_TIMEOUT,
            )
        except Error as exc:
            self._log(f"tsnet2: unregister_listener {listener_id} failed (ignored): {exc}")

    def _gone_event(self) -> asyncio.Event | None:
        return self._control.gone if self._control is not None else None

    def _control_alive(self) -> bool:
        control = self._control
        return control is not None and control.broken is None

    async def dial(self, network: str, addr: str, timeout: float | None = None) -> AsyncConn:
        """Connect to ``addr`` (``"host:port"``) through the daemon; return an AsyncConn.

        ``timeout`` bounds both the socket connect and the daemon's reply.
        Raises DialError if the daemon could not connect.
        """
        op = "tsnet2.dial"
        _base.check_dial_args(op, network, addr)
        await self.start()
        if not self._control_alive():
            await self._revive(op)  # DaemonUnavailableError if the daemon does not come back
        loop = asyncio.get_running_loop()
        now = loop.time()
        reader, writer = await open_channel(
            self.socket_path,
            int(proto.ChannelKind.DIAL),
            op,
            now + (self.connect_timeout if timeout is None else timeout),
            payload=proto.encode_dial_request(network, addr),
        )
        ok = False
        try:
            try:
                async with asyncio.timeout_at(None if timeout is None else now + timeout):
                    await writer.drain()
                    line = await read_header(reader, op)
            except TimeoutError as exc:
                if isinstance(exc, Error):
                    raise
                raise DeadlineExceededError(f"{op}: no reply from the daemon in time") from None
            except OSError as exc:
                if isinstance(exc, Error):
                    raise
                raise DaemonUnavailableError(
                    f"{op}: connection to the daemon failed: {exc}"
                ) from exc
            if line is None:
                raise DaemonUnavailableError(
                    f"{op}: the daemon closed the connection without a reply"
                )
            try:
                reply = proto.decode_dial_reply(line)
            except proto.ProtocolError as exc:
                raise ProtocolError(f"{op}: bad dial reply: {exc}") from None
            if not reply.ok:
                raise _base.dial_error(op, reply)
            conn = AsyncConn(
                reader,
                writer,
                _base.parse_tailnet_addr(reply.local or ""),
                _base.parse_tailnet_addr(reply.remote or ""),
            )
            ok = True
            return conn
        finally:
            if not ok:
                await close_writer(writer)

    async def local_client(self) -> AsyncLocalClient:
        """Start, then return an AsyncLocalClient for the daemon's LocalAPI."""
        await self.start()
        return self._local()

    async def tailscale_ips(self) -> tuple[IPv4Address | None, IPv6Address | None]:
        """The node's (IPv4, IPv6) tailnet addresses, asked fresh; (None, None) before start."""
        if self._state is not State.STARTED:
            return None, None
        return _base.parse_tailscale_ips(
            await self._rpc("tsnet2.tailscale_ips", "tailscale_ips", None, RPC_TIMEOUT)
        )

    async def cert_domains(self) -> list[str] | None:
        """DNS names this node can get TLS certificates for; None before start."""
        if self._state is not State.STARTED:
            return None
        return _base.parse_cert_domains(
            await self._rpc("tsnet2.cert_domains", "cert_domains", None, RPC_TIMEOUT)
        )


@dataclass(eq=False)
class _Slot:
    """One parked accept connection, and the listener id it was parked for."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    listener_id: str
    header: bytes | None = None
    eof: bool = False


class AsyncListener(_base.ListenerBase):
    """asyncio version of :class:`tsnet2.Listener` (from ``AsyncServer.listen``).

    ``await accept()`` returns an AsyncConn; ``async for conn in listener`` yields
    connections until the listener is closed. If the daemon restarts, accept()
    has the server reconnect, and goes on with the listener registered again on
    the same address (``listener_id`` changes).

    Attributes:
        network: "tcp", "tcp4" or "tcp6".
        addr: the bound address as the daemon reported it, like ``":8080"``.
        listener_id: the daemon's id for this listener.
    """

    def __init__(self, server: AsyncServer, binding: _base.ListenerBinding, slots: int) -> None:
        self._binding = binding
        self._server = server
        self._k = slots
        self._slots: list[_Slot] = []
        self._lock = asyncio.Lock()
        self._closed = False
        self._closed_event = asyncio.Event()
        self._retry_at = 0.0
        self._backoff = BACKOFF_INITIAL
        self._reported: set[str] = set()  # registrations whose loss accept() has raised

    async def _park_one(self, op: str, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        listener_id = self._binding.listener_id
        reader, writer = await open_channel(
            self._server.socket_path,
            int(proto.ChannelKind.ACCEPT),
            op,
            loop.time() + timeout,
            payload=proto.encode_accept_request(listener_id),
        )
        self._slots.append(_Slot(reader, writer, listener_id))
        with contextlib.suppress(OSError):  # the slot then reads EOF and is re-parked
            await writer.drain()

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

    async def _check_binding(self, op: str) -> None:
        """Raise if the listener was lost; drop slots parked for an earlier registration."""
        b = self._binding
        if b.lost is not None:
            raise DaemonUnavailableError(b.lost)
        if b.slots_stale():
            slots, self._slots = self._slots, []
            for slot in slots:
                await close_writer(slot.writer)
            b.mark_slots_current()
            self._retry_at = 0.0
            self._backoff = BACKOFF_INITIAL

    def _schedule_retry(self) -> None:
        self._retry_at = asyncio.get_running_loop().time() + self._backoff
        self._backoff = min(self._backoff * 2, REPARK_BACKOFF_MAX)

    async def _refill(self, op: str, *, revive: bool = True) -> None:
        loop = asyncio.get_running_loop()
        while len(self._slots) < self._k and loop.time() >= self._retry_at:
            try:
                await self._park_one(op, REPARK_CONNECT_TIMEOUT)
            except DaemonUnavailableError:
                self._schedule_retry()
                if revive and not self._server._control_alive():
                    await self._revive(op)
                return

    @staticmethod
    async def _read_slot(slot: _Slot, op: str) -> None:
        try:
            line = await read_header(slot.reader, op)
        except DaemonUnavailableError:  # reset: as good as EOF
            line = None
        if line is None:
            slot.eof = True
        else:
            slot.header = line

    async def _finish(self, slot: _Slot, op: str) -> AsyncConn | None:
        self._slots.remove(slot)
        try:
            assert slot.header is not None
            try:
                header = proto.decode_accept_header(slot.header)
            except proto.ChannelRefused as exc:
                # The daemon closed the slot with a reason (its node went away): say so once
                # per registration; the next accept() reconnects and registers again.
                self._schedule_retry()
                if slot.listener_id in self._reported:
                    await close_writer(slot.writer)
                    return None
                self._reported.add(slot.listener_id)
                raise (_base.refused_error(f"{op}: {exc}", exc.code)
                       or DaemonUnavailableError(f"{op}: {exc}")) from None
            except proto.ProtocolError as exc:
                raise ProtocolError(f"{op}: bad accept header: {exc}") from None
            if header.listener_id and header.listener_id != slot.listener_id:
                raise ProtocolError(
                    f"{op}: accept header names listener {header.listener_id}, "
                    f"want {slot.listener_id}"
                )
            conn = AsyncConn(
                slot.reader,
                slot.writer,
                _base.parse_tailnet_addr(header.local),
                _base.parse_tailnet_addr(header.remote),
            )
        except BaseException:
            await close_writer(slot.writer)
            raise
        self._backoff = BACKOFF_INITIAL
        with contextlib.suppress(DaemonUnavailableError):  # the next accept() reports it
            await self._refill(op, revive=False)
        return conn

    async def _drop_dead(self, op: str) -> bool:
        """Close slots the daemon dropped; True if there were any."""
        dead = [s for s in self._slots if s.eof]
        for slot in dead:
            self._slots.remove(slot)
            await close_writer(slot.writer)
            self._server._log(f"tsnet2: daemon dropped an accept slot of {self.addr}; re-parking")
            self._schedule_retry()
        return bool(dead)

    async def accept(self, timeout: float | None = None) -> AsyncConn:
        """Wait for the next inbound connection (``timeout`` in seconds, None = forever).

        Raises ClosedError once the listener is closed, DeadlineExceededError on timeout.
        If the daemon restarts, accept() has the server reconnect and goes on (a
        reconnect may hold it up to ``reconnect_timeout``); it raises
        DaemonUnavailableError if the daemon does not come back in time or the
        listener could not be registered again.
        """
        op = "tsnet2.accept"
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        async with self._lock:
            while True:
                if self._closed:
                    raise ClosedError(f"{op}: listener {self.addr} is closed")
                await self._check_binding(op)
                ready = next((s for s in self._slots if s.header is not None), None)
                if ready is not None:
                    conn = await self._finish(ready, op)
                    if conn is None:
                        continue  # a slot closed for a loss already reported
                    return conn
                gone = self._server._gone_event()
                if gone is None:
                    raise ClosedError(f"{op}: server is closed")
                if gone.is_set():
                    await self._revive(op)
                    continue
                await self._refill(op)
                wait = None if deadline is None else max(0.0, deadline - loop.time())
                if len(self._slots) < self._k:
                    until_retry = max(0.0, self._retry_at - loop.time())
                    wait = until_retry if wait is None else min(wait, until_retry)
                await self._wait_any(op, gone, wait)
                if await self._drop_dead(op) and not gone.is_set():
                    await self._server._ensure_bound(op, self)
                if (
                    deadline is not None
                    and loop.time() >= deadline
                    and not self._closed
                    and not gone.is_set()
                    and not any(s.header is not None for s in self._slots)
                ):
                    raise DeadlineExceededError(f"{op}: no connection within {timeout}s")

    async def _wait_any(self, op: str, gone: asyncio.Event, wait: float | None) -> None:
        """Wait until a slot has a header or EOF, the listener closes, or the daemon goes."""
        readers = {asyncio.ensure_future(self._read_slot(s, op)): s for s in self._slots}
        watchers = [
            asyncio.ensure_future(self._closed_event.wait()),
            asyncio.ensure_future(gone.wait()),
        ]
        tasks = [*readers, *watchers]
        try:
            await asyncio.wait(tasks, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.wait(tasks)
        for t, slot in readers.items():
            exc = None if t.cancelled() else t.exception()
            if exc is not None:
                self._slots.remove(slot)
                await close_writer(slot.writer)
                self._schedule_retry()
                raise exc

    def __aiter__(self) -> AsyncIterator[AsyncConn]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[AsyncConn]:
        while True:
            try:
                yield await self.accept()
            except ClosedError:
                return

    async def close(self) -> None:
        """Unregister the listener and release every parked slot (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._closed_event.set()
        await self._server._unregister(self.listener_id)
        async with self._lock:
            slots, self._slots = self._slots, []
            for slot in slots:
                await close_writer(slot.writer)
        self._server._listeners.discard(self)

    async def __aenter__(self) -> AsyncListener:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
