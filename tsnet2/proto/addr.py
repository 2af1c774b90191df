"""Parsing and formatting of ``host:port`` strings (Go ``net.SplitHostPort`` rules)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from tsnet2.proto.errors import WireAddressError

__all__ = [
    "LISTEN_NETWORKS",
    "IPAddress",
    "ListenAddr",
    "format_addr",
    "parse_listen_addr",
    "split_host_port",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
"""Either IP address type."""

LISTEN_NETWORKS = ("tcp", "tcp4", "tcp6")
"""Networks a listener may use."""


@dataclass(frozen=True, slots=True)
class ListenAddr:
    """A parsed listen address.

    ``host`` is ``None`` for "any address": an empty host, ``0.0.0.0`` or ``::`` (tsnet
    normalises these the same way). ``port`` 0 asks the daemon to pick one.
    """

    network: str
    host: IPAddress | None
    port: int


def _parse_port(port: str, s: str) -> int:
    # Decimal digits only: no signs, spaces, "0x", or service names (the prototype's rule).
    if not port or not port.isascii() or not port.isdigit() or len(port) > 5:
        raise WireAddressError(f"bad port {port!r} in {s!r}: must be a decimal number 0-65535")
    value = int(port)
    if value > 65535:
        raise WireAddressError(f"bad port {port!r} in {s!r}: must be a decimal number 0-65535")
    return value


def split_host_port(s: str) -> tuple[str, int]:
    """Split ``host:port`` or ``[v6-host]:port`` into ``(host, port)``.

    The host may be a name, an IP literal or empty; the port must be decimal 0-65535.
    Raises :class:`WireAddressError` with a message naming what is wrong.
    """
    if ":" not in s:
        raise WireAddressError(f"bad addr {s!r}: missing port (expected host:port)")
    if s.startswith("["):
        end = s.find("]")
        if end < 0:
            raise WireAddressError(f"bad addr {s!r}: missing ']'")
        host, rest = s[1:end], s[end + 1 :]
        if not rest.startswith(":"):
            raise WireAddressError(f"bad addr {s!r}: missing port after ']'")
        if "[" in host or "]" in rest:
            raise WireAddressError(f"bad addr {s!r}: unexpected bracket")
        port = rest[1:]
    else:
        host, _, port = s.rpartition(":")
        if ":" in host:
            raise WireAddressError(
                f"bad addr {s!r}: too many colons (put an IPv6 address in brackets)"
            )
        if "[" in host or "]" in host:
            raise WireAddressError(f"bad addr {s!r}: unexpected bracket")
    return host, _parse_port(port, s)


def parse_listen_addr(network: str, addr: str, *,
                      networks: tuple[str, ...] = LISTEN_NETWORKS) -> ListenAddr:
    """Validate a listen request: network ``tcp``/``tcp4``/``tcp6`` and an IP-or-empty host.

    The host's family must match ``tcp4``/``tcp6`` (an IPv4-mapped IPv6 address counts
    as IPv4). ``networks``: the accepted names, the plain one first and its ``4``/``6``
    variants after it (``tsnet2.proto.udp.UDP_NETWORKS`` for UDP). Raises
    :class:`WireAddressError`.
    """
    if network not in networks:
        raise WireAddressError(f'unsupported network "{network}"; expected '
                               f'{", ".join(networks[:-1])} or {networks[-1]}')
    host_s, port = split_host_port(addr)
    host: IPAddress | None = None
    if host_s:
        try:
            host = ipaddress.ip_address(host_s)
        except ValueError:
            raise WireAddressError(
                f"bad addr {addr!r}: host {host_s!r} is not an IP address "
                "(listen hosts must be empty or an IP literal)"
            ) from None
        if isinstance(host, ipaddress.IPv6Address) and host.ipv4_mapped is not None:
            host = host.ipv4_mapped
        if network.endswith("4") and host.version != 4:
            raise WireAddressError(f"bad addr {addr!r}: network {network} needs an IPv4 host")
        if network.endswith("6") and host.version != 6:
            raise WireAddressError(f"bad addr {addr!r}: network {network} needs an IPv6 host")
        if host.is_unspecified:
            host = None
    return ListenAddr(network, host, port)


def format_addr(ip: IPAddress | str, port: int) -> str:
    """Format ``ip:port``, bracketing IPv6 (``[fd7a:115c:a1e0::1]:80``)."""
    text = str(ip)
    if ":" in text:
        return f"[{text}]:{port}"
    return f"{text}:{port}"
