"""tsnet2d's UDP datapath (tsnet2.daemon.udp) on loopback sockets, without a tailnet:
the bounded app buffer (drops counted, never unbounded), notices, records, close_all; and
the --udp-idle-timeout flag."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
from pathlib import Path
from typing import Any

import pytest

from tsnet2 import proto
from tsnet2.daemon import cli
from tsnet2.daemon.datapath import Datapath, ListenerRegistration
from tsnet2.daemon.metrics import Metrics
from tsnet2.daemon.udp import APP_BUFFER, max_datagram
from tsnet2.proto.udp import Datagram, FrameDecoder, Notice, encode_datagram
from tsnet2.traffic import TrafficLog

LO = ipaddress.ip_address("127.0.0.1")


class FakeBackend:
    """Just what the UDP datapath asks: 127.0.0.1 is a node, nothing else is."""

    running = True

    def node_by_ip(self, ip: Any) -> dict[str, Any] | None:
        return {"name": "peer", "fqdn": "peer.ts.net.", "id": "n1"} if ip == LO else None

    def node_by_addr(self, text: str) -> dict[str, Any] | None:
        return self.node_by_ip(ipaddress.ip_address(text))

    async def set_listeners(self, *_: Any) -> None:
        return None


def test_max_datagram_is_the_mtu_less_headers() -> None:
    assert (max_datagram(4), max_datagram(6)) == (1252, 1232)


def test_flag_is_documented_and_checked(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    text = " ".join(cli.build_parser().format_help().split())
    assert "--udp-idle-timeout SECONDS" in text and "default 60" in text
    argv = ["--socket", str(tmp_path / "s.sock"), "--state-dir", str(tmp_path / "st"),
            "--udp-idle-timeout", "0"]
    assert cli.main(argv) == cli.USAGE_EXIT
    assert "--udp-idle-timeout takes 0.1 to 86400 seconds" in capsys.readouterr().err


async def until(pred: Any, what: str, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not pred():
        if loop.time() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def sample(m: Metrics, name: str, **labels: str) -> float:
    for line in m.render().decode().splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no sample {name} {labels}")


def test_listener_buffer_is_bounded_and_records_match(tmp_path: Path) -> None:
    log_path = tmp_path / "t.jsonl"

    async def main() -> None:
        tasks: list[asyncio.Task[Any]] = []
        metrics = Metrics()
        with TrafficLog(str(log_path), mode="metadata") as log:
            dp = Datapath(FakeBackend(), log,  # type: ignore[arg-type]
                          lambda c: tasks.append(asyncio.ensure_future(c)) or tasks[-1],
                          metrics)
            socks = dp.udp.bind([LO], 0)
            port = socks[0].getsockname()[1]
            lst = ListenerRegistration(id="00112233aabbccdd", network="udp", port=port,
                                       addr=f":{port}", owner=None, ips=[LO], socks=socks)
            dp.listeners[lst.id] = lst
            assert dp.udp.add_listener(lst) == 1252
            app, daemon_end = socket.socketpair()
            daemon_end.setblocking(False)
            app.setblocking(False)
            assert await dp.udp.attach(lst, daemon_end, proto.LineReader(4096))
            peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            peer.bind(("127.0.0.1", 0))
            peer.setblocking(False)
            sent = 0
            # The app does not read: the daemon buffers at most APP_BUFFER, then drops.
            while sample(metrics, "tsnet2_udp_datagrams_dropped_total", reason="app_slow") < 50:
                for _ in range(20):
                    try:
                        peer.sendto(b"d" * 1000, ("127.0.0.1", port))
                        sent += 1
                    except BlockingIOError:
                        break
                await asyncio.sleep(0.005)
                assert sent < 100000, "no drop: the buffer is not bounded"
            ul = dp.udp.listeners[lst.id]
            assert ul.channel is not None and ul.channel.out_bytes <= APP_BUFFER
            # Oversized and non-tailnet frames from the app: notices, nothing sent.
            app.sendall(encode_datagram(b"x" * 2000, f"127.0.0.1:{port}")
                        + encode_datagram(b"hi", "100.64.9.9:53"))
            # Now the app reads everything: exactly the datagrams the log counted.
            dec = FrameDecoder(addressed=True)
            buf = b""
            while b"\n" not in buf:
                buf += app.recv(1)
            header = proto.decode_accept_header(buf)
            assert (header.remote, header.max_datagram) == ("", 1252)
            got: list[Any] = []
            notices: list[Notice] = []

            def drain() -> bool:
                try:
                    data = app.recv(65536)
                except BlockingIOError:
                    return False
                for ev in dec.feed(data):
                    (notices if isinstance(ev, Notice) else got).append(ev)
                return True

            await until(lambda: (drain() or True) and len(notices) == 2, "two notices")
            await until(lambda: not drain() and ul.channel is not None
                        and not ul.channel.out, "the buffer to drain")
            codes = [n.code for n in notices]
            assert codes == [proto.ErrorCode.DATAGRAM_TOO_LARGE, proto.ErrorCode.NO_SUCH_PEER]
            assert sample(metrics, "tsnet2_udp_datagrams_dropped_total",
                          reason="too_large") == 1
            assert all(isinstance(d, Datagram) and len(d.payload) == 1000 for d in got)
            delivered = len(got)
            assert sample(metrics, "tsnet2_udp_datagrams_total",
                          stream="peer->app") == delivered
            await dp.udp.close_all()  # as at shutdown: the flow is cut, with its record
            peer.close()
            app.close()
            for s in socks:
                s.close()
            recs = [json.loads(x) for x in log_path.read_text().splitlines()]
            close = next(r for r in recs if r["kind"] == "close")
            assert close["proto"] == "udp" and close["datagrams_in"] == delivered
            assert close["bytes_in"] == 1000 * delivered and close["datagrams_out"] == 0
            assert close["error"] == "daemon: flow cut by shutdown"
            data = [r for r in recs if r["kind"] == "data"]
            assert len(data) == delivered and "payload_b64" not in data[0]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(main())


def test_udp_dials_per_client_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tsnet2.daemon import udp as udp_mod

    monkeypatch.setattr(udp_mod, "MAX_UDP_DIALS_PER_CLIENT", 1)

    class Backend(FakeBackend):
        def resolve(self, host: str, family: int | None) -> Any:
            return LO

    async def dial(dp: Datapath, target: str) -> tuple[socket.socket, bool, bytes]:
        app, daemon_end = socket.socketpair()
        daemon_end.setblocking(False)
        req = proto.decode_dial_request(proto.encode_dial_request("udp", target))
        owned = await dp.udp.dial(daemon_end, req, proto.LineReader(4096))
        if not owned:
            daemon_end.close()
        buf = b""
        while not buf.endswith(b"\n"):
            buf += app.recv(1)
        return app, owned, buf

    async def main() -> None:
        with TrafficLog(str(tmp_path / "t.jsonl"), mode="metadata") as log:
            dp = Datapath(Backend(), log, lambda c: asyncio.ensure_future(c))  # type: ignore[arg-type]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer:
                peer.bind(("127.0.0.1", 0))
                target = f"127.0.0.1:{peer.getsockname()[1]}"
                app1, owned1, reply1 = await dial(dp, target)
                app2, owned2, reply2 = await dial(dp, target)
                r1, r2 = proto.decode_dial_reply(reply1), proto.decode_dial_reply(reply2)
                assert owned1 and r1.ok and r1.max_datagram == 1252
                assert not owned2 and not r2.ok and r2.code == proto.ErrorCode.LIMIT
                assert "at most 1 per client" in r2.err
                await dp.udp.close_all()
                app1.close()
                app2.close()
        recs = [json.loads(x) for x in (tmp_path / "t.jsonl").read_text().splitlines()]
        rejects = [r for r in recs if r["kind"] == "reject"]
        assert [(r["reason"], r["proto"]) for r in rejects] == [("over_limit", "udp")]

    asyncio.run(main())
