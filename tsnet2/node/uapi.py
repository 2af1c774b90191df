"""A raw client for the WireGuard cross-platform UAPI (``/var/run/wireguard/<ifname>.sock``).

Protocol: the client sends ``get=1\\n\\n`` or ``set=1\\n<key=value lines>\\n\\n``; the device
answers ``key=value`` lines ending with ``errno=N`` and a blank line. Keys are lowercase hex on
UAPI (never base64). This module converts them to base64 at its boundary. (The PyPI
wireguard-tools' ``set_config`` always replaces all peers and mis-encodes keys: see
docs/dataplane.md.)
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UAPIError
from .wgkey import WireguardKey

__all__ = ["MAX_REPLY_BYTES", "DeviceState", "PeerState", "UAPIClient", "b64_to_hex", "hex_to_b64"]

MAX_REPLY_BYTES = 16 * 1024 * 1024
"""Largest UAPI reply accepted (about 60k peers with a few allowed IPs each)."""


def b64_to_hex(key_b64: str) -> str:
    """Convert a base64 WireGuard key to the hex form UAPI wants (``ValueError`` if invalid)."""
    return WireguardKey(key_b64).hex


def hex_to_b64(key_hex: str) -> str:
    """Convert a UAPI hex key to base64 (``ValueError`` if invalid)."""
    if len(key_hex) != 64:
        raise ValueError(f"UAPI key {key_hex!r} is not 64 hex digits")
    return str(WireguardKey(bytes.fromhex(key_hex)))


@dataclass
class PeerState:
    """One peer as the device reports it. ``last_handshake`` is unix seconds, or None if never."""

    endpoint: str | None = None
    allowed_ips: list[str] = field(default_factory=list)
    rx_bytes: int = 0
    tx_bytes: int = 0
    last_handshake: float | None = None
    persistent_keepalive: int | None = None


@dataclass
class DeviceState:
    """The device as ``get`` reports it: listen port, own public key, peers (base64 keys)."""

    listen_port: int | None = None
    public_key: str | None = None
    peers: dict[str, PeerState] = field(default_factory=dict)


def _parse_get(pairs: list[tuple[str, str]]) -> DeviceState:
    state = DeviceState()
    peer: PeerState | None = None
    hs_sec: int | None = None
    hs_nsec = 0

    def finish() -> None:
        if peer is not None and hs_sec:
            peer.last_handshake = hs_sec + hs_nsec / 1e9

    for key, value in pairs:
        if key == "public_key":
            finish()
            peer = PeerState()
            hs_sec, hs_nsec = None, 0
            state.peers[hex_to_b64(value)] = peer
        elif peer is None:
            if key == "private_key":
                state.public_key = str(WireguardKey(bytes.fromhex(value)).public_key())
            elif key == "listen_port":
                state.listen_port = int(value)
        elif key == "endpoint":
            peer.endpoint = value
        elif key == "allowed_ip":
            peer.allowed_ips.append(value)
        elif key == "rx_bytes":
            peer.rx_bytes = int(value)
        elif key == "tx_bytes":
            peer.tx_bytes = int(value)
        elif key == "last_handshake_time_sec":
            hs_sec = int(value)
        elif key == "last_handshake_time_nsec":
            hs_nsec = int(value)
        elif key == "persistent_keepalive_interval":
            peer.persistent_keepalive = int(value) or None
    finish()
    return state


class UAPIClient:
    """Talk to one wireguard-go device over its UAPI unix socket. One connection per request."""

    def __init__(self, sock_path: str | Path, timeout: float = 5.0) -> None:
        """``timeout`` bounds connect and each read/write, in seconds."""
        self.sock_path = Path(sock_path)
        self.timeout = timeout

    def _request(self, request: str) -> list[tuple[str, str]]:
        deadline = time.monotonic() + self.timeout
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(self.timeout)
                sock.connect(str(self.sock_path))
                sock.sendall(request.encode("ascii"))
                buf = bytearray()
                while not (buf.endswith(b"\n\n") or buf == b"\n"):
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise TimeoutError
                    sock.settimeout(remaining)
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    buf += chunk
                    if len(buf) > MAX_REPLY_BYTES:
                        raise UAPIError(
                            f"UAPI reply from {self.sock_path} exceeds {MAX_REPLY_BYTES} bytes"
                        )
        except TimeoutError:
            raise UAPIError(
                f"UAPI request to {self.sock_path} timed out after {self.timeout} s; "
                "is wireguard-go hung?"
            ) from None
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise UAPIError(
                f"cannot reach wireguard-go at {self.sock_path} ({exc.strerror}); "
                "is the device running?"
            ) from None
        except OSError as exc:
            raise UAPIError(f"UAPI I/O error on {self.sock_path}: {exc}") from None
        try:
            text = buf.decode("ascii")
        except UnicodeDecodeError:
            raise UAPIError(f"UAPI reply from {self.sock_path} is not ASCII") from None
        pairs: list[tuple[str, str]] = []
        for line in text.split("\n"):
            if not line:
                continue
            key, sep, value = line.partition("=")
            if not sep:
                raise UAPIError(f"malformed UAPI line from {self.sock_path}: {line[:80]!r}")
            pairs.append((key, value))
        if not pairs or pairs[-1][0] != "errno":
            raise UAPIError(f"UAPI reply from {self.sock_path} ended without errno (truncated?)")
        try:
            err = int(pairs[-1][1])
        except ValueError:
            raise UAPIError(f"UAPI errno {pairs[-1][1][:20]!r} is not a number") from None
        if err != 0:
            raise UAPIError(
                f"wireguard-go rejected the request with errno {err} (see its log for the reason)",
                errno=abs(err),
            )
        return pairs[:-1]

    def get(self) -> DeviceState:
        """Read the device state (``get=1``)."""
        pairs = self._request("get=1\n\n")
        try:
            return _parse_get(pairs)
        except ValueError as exc:
            raise UAPIError(f"unparseable UAPI get reply from {self.sock_path}: {exc}") from None

    def set(self, lines: list[str]) -> None:
        """Apply ``key=value`` lines in one ``set=1`` request (keys must already be hex).

        Not transactional: on ``UAPIError`` a prefix of the lines may have been applied.
        """
        for line in lines:
            if "\n" in line or "=" not in line:
                raise ValueError(f"bad UAPI set line {line!r}")
        self._request("set=1\n" + "".join(f"{line}\n" for line in lines) + "\n")
