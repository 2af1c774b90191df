"""Pure address allocation for the tailnet: IPv4 from 100.64.0.0/10, IPv6 from fd7a:115c:a1e0::/48.

A node is given one *offset* ``o``; its addresses are ``100.64.0.0 + o`` and
``fd7a:115c:a1e0:: + o``, so the IPv6 host part mirrors the IPv4 offset (``100.64.0.5`` goes
with ``fd7a:115c:a1e0::5``). Offsets whose IPv4 address ends in ``.0`` or ``.255`` are never
used, nor the one for ``100.100.100.100`` (Tailscale's service address).
"""

from __future__ import annotations

from collections.abc import Iterable
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

V4_POOL = IPv4Network("100.64.0.0/10")
"""The CGNAT range Tailscale uses for node IPv4 addresses."""
V6_POOL = IPv6Network("fd7a:115c:a1e0::/48")
"""Tailscale's ULA prefix for node IPv6 addresses."""
RESERVED_V4 = frozenset({IPv4Address("100.100.100.100")})
"""IPv4 addresses inside the pool that are never given to a node."""

_V4_BASE = int(V4_POOL.network_address)
_V6_BASE = int(V6_POOL.network_address)
_SIZE = V4_POOL.num_addresses


class AddressPoolExhausted(Exception):
    """No offset is free in the pool."""


def is_usable(offset: int) -> bool:
    """True if ``offset`` may be given to a node."""
    if not 0 < offset < _SIZE - 1:
        return False
    addr = IPv4Address(_V4_BASE + offset)
    return offset & 0xFF not in (0, 0xFF) and addr not in RESERVED_V4


def addresses(offset: int) -> tuple[IPv4Address, IPv6Address]:
    """The (IPv4, IPv6) pair of ``offset``."""
    if not is_usable(offset):
        raise ValueError(f"offset {offset} is not a usable tailnet address")
    return IPv4Address(_V4_BASE + offset), IPv6Address(_V6_BASE + offset)


def offset_of(addr: IPv4Address) -> int:
    """The offset of an IPv4 address in the pool."""
    if addr not in V4_POOL:
        raise ValueError(f"{addr} is not in {V4_POOL}")
    return int(addr) - _V4_BASE


def first_free(used: Iterable[int]) -> int:
    """The lowest usable offset not in ``used`` (so freed addresses are reused first)."""
    taken = set(used)
    offset = 1
    while offset < _SIZE - 1:
        if offset not in taken and is_usable(offset):
            return offset
        offset += 1
    raise AddressPoolExhausted(f"no free address left in {V4_POOL}")
