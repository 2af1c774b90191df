"""The control channel (0x01): concurrent RPCs over one connection, matched by id.

No task or thread reads in the background. A caller waiting for its reply becomes the
*reader* if nobody else is reading: it reads one chunk, files every reply in it under its
id, wakes the other waiters, and gives the reader role up. So any number of callers (tasks
in the asyncio face, threads in the sync face) share one connection, each bounded by its
own timeout: a slow ``up()`` does not hold back another caller's ``tailscale_ips()``.
"""

from __future__ import annotations

import socket
import time
from typing import Any

from tsnet2 import proto
from tsnet2.client import _backend_async as backend
from tsnet2.client._async.channel import close_when_idle, remaining, send_all
from tsnet2.client._base import refused_error, rpc_result
from tsnet2.client.errors import ClosedError, DaemonUnavailableError, DeadlineExceededError


class AsyncControlChannel:
    """Send control RPCs over one socket and match replies by id.

    A timeout cancels the pending id in the sans-IO core, so a late reply is dropped
    there. When the connection drops, every waiting and later call raises
    DaemonUnavailableError (ClosedError once :meth:`aclose` was called).
    """

    def __init__(self, sock: socket.socket, path: str) -> None:
        self._sock = sock
        self._path = path
        self._core = proto.ControlClientCore()
        self._cond = backend.Condition()  # guards everything below and the core
        self._send_lock = backend.Lock()
        self._replies: dict[int, proto.Response] = {}
        self._reading = False
        self._broken: str | None = None
        self._refused = ""  # the code of the daemon's reason for closing, if it gave one
        self._closing = False

    @property
    def broken(self) -> str | None:
        """Why the channel is unusable, or None while it works (as far as we know)."""
        return self._broken

    async def alive(self) -> bool:
        """Whether the channel still works; reads what the daemon sent meanwhile (late
        replies, or the reason it hangs up) without waiting."""
        if self._broken is not None or self._closing:
            return False
        async with self._cond:
            if not self._reading:
                while self._broken is None:
                    try:
                        chunk = self._sock.recv(65536)
                    except BlockingIOError:
                        break
                    except OSError as exc:
                        self._broken = str(exc)
                        break
                    self._file(chunk)
                    if not chunk:
                        break
                self._cond.notify_all()
        return self._broken is None

    def _file(self, chunk: bytes) -> None:
        """Feed a chunk to the core and file the replies (the caller holds the lock)."""
        try:
            responses = self._core.receive_data(chunk)
        except proto.ChannelRefused as exc:  # the daemon said why it hangs up
            self._refused = exc.code or str(proto.ErrorCode.OTHER)
            self._broken = str(exc)
            return
        except proto.WireError as exc:
            self._broken = (
                "the daemon closed the connection" if not chunk else f"protocol error: {exc}"
            )
            return
        for resp in responses:
            self._replies[resp.id] = resp

    def _error(self, op: str) -> Exception:
        if self._closing:
            return ClosedError(f"{op}: server is closed")
        if self._refused:
            return refused_error(f"{op}: {self._broken}", self._refused) or \
                DaemonUnavailableError(f"{op}: {self._broken}")
        return DaemonUnavailableError(
            f"{op}: control channel to the daemon at {self._path} closed: {self._broken}"
        )

    async def request(
        self, op: str, method: proto.Method, params: proto.WireDocument | None,
        timeout: float | None,
    ) -> Any:
        """One RPC: its typed result (``tsnet2.proto.methods``), or the typed error the
        daemon's reply names (see :func:`tsnet2.client._base.rpc_result`)."""
        return rpc_result(op, method, await self.call(op, method, params, timeout))

    async def call(
        self, op: str, method: proto.Method, params: proto.WireDocument | None,
        timeout: float | None,
    ) -> proto.Response:
        """Send one request and wait (at most ``timeout`` seconds) for its reply."""
        deadline = None if timeout is None else time.monotonic() + timeout
        doc = proto.encode_params(method, params)  # the one definition of the method's params
        async with self._cond:
            if self._closing or self._broken is not None:
                raise self._error(op)
            req_id, data = self._core.request(method, doc)
        try:
            try:
                async with self._send_lock:
                    await send_all(self._sock, data, op, deadline)
            except DeadlineExceededError:
                raise DeadlineExceededError(
                    f"{op}: no reply from the daemon to {method!r} in time"
                ) from None
            except OSError as exc:
                async with self._cond:
                    self._broken = self._broken or str(exc)
                    self._cond.notify_all()
                raise self._error(op) from exc
            return await self._wait_reply(op, method, req_id, deadline)
        finally:
            async with self._cond:
                self._core.cancel(req_id)
                self._replies.pop(req_id, None)

    async def _wait_reply(
        self, op: str, method: str, req_id: int, deadline: float | None
    ) -> proto.Response:
        while True:
            async with self._cond:
                while True:
                    resp = self._replies.pop(req_id, None)
                    if resp is not None:
                        return resp
                    if self._closing or self._broken is not None:
                        raise self._error(op)
                    left = remaining(deadline)
                    if left == 0:
                        raise DeadlineExceededError(
                            f"{op}: no reply from the daemon to {method!r} in time"
                        )
                    if not self._reading:
                        self._reading = True  # our turn to read for everyone
                        break
                    await self._cond.wait(left)
            chunk: bytes | None = None
            failure: str | None = None
            try:
                if await backend.wait_readable([self._sock], remaining(deadline)):
                    chunk = self._sock.recv(65536)
            except BlockingIOError:
                pass
            except OSError as exc:
                failure = str(exc)
            finally:
                async with self._cond:
                    self._reading = False
                    if failure is not None:
                        self._broken = self._broken or failure
                    elif chunk is not None:
                        self._file(chunk)
                    self._cond.notify_all()

    async def discard(self, reason: str) -> None:
        """Drop a dead connection being replaced; later calls raise DaemonUnavailableError."""
        self._broken = self._broken or reason
        await self._shut()

    async def aclose(self) -> None:
        """Close the connection; a call waiting in another task fails with ClosedError."""
        self._closing = True
        await self._shut()

    async def _shut(self) -> None:
        await close_when_idle(self._sock, self._cond, lambda: self._reading)
