"""Endpoint strings ("ip:port", "[v6]:port") and detection of this namespace's own endpoints."""

from __future__ import annotations

import socket
from collections.abc import Collection
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address
from typing import NamedTuple

from .errors import NodeError
from .rtnl import IFF_LOOPBACK, RT_TABLE_MAIN, Rtnl

__all__ = [
    "TAILNET_V4",
    "TAILNET_V6",
    "Endpoint",
    "detect_endpoints",
    "parse_endpoint",
    "split_endpoint",
]

TAILNET_V4 = IPv4Network("100.64.0.0/10")
TAILNET_V6 = IPv6Network("fd7a:115c:a1e0::/48")


class Endpoint(NamedTuple):
    """A validated UDP endpoint; ``str()`` gives the canonical "ip:port" / "[v6]:port"."""

    ip: IPv4Address | IPv6Address
    port: int

    def __str__(self) -> str:
        if self.ip.version == 6:
            return f"[{self.ip}]:{self.port}"
        return f"{self.ip}:{self.port}"


def parse_endpoint(text: str) -> str:
    """Validate "IP:PORT" or "[IPv6]:PORT" and return it in canonical form.

    IP literals only, port 1-65535; ``NodeError`` with the offending text on anything else.
    """
    return str(split_endpoint(text))


def split_endpoint(text: str) -> Endpoint:
    """Parse "IP:PORT" or "[IPv6]:PORT" into an ``Endpoint`` (``NodeError`` if invalid)."""
    if len(text) > 64:
        raise NodeError(f"endpoint {text[:64]!r}... is too long")
    if text.startswith("["):
        host, sep, port_s = text[1:].partition("]:")
    else:
        host, sep, port_s = text.rpartition(":")
        if ":" in host:
            raise NodeError(f"endpoint {text!r}: write IPv6 endpoints as [addr]:port")
    if not sep or not host:
        raise NodeError(f"endpoint {text!r} is not HOST:PORT")
    try:
        ip = ip_address(host)
    except ValueError:
        raise NodeError(f"endpoint {text!r}: host {host!r} is not an IP address") from None
    if not port_s.isdigit() or not 0 < int(port_s) < 65536:
        raise NodeError(f"endpoint {text!r}: port {port_s!r} is not in 1-65535")
    return Endpoint(ip, int(port_s))


def _usable(ip: IPv4Address | IPv6Address) -> bool:
    if ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_unspecified:
        return False
    return ip not in (TAILNET_V4 if ip.version == 4 else TAILNET_V6)


def detect_endpoints(listen_port: int, exclude_ifnames: Collection[str] = ()) -> list[str]:
    """Return "ip:port" endpoints for this network namespace (current thread's).

    Order: the default routes' preferred source addresses, then the global-scope addresses of
    the default routes' interfaces, then every other global-scope address. Loopback and
    link-local addresses, loopback interfaces, ``exclude_ifnames`` (pass the WireGuard device)
    and tailnet addresses (100.64.0.0/10, fd7a:115c:a1e0::/48) are left out.
    """
    ordered: list[IPv4Address | IPv6Address] = []
    with Rtnl() as rt:
        links = {link.index: link for link in rt.links()}
        excluded = {
            idx
            for idx, link in links.items()
            if link.flags & IFF_LOOPBACK or link.name in exclude_ifnames
        }
        addrs: list[tuple[int, IPv4Address | IPv6Address]] = []
        for msg in rt.addresses():
            if msg.index in excluded or msg.scope != 0:
                continue
            if msg.ip is not None:
                addrs.append((msg.index, msg.ip))
        default_oifs: list[int] = []
        for family in (socket.AF_INET, socket.AF_INET6):
            for route in rt.routes(family, RT_TABLE_MAIN):
                if route.dst_len != 0 or route.dst is not None:
                    continue
                if route.oif in excluded:
                    continue
                if route.prefsrc is not None:
                    ordered.append(route.prefsrc)
                if route.oif is not None:
                    default_oifs.append(route.oif)
    ordered += [ip for idx, ip in addrs if idx in default_oifs]
    ordered += [ip for _, ip in addrs]
    seen: set[IPv4Address | IPv6Address] = set()
    result: list[str] = []
    for ip in ordered:
        if ip in seen or not _usable(ip):
            continue
        seen.add(ip)
        result.append(str(Endpoint(ip, listen_port)))
    return result
