"""The audit guard's nft script generation (pure) and input validation.

The last tests feed the generated scripts to the real ``nft`` in check mode (``-c``: parse and
validate against the kernel, then abort) inside a throwaway network namespace; they are skipped
without root, ``nft`` or ``unshare``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from ipaddress import IPv4Address, IPv6Address, ip_address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.require import needs
from tsnet2.node import NodeError
from tsnet2.node.guard import (
    DEFAULT_MARK,
    LOG_BURST,
    LOG_PREFIX,
    LOG_RATE,
    LOG_SNAPLEN,
    Guard,
    GuardError,
    Listener,
    ruleset,
    set_listeners_script,
    table_name,
)

A4, A6 = IPv4Address("100.64.0.1"), IPv6Address("fd7a:115c:a1e0::1")


def rule_lines(text: str) -> list[str]:
    """The script's lines, stripped, without blanks and comments."""
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]


def test_default_mark_is_the_daemons() -> None:
    from tsnet2.daemon.io import DAEMON_MARK

    assert DEFAULT_MARK == DAEMON_MARK == 0x7473


def test_install_script_replaces_the_table_in_one_transaction() -> None:
    lines = rule_lines(ruleset("wg0"))
    # create-if-missing, delete, define: one `nft -f` transaction, so a leftover table of a
    # crashed daemon goes and a missing one is no error.
    assert lines[:3] == [
        "table inet tsnet2_wg0",
        "delete table inet tsnet2_wg0",
        "table inet tsnet2_wg0 {",
    ]


def test_output_rules() -> None:
    lines = rule_lines(ruleset("wg0"))
    out = lines[lines.index("chain tailnet_out {") + 1 :]
    out = out[: out.index("}")]
    assert 'oifname "wg0" jump tailnet_out' in lines
    assert "type filter hook output priority filter; policy accept;" in lines
    assert out[0].startswith("meta mark 0x7473 accept")
    assert out[1].startswith("ct state related accept")
    assert out[2].startswith("ct state established tcp flags rst accept")
    assert out[3:] == [
        "meta l4proto tcp reject with tcp reset",
        "reject with icmpx admin-prohibited",
    ]


def input_chain(text: str) -> list[str]:
    """The rules of the ``tailnet_in`` chain."""
    lines = rule_lines(text)
    inp = lines[lines.index("chain tailnet_in {") + 1 :]
    return inp[: inp.index("}")]


def test_input_rules_without_log_group() -> None:
    text = ruleset("wg0")
    inp = input_chain(text)
    assert 'iifname "wg0" jump tailnet_in' in rule_lines(text)
    # UDP first: only to a socket of the daemon, even for an "established" conntrack entry
    # (it outlives the daemon's socket; an app could bind the port and get its datagrams).
    assert inp[0].startswith("meta l4proto udp socket mark != 0x7473 "
                             "reject with icmpx admin-prohibited comment ")
    assert inp[1] == "ct state established,related accept"
    # TCP: address-precise, and no `socket mark`: that lookup breaks for a SYN matching a
    # TIME_WAIT socket, refusing a peer that reuses a source port.
    assert inp[2].startswith("ip daddr . tcp dport @listen4 accept comment ")
    assert inp[3].startswith("ip6 daddr . tcp dport @listen6 accept comment ")
    assert "socket" not in " ".join(inp[1:])
    assert inp[4].startswith("ip daddr . udp dport @ulisten4 accept comment ")
    assert inp[5].startswith("ip6 daddr . udp dport @ulisten6 accept comment ")
    assert inp[6:] == [
        "meta l4proto tcp reject with tcp reset",
        "reject with icmpx admin-prohibited",
    ]
    assert "nat" not in text and "redirect" not in text and " log " not in text


def test_log_group_logs_refused_syns_rate_limited_then_rejects() -> None:
    text = ruleset("wg0", log_group=7)
    inp = input_chain(text)
    assert inp[:6] == input_chain(ruleset("wg0"))[:6]  # the accepts come first, unchanged
    assert inp[6].startswith(
        "tcp flags & (fin | syn | rst | ack) == syn "
        "limit rate 100/second burst 200 packets "
        'log prefix "tsnet2-refused" group 7 snaplen 128 comment '
    )
    assert (LOG_RATE, LOG_BURST, LOG_PREFIX, LOG_SNAPLEN) == (
        "100/second", 200, "tsnet2-refused", 128)  # fmt: skip
    # The log statement does not end the chain: the SYN is still rejected with a reset.
    assert inp[7:] == [
        "meta l4proto tcp reject with tcp reset",
        "reject with icmpx admin-prohibited",
    ]
    assert "nat" not in text and "redirect" not in text
    assert "group 0 " in ruleset("wg0", log_group=0)


def test_udp_listeners_have_their_own_sets() -> None:
    text = ruleset("wg0", listeners=[(A4, 53)], udp_listeners=[(A4, 53), (A6, 5353)])
    assert set_block(text, "listen4")[1] == "elements = { 100.64.0.1 . 53 }"
    assert set_block(text, "ulisten4") == ["type ipv4_addr . inet_service",
                                           "elements = { 100.64.0.1 . 53 }"]
    assert set_block(text, "ulisten6") == ["type ipv6_addr . inet_service",
                                           "elements = { fd7a:115c:a1e0::1 . 5353 }"]
    assert set_listeners_script("t", [(A4, 80)], [(A6, 53)]) == (
        "flush set inet t listen4\n"
        "flush set inet t listen6\n"
        "flush set inet t ulisten4\n"
        "flush set inet t ulisten6\n"
        "add element inet t listen4 { 100.64.0.1 . 80 }\n"
        "add element inet t ulisten6 { fd7a:115c:a1e0::1 . 53 }\n"
    )
    with pytest.raises(GuardError):
        ruleset("wg0", udp_listeners=[(ip_address("0.0.0.0"), 53)])


def set_block(text: str, name: str) -> list[str]:
    """The lines inside ``set <name> { ... }``."""
    lines = rule_lines(text)
    body = lines[lines.index(f"set {name} {{") + 1 :]
    return body[: body.index("}")]


def test_sets_are_typed_address_port_pairs_sorted_and_unique() -> None:
    pairs: list[Listener] = [(A4, 443), (A6, 80), (A4, 80), (A4, 443), (IPv4Address("1.2.3.4"), 9)]
    text = ruleset("wg0", listeners=pairs)
    assert set_block(text, "listen4") == [
        "type ipv4_addr . inet_service",
        "elements = { 1.2.3.4 . 9, 100.64.0.1 . 80, 100.64.0.1 . 443 }",
    ]
    assert set_block(text, "listen6") == [
        "type ipv6_addr . inet_service",
        "elements = { fd7a:115c:a1e0::1 . 80 }",
    ]
    empty = ruleset("wg0")
    assert set_block(empty, "listen4") == ["type ipv4_addr . inet_service"]
    assert set_block(empty, "listen6") == ["type ipv6_addr . inet_service"]
    # Any iterable of pairs will do (a generator is consumed once).
    assert ruleset("wg0", listeners=iter(pairs)) == text


def test_custom_mark_and_table() -> None:
    text = ruleset("wg0", mark=0xDEADBEEF, table="guard1")
    assert "meta mark 0xdeadbeef accept" in text
    assert "table inet guard1 {" in text and "tsnet2_wg0" not in text


def test_table_name_per_device() -> None:
    assert table_name("tsnet2") == "tsnet2_tsnet2"
    assert table_name("t2ab-x.1") == "tsnet2_t2ab_x_1"
    assert table_name("a") != table_name("b")


def test_set_listeners_script_flushes_both_sets_in_one_transaction() -> None:
    assert set_listeners_script("t", {(A4, 22), (A6, 8080), (A4, 8080)}) == (
        "flush set inet t listen4\n"
        "flush set inet t listen6\n"
        "add element inet t listen4 { 100.64.0.1 . 22, 100.64.0.1 . 8080 }\n"
        "add element inet t listen6 { fd7a:115c:a1e0::1 . 8080 }\n"
    )
    assert set_listeners_script("t", [(A6, 1)]) == (
        "flush set inet t listen4\nflush set inet t listen6\n"
        "add element inet t listen6 { fd7a:115c:a1e0::1 . 1 }\n"
    )
    assert (
        set_listeners_script("t", set()) == "flush set inet t listen4\nflush set inet t listen6\n"
    )
    with pytest.raises(GuardError, match="table name"):
        set_listeners_script("1t", set())


BAD_LISTENERS: list[tuple[object, str]] = [
    ([(A4, 0)], "not a TCP port"),
    ([(A4, 80), (A6, 70000)], "not a TCP port"),
    ([(A4, "80")], "not a TCP port"),
    ([(A4, True)], "not a TCP port"),
    ([("100.64.0.1", 80)], "not an ipaddress"),
    ([(80, A4)], "not an ipaddress"),
    ([(A4, 80, 1)], "pair"),
    ([A4], "pair"),
    ([[A4, 80]], "pair"),
    ((A4, 80), "pair"),  # one pair, not an iterable of pairs
    ("100.64.0.1", "iterable"),
    (80, "iterable"),
    ([(IPv4Address("0.0.0.0"), 80)], "wildcard"),
    ([(IPv6Address("::"), 80)], "wildcard"),
    ([(IPv6Address("::ffff:100.64.0.1"), 80)], "IPv4-mapped.*100.64.0.1"),
    ([(IPv6Address("fe80::1%eth0"), 80)], "scope"),
]


@pytest.mark.parametrize(("listeners", "message"), BAD_LISTENERS)
def test_bad_listeners_are_a_guard_error(listeners: object, message: str) -> None:
    with pytest.raises(GuardError, match=message):
        ruleset("wg0", listeners=listeners)  # type: ignore[arg-type]
    with pytest.raises(GuardError, match=message):
        set_listeners_script("t", listeners)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"ifname": 'wg"0'},
        {"ifname": "wg*"},  # a trailing * would be an nft wildcard
        {"ifname": "wg 0"},
        {"ifname": ""},
        {"ifname": "x" * 16},
        {"ifname": "wg0", "mark": 0},
        {"ifname": "wg0", "mark": 1 << 32},
        {"ifname": "wg0", "mark": True},
        {"ifname": "wg0", "log_group": -1},
        {"ifname": "wg0", "log_group": 65536},
        {"ifname": "wg0", "log_group": True},
        {"ifname": "wg0", "log_group": "7"},
        {"ifname": "wg0", "table": "1abc"},
        {"ifname": "wg0", "table": "a b"},
    ],
)
def test_bad_input_is_a_guard_error(kwargs: dict[str, object]) -> None:
    ifname = str(kwargs.pop("ifname"))
    with pytest.raises(GuardError) as info:
        ruleset(ifname, **kwargs)  # type: ignore[arg-type]
    assert isinstance(info.value, NodeError)  # one root for the node's errors
    with pytest.raises(GuardError):
        Guard(ifname, **kwargs)  # type: ignore[arg-type]


def _registrable(addr: IPv4Address | IPv6Address) -> bool:
    """Not the wildcard, not IPv4-mapped (the guard refuses both)."""
    return not addr.is_unspecified and getattr(addr, "ipv4_mapped", None) is None


_pairs = st.tuples(st.ip_addresses().filter(_registrable), st.integers(1, 65535))


@settings(max_examples=50, deadline=None)
@given(st.lists(_pairs, max_size=40))
def test_any_listener_set_is_listed_once_each_in_its_family(pairs: list[Listener]) -> None:
    text = set_listeners_script("t", pairs)
    listed: set[Listener] = set()
    for line in text.splitlines():
        if line.startswith("add element"):
            name = line.split()[4]
            elems = [e.split(" . ") for e in line.split("{ ", 1)[1].rstrip(" }").split(", ")]
            got = [(ip_address(addr), int(port)) for addr, port in elems]
            assert len(got) == len(set(got))  # each once
            assert all(addr.version == (4 if name == "listen4" else 6) for addr, _ in got)
            listed |= set(got)
    assert listed == set(pairs)


def test_guard_is_inert_until_installed() -> None:
    guard = Guard("wg0", log_group=9)
    assert not guard.installed and guard.listeners == frozenset()
    assert guard.table == "tsnet2_wg0"
    with pytest.raises(GuardError, match="install"):
        guard.set_listeners({(A4, 80)})
    with pytest.raises(GuardError, match="not a TCP port"):  # validated before anything else
        guard.set_listeners({(A4, 0)})
    assert guard.listeners == frozenset()


_NFT_READY = os.geteuid() == 0 and shutil.which("nft") and shutil.which("unshare")


def _nft_check(script: str) -> subprocess.CompletedProcess[str]:
    """Validate ``script`` with the real nft (check mode) in a throwaway network namespace."""
    return subprocess.run(
        ["unshare", "--net", "nft", "-c", "-f", "-"],
        input=script, capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip


@pytest.mark.skipif(not _NFT_READY, reason=needs("root", "needs root, nft and unshare"))
@pytest.mark.parametrize("log_group", [None, 0, 65535])
def test_real_nft_accepts_the_scripts(log_group: int | None) -> None:
    pairs: list[Listener] = [(A4, 22), (A4, 80), (A6, 80), (ip_address("10.1.2.3"), 65535)]
    proc = _nft_check(ruleset("wg0", log_group=log_group, listeners=pairs))
    assert proc.returncode == 0, proc.stderr
    script = ruleset("wg0", log_group=log_group) + set_listeners_script("tsnet2_wg0", pairs)
    proc = _nft_check(script)
    assert proc.returncode == 0, proc.stderr
    script = ruleset("wg0", listeners=pairs) + set_listeners_script("tsnet2_wg0", ())
    proc = _nft_check(script)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(not _NFT_READY, reason=needs("root", "needs root, nft and unshare"))
def test_real_nft_rejects_a_broken_script() -> None:  # the check above can fail
    proc = _nft_check(ruleset("wg0").replace("reject with tcp reset", "reject with tcp bogus"))
    assert proc.returncode != 0 and "Error" in proc.stderr
