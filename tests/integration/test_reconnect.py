"""Daemon restarts under a live app: the client reconnects and re-registers its listeners.

Real processes throughout (tsnet2 control, tsnet2d per node, wireguard-go). The daemon is
stopped with SIGTERM and started again on the same state dir, so the node keeps its
tailnet addresses.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

import tsnet2
from tsnet2.lab.tailnet import DaemonProc, LocalTailnet

from .tailnet import recv_exactly, running_tailnet

pytestmark = pytest.mark.netns

FIXED_PORT = 7300


class Pair:
    """Two daemons, A and B, non-ephemeral so a restart keeps the node."""

    def __init__(self, net: LocalTailnet) -> None:
        self.net = net
        key = net.authkey(reusable=True)
        self.da = net.add_daemon("rc-a", auth_key=key)
        self.db = net.add_daemon("rc-b", auth_key=key)


@pytest.fixture
def pair() -> Iterator[Pair]:
    with running_tailnet() as net:
        yield Pair(net)


def _server(d: DaemonProc, logs: list[str] | None = None, **kw: Any) -> tsnet2.Server:
    return tsnet2.Server(socket_path=str(d.socket_path), hostname=d.name,
                         logf=None if logs is None else logs.append, **kw)


def _dial_ok(client: tsnet2.Server, target: str, payload: bytes, timeout: float = 5) -> bool:
    """One echo round trip; False if the dial is refused (nobody listening yet)."""
    try:
        with client.dial("tcp", target, timeout=timeout) as conn:
            conn.sendall(payload)
            return recv_exactly(conn, len(payload)) == payload
    except tsnet2.DialError:
        return False


def _echo_forever(ln: tsnet2.Listener, served: list[Any]) -> threading.Thread:
    """Accept and echo until the listener is closed; exceptions land in `served`."""

    def run() -> None:
        while True:
            try:
                conn = ln.accept()
            except tsnet2.ClosedError:
                return
            except Exception as exc:
                served.append(exc)
                return
            with conn:
                served.append(conn.tailnet_remote)
                while data := conn.recv(4096):
                    conn.sendall(data)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _restart(net: LocalTailnet, name: str) -> float:
    """SIGTERM the daemon, start it again; return the monotonic time it was ready."""
    assert net.stop_daemon(name) == 0
    net.start_daemon(name)
    return time.monotonic()


def _registered(d: DaemonProc, port: int) -> bool:
    """The daemon side: has the (re)started daemon logged a listener on `port`?"""
    text = d.log_text()
    return f":{port} on " in text[text.rfind("--- start"):]


def _nudge(a: tsnet2.Server, b: tsnet2.Server) -> None:
    """Have A's new WireGuard device handshake with B at once (else B's stale session
    waits out WireGuard's rekey timeout); the dial itself is refused, which is fine."""
    with contextlib.suppress(tsnet2.DialError, tsnet2.DeadlineExceededError):
        a.dial("tcp", f"{b.tailscale_ips()[0]}:1", timeout=5).close()


def _time_until(pred: Any, limit: float) -> float:
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > limit:
            raise AssertionError(f"not within {limit}s")
        time.sleep(0.05)
    return time.monotonic() - t0


def test_sync_listeners_survive_a_daemon_restart(pair: Pair) -> None:
    logs: list[str] = []
    with _server(pair.da, logs) as a, _server(pair.db) as b:
        a_ip = a.up(timeout=30).tailscale_ips[0]
        b.up(timeout=30)
        ln0 = a.listen("tcp", ":0")
        lnf = a.listen("tcp", f":{FIXED_PORT}")
        port0, old_ids = ln0.port, (ln0.listener_id, lnf.listener_id)
        assert port0 > 0
        served: list[Any] = []
        threads = [_echo_forever(ln, served) for ln in (ln0, lnf)]
        assert _dial_ok(b, f"{a_ip}:{port0}", b"before-0")
        assert _dial_ok(b, f"{a_ip}:{FIXED_PORT}", b"before-f")

        _restart(pair.net, "rc-a")
        # No app action: the threads blocked in accept() notice and the server reconnects.
        took = _time_until(lambda: _registered(pair.da, FIXED_PORT)
                           and _registered(pair.da, port0), 10)
        assert took < 2.0, f"listeners back {took:.2f}s after the daemon was ready"
        _nudge(a, b)
        # The next flows from B reach the threads still blocked in accept() (port 0 kept).
        assert _dial_ok(b, f"{a_ip}:{FIXED_PORT}", b"after-f", timeout=30)
        assert _dial_ok(b, f"{a_ip}:{port0}", b"after-0", timeout=30)
        assert ln0.port == port0 and lnf.port == FIXED_PORT
        assert (ln0.listener_id, lnf.listener_id) != old_ids
        assert not [x for x in served if isinstance(x, Exception)], served
        assert sum(1 for x in served if isinstance(x, tuple)) >= 4
        assert any("reconnected to the daemon" in m for m in logs), logs
        # Ordinary RPCs work on the new channel too.
        assert a.tailscale_ips()[0] == a_ip
        ln0.close()
        lnf.close()
        for t in threads:
            t.join(10)
            assert not t.is_alive()


def test_async_listener_survives_a_daemon_restart(pair: Pair) -> None:
    async def main() -> None:
        logs: list[str] = []
        async with tsnet2.AsyncServer(socket_path=str(pair.da.socket_path), hostname="rc-a",
                                      logf=logs.append) as a:
            with _server(pair.db) as b:
                a_ip = (await a.up(timeout=30)).tailscale_ips[0]
                b.up(timeout=30)
                ln0 = await a.listen("tcp", ":0")
                lnf = await a.listen("tcp", f":{FIXED_PORT}")
                port0 = ln0.port
                errors: list[BaseException] = []

                async def serve(ln: tsnet2.AsyncListener) -> None:
                    try:
                        async for conn in ln:
                            async with conn:
                                data = await conn.reader.read(4096)
                                conn.writer.write(data)
                                await conn.writer.drain()
                    except tsnet2.Error as exc:
                        errors.append(exc)

                async with asyncio.TaskGroup() as tg:
                    tg.create_task(serve(ln0))
                    tg.create_task(serve(lnf))
                    dial = asyncio.to_thread
                    assert await dial(_dial_ok, b, f"{a_ip}:{FIXED_PORT}", b"before")
                    await dial(_restart, pair.net, "rc-a")
                    took = await dial(_time_until, lambda: _registered(pair.da, FIXED_PORT)
                                      and _registered(pair.da, port0), 10)
                    assert took < 2.0, f"listeners back {took:.2f}s after the daemon was ready"
                    with contextlib.suppress(tsnet2.DialError, tsnet2.DeadlineExceededError):
                        conn = await a.dial("tcp", f"{b.tailscale_ips()[0]}:1", timeout=5)
                        await conn.__aexit__(None, None, None)
                    assert await dial(_dial_ok, b, f"{a_ip}:{FIXED_PORT}", b"after", 30)
                    assert await dial(_dial_ok, b, f"{a_ip}:{port0}", b"after-0", 30)
                    assert ln0.port == port0
                    await ln0.close()
                    await lnf.close()
                assert not errors, errors
                assert any("reconnected to the daemon" in m for m in logs), logs
                assert (await a.tailscale_ips())[0] == a_ip

    asyncio.run(main())


def test_dialer_reconnects_after_its_daemon_restarts(pair: Pair) -> None:
    with _server(pair.da) as a, _server(pair.db) as b:
        a_ip = a.up(timeout=30).tailscale_ips[0]
        b.up(timeout=30)
        served: list[Any] = []
        with a.listen("tcp", f":{FIXED_PORT}") as ln:
            t = _echo_forever(ln, served)
            assert _dial_ok(b, f"{a_ip}:{FIXED_PORT}", b"one")
            _restart(pair.net, "rc-b")
            # B's next dial reconnects (start sent again) and goes through the new daemon.
            assert _dial_ok(b, f"{a_ip}:{FIXED_PORT}", b"two", timeout=15)
            assert b.cert_domains() == ["rc-b.tail-scale.ts.net"]
        t.join(10)
        assert not [x for x in served if isinstance(x, Exception)], served


def test_reconnect_disabled_fails_loudly(pair: Pair) -> None:
    with _server(pair.da, reconnect_timeout=0) as a, _server(pair.db) as b:
        a_ip = a.up(timeout=30).tailscale_ips[0]
        b.up(timeout=30)
        ln = a.listen("tcp", f":{FIXED_PORT}")
        _restart(pair.net, "rc-a")
        with pytest.raises(tsnet2.DaemonUnavailableError, match="reconnect_timeout is 0"):
            ln.accept(timeout=10)
        with pytest.raises(tsnet2.DaemonUnavailableError, match="reconnect_timeout is 0"):
            a.dial("tcp", f"{a_ip}:1", timeout=5)
        with pytest.raises(tsnet2.DaemonUnavailableError):
            a.tailscale_ips()
        ln.close()


def test_daemon_down_longer_than_reconnect_timeout(pair: Pair) -> None:
    with _server(pair.da, reconnect_timeout=1.0) as a, _server(pair.db) as b:
        a_ip = a.up(timeout=30).tailscale_ips[0]
        b.up(timeout=30)
        ln = a.listen("tcp", f":{FIXED_PORT}")
        errors: list[tuple[BaseException, float]] = []

        def accept() -> None:
            try:
                ln.accept(timeout=60)
            except Exception as exc:
                errors.append((exc, time.monotonic()))

        t = threading.Thread(target=accept, daemon=True)
        t.start()
        time.sleep(0.3)  # most likely blocked in accept by now; if not, the same error follows
        assert pair.net.stop_daemon("rc-a") == 0
        stopped_done = time.monotonic()
        t.join(30)
        assert errors, "accept() did not fail"
        exc, when = errors[0]
        # Ended by the 1 s reconnect_timeout (its error says so), not the 60 s call timeout
        # (a DeadlineExceededError); the 20 s bound only catches waiting for the latter.
        assert isinstance(exc, tsnet2.DaemonUnavailableError), exc
        assert "reconnect_timeout=1s" in str(exc) and "tsnet2d is running" in str(exc)
        assert when - stopped_done < 20
        t0 = time.monotonic()
        with pytest.raises(tsnet2.DaemonUnavailableError, match="did not come back"):
            a.dial("tcp", f"{a_ip}:{FIXED_PORT}", timeout=60)
        assert time.monotonic() - t0 < 20
        # Once the daemon is back, the next call reconnects after all.
        pair.net.start_daemon("rc-a")
        assert a.tailscale_ips()[0] == a_ip
        ln.close()
