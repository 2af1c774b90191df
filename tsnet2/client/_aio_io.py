"""asyncio helpers: connecting to channels, exact header reads, the control channel."""

from __future__ import annotations

import asyncio
import contextlib
import errno
from collections.abc import AsyncIterator
from typing import Any

from tsnet2 import proto
from tsnet2.client._base import BACKOFF_INITIAL, BACKOFF_MAX, refused_error
from tsnet2.client.errors import (
    ClosedError,
    DaemonUnavailableError,
    DeadlineExceededError,
    Error,
    ProtocolError,
)

_RETRYABLE = (FileNotFoundError, ConnectionRefusedError, BlockingIOError, TimeoutError)


def stream_limit() -> int:
    """StreamReader limit: large enough for one header line, at least asyncio's default."""
    return max(proto.MAX_HEADER_LINE + 1, 1 << 16)


async def open_channel(
    path: str,
    kind: int,
    op: str,
    deadline: float,
    *,
    payload: bytes = b"",
    max_delay: float = BACKOFF_MAX,
    cancel: asyncio.Event | None = None,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to the daemon socket and write the channel byte (and ``payload``).

    Retries with backoff (50 ms doubling to ``max_delay``, default 1 s) until
    ``deadline`` (loop time), then raises DaemonUnavailableError. If ``cancel`` is
    set while waiting, raises ClosedError.
    """
    loop = asyncio.get_running_loop()
    delay = BACKOFF_INITIAL
    start = loop.time()
    while True:
        if cancel is not None and cancel.is_set():
            raise ClosedError(f"{op}: server is closed")
        try:
            async with asyncio.timeout_at(max(deadline, loop.time() + 0.001)):
                reader, writer = await asyncio.open_unix_connection(path, limit=stream_limit())
            writer.write(bytes([kind]) + payload)
            return reader, writer
        except _RETRYABLE as exc:
            last: OSError = exc
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.ECONNREFUSED, errno.ENOENT):
                raise DaemonUnavailableError(
                    f"{op}: cannot connect to the daemon at {path}: {exc}"
                ) from exc
            last = exc
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise DaemonUnavailableError(
                f"{op}: cannot connect to the daemon at {path} "
                f"(gave up after {loop.time() - start:.1f}s): {last}"
            ) from last
        if cancel is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(delay, remaining)):
                    await cancel.wait()
        else:
            await asyncio.sleep(min(delay, remaining))
        delay = min(delay * 2, max_delay)


async def read_header(reader: asyncio.StreamReader, op: str) -> bytes | None:
    """Read exactly one ``\\n``-terminated line; None on EOF before any byte.

    Bytes after the line stay in ``reader`` for the application.
    """
    try:
        line = await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise ProtocolError(f"{op}: daemon closed the connection mid-header") from None
    except asyncio.LimitOverrunError:
        raise ProtocolError(
            f"{op}: header line longer than {proto.MAX_HEADER_LINE} bytes"
        ) from None
    except OSError as exc:
        raise DaemonUnavailableError(f"{op}: connection to the daemon failed: {exc}") from exc
    if len(line) - 1 > proto.MAX_HEADER_LINE:
        raise ProtocolError(f"{op}: header line longer than {proto.MAX_HEADER_LINE} bytes")
    return line[:-1]


@contextlib.asynccontextmanager
async def map_io_errors(op: str) -> AsyncIterator[None]:
    """Map TimeoutError -> DeadlineExceededError, other OSError -> DaemonUnavailableError."""
    try:
        yield
    except Error:
        raise
    except TimeoutError:
        raise DeadlineExceededError(f"{op}: timed out") from None
    except OSError as exc:
        raise DaemonUnavailableError(f"{op}: connection to the daemon failed: {exc}") from exc


async def close_writer(writer: asyncio.StreamWriter) -> None:
    """Close a stream writer and wait for it, ignoring connection errors."""
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


class AsyncControl:
    """The control channel (0x01) on asyncio streams.

    One reader task, owned by this object (created here, cancelled and awaited
    in :meth:`aclose`), resolves pending calls by id. When the connection drops,
    every pending call fails with DaemonUnavailableError and :attr:`gone` is set.
    """

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._path = path
        self._core = proto.ControlClientCore()
        self._pending: dict[int, asyncio.Future[proto.Response]] = {}
        self.broken: str | None = None
        self.refused = ""  # the code of the daemon's reason for closing, if it gave one
        self.gone = asyncio.Event()
        self._closing = False
        self._task = asyncio.create_task(self._read_loop(), name="tsnet2-control-reader")

    def _error(self, op: str) -> Exception:
        if self._closing:
            return ClosedError(f"{op}: server is closed")
        if self.refused:
            return refused_error(f"{op}: {self.broken}", self.refused) or \
                DaemonUnavailableError(f"{op}: {self.broken}")
        return DaemonUnavailableError(
            f"{op}: control channel to the daemon at {self._path} closed: {self.broken}"
        )

    async def _read_loop(self) -> None:
        reason = "the daemon closed the connection"
        try:
            while True:
                data = await self._reader.read(65536)
                try:
                    responses = self._core.receive_data(data)
                except proto.ChannelRefused as exc:  # the daemon said why it hangs up
                    reason = str(exc)
                    self.refused = exc.code or str(proto.ErrorCode.OTHER)
                    break
                except proto.ProtocolError as exc:
                    if data:
                        reason = f"protocol error: {exc}"
                    break
                for resp in responses:
                    fut = self._pending.pop(resp.id, None)
                    if fut is not None and not fut.done():
                        fut.set_result(resp)
        except OSError as exc:
            reason = str(exc)
        finally:
            self.broken = self.broken or reason
            self.gone.set()
            pending, self._pending = self._pending, {}
            for fut in pending.values():
                if not fut.done():
                    fut.set_exception(self._error("tsnet2"))

    async def call(
        self, op: str, method: str, params: dict[str, Any] | None, timeout: float | None
    ) -> proto.Response:
        """Send one request and wait (at most ``timeout`` seconds) for its reply."""
        if self._closing or self.broken is not None:
            raise self._error(op)
        req_id, data = self._core.request(method, params)
        fut: asyncio.Future[proto.Response] = asyncio.get_running_loop().create_future()
        self._pending[req_id] = fut
        try:
            async with asyncio.timeout(timeout):
                self._writer.write(data)
                await self._writer.drain()
                return await fut
        except TimeoutError:
            raise DeadlineExceededError(
                f"{op}: no reply from the daemon to {method!r} in time"
            ) from None
        except Error:
            raise self._error(op) from None
        except OSError as exc:
            self.broken = self.broken or str(exc)
            raise self._error(op) from exc
        finally:
            if self._pending.pop(req_id, None) is not None:
                self._core.cancel(req_id)
            if not fut.done():
                fut.cancel()

    async def discard(self, reason: str) -> None:
        """Drop a dead connection being replaced; later calls raise DaemonUnavailableError."""
        self.broken = self.broken or reason
        await self._shut()

    async def aclose(self) -> None:
        """Close the connection, cancel the reader task and wait for it."""
        self._closing = True
        await self._shut()

    async def _shut(self) -> None:
        self._writer.close()
        self._task.cancel()
        await asyncio.wait([self._task])
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()
