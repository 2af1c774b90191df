"""Channel kinds (the first byte of every socket connection) and line-length limits."""

from __future__ import annotations

import enum

from tsnet2.proto.errors import RemoteProtocolError

__all__ = ["MAX_CONTROL_LINE", "MAX_HEADER_LINE", "ChannelKind", "parse_channel_byte"]


class ChannelKind(enum.IntEnum):
    """The byte a client writes first on a new connection to name its channel (seed-spec §2.1)."""

    CONTROL = 0x01
    """Long-lived newline-delimited JSON RPC, one per Server."""
    LOCALAPI = 0x02
    """Plain HTTP/1.1 LocalAPI, one per HTTP client connection."""
    DIAL = 0x03
    """Outbound datapath: one JSON request line, one JSON reply line, then raw bytes."""
    ACCEPT = 0x04
    """Parked inbound slot: one JSON request line, one JSON header line, then raw bytes."""

    @property
    def byte(self) -> bytes:
        """The single byte that opens a connection of this kind, e.g. ``b"\\x01"``."""
        return bytes((self.value,))


def parse_channel_byte(b: int) -> ChannelKind:
    """Map the first byte of a connection to its :class:`ChannelKind`.

    Raises :class:`RemoteProtocolError` for any other value.
    """
    try:
        return ChannelKind(b)
    except ValueError:
        raise RemoteProtocolError(
            f"unknown channel byte 0x{b & 0xFF:02x}; expected 0x01-0x04"
        ) from None


# Limits. The prototype read every line with no cap (seed-spec §6.2 item 7), so a local
# process could make the daemon (or the client) buffer unbounded memory.
#
# Control frames carry base64 of JSON documents. The largest legitimate ones are `up`
# results and `start` params (a handful of IPs, domains and tags): well under 4 KiB. 1 MiB
# leaves room for future additive methods (e.g. a netmap-sized result, which base64 makes
# 4/3 larger) while bounding the memory one misbehaving peer can pin per connection.
MAX_CONTROL_LINE = 1 << 20
"""Longest control-channel line (without the newline) we accept: 1 MiB."""

# Dial request/reply, accept request and accept header hold at most an op, a network, a
# 16-hex-char id, two `ip:port` strings or a DNS name (<= 253 bytes) plus port, or one error
# message. 4 KiB is ten times the largest realistic line, and the prototype client itself
# capped the dial status line at 1024 bytes. These headers are read before any payload, so
# a small cap also stops a peer from making us buffer stream bytes while looking for "\n".
MAX_HEADER_LINE = 4096
"""Longest dial/accept header line (without the newline) we accept: 4 KiB."""
