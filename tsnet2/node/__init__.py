"""The WireGuard node: device, addresses, routes and incremental peer configuration.

``Node`` is synchronous; the daemon calls the slow parts via ``asyncio.to_thread``. It remembers
the network namespace of the thread that called ``start()`` and does every later netlink call
there, from whatever thread calls it (see ``tsnet2.node.netns`` for why that matters).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address, ip_address, ip_network
from types import TracebackType
from typing import Literal

from .device import Backend, Device, PeerUpdate, create_device, detect_backend
from .endpoint import (
    TAILNET_V4,
    TAILNET_V6,
    Endpoint,
    detect_endpoints,
    parse_endpoint,
    split_endpoint,
)
from .errors import KeyFileError, NodeError, UAPIError
from .keys import load_or_create_private_key, public_key_b64
from .netns import current_netns_fd, enter_netns
from .rtnl import IFA_F_NODAD, RT_SCOPE_LINK, Rtnl, RtnlError
from .uapi import DeviceState, PeerState
from .wgkey import WireguardKey

__all__ = [
    "MTU",
    "TAILNET_V4",
    "TAILNET_V6",
    "ApplyResult",
    "DeviceState",
    "Endpoint",
    "KeyFileError",
    "Node",
    "NodeError",
    "PeerConfig",
    "PeerState",
    "UAPIError",
    "detect_endpoints",
    "load_or_create_private_key",
    "parse_endpoint",
    "public_key_b64",
    "split_endpoint",
]

MTU = 1280
"""Tailscale's default tunnel MTU (also the IPv6 minimum, so it never needs fragmentation)."""


@dataclass
class PeerConfig:
    """A peer as the netmap describes it.

    ``public_key`` base64; ``endpoint`` "ip:port" / "[v6]:port" or None (wait for the peer to
    reach us); ``allowed_ips`` CIDRs routed to this peer; ``persistent_keepalive`` seconds or
    None for off.
    """

    public_key: str
    endpoint: str | None
    allowed_ips: list[str] = field(default_factory=list)
    persistent_keepalive: int | None = 25


@dataclass
class ApplyResult:
    """What ``apply_peers`` changed, as lists of base64 public keys."""

    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        """True if anything was sent to the device."""
        return bool(self.added or self.updated or self.removed)


@dataclass(frozen=True)
class _Wanted:
    key: str
    endpoint: Endpoint | None
    allowed_ips: tuple[str, ...]
    keepalive: int


def _validate_ifname(name: str) -> None:
    if (
        not 0 < len(name.encode()) <= 15
        or name in (".", "..")
        or any(c in name for c in "/: \t\n%")
    ):
        raise NodeError(f"bad interface name {name!r}: 1-15 characters, no '/', ':', '%' or space")


def _canon_peer(peer: PeerConfig) -> _Wanted:
    try:
        key = str(WireguardKey(peer.public_key))
    except ValueError:
        raise NodeError(
            f"peer public key {peer.public_key[:60]!r} is not a WireGuard key"
        ) from None
    endpoint = split_endpoint(peer.endpoint) if peer.endpoint is not None else None
    allowed: list[str] = []
    for cidr in peer.allowed_ips:
        try:
            allowed.append(str(ip_network(cidr, strict=True)))
        except ValueError as exc:
            raise NodeError(f"peer {key}: allowed IP {cidr!r} is not a network: {exc}") from None
    keepalive = peer.persistent_keepalive or 0
    if not 0 <= keepalive <= 65535:
        raise NodeError(f"peer {key}: persistent_keepalive {keepalive} is not in 0-65535")
    return _Wanted(key, endpoint, tuple(sorted(set(allowed))), keepalive)


def _same_endpoint(current: str | None, wanted: Endpoint) -> bool:
    if current is None:
        return False
    try:
        return split_endpoint(current) == wanted
    except NodeError:
        return False


def _canon_networks(cidrs: list[str]) -> set[str]:
    out = set()
    for cidr in cidrs:
        with contextlib.suppress(ValueError):
            out.add(str(ip_network(cidr, strict=False)))
    return out


class Node:
    """One WireGuard device with the tailnet's addresses and routes, in the current netns.

    ``start()`` creates the device (link up, MTU 1280, routes 100.64.0.0/10 and
    fd7a:115c:a1e0::/48 through it); ``close()`` removes all of it. Thread-safe.
    """

    def __init__(
        self,
        ifname: str = "tsnet2",
        listen_port: int = 41641,
        backend: Literal["auto", "kernel", "userspace"] = "auto",
        wireguard_go: str | None = None,
    ) -> None:
        """Validate the settings; nothing is created until ``start()``. ``wireguard_go``: the
        userspace backend's binary (default ``$TSNET2_WIREGUARD_GO``, else ``wireguard-go``
        on PATH)."""
        _validate_ifname(ifname)
        if not 0 <= listen_port <= 65535:
            raise NodeError(f"listen port {listen_port} is not in 0-65535")
        if backend not in ("auto", "kernel", "userspace"):
            raise NodeError(f"unknown WireGuard backend {backend!r}; use auto, kernel or userspace")
        self.ifname = ifname
        self.listen_port = listen_port
        self.requested_backend = backend
        self.wireguard_go = wireguard_go
        self.ipv6 = False
        self._device: Device | None = None
        self._netns_fd: int | None = None
        self._public_key: str | None = None
        self._lock = threading.RLock()

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def started(self) -> bool:
        """True between a successful ``start()`` and ``close()``."""
        return self._device is not None

    @property
    def backend(self) -> Backend | None:
        """The backend in use ("kernel" / "userspace"), None before start."""
        return self._device.backend if self._device is not None else None

    @property
    def public_key(self) -> str:
        """This node's base64 public key (after start)."""
        if self._public_key is None:
            raise NodeError("node is not started")
        return self._public_key

    @property
    def device(self) -> Device:
        """The running device backend (after start)."""
        if self._device is None:
            raise NodeError(f"node {self.ifname} is not started; call start() first")
        return self._device

    @contextlib.contextmanager
    def _in_netns(self) -> Iterator[None]:
        if self._netns_fd is None:
            raise NodeError(f"node {self.ifname} is not started; call start() first")
        with enter_netns(self._netns_fd):
            yield

    @contextlib.contextmanager
    def _rtnl(self) -> Iterator[tuple[Rtnl, int]]:
        """An rtnetlink socket opened in the node's netns, and the device's link index."""
        with self._in_netns(), Rtnl() as rt:
            try:
                idx = rt.link_index(self.ifname)
            except RtnlError as exc:
                raise NodeError(f"cannot look up device {self.ifname}: {exc}") from exc
            if idx is None:
                raise NodeError(f"device {self.ifname} disappeared (was it deleted or killed?)")
            yield rt, idx

    def start(self, private_key: WireguardKey) -> None:
        """Create the device in the calling thread's netns, bring it up, add tailnet routes.

        On any failure everything created so far is removed again and ``NodeError`` raised.
        """
        with self._lock:
            if self._device is not None:
                raise NodeError(f"node {self.ifname} is already started")
            backend = (
                detect_backend() if self.requested_backend == "auto" else self.requested_backend
            )
            device = create_device(self.ifname, backend, self.wireguard_go)
            self._netns_fd = current_netns_fd()
            try:
                device.start(private_key, self.listen_port)
                self._device = device
                self._public_key = public_key_b64(private_key)
                self._setup_link()
            except BaseException as exc:
                device.close()
                self._device = None
                self._public_key = None
                os.close(self._netns_fd)
                self._netns_fd = None
                if isinstance(exc, RtnlError):
                    raise NodeError(f"cannot set up device {self.ifname}: {exc}") from exc
                raise

    def _setup_link(self) -> None:
        with self._rtnl() as (rt, idx):
            rt.link_set(idx, mtu=MTU, up=True)
            rt.route_replace(TAILNET_V4, idx)
            try:
                rt.route_replace(TAILNET_V6, idx)
                self.ipv6 = True
            except RtnlError:
                self.ipv6 = False  # IPv6 disabled in this namespace: run IPv4-only

    def close(self) -> None:
        """Remove the device (stop wireguard-go); its routes and addresses go too. Idempotent."""
        with self._lock:
            device, self._device = self._device, None
            try:
                if device is not None:
                    with self._in_netns():
                        device.close()
            finally:
                if self._netns_fd is not None:
                    os.close(self._netns_fd)
                    self._netns_fd = None
                self._public_key = None

    def check(self) -> None:
        """Raise NodeError if the device died: wireguard-go exited, or the link is gone.

        Cheap enough to call every few seconds (one process poll, one netlink lookup).
        """
        with self._lock:
            device = self._device
            if device is None:
                raise NodeError(f"node {self.ifname} is not started")
            exited = getattr(device, "exited", None)
            reason = exited() if exited is not None else None
            if reason is not None:
                raise NodeError(reason)
            with self._rtnl():
                pass  # raises NodeError when the link disappeared

    def __enter__(self) -> Node:
        """Return self; ``close()`` on exit."""
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the node."""
        self.close()

    # -- addresses -------------------------------------------------------------------------

    def set_addresses(self, v4: IPv4Address | None, v6: IPv6Address | None) -> None:
        """Make the device's global addresses exactly ``v4``/32 and ``v6``/128 (None = none).

        Idempotent; stale global addresses are removed; IPv6 is added with ``nodad`` so it is
        usable at once. Link-local addresses are left alone.
        """
        wanted: set[tuple[str, int]] = set()
        if v4 is not None:
            wanted.add((str(IPv4Address(v4)), 32))
        if v6 is not None:
            if not self.ipv6:
                raise NodeError(f"IPv6 is disabled in the network namespace of {self.ifname}")
            wanted.add((str(IPv6Address(v6)), 128))
        try:
            with self._lock, self._rtnl() as (rt, idx):
                present: set[tuple[str, int]] = set()
                for msg in rt.addresses(idx):
                    addr = msg.ip
                    if addr is None or msg.scope == RT_SCOPE_LINK or addr.is_link_local:
                        continue
                    item = (str(addr), msg.prefixlen)
                    if item in wanted:
                        present.add(item)
                    else:
                        rt.addr_del(idx, addr, msg.prefixlen)
                for text, plen in sorted(wanted - present):
                    rt.addr_add(idx, ip_address(text), plen, IFA_F_NODAD if plen == 128 else 0)
        except RtnlError as exc:
            raise NodeError(f"cannot set the addresses of {self.ifname}: {exc}") from exc

    def addresses(self) -> list[IPv4Address | IPv6Address]:
        """The device's non-link-local addresses."""
        try:
            with self._rtnl() as (rt, idx):
                found = rt.addresses(idx)
        except RtnlError as exc:
            raise NodeError(f"cannot read the addresses of {self.ifname}: {exc}") from exc
        return [msg.ip for msg in found if msg.ip is not None and not msg.ip.is_link_local]

    # -- peers -----------------------------------------------------------------------------

    def state(self) -> DeviceState:
        """The device's current state (listen port, public key, peers)."""
        with self._lock, self._in_netns():
            return self.device.state()

    def peer_stats(self) -> dict[str, PeerState]:
        """Per-peer counters and handshake times, keyed by base64 public key."""
        return self.state().peers

    def apply_peers(self, peers: list[PeerConfig]) -> ApplyResult:
        """Make the device's peers exactly ``peers``, incrementally.

        The desired list is validated first (nothing is sent if any entry is bad). Then it is
        diffed against the device: gone peers are removed (``remove=true``), new peers added,
        and for existing peers only changed fields are sent (``replace_allowed_ips`` for that
        peer only), so untouched peers keep their session, handshake and counters. A desired
        endpoint of None leaves a known endpoint in place (WireGuard cannot unset one).
        ``replace_peers`` is never used. On a device error the state is re-read and
        ``UAPIError`` says how much is applied; the next call converges.
        """
        wanted: dict[str, _Wanted] = {}
        for peer in peers:
            item = _canon_peer(peer)
            if item.key in wanted:
                raise NodeError(f"peer {item.key} is listed twice")
            if item.key == self.public_key:
                raise NodeError(f"peer {item.key} is this node's own key")
            wanted[item.key] = item
        with self._lock, self._in_netns():
            device = self.device
            current = device.state().peers
            result = ApplyResult()
            updates: list[PeerUpdate] = []
            for key in sorted(set(current) - set(wanted)):
                updates.append(PeerUpdate(key, remove=True))
                result.removed.append(key)
            for key, want in wanted.items():
                cur = current.get(key)
                if cur is None:
                    updates.append(
                        PeerUpdate(
                            key,
                            endpoint=str(want.endpoint) if want.endpoint is not None else None,
                            allowed_ips=want.allowed_ips,
                            persistent_keepalive=want.keepalive,
                        )
                    )
                    result.added.append(key)
                    continue
                endpoint = None
                if want.endpoint is not None and not _same_endpoint(cur.endpoint, want.endpoint):
                    endpoint = str(want.endpoint)
                allowed = (
                    want.allowed_ips
                    if _canon_networks(cur.allowed_ips) != set(want.allowed_ips)
                    else None
                )
                keepalive = (
                    want.keepalive if (cur.persistent_keepalive or 0) != want.keepalive else None
                )
                if endpoint is not None or allowed is not None or keepalive is not None:
                    updates.append(PeerUpdate(key, False, endpoint, allowed, keepalive))
                    result.updated.append(key)
            if not updates:
                return result
            try:
                device.set_peers(updates)
            except UAPIError as exc:
                after = device.state().peers
                raise UAPIError(
                    f"peer update on {self.ifname} failed part-way ({exc}); the device now has "
                    f"{len(after)} peers, {len(set(after) & set(wanted))} of the {len(wanted)} "
                    "wanted; apply_peers again to converge",
                    errno=exc.errno,
                ) from exc
            return result
