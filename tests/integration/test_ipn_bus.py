"""LocalAPI ``watch-ipn-bus`` streaming, blocking and asyncio faces, against real daemons.

A and B are up for the whole module (blocking Servers hold them). Each test watches A's
bus, then a third node C joins the tailnet (and leaves again: it is ephemeral), and checks
what A's watchers were told, how fast, and that closing a watcher really closes its
connection to the daemon (counted in this network namespace's ``/proc/self/net/unix``:
the daemon's end of a connection from this process is listed here under the socket path).
"""

from __future__ import annotations

import asyncio
import queue
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

import tsnet2
from tsnet2.client import AsyncIPNBusWatcher, IPNBusWatcher
from tsnet2.lab.tailnet import DaemonProc, LocalTailnet

from .tailnet import running_tailnet, wait_for

pytestmark = pytest.mark.netns

NOTIFY_INITIAL_STATE = 1 << 1
NOTIFY_INITIAL_NETMAP = 1 << 3
RUNNING = 6
DOMAIN = "tail-scale.ts.net"
A_NAME = f"tsnet2-a.{DOMAIN}."
B_NAME = f"tsnet2-b.{DOMAIN}."
C_NAME = f"tsnet2-c.{DOMAIN}."
NOTE_DEADLINE = 2.0  # seconds a change may take to reach a watcher

Note = dict[str, Any]


@dataclass
class Bus:
    """The module's tailnet: A and B up, C's daemon running but not joined."""

    net: LocalTailnet
    da: DaemonProc
    a: tsnet2.Server

    def c_daemon(self) -> DaemonProc:
        """C's daemon: running, but its node joins the tailnet only when a test's Server
        starts it (and leaves again when that ephemeral Server closes)."""
        return self.net.daemons["tsnet2-c"]

    def conns(self) -> int:
        """Open connections from this process to A's daemon, as the kernel lists them."""
        return daemon_conns(self.da)


@pytest.fixture(scope="module")
def bus() -> Iterator[Bus]:
    with running_tailnet() as net:
        key = net.authkey(reusable=True)
        da = net.add_daemon("tsnet2-a", auth_key=key)
        db = net.add_daemon("tsnet2-b", auth_key=key)
        # C's namespace and daemon exist before any node talks to the control server:
        # adding a lab node later can change the hub bridge's MAC address (see the report
        # on tsnet2/lab), which cuts A and B off the control server for seconds.
        net.add_daemon("tsnet2-c", auth_key=key)
        with (
            tsnet2.Server(socket_path=str(da.socket_path), hostname="tsnet2-a") as a,
            tsnet2.Server(socket_path=str(db.socket_path), hostname="tsnet2-b") as b,
        ):
            a.up(timeout=30)
            b.up(timeout=30)
            yield Bus(net, da, a)


def daemon_conns(d: DaemonProc) -> int:
    suffix = " " + str(d.socket_path)
    with open("/proc/self/net/unix") as f:
        return sum(1 for line in f if line.rstrip("\n").endswith(suffix))


def peer_names(note: Note) -> list[str]:
    return [p["Name"] for p in note["NetMap"]["Peers"] or []]


def has_c(note: Note) -> bool:
    return "NetMap" in note and C_NAME in peer_names(note)


def lost_c(note: Note) -> bool:
    return "NetMap" in note and C_NAME not in peer_names(note)


SESSION_ID = re.compile(r"[0-9a-f]{16}")  # tailscaled's rands.HexString(16)


def check_initial(note: Note) -> None:
    """The first Notify for mask 2|8: a session id, Running, and a NetMap of A with B as a
    peer, in ipn.Notify's field order."""
    assert list(note) == ["Version", "SessionID", "State", "NetMap"], list(note)
    assert SESSION_ID.fullmatch(note["SessionID"]), note["SessionID"]
    assert note["State"] == RUNNING, note
    assert note["Version"]
    nm = note["NetMap"]
    assert nm["SelfNode"]["Name"] == A_NAME
    assert nm["NodeKey"].startswith("nodekey:")
    assert nm["Domain"] == DOMAIN
    assert B_NAME in peer_names(note)
    assert C_NAME not in peer_names(note)


# ---- blocking face ---------------------------------------------------------------------

END = object()


def pump(watcher: IPNBusWatcher) -> tuple[queue.Queue[Any], threading.Thread]:
    """Iterate ``watcher`` in a thread: each note, then END (or the exception) on the queue."""
    q: queue.Queue[Any] = queue.Queue()

    def run() -> None:
        try:
            for note in watcher:
                q.put(note)
        except Exception as exc:  # handed to the test thread
            q.put(exc)
        else:
            q.put(END)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return q, t


def next_matching(q: queue.Queue[Any], pred: Callable[[Note], bool], timeout: float,
                  seen: list[Note]) -> Note:
    """The next note on ``q`` satisfying ``pred`` within ``timeout`` s (others go to seen)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            item = q.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise AssertionError(f"no matching notification in {timeout}s; saw {seen}") from None
        assert isinstance(item, dict), f"watcher ended early: {item!r}"
        seen.append(item)
        if pred(item):
            return item


def drain_end(q: queue.Queue[Any], t: threading.Thread) -> list[Note]:
    """After close: the pump thread ends with END (no error) within 2 s; return late notes."""
    t.join(NOTE_DEADLINE)
    assert not t.is_alive(), "close() did not end a blocked iteration"
    items = []
    while not q.empty():
        items.append(q.get_nowait())
    assert items and items[-1] is END, items
    return items[:-1]


def test_watch_ipn_bus_blocking(bus: Bus) -> None:
    """Initial state+netmap with mask 2|8, nothing initial with mask 0; C joining and leaving
    reaches both within 2 s; closing (even while another thread reads) ends the stream."""
    lc = bus.a.local_client()
    c_daemon = bus.c_daemon()
    base = bus.conns()
    full = lc.watch_ipn_bus(mask=NOTIFY_INITIAL_STATE | NOTIFY_INITIAL_NETMAP)
    quiet = lc.watch_ipn_bus(mask=0)
    with full, quiet:
        wait_for(lambda: bus.conns() == base + 2, 5, "two watch connections at the daemon")
        q_full, t_full = pump(full)
        q_quiet, t_quiet = pump(quiet)
        seen_full: list[Note] = []
        seen_quiet: list[Note] = []
        check_initial(next_matching(q_full, lambda n: True, NOTE_DEADLINE, seen_full))
        with pytest.raises(queue.Empty):  # mask 0: no initial notification
            q_quiet.get(timeout=0.5)

        with tsnet2.Server(socket_path=str(c_daemon.socket_path), hostname="tsnet2-c",
                           ephemeral=True) as c:
            c.up(timeout=30)
            joined = time.monotonic()
            next_matching(q_full, has_c, NOTE_DEADLINE, seen_full)
            next_matching(q_quiet, has_c, NOTE_DEADLINE - (time.monotonic() - joined),
                          seen_quiet)
        # C was ephemeral: closing its Server took it off the tailnet.
        next_matching(q_full, lost_c, NOTE_DEADLINE, seen_full)
        next_matching(q_quiet, lost_c, NOTE_DEADLINE, seen_quiet)
    # Leaving the with-block closed both watchers while their threads were blocked reading.
    late = drain_end(q_full, t_full) + drain_end(q_quiet, t_quiet)
    assert all("State" not in n for n in seen_quiet + late), "mask 0 sent a State"
    assert all("State" not in n for n in seen_full[1:]), "A's state did not change"
    # The session id is in the first Notify only, and only with NotifyInitialState.
    assert all("SessionID" not in n for n in seen_full[1:] + seen_quiet + late)
    wait_for(lambda: bus.conns() == base, 5, "the daemon to drop both watch connections")

    # The daemon keeps serving; a watch closed from its own thread is gone at once too.
    assert lc.status()["BackendState"] == "Running"
    with lc.watch_ipn_bus(mask=NOTIFY_INITIAL_STATE) as only_state:
        note = next(only_state)
        assert note["State"] == RUNNING and "NetMap" not in note
        assert list(note) == ["Version", "SessionID", "State"]
        assert SESSION_ID.fullmatch(note["SessionID"])
        wait_for(lambda: bus.conns() == base + 1, 5, "the watch connection")
    with pytest.raises(StopIteration):
        next(only_state)
    wait_for(lambda: bus.conns() == base, 5, "the daemon to drop the watch connection")
    # Leaving a for-loop early and closing explicitly.
    watcher = lc.watch_ipn_bus(mask=NOTIFY_INITIAL_NETMAP)
    for note in watcher:
        assert B_NAME in peer_names(note) and "State" not in note
        assert "SessionID" not in note  # tailscaled sets it for NotifyInitialState only
        break
    watcher.close()
    watcher.close()  # idempotent
    assert list(watcher) == []
    wait_for(lambda: bus.conns() == base, 5, "the daemon to drop the watch connection")


# ---- asyncio face ----------------------------------------------------------------------


async def anext_matching(q: asyncio.Queue[Any], pred: Callable[[Note], bool], timeout: float,
                         seen: list[Note]) -> Note:
    """asyncio version of next_matching."""
    try:
        async with asyncio.timeout(timeout):
            while True:
                item = await q.get()
                assert isinstance(item, dict), f"watcher ended early: {item!r}"
                seen.append(item)
                if pred(item):
                    return item
    except TimeoutError:
        raise AssertionError(f"no matching notification in {timeout}s; saw {seen}") from None


async def apump(watcher: AsyncIPNBusWatcher, q: asyncio.Queue[Any]) -> None:
    """Iterate ``watcher`` into ``q``, then END (or the exception)."""
    try:
        async for note in watcher:
            await q.put(note)
    except Exception as exc:  # handed to the test
        await q.put(exc)
    else:
        await q.put(END)


async def aend(q: asyncio.Queue[Any], task: asyncio.Task[None]) -> list[Note]:
    """After aclose: the pump task ends with END (no error) within 2 s; return late notes."""
    await asyncio.wait_for(task, NOTE_DEADLINE)
    items = []
    while not q.empty():
        items.append(q.get_nowait())
    assert items and items[-1] is END, items
    return items[:-1]


def test_watch_ipn_bus_async(bus: Bus) -> None:
    """The same through AsyncLocalClient: initial state+netmap, mask 0 quiet, C joins and
    leaves within 2 s, and async with / aclose() close the connection."""
    c_daemon = bus.c_daemon()
    base = bus.conns()

    async def main() -> None:
        lc = tsnet2.AsyncLocalClient(str(bus.da.socket_path))
        full = await lc.watch_ipn_bus(mask=NOTIFY_INITIAL_STATE | NOTIFY_INITIAL_NETMAP)
        quiet = await lc.watch_ipn_bus(mask=0)
        q_full: asyncio.Queue[Any] = asyncio.Queue()
        q_quiet: asyncio.Queue[Any] = asyncio.Queue()
        seen_full: list[Note] = []
        seen_quiet: list[Note] = []
        async with full, quiet:
            assert bus.conns() == base + 2
            t_full = asyncio.create_task(apump(full, q_full))
            t_quiet = asyncio.create_task(apump(quiet, q_quiet))
            check_initial(await anext_matching(q_full, lambda n: True, NOTE_DEADLINE, seen_full))
            with pytest.raises(TimeoutError):  # mask 0: no initial notification
                await asyncio.wait_for(q_quiet.get(), 0.5)
            async with tsnet2.AsyncServer(socket_path=str(c_daemon.socket_path),
                                          hostname="tsnet2-c", ephemeral=True) as c:
                await c.up(timeout=30)
                async with asyncio.timeout(NOTE_DEADLINE):
                    await asyncio.gather(
                        anext_matching(q_full, has_c, NOTE_DEADLINE, seen_full),
                        anext_matching(q_quiet, has_c, NOTE_DEADLINE, seen_quiet),
                    )
            await anext_matching(q_full, lost_c, NOTE_DEADLINE, seen_full)
            await anext_matching(q_quiet, lost_c, NOTE_DEADLINE, seen_quiet)
        # Leaving async with closed both while their tasks were waiting in __anext__.
        late = await aend(q_full, t_full) + await aend(q_quiet, t_quiet)
        assert all("State" not in n for n in seen_quiet + late), "mask 0 sent a State"
        assert all("State" not in n for n in seen_full[1:]), "A's state did not change"
        await wait_async(lambda: bus.conns() == base, "the daemon to drop both watches")

        assert (await lc.status())["BackendState"] == "Running"
        watcher = await lc.watch_ipn_bus(mask=NOTIFY_INITIAL_STATE)
        async for note in watcher:
            assert note["State"] == RUNNING and "NetMap" not in note
            break
        assert bus.conns() == base + 1
        await watcher.aclose()
        await watcher.aclose()  # idempotent
        assert [n async for n in watcher] == []
        await wait_async(lambda: bus.conns() == base, "the daemon to drop the watch")

    asyncio.run(main())


async def wait_async(pred: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    """Poll ``pred`` without blocking the loop."""
    async with asyncio.timeout(timeout):
        while not pred():
            await asyncio.sleep(0.05)
    assert pred(), what


def test_watch_bad_mask_is_an_error(bus: Bus) -> None:
    """A non-numeric mask is refused with HTTP 400 on both faces, and nothing stays open."""
    base = bus.conns()
    lc = bus.a.local_client()
    with pytest.raises(tsnet2.LocalAPIError) as ei:
        lc.get("watch-ipn-bus?mask=lots")
    assert ei.value.status == 400

    async def main() -> None:
        alc = tsnet2.AsyncLocalClient(str(bus.da.socket_path))
        with pytest.raises(tsnet2.LocalAPIError) as ei:
            await alc.get("watch-ipn-bus?mask=lots")
        assert ei.value.status == 400

    asyncio.run(main())
    wait_for(lambda: bus.conns() == base, 5, "no leftover connections")


# ---- wire bytes --------------------------------------------------------------------------


def first_bus_line(d: DaemonProc, mask: int) -> bytes:
    """The first Notify line of a raw watch-ipn-bus request (chunked HTTP/1.1 on a LocalAPI
    channel), as the bytes the daemon wrote."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(d.socket_path))
        s.sendall(b"\x02GET /localapi/v0/watch-ipn-bus?mask=%d HTTP/1.1\r\n"
                  b"Host: local-tailscaled.sock\r\n\r\n" % mask)
        buf = b""
        while True:
            head, sep, body = buf.partition(b"\r\n\r\n")
            if sep:
                size, crlf, rest = body.partition(b"\r\n")
                if crlf and len(rest) >= int(size, 16):
                    assert head.startswith(b"HTTP/1.1 200 "), head
                    assert b"transfer-encoding: chunked" in head.lower(), head
                    return rest[: int(size, 16)]
            chunk = s.recv(65536)
            assert chunk, f"connection closed before the first Notify: {buf!r}"
            buf += chunk


def test_first_notify_bytes_carry_a_session_id(bus: Bus) -> None:
    """Byte for byte as tailscaled: ``{"Version":..,"SessionID":"<16 hex>","State":6}``; a
    new id for every watch; none without NotifyInitialState."""
    version = bus.a.local_client().status()["Version"]
    ids = []
    for _ in range(2):
        line = first_bus_line(bus.da, NOTIFY_INITIAL_STATE)
        m = re.fullmatch(rb'\{"Version":"([^"]+)","SessionID":"([0-9a-f]{16})","State":6\}\n',
                         line)
        assert m, line
        assert m.group(1).decode() == version
        ids.append(m.group(2))
    assert ids[0] != ids[1]
    line = first_bus_line(bus.da, NOTIFY_INITIAL_NETMAP)
    assert line.startswith(b'{"Version":"%s","NetMap":{' % version.encode()), line[:80]
    assert b'"SessionID"' not in line
