"""Run one client test suite against both faces: the blocking Server and the AsyncServer.

:class:`AsyncFace` runs an event loop in a thread and gives the test blocking proxies of
the asyncio objects (AsyncServer, AsyncListener, AsyncLocalClient, AsyncIPNBusWatcher,
AsyncConn), so a test written against the blocking API drives the asyncio code
unchanged. Calls from several test threads become concurrent tasks on that loop.
"""

from __future__ import annotations

import asyncio
import inspect
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import tsnet2
import tsnet2.client


class SyncFace:
    """The blocking face as it is."""

    name = "sync"
    conn_type: type = tsnet2.TailnetSocket

    def Server(self, **kw: Any) -> Any:
        return tsnet2.Server(**kw)

    def close(self) -> None:
        pass


class AsyncFace:
    """The asyncio face, behind blocking proxies; its loop runs in a thread."""

    name = "async"
    conn_type: type = tsnet2.AsyncConn

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="face-loop")
        self._thread.start()

    def run(self, coro: Any) -> Any:
        """Run a coroutine on the loop and wait for its result (from any thread)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def Server(self, **kw: Any) -> Any:
        return self.wrap(tsnet2.AsyncServer(**kw))

    def wrap(self, value: Any) -> Any:
        if isinstance(value, tsnet2.AsyncConn):
            return _Conn(self, value)
        if isinstance(value, (tsnet2.AsyncServer, tsnet2.AsyncListener,
                              tsnet2.AsyncLocalClient, tsnet2.client.AsyncIPNBusWatcher)):
            return _Proxy(self, value)
        return value

    def tasks(self) -> set[asyncio.Task[Any]]:
        async def current() -> set[asyncio.Task[Any]]:
            return asyncio.all_tasks() - {asyncio.current_task()}  # type: ignore[operator]
        result: set[asyncio.Task[Any]] = self.run(current())
        return result

    def close(self) -> None:
        left = self.tasks()
        for t in left:
            self.loop.call_soon_threadsafe(t.cancel)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()
        assert not left, f"tasks left running on the loop: {left}"


class _Proxy:
    """A blocking view of an asyncio client object."""

    def __init__(self, face: AsyncFace, obj: Any) -> None:
        object.__setattr__(self, "_face", face)
        object.__setattr__(self, "_obj", obj)

    def __getattr__(self, name: str) -> Any:
        obj = self._obj
        if name == "close" and not hasattr(obj, "close"):
            name = "aclose"
        value = getattr(obj, name)
        if inspect.iscoroutinefunction(value):
            return lambda *a, **k: self._face.wrap(self._face.run(value(*a, **k)))
        if inspect.ismethod(value):
            return lambda *a, **k: self._face.wrap(value(*a, **k))
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._obj, name, value)

    def __repr__(self) -> str:
        return repr(self._obj)

    def __enter__(self) -> _Proxy:
        self._face.run(self._obj.__aenter__())
        return self

    def __exit__(self, *exc: object) -> None:
        self._face.run(self._obj.__aexit__(None, None, None))

    def __iter__(self) -> Iterator[Any]:
        it = self._obj.__aiter__()
        while True:
            try:
                item = self._face.run(it.__anext__())
            except StopAsyncIteration:
                return
            yield self._face.wrap(item)


class _Conn:
    """An AsyncConn with the few socket methods the tests use."""

    def __init__(self, face: AsyncFace, conn: tsnet2.AsyncConn) -> None:
        self._face = face
        self.conn = conn
        self.tailnet_local = conn.tailnet_local
        self.tailnet_remote = conn.tailnet_remote
        self.tls = conn.tls

    def _run(self, fn: Callable[[], Any]) -> Any:
        """Call ``fn`` on the loop (streams are not thread-safe) and await what it returns."""
        async def call() -> Any:
            result = fn()
            return await result if inspect.isawaitable(result) else result
        return self._face.run(call())

    def sendall(self, data: bytes) -> None:
        writer = self.conn.writer
        self._run(lambda: (writer.write(data), writer.drain())[1])

    def recv(self, n: int) -> bytes:
        data: bytes = self._run(lambda: self.conn.reader.read(n))
        return data

    def shutdown(self, how: int) -> None:
        assert how == socket.SHUT_WR
        self._run(self.conn.writer.write_eof)

    def close(self) -> None:
        self._run(lambda: self.conn.__aexit__())

    def __enter__(self) -> _Conn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
