"""The blocking control channel (0x01): one connection, calls serialised by a lock."""

from __future__ import annotations

import contextlib
import select
import socket
import threading
import time
from typing import Any

from tsnet2 import proto
from tsnet2.client._base import refused_error
from tsnet2.client._sockets import close_quietly, peek_eof
from tsnet2.client.errors import (
    ClosedError,
    DaemonUnavailableError,
    DeadlineExceededError,
    ProtocolError,
)


class SyncControl:
    """Send control RPCs over one blocking socket and match replies by id.

    Every call holds the lock for its whole round trip. A timeout cancels the
    pending id in the sans-IO core, so a late reply is dropped there. When the
    connection drops, this and every later call raise DaemonUnavailableError.
    """

    def __init__(self, sock: socket.socket, path: str) -> None:
        self._sock = sock
        self._path = path
        self._core = proto.ControlClientCore()
        self._lock = threading.Lock()
        self._broken: str | None = None
        self._refused = ""  # the code of the daemon's reason for closing, if it gave one
        self._closing = False

    @property
    def broken(self) -> str | None:
        """Why the channel is unusable, or None while it works."""
        return self._broken

    def alive(self) -> bool:
        """Non-blocking liveness check: False once the daemon closed the connection."""
        if self._broken is not None or self._closing:
            return False
        if self._lock.acquire(blocking=False):  # else a call in progress reads for us
            try:
                self._read_unsolicited()
            finally:
                self._lock.release()
            if self._broken is not None:
                return False
        if peek_eof(self._sock):
            self._broken = "the daemon closed the control channel"
            return False
        return True

    def call(
        self,
        op: str,
        method: str,
        params: dict[str, Any] | None,
        timeout: float | None,
        *,
        lock_timeout: float = -1,
    ) -> proto.Response:
        """Send one request and wait for its reply (at most ``timeout`` seconds)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._lock.acquire(timeout=lock_timeout):
            raise DeadlineExceededError(f"{op}: control channel busy")
        try:
            return self._call_locked(op, method, params, deadline)
        finally:
            self._lock.release()

    def _read_unsolicited(self) -> None:
        """Between calls, read what the daemon sent anyway: late replies (dropped by the
        core) or the reason it is about to hang up (then the channel is broken)."""
        while True:
            try:
                readable, _, _ = select.select([self._sock], [], [], 0)
                if not readable:
                    return
                chunk = self._sock.recv(65536, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            except (OSError, ValueError) as exc:
                self._broken = self._broken or str(exc)
                return
            try:
                self._core.receive_data(chunk)
            except proto.ChannelRefused as exc:
                self._refused = exc.code or str(proto.ErrorCode.OTHER)
                self._broken = str(exc)
                return
            except proto.ProtocolError as exc:
                self._broken = ("the daemon closed the control channel" if not chunk
                                else f"protocol error: {exc}")
                return
            if not chunk:
                return

    def _fail(self, op: str, reason: str) -> Exception:
        if self._closing:
            return ClosedError(f"{op}: server is closed")
        if self._broken is None:
            self._broken = reason
        if self._refused:
            return refused_error(f"{op}: {self._broken}", self._refused) or \
                DaemonUnavailableError(f"{op}: {self._broken}")
        return DaemonUnavailableError(
            f"{op}: control channel to the daemon at {self._path} closed: {self._broken}"
        )

    def _call_locked(
        self, op: str, method: str, params: dict[str, Any] | None, deadline: float | None
    ) -> proto.Response:
        if self._closing:
            raise ClosedError(f"{op}: server is closed")
        if self._broken is not None:
            raise self._fail(op, self._broken)
        req_id, data = self._core.request(method, params)
        try:
            self._sock.settimeout(
                None if deadline is None else max(0.001, deadline - time.monotonic())
            )
            self._sock.sendall(data)
            while True:
                if deadline is not None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise TimeoutError
                    self._sock.settimeout(remaining)
                chunk = self._sock.recv(65536)
                try:
                    responses = self._core.receive_data(chunk)
                except proto.ChannelRefused as exc:  # the daemon said why it hangs up
                    self._refused = exc.code or str(proto.ErrorCode.OTHER)
                    raise self._fail(op, str(exc)) from None
                except proto.ProtocolError as exc:
                    if chunk == b"":
                        raise self._fail(op, "the daemon closed the connection") from None
                    self._broken = f"protocol error: {exc}"
                    raise ProtocolError(f"{op}: {exc}") from None
                for resp in responses:
                    if resp.id == req_id:
                        return resp
        except TimeoutError:
            self._core.cancel(req_id)
            raise DeadlineExceededError(
                f"{op}: no reply from the daemon to {method!r} in time"
            ) from None
        except OSError as exc:
            if isinstance(exc, DaemonUnavailableError):
                raise
            raise self._fail(op, str(exc)) from exc

    def discard(self, reason: str) -> None:
        """Drop a dead connection being replaced: later calls raise DaemonUnavailableError."""
        if self._broken is None:
            self._broken = reason
        self._shut()

    def close(self) -> None:
        """Close the connection; a call blocked in another thread fails with ClosedError."""
        self._closing = True
        self._shut()

    def _shut(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        # Take the lock briefly so we never close a descriptor another thread is using.
        got = self._lock.acquire(timeout=5)
        try:
            close_quietly(self._sock)
        finally:
            if got:
                self._lock.release()
