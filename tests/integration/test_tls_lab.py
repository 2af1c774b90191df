"""TLS in the daemon, in the lab: two tsnet2d nodes (real wireguard-go, real control server
issuing certificates from the tailnet CA). Node B's ``listen_tls`` service is reached by an
``ssl``-verifying client that trusts only the tailnet CA, and by ``dial_tls``; the traffic
log of the node that terminated or originated TLS holds the plaintext and says the flow was
TLS; a wrong name or a peer that does not speak TLS is a ``reject`` with reason
``tls_failed``, and the listener goes on serving."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import socket
import ssl
import threading
from collections.abc import Iterator
from typing import Any

import jsonschema
import pytest

import tsnet2
from tsnet2.daemon.certs import CA_BUNDLE_NAME
from tsnet2.traffic import load_schema

from .tailnet import TwoNodes, read_log, two_nodes, wait_for

pytestmark = pytest.mark.netns

DOMAIN = "tail-scale.ts.net"
FQDN_A, FQDN_B = f"tlsa.{DOMAIN}", f"tlsb.{DOMAIN}"
WAIT = 60.0


def _cert_ready(d: Any, fqdn: str) -> bool:
    try:
        return bool(tsnet2.LocalClient(str(d.socket_path)).cert_pem(fqdn))
    except tsnet2.LocalAPIError as exc:
        assert exc.status == 503, exc
        return False


@pytest.fixture(scope="module", params=["uvloop", "asyncio"])
def nodes(request: pytest.FixtureRequest) -> Iterator[TwoNodes]:
    """Both daemons on the event loop of the parameter (tsnet2d --event-loop)."""
    loop = ("--event-loop", str(request.param))
    with two_nodes(("tlsa", "tlsb"), extra_a=loop, extra_b=loop) as n:
        wait_for(lambda: _cert_ready(n.da, FQDN_A), WAIT, "node A's certificate")
        wait_for(lambda: _cert_ready(n.db, FQDN_B), WAIT, "node B's certificate")
        yield n


def _payload(records: list[dict[str, Any]], conn_id: str, direction: str) -> bytes:
    return b"".join(base64.b64decode(r.get("payload_b64", "")) for r in records
                    if r.get("kind") == "data" and r["conn_id"] == conn_id
                    and r["dir"] == direction)


def _closed(path: Any, conn_id: str) -> list[dict[str, Any]]:
    recs = read_log(path)
    return recs if any(r.get("kind") == "close" and r["conn_id"] == conn_id
                       for r in recs) else []


def _echo_line(ln: tsnet2.Listener, seen: list[Any]) -> threading.Thread:
    """Serve one connection on ``ln``: read a line, answer ``echo: <line>``."""
    def serve() -> None:
        with ln.accept(timeout=30) as conn:
            seen.append(conn.tls)
            line = b""
            while not line.endswith(b"\n"):
                chunk = conn.recv(100)
                if not chunk:
                    break
                line += chunk
            conn.sendall(b"echo: " + line)
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return t


def _read_until_eof(sock: Any) -> bytes:
    got = b""
    while chunk := sock.recv(4096):
        got += chunk
    return got


def test_ssl_client_with_only_the_tailnet_ca_reaches_listen_tls_by_fqdn(
        nodes: TwoNodes) -> None:
    """(a) + ALPN: B's daemon terminates; B's log holds the plaintext, A's the ciphertext."""
    n = nodes
    with n.b.listen_tls("tcp", ":443", alpn=["x-echo", "http/1.1"]) as ln:
        assert ln.tls
        seen: list[Any] = []
        t = _echo_line(ln, seen)
        ca_file = n.da.socket_path.parent / CA_BUNDLE_NAME  # the tailnet CA, nothing else
        ctx = ssl.create_default_context(cafile=str(ca_file))
        ctx.set_alpn_protocols(["x-echo"])
        sock = n.a.dial("tcp", f"{FQDN_B}:443", timeout=10)
        with ctx.wrap_socket(sock, server_hostname=FQDN_B) as tls:
            assert tls.selected_alpn_protocol() == "x-echo"
            assert dict(x[0] for x in tls.getpeercert()["subject"])["commonName"]
            tls.sendall(b"secret plaintext 1\n")
            assert _read_until_eof(tls) == b"echo: secret plaintext 1\n"
        t.join(30)
    info = seen[0]
    assert isinstance(info, tsnet2.TLSInfo)
    assert (info.sni, info.alpn, info.peer_name) == (FQDN_B, "x-echo", "")
    assert info.version in ("TLSv1.3", "TLSv1.2") and info.cipher

    opened = wait_for(lambda: [r for r in read_log(n.db.traffic_log)
                               if r.get("kind") == "open" and r.get("listener_id")
                               == ln.listener_id], 10, "B's open record")[0]
    assert opened["tls"] == {"alpn": "x-echo", "cipher": info.cipher, "sni": FQDN_B,
                             "version": info.version}
    assert opened["dir"] == "in" and opened["whois"]["node"].startswith("tlsa.")
    recs = wait_for(lambda: _closed(n.db.traffic_log, opened["conn_id"]), 10, "B's close")
    assert _payload(recs, opened["conn_id"], "peer->app") == b"secret plaintext 1\n"
    assert _payload(recs, opened["conn_id"], "app->peer") == b"echo: secret plaintext 1\n"
    # A's app did TLS itself over a plain dial: A's log has only ciphertext, no tls object.
    a_open = [r for r in read_log(n.da.traffic_log) if r.get("kind") == "open"
              and r["dir"] == "out" and r["remote"].endswith(":443")][-1]
    assert "tls" not in a_open
    a_recs = wait_for(lambda: _closed(n.da.traffic_log, a_open["conn_id"]), 10, "A's close")
    sent = _payload(a_recs, a_open["conn_id"], "app->peer")
    assert sent and b"secret plaintext" not in sent


def test_dial_tls_verifies_the_peer_and_logs_plaintext(nodes: TwoNodes) -> None:
    """(b) + (e): A's daemon originates TLS to B's listen_tls; both ends see the ALPN."""
    n = nodes
    with n.b.listen_tls("tcp", ":8443", alpn=["h2", "x-echo"]) as ln:
        seen: list[Any] = []
        t = _echo_line(ln, seen)
        with n.a.dial_tls("tcp", "tlsb:8443", alpn=["x-echo"], timeout=15) as conn:
            info = conn.tls
            conn.sendall(b"over dial_tls\n")
            assert _read_until_eof(conn) == b"echo: over dial_tls\n"
        t.join(30)
    assert isinstance(info, tsnet2.TLSInfo)
    assert (info.peer_name, info.sni, info.alpn) == (FQDN_B, FQDN_B, "x-echo")
    assert seen[0].alpn == "x-echo" and seen[0].sni == FQDN_B
    opened = [r for r in read_log(n.da.traffic_log) if r.get("kind") == "open"
              and r.get("tls", {}).get("peer_name") == FQDN_B][-1]
    assert opened["tls"]["alpn"] == "x-echo" and opened["dir"] == "out"
    recs = wait_for(lambda: _closed(n.da.traffic_log, opened["conn_id"]), 10, "A's close")
    assert _payload(recs, opened["conn_id"], "app->peer") == b"over dial_tls\n"
    assert _payload(recs, opened["conn_id"], "peer->app") == b"echo: over dial_tls\n"


def test_dial_tls_with_a_wrong_name_fails_verification(nodes: TwoNodes) -> None:
    """(c): TLSError with OpenSSL's reason, a reject tls_failed in A's log."""
    n = nodes
    wrong = f"other.{DOMAIN}"
    with n.b.listen_tls("tcp", ":9443") as ln:
        with pytest.raises(tsnet2.TLSError) as ei:
            n.a.dial_tls("tcp", "tlsb:9443", server_name=wrong, timeout=15)
        msg = str(ei.value)
        assert msg.startswith("tsnet2.dial_tls: daemon: dial tlsb:9443: TLS: certificate "
                              "verify failed: Hostname mismatch"), msg
        assert f"'{wrong}'" in msg
        assert isinstance(ei.value, tsnet2.DialError)
        rejects = [r for r in read_log(n.da.traffic_log) if r.get("kind") == "reject"
                   and r.get("reason") == "tls_failed" and r["dir"] == "out"]
        assert rejects and "Hostname mismatch" in rejects[-1]["error"]
        assert ln.tls


def test_a_peer_that_does_not_speak_tls_is_refused_and_the_listener_serves_on(
        nodes: TwoNodes) -> None:
    """(d): garbage instead of a ClientHello: reject tls_failed on B, the client's
    connection ends; a client that sends nothing does not hold up the next (real) one."""
    n = nodes
    with n.b.listen_tls("tcp", ":10443") as ln:
        with n.a.dial("tcp", "tlsb:10443", timeout=10) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: tlsb\r\n\r\n")
            with contextlib.suppress(ConnectionResetError):
                _read_until_eof(sock)  # the daemon's alert, then EOF or a reset
        reject = wait_for(lambda: [r for r in read_log(n.db.traffic_log)
                                   if r.get("kind") == "reject"
                                   and r.get("listener_id") == ln.listener_id], 10,
                          "B's reject")[-1]
        assert reject["reason"] == "tls_failed" and reject["dir"] == "in"
        assert reject["error"].startswith("TLS: "), reject
        # A client that connects and says nothing holds one handshake (up to 10 s), not
        # the listener: a real client is served meanwhile.
        silent = n.a.dial("tcp", "tlsb:10443", timeout=10)
        seen: list[Any] = []
        t = _echo_line(ln, seen)
        with n.a.dial_tls("tcp", "tlsb:10443", timeout=15) as conn:
            conn.sendall(b"still here\n")
            assert _read_until_eof(conn) == b"echo: still here\n"
        t.join(30)
        assert seen[0].sni == FQDN_B
        silent.close()  # its handshake ends: refused too
        wait_for(lambda: len([r for r in read_log(n.db.traffic_log)
                              if r.get("kind") == "reject"
                              and r.get("listener_id") == ln.listener_id]) == 2, 15,
                 "the silent client's reject")


def test_the_asyncio_face(nodes: TwoNodes) -> None:
    """(f): AsyncServer.listen_tls / dial_tls, AsyncConn.tls."""
    n = nodes

    async def main() -> tuple[Any, Any, bytes]:
        async with tsnet2.AsyncServer(socket_path=str(n.da.socket_path)) as a, \
                tsnet2.AsyncServer(socket_path=str(n.db.socket_path)) as b:
            ln = await b.listen_tls("tcp", ":11443", alpn=["x-async"])
            async with ln:
                assert ln.tls

                async def serve() -> Any:
                    conn = await ln.accept(timeout=30)
                    async with conn:
                        line = await conn.reader.readline()
                        conn.writer.write(b"async " + line)
                        await conn.writer.drain()
                    return conn.tls

                server = asyncio.create_task(serve())
                conn = await a.dial_tls("tcp", "tlsb:11443", alpn=["x-async"], timeout=15)
                async with conn:
                    conn.writer.write(b"hello\n")
                    await conn.writer.drain()
                    answer = await conn.reader.read()
                return await server, conn.tls, answer

    server_tls, client_tls, answer = asyncio.run(main())
    assert answer == b"async hello\n"
    assert server_tls.alpn == client_tls.alpn == "x-async"
    assert client_tls.peer_name == FQDN_B and server_tls.sni == FQDN_B


def test_plain_dial_to_a_tls_port_and_socket_names(nodes: TwoNodes) -> None:
    """A TailnetSocket from dial_tls is still a socket with tailnet names."""
    n = nodes
    with n.b.listen_tls("tcp", ":12443") as ln:
        seen: list[Any] = []
        t = _echo_line(ln, seen)
        with n.a.dial_tls("tcp", f"{FQDN_B}:12443", timeout=15) as conn:
            assert isinstance(conn, socket.socket) and conn.getpeername()[1] == 12443
            conn.sendall(b"x\n")
            assert _read_until_eof(conn) == b"echo: x\n"
        t.join(30)


def test_every_record_matches_the_schema(nodes: TwoNodes) -> None:
    """Runs last in the module: the open records with tls and the tls_failed rejects the
    tests above wrote are valid against tsnet2/traffic/schema.json."""
    schema = load_schema()
    recs = read_log(nodes.da.traffic_log) + read_log(nodes.db.traffic_log)
    assert any("tls" in r for r in recs)
    assert any(r.get("reason") == "tls_failed" for r in recs)
    for r in recs:
        jsonschema.validate(r, schema)
