"""LocalAPI methods against a running node: HEAD gets the GET's headers and no body.

The answers that need no node (405, 404, 400/413/431, 403, HEAD before start) are in
tests/unit/test_localapi_methods.py, over a socketpair; here one real ``tsnet2d --up`` in
the netns lab answers over its real socket, with a body to leave out.
"""

from __future__ import annotations

import http.client
import socket
from collections.abc import Iterator

import pytest

import tsnet2
from tsnet2 import proto

from .tailnet import running_tailnet, wait_for


class UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over the daemon socket's LocalAPI channel (the channel byte first)."""

    def __init__(self, path: str) -> None:
        super().__init__("local-tailscaled.sock", timeout=15)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(15)
        sock.connect(self.path)
        sock.sendall(bytes([proto.ChannelKind.LOCALAPI]))
        self.sock = sock


@pytest.fixture(scope="module")
def node() -> Iterator[tuple[str, str]]:
    """(socket path, IPv4) of a node started with --up."""
    with running_tailnet() as lnet:
        d = lnet.add_daemon("head", auth_key=lnet.authkey(),
                           extra_args=("--up", "--hostname", "head"))
        sock = str(d.socket_path)

        def running() -> dict[str, object] | None:
            try:
                st = tsnet2.LocalClient(sock).status()
            except tsnet2.LocalAPIError:
                return None
            return st if st.get("BackendState") == "Running" else None

        st = wait_for(running, 30, "the node to run")
        ips = st["TailscaleIPs"]
        assert isinstance(ips, list)
        yield sock, str(ips[0])


def ask(conn: UnixHTTPConnection, method: str, target: str) -> http.client.HTTPResponse:
    conn.request(method, target)
    resp = conn.getresponse()
    resp.read()
    return resp


@pytest.mark.netns
@pytest.mark.parametrize("target", ["/localapi/v0/status", "/localapi/v0/status?peers=false",
                                    "/localapi/v0/whois?addr={ip}"])
def test_head_is_the_get_without_its_body(node: tuple[str, str], target: str) -> None:
    sock, ip = node
    target = target.format(ip=ip)
    conn = UnixHTTPConnection(sock)
    try:
        get = ask(conn, "GET", target)
        assert get.status == 200
        length = int(get.headers["Content-Length"])
        assert length > 0
        conn.request("HEAD", target)
        head = conn.getresponse()
        assert head.status == 200
        assert head.headers["Content-Type"] == "application/json"
        if "whois" in target:  # a stable document: the very length GET sent
            assert int(head.headers["Content-Length"]) == length
        else:  # status carries live counters; its length may move between the two
            assert int(head.headers["Content-Length"]) > 0
        assert head.read() == b""
        # The connection is still framed right: a GET after the HEAD is answered.
        assert ask(conn, "GET", target).status == 200
    finally:
        conn.close()


@pytest.mark.netns
def test_head_on_the_stream_answers_headers_and_ends(node: tuple[str, str]) -> None:
    conn = UnixHTTPConnection(node[0])
    try:
        conn.request("HEAD", "/localapi/v0/watch-ipn-bus?mask=2")
        resp = conn.getresponse()
        assert resp.status == 200
        assert resp.headers["Transfer-Encoding"] == "chunked"
        assert resp.read() == b""
    finally:
        conn.close()


@pytest.mark.netns
@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS"])
def test_other_methods_are_405_with_allow_on_a_running_node(node: tuple[str, str],
                                                            method: str) -> None:
    conn = UnixHTTPConnection(node[0])
    try:
        for target in ("/localapi/v0/status", f"/localapi/v0/whois?addr={node[1]}"):
            resp = ask(conn, method, target)
            assert resp.status == 405
            assert resp.headers["Allow"] == "GET, HEAD"
        assert ask(conn, "GET", "/localapi/v0/status").status == 200
    finally:
        conn.close()


@pytest.mark.netns
def test_the_go_around_the_log_endpoints_stay_403(node: tuple[str, str]) -> None:
    conn = UnixHTTPConnection(node[0])
    try:
        for method in ("GET", "HEAD", "POST"):
            assert ask(conn, method, "/localapi/v0/dial").status == 403
    finally:
        conn.close()
