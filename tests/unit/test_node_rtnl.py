"""The rtnetlink client (``tsnet2.node.rtnl``) without a kernel: requests and replies as bytes.

Requests are compared with the bytes pyroute2 0.9 sent for the same calls (captured with
``strace -e write=...``; sequence number and port id zeroed), the requests the node made
before it dropped pyroute2. Replies are real kernel datagrams (``rtnl_captures.py``). The
socket loop (``Rtnl.exchange``) runs against a fake socket that plays those datagrams back.
The same operations against a real kernel are in tests/integration/test_node_rtnl.py.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterable
from ipaddress import IPv4Address, IPv6Address, ip_address, ip_network
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit import rtnl_captures as cap
from tsnet2.node import rtnl
from tsnet2.node.rtnl import (
    IFA_F_NODAD,
    IFF_UP,
    RT_SCOPE_LINK,
    NlMsg,
    Rtnl,
    RtnlError,
    build_addr_add,
    build_addr_del,
    build_addr_dump,
    build_link_add,
    build_link_del,
    build_link_dump,
    build_link_get,
    build_link_set,
    build_route_dump,
    build_route_replace,
    nlmsg,
    parse_address,
    parse_attrs,
    parse_error,
    parse_link,
    parse_messages,
    parse_route,
)

# -- requests --------------------------------------------------------------------------------

# What pyroute2 0.9.7 sent (strace -e write=FD), seq and pid zeroed; the link was index 3.
PYROUTE2 = {
    # link_lookup(ifname="v0")
    "link_get": "28000000120005000000000000000000"
                "000000000000000000000000000000000700030076300000",
    # link("set", index=3, mtu=1280, state="up")
    "link_set": "28000000100005000000000000000000"
                "000000000300000001000000010000000800040000050000",
    # route("replace", dst="100.64.0.0/10", oif=3)
    "route4": "2c000000180005050000000000000000"
              "020a0000fe0400010000000008000100644000000800040003000000",
    # route("replace", dst="fd7a:115c:a1e0::/48", oif=3, family=AF_INET6)
    "route6": "38000000180005050000000000000000"
              "0a300000fe0400010000000014000100fd7a115ca1e000000000000000000000"
              "0800040003000000",
    # addr("add", index=3, address="100.64.0.1", prefixlen=32)
    "addr_add4": "28000000140005060000000000000000"
                 "022000000300000008000100644000010800020064400001",
    # addr("add", index=3, address="fd7a:115c:a1e0::1", prefixlen=128, flags=IFA_F_NODAD)
    "addr_add6": "34000000140005060000000000000000"
                 "0a8000000300000014000100fd7a115ca1e00000000000000000000108000800"
                 "02000000",
    # get_addr(index=3): a dump of everything, filtered in userspace
    "addr_dump": "18000000160001030000000000000000"
                 "0000000000000000",
    # addr("del", index=3, address="100.64.0.1", prefixlen=32)
    "addr_del4": "28000000150005000000000000000000"
                 "022000000300000008000100644000010800020064400001",
    # addr("del", index=3, address="fd7a:115c:a1e0::1", prefixlen=128)
    "addr_del6": "2c000000150005000000000000000000"
                 "0a8000000300000014000100fd7a115ca1e000000000000000000001",
    # get_links()
    "link_dump": "20000000120001030000000000000000"
                 "00000000000000000000000000000000",
    # get_routes(family=AF_INET, table=254), get_routes(family=AF_INET6, table=254)
    "route_dump4": "1c0000001a0001030000000000000000"
                   "02000000fe00000000000000",
    "route_dump6": "1c0000001a0001030000000000000000"
                   "0a000000fe00000000000000",
    # link("del", index=5)
    "link_del": "20000000110005000000000000000000"
                "00000000050000000000000000000000",
    # link("add", ifname="wgp", kind="wireguard"): strace's decoding of it (nla_len 8, 20, 14)
    "link_add": "3c000000100005060000000000000000"
                "000000000000000000000000000000000800030077677000140012000e000100"
                "776972656775617264000000",
}

V4, V6 = ip_address("100.64.0.1"), ip_address("fd7a:115c:a1e0::1")
REQUESTS: dict[str, rtnl.Request] = {
    "link_get": build_link_get("v0"),
    "link_set": build_link_set(3, mtu=1280, up=True),
    "route4": build_route_replace(ip_network("100.64.0.0/10"), 3),
    "route6": build_route_replace(ip_network("fd7a:115c:a1e0::/48"), 3),
    "addr_add4": build_addr_add(3, V4, 32),
    "addr_add6": build_addr_add(3, V6, 128, IFA_F_NODAD),
    "addr_dump": build_addr_dump(),
    "addr_del4": build_addr_del(3, V4, 32),
    "addr_del6": build_addr_del(3, V6, 128),
    "link_dump": build_link_dump(),
    "route_dump4": build_route_dump(socket.AF_INET),
    "route_dump6": build_route_dump(socket.AF_INET6),
    "link_del": build_link_del(5),
    "link_add": build_link_add("wgp", "wireguard"),
}


@pytest.mark.parametrize("name", sorted(PYROUTE2))
def test_requests_are_the_bytes_pyroute2_sent(name: str) -> None:
    assert nlmsg(*REQUESTS[name], seq=0).hex() == PYROUTE2[name]


def test_header_carries_seq_and_pid() -> None:
    msg = nlmsg(*build_link_dump(), seq=0x01020304, pid=0x0A0B0C0D)
    assert msg[8:16] == bytes.fromhex("04030201" "0d0c0b0a")
    assert parse_messages(msg) == [NlMsg(18, 0x301, 0x01020304, 0x0A0B0C0D, msg[16:])]


def test_link_set_variants() -> None:
    def body(**kw: Any) -> bytes:
        return build_link_set(7, **kw)[2]

    assert body(up=False)[4:16] == bytes.fromhex("07000000" "00000000" "01000000")  # down
    assert body()[4:16] == bytes.fromhex("07000000" "00000000" "00000000")  # leave it
    assert len(body()) == 16 and len(body(mtu=9000)) == 24


def test_describe_names_the_request() -> None:
    assert rtnl.describe(REQUESTS["link_add"]) == "RTM_NEWLINK wgp (kind wireguard)"
    assert rtnl.describe(REQUESTS["link_set"]) == "RTM_NEWLINK index 3 up mtu 1280"
    assert rtnl.describe(REQUESTS["route6"]) == "RTM_NEWROUTE fd7a:115c:a1e0::/48 oif 3"
    assert rtnl.describe(REQUESTS["addr_add4"]) == "RTM_NEWADDR 100.64.0.1/32 index 3"
    assert rtnl.describe(REQUESTS["route_dump4"]) == "RTM_GETROUTE"
    assert rtnl.describe((99, 0, b"")) == "message type 99"


# -- replies ---------------------------------------------------------------------------------


def messages(datagrams: Iterable[bytes]) -> list[NlMsg]:
    return [m for d in datagrams for m in parse_messages(d)]


def test_parse_link_reply_and_its_ack() -> None:
    msgs = messages(cap.LINK_GET_V0)
    assert [(m.type, m.seq, m.pid) for m in msgs] == [(16, 7, cap.PORTID), (2, 7, cap.PORTID)]
    link = parse_link(msgs[0].payload)
    assert (link.index, link.name, link.mtu) == (cap.INDEX_V0, "v0", 1500)
    assert link.flags & IFF_UP
    assert parse_error(msgs[1].payload, msgs[1].flags) == (0, None)


def test_parse_address_dump() -> None:
    msgs = messages(cap.ADDR_DUMP)
    assert msgs[-1].type == rtnl.NLMSG_DONE
    assert parse_error(msgs[-1].payload, msgs[-1].flags, done=True) == (0, None)
    addrs = [parse_address(m.payload) for m in msgs[:-1]]
    assert all(m.flags & rtnl.NLM_F_MULTI for m in msgs)
    by_ip = {str(a.ip): a for a in addrs}
    v4 = by_ip["10.9.0.2"]
    assert (v4.family, v4.prefixlen, v4.scope, v4.index, v4.label) == (
        socket.AF_INET, 24, 0, cap.INDEX_V0, "v0")
    assert v4.address == v4.local == IPv4Address("10.9.0.2")
    v6 = by_ip["fd00::2"]
    assert (v6.prefixlen, v6.scope, v6.local) == (64, 0, None)
    assert v6.flags & IFA_F_NODAD  # from IFA_FLAGS
    assert by_ip["127.0.0.1"].scope == 254 and by_ip["::1"].index == 1
    link_local = [a for a in addrs if a.scope == RT_SCOPE_LINK]
    assert link_local and all(a.ip is not None and a.ip.is_link_local for a in link_local)


def test_parse_route_dump() -> None:
    msgs = messages(cap.ROUTE_DUMP_V4)
    routes = [parse_route(m.payload) for m in msgs if m.type == rtnl.RTM_NEWROUTE]
    main = [r for r in routes if r.table == rtnl.RT_TABLE_MAIN]
    assert {r.table for r in routes} == {254, 255}  # the kernel ignores the table asked for
    default = next(r for r in main if r.dst_len == 0)
    assert default.dst is None and default.oif == cap.INDEX_V0
    assert default.gateway == IPv4Address("10.9.0.1")
    assert default.prefsrc == IPv4Address("10.9.0.2")
    subnet = next(r for r in main if r.dst_len == 24)
    assert (subnet.dst, subnet.scope, subnet.gateway) == (IPv4Address("10.9.0.0"), 253, None)


@pytest.mark.parametrize(
    ("capture", "expected"),
    [
        (cap.LINK_ADD_WIREGUARD, (errno.EOPNOTSUPP, "Unknown device type")),
        (cap.LINK_ADD_WIREGUARD_NOEXT, (errno.EOPNOTSUPP, None)),  # whole request echoed
        (cap.LINK_GET_MISSING, (errno.ENODEV, None)),
        (cap.ROUTE_REPLACE_BAD_OIF, (errno.ENODEV, None)),
        (cap.ADDR_ADD_OK, (0, None)),
    ],
)
def test_parse_errors(capture: list[bytes], expected: tuple[int, str | None]) -> None:
    (msg,) = messages(capture)
    assert msg.type == rtnl.NLMSG_ERROR
    assert parse_error(msg.payload, msg.flags) == expected


def test_parse_done_with_an_error_and_message() -> None:
    tlv = bytes.fromhex("0d000100") + b"too busy\0" + b"\0" * 3
    done = nlmsg(rtnl.NLMSG_DONE, rtnl.NLM_F_MULTI | rtnl.NLM_F_ACK_TLVS,
                 (-errno.EBUSY).to_bytes(4, "little", signed=True) + tlv, seq=1)
    (msg,) = parse_messages(done)
    assert parse_error(msg.payload, msg.flags, done=True) == (errno.EBUSY, "too busy")


@pytest.mark.parametrize(
    "data",
    [
        b"\x10\x00\x00",  # shorter than a header
        bytes.fromhex("20000000" "1000" "0000" "00000000" "00000000"),  # length overruns
        bytes.fromhex("08000000" "1000" "0000" "00000000" "00000000"),  # length < header
    ],
)
def test_malformed_datagrams(data: bytes) -> None:
    with pytest.raises(RtnlError) as info:
        parse_messages(data)
    assert info.value.errno == errno.EBADMSG


def test_malformed_payloads() -> None:
    with pytest.raises(RtnlError, match="ifinfomsg of 4 bytes"):
        parse_link(b"\0" * 4)
    with pytest.raises(RtnlError, match="overruns"):
        parse_attrs(bytes.fromhex("0900010001"))
    truncated_attr = bytes.fromhex("02200000" "03000000" "08000100" "0102")
    with pytest.raises(RtnlError, match="overruns"):
        parse_address(truncated_attr)
    v4_in_v6 = bytes.fromhex("0a800000" "03000000" "08000100" "64400001")
    with pytest.raises(RtnlError, match="no address of family 10"):
        parse_address(v4_in_v6)
    with pytest.raises(RtnlError, match="expected 4"):
        parse_route(bytes(12) + bytes.fromhex("06000400" "0100" "0000"))
    with pytest.raises(RtnlError, match="without the request's header"):
        parse_error(bytes.fromhex("ecffffff"), rtnl.NLM_F_ACK_TLVS)


def test_error_text() -> None:
    exc = RtnlError(errno.EOPNOTSUPP, "RTM_NEWLINK wgp (kind wireguard)", "Unknown device type")
    assert isinstance(exc, OSError) and exc.errno == errno.EOPNOTSUPP
    assert str(exc) == ("[Errno 95] RTM_NEWLINK wgp (kind wireguard): Operation not supported "
                        "(kernel: Unknown device type)")
    assert exc.request == "RTM_NEWLINK wgp (kind wireguard)"
    assert exc.kernel_message == "Unknown device type"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=256))
def test_parsers_only_ever_raise_rtnl_error(data: bytes) -> None:
    for parse in (parse_messages, parse_attrs, parse_link, parse_address, parse_route):
        try:
            parse(data)
        except RtnlError as exc:
            assert exc.errno == errno.EBADMSG


# -- the socket loop, on a fake socket -------------------------------------------------------


class FakeSocket:
    """Records what is sent; answers each recvmsg with the next queued datagram."""

    def __init__(self, replies: Iterable[bytes | BaseException], flags: int = 0,
                 sender: int = 0) -> None:
        self.replies = list(replies)
        self.sent: list[bytes] = []
        self.flags = flags
        self.sender = sender
        self.closed = False

    def sendall(self, data: bytes) -> None:
        self.sent.append(data)

    def recvmsg(self, size: int) -> tuple[bytes, list[Any], int, tuple[int, int]]:
        assert size == rtnl.RECV_SIZE
        if not self.replies:
            raise TimeoutError("timed out")
        reply = self.replies.pop(0)
        if isinstance(reply, BaseException):
            raise reply
        return reply, [], self.flags, (self.sender, 0)

    def close(self) -> None:
        self.closed = True


def fake_rtnl(replies: Iterable[bytes | BaseException], next_seq: int, **kw: Any) -> Rtnl:
    rt = Rtnl.__new__(Rtnl)
    rt._sock = FakeSocket(replies, **kw)  # type: ignore[assignment]
    rt._seq = next_seq - 1
    rt.portid = cap.PORTID
    rt.timeout = 0.5
    return rt


def sent(rt: Rtnl) -> list[bytes]:
    return rt._sock.sent  # type: ignore[attr-defined,no-any-return]


def test_link_index_found_and_missing() -> None:
    rt = fake_rtnl(cap.LINK_GET_V0, 7)
    assert rt.link_index("v0") == cap.INDEX_V0
    assert sent(rt) == [nlmsg(*build_link_get("v0"), seq=7)]
    assert fake_rtnl(cap.LINK_GET_MISSING, 8).link_index("nope0") is None


def test_addresses_of_one_link_and_all() -> None:
    assert [str(a.ip) for a in fake_rtnl(cap.ADDR_DUMP, 9).addresses(cap.INDEX_V0)] == [
        "10.9.0.2", "fd00::2", "fe80::44d0:1bff:fe16:4dd2"]
    assert len(fake_rtnl(cap.ADDR_DUMP, 9).addresses()) == 6


def test_routes_keep_the_table_asked_for() -> None:
    routes = fake_rtnl(cap.ROUTE_DUMP_V4, 10).routes(socket.AF_INET)
    assert [(str(r.dst), r.dst_len) for r in routes] == [("None", 0), ("10.9.0.0", 24)]
    local = fake_rtnl(cap.ROUTE_DUMP_V4, 10).routes(socket.AF_INET, table=255)
    assert len(local) == 5 and all(r.table == 255 for r in local)


def test_kernel_error_becomes_rtnl_error() -> None:
    rt = fake_rtnl(cap.LINK_ADD_WIREGUARD, 11)
    with pytest.raises(RtnlError) as info:
        rt.link_add("wgp0", "wireguard")
    assert info.value.errno == errno.EOPNOTSUPP
    assert str(info.value) == ("[Errno 95] RTM_NEWLINK wgp0 (kind wireguard): Operation not "
                               "supported (kernel: Unknown device type)")
    rt = fake_rtnl(cap.ROUTE_REPLACE_BAD_OIF, 13)
    with pytest.raises(RtnlError, match=r"\[Errno 19\] RTM_NEWROUTE 100.64.0.0/10 oif 999: "
                                        r"No such device$"):
        rt.route_replace(ip_network("100.64.0.0/10"), 999)


def test_ack_ends_the_request() -> None:
    rt = fake_rtnl(cap.ADDR_ADD_OK, 14)
    rt.addr_add(cap.INDEX_V0, IPv4Address("100.64.0.7"), 32)
    assert sent(rt) == [nlmsg(*build_addr_add(cap.INDEX_V0, IPv4Address("100.64.0.7"), 32),
                              seq=14)]


def test_replies_to_other_requests_are_skipped() -> None:
    """A late answer to an earlier request (its seq), or one for another port id, is not
    this request's answer, even when it is an error."""
    stale = cap.LINK_ADD_WIREGUARD[0]  # seq 11, an error
    other_port = bytearray(cap.LINK_ADD_WIREGUARD[0])
    other_port[8:12] = (14).to_bytes(4, "little")  # seq 14, but ...
    other_port[12:16] = (cap.PORTID + 1).to_bytes(4, "little")  # ... another port id
    rt = fake_rtnl([stale, bytes(other_port), *cap.ADDR_ADD_OK], 14)
    rt.addr_add(cap.INDEX_V0, IPv4Address("100.64.0.7"), 32)


def test_datagrams_not_from_the_kernel_are_ignored() -> None:
    rt = fake_rtnl(cap.LINK_ADD_WIREGUARD, 11, sender=4242)
    with pytest.raises(RtnlError) as info:  # the error is ignored; then nothing comes
        rt.link_add("wgp0", "wireguard")
    assert info.value.errno == errno.ETIMEDOUT


def test_timeout_and_socket_errors() -> None:
    rt = fake_rtnl([], 1)
    with pytest.raises(RtnlError, match=r"RTM_GETLINK: no reply from the kernel within 0.5 s") \
            as info:
        rt.links()
    assert info.value.errno == errno.ETIMEDOUT
    rt = fake_rtnl([OSError(errno.ENOBUFS, "No buffer space available")], 1)
    with pytest.raises(RtnlError) as info:
        rt.links()
    assert info.value.errno == errno.ENOBUFS


def test_truncated_datagram_is_an_error() -> None:
    rt = fake_rtnl(cap.ADDR_DUMP, 9, flags=socket.MSG_TRUNC)
    with pytest.raises(RtnlError, match="exceeds 65536 bytes") as info:
        rt.addresses()
    assert info.value.errno == errno.EMSGSIZE


def test_reply_size_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rtnl, "MAX_MESSAGES", 3)
    with pytest.raises(RtnlError, match="more than 3 reply messages"):
        fake_rtnl(cap.ADDR_DUMP, 9).addresses()


def test_dump_that_ends_in_an_error() -> None:
    msgs = messages(cap.ADDR_DUMP)
    first = nlmsg(msgs[0].type, msgs[0].flags, msgs[0].payload, seq=9, pid=cap.PORTID)
    done = nlmsg(rtnl.NLMSG_DONE, rtnl.NLM_F_MULTI,
                 (-errno.EINTR).to_bytes(4, "little", signed=True), seq=9, pid=cap.PORTID)
    with pytest.raises(RtnlError) as info:
        fake_rtnl([first, done], 9).addresses()
    assert info.value.errno == errno.EINTR


def test_sequence_numbers_advance_and_wrap() -> None:
    rt = fake_rtnl([], 0xFFFFFFFF)
    with pytest.raises(RtnlError):
        rt.links()
    rt._sock.replies = []  # type: ignore[attr-defined]
    with pytest.raises(RtnlError):
        rt.links()
    seqs = [parse_messages(m)[0].seq for m in sent(rt)]
    assert seqs == [0xFFFFFFFF, 1]


def test_context_manager_closes_the_socket() -> None:
    rt = fake_rtnl([], 1)
    with rt:
        pass
    assert rt._sock.closed  # type: ignore[attr-defined]


def test_address_helpers() -> None:
    a = parse_address(bytes.fromhex("0a800000" "03000000" "14000100") + IPv6Address(1).packed)
    assert a.ip == IPv6Address(1) and a.local is None and a.label is None
