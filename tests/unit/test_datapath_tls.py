"""The daemon's datapath with TLS listeners, on loopback (no node, no root): a real
``Datapath`` with a stand-in backend whose certificates come from a throwaway CA. A
``listen_tls`` flow is handshaken before it is handed to a parked slot (the accept header
and the open record carry ``tls``); no certificate is ``no_certificate``; handshakes past
the per-listener bound are refused at once."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest

from tests.tlsca import FakeNodeCerts, TailnetCA
from tsnet2 import proto
from tsnet2.daemon import tls as dtls
from tsnet2.daemon.datapath import Datapath, ListenError
from tsnet2.proto import ErrorCode
from tsnet2.traffic import TrafficLog

LO = ipaddress.IPv4Address("127.0.0.1")
NAME = "web.tailnet.test"
TIMEOUT = 10.0


class Backend:
    """What the datapath reads of a running node, on loopback."""

    running = True

    def __init__(self, certs: FakeNodeCerts) -> None:
        self.certs = certs

    def addresses(self) -> tuple[ipaddress.IPv4Address, None]:
        return LO, None

    async def set_listeners(self, pairs: object, udp: object = None) -> None:
        pass

    def node_by_addr(self, text: str) -> None:
        return None

    def node_by_ip(self, ip: object) -> None:
        return None


@pytest.fixture(scope="module")
def ca() -> TailnetCA:
    return TailnetCA.create()


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


async def _datapath(tmp_path: Path, certs: FakeNodeCerts, log: TrafficLog
                    ) -> tuple[Datapath, set[asyncio.Task[Any]]]:
    tasks: set[asyncio.Task[Any]] = set()

    def spawn(coro: Any) -> asyncio.Task[Any]:
        t = asyncio.get_running_loop().create_task(coro)
        tasks.add(t)
        t.add_done_callback(tasks.discard)
        return t

    return Datapath(cast(Any, Backend(certs)), log, spawn, relay="copy"), tasks


def test_listen_tls_flow_is_handshaken_then_handed_over(ca: TailnetCA, tmp_path: Path) -> None:
    log_path = tmp_path / "t.jsonl"
    client_ctx = ca.client_context()
    client_ctx.set_alpn_protocols(["b", "a"])

    def client(port: int) -> bytes:
        with socket.create_connection((str(LO), port), timeout=TIMEOUT) as raw, \
                client_ctx.wrap_socket(raw, server_hostname=NAME) as tls:
            assert tls.selected_alpn_protocol() == "a"
            tls.sendall(b"ping")
            return tls.recv(100)

    async def main() -> tuple[proto.AcceptHeader, bytes]:
        with TrafficLog(str(log_path), mode="payload") as log:
            dp, _tasks = await _datapath(tmp_path, FakeNodeCerts(ca, NAME), log)
            lst = await dp.register_listener("tcp", f"{LO}:0", object(), tls=True,
                                             alpn=("a", "b"))
            assert lst.tls is not None and lst.alpn == ("a", "b")
            daemon_end, app = socket.socketpair()
            daemon_end.setblocking(False)
            app.setblocking(False)
            app.sendall(proto.encode_accept_request(lst.id))
            parked = asyncio.create_task(dp.park(daemon_end,
                                                 proto.LineReader(proto.MAX_HEADER_LINE)))
            out: list[bytes] = []
            t = threading.Thread(target=lambda: out.append(client(lst.port)))
            t.start()
            loop = asyncio.get_running_loop()
            got = b""
            while got.count(b"\n") < 1 or not got.endswith(b"ping"):
                got += await loop.sock_recv(app, 4096)
            line, _, rest = got.partition(b"\n")
            assert rest == b"ping"
            await loop.sock_sendall(app, b"pong")
            await asyncio.to_thread(t.join, TIMEOUT)
            assert await parked is True
            app.close()
            await asyncio.wait([sp.done for sp in dp.splices], timeout=TIMEOUT)
            await dp.close_all()
            return proto.decode_accept_header(line + b"\n"), out[0]

    header, answer = _run(main())
    assert answer == b"pong"
    assert header.tls is not None
    assert (header.tls.sni, header.tls.alpn) == (NAME, "a")
    opened = next(r for r in _records(log_path) if r["kind"] == "open")
    assert opened["tls"] == header.tls.to_json()


def test_no_certificate_is_a_listen_error_with_its_code(ca: TailnetCA, tmp_path: Path) -> None:
    async def main() -> ListenError:
        with TrafficLog(str(tmp_path / "t.jsonl")) as log:
            dp, _ = await _datapath(tmp_path, FakeNodeCerts(ca), log)
            with pytest.raises(ListenError) as ei:
                await dp.register_listener("tcp", f"{LO}:0", object(), tls=True)
            assert not dp.listeners
            return ei.value

    err = _run(main())
    assert err.code == ErrorCode.NO_CERTIFICATE
    assert str(err).startswith("daemon: cannot listen with TLS: ")


def test_tls_with_a_forward_socket_is_refused(ca: TailnetCA, tmp_path: Path) -> None:
    async def main() -> ListenError:
        with TrafficLog(str(tmp_path / "t.jsonl")) as log:
            dp, _ = await _datapath(tmp_path, FakeNodeCerts(ca, NAME), log)
            with pytest.raises(ListenError) as ei:
                await dp.register_listener("tcp", f"{LO}:0", object(),
                                           forward=cast(Any, object()), tls=True)
            return ei.value

    assert _run(main()).code == ErrorCode.BAD_REQUEST


def test_handshakes_past_the_bound_are_refused_at_once(
        ca: TailnetCA, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the listener's handshakes at the bound, the next connection is reset and
    rejected (over_limit) without waiting; the metric reason is tls_busy."""
    monkeypatch.setattr(dtls, "MAX_HANDSHAKES", 1)
    log_path = tmp_path / "t.jsonl"

    async def main() -> tuple[bytes | None, float]:
        with TrafficLog(str(log_path)) as log:
            dp, _ = await _datapath(tmp_path, FakeNodeCerts(ca, NAME), log)
            lst = await dp.register_listener("tcp", f"{LO}:0", object(), tls=True)
            loop = asyncio.get_running_loop()
            silent = socket.create_connection((str(LO), lst.port))  # holds the one place
            await _wait(lambda: lst.handshakes == 1)
            late = socket.create_connection((str(LO), lst.port))
            late.setblocking(False)
            try:
                got: bytes | None = await asyncio.wait_for(loop.sock_recv(late, 10), TIMEOUT)
            except ConnectionResetError:
                got = None
            refused = dp.metrics.flows_refused.labels("in", "tls_busy").value
            late.close()
            silent.close()
            await _wait(lambda: lst.handshakes == 0)
            await dp.close_all()
            return got, refused

    got, refused = _run(main())
    assert got in (None, b"")
    assert refused == 1
    rejects = [r for r in _records(log_path) if r["kind"] == "reject"]
    assert rejects[0]["reason"] == "over_limit" and "handshakes already" in rejects[0]["error"]
    assert rejects[1]["reason"] == "tls_failed"  # the silent one, when it hung up


async def _wait(pred: Callable[[], bool]) -> None:
    async with asyncio.timeout(TIMEOUT):
        while not pred():
            await asyncio.sleep(0.01)
