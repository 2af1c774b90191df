"""The daemon's network backend: one tailnet node.

`Backend` joins the three outside parts the daemon owns: the coordination server (register,
netmap long-poll), the WireGuard device (`tsnet2.node.Node`) and the node's state directory.
It is a small state machine (see `NodeState`) with watchers for the IPN bus, and it is the only
place that knows what the netmap says: WhoIs, name resolution and status come from here.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import enum
import ipaddress
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Any, Literal, Protocol

from tsnet2.controlclient import AuthError, ControlClient, ControlError
from tsnet2.daemon.certs import TLS_DIR, NodeCerts
from tsnet2.daemon.io import DAEMON_MARK
from tsnet2.node import Node, NodeError, PeerConfig, PeerState
from tsnet2.node.device import UserspaceDevice
from tsnet2.node.endpoint import detect_endpoints, parse_endpoint
from tsnet2.node.guard import Guard
from tsnet2.node.keys import load_or_create_private_key, public_key_b64
from tsnet2.proto.codes import ErrorCode
from tsnet2.proto.methods import StartParams
from tsnet2.traffic.signing import SigningKeyError, load_or_create_signing_key

log = logging.getLogger("tsnet2d.backend")

TAILNET_V4 = ipaddress.ip_network("100.64.0.0/10")
TAILNET_V6 = ipaddress.ip_network("fd7a:115c:a1e0::/48")
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

NODE_FILE = "node.json"
POLL_TIMEOUT = 25.0  # seconds a netmap long-poll may wait; the server caps it too
RETRY_MAX = 2.0  # longest pause between attempts to reach a control server that is down
NODE_CHECK_INTERVAL = 2.0  # seconds between checks that the WireGuard device still runs


class NodeState(enum.IntEnum):
    """The node's states, numbered as Tailscale's ipn.State so LocalAPI clients read them."""

    NO_STATE = 0
    NEEDS_LOGIN = 2
    STOPPED = 4
    STARTING = 5
    RUNNING = 6


class BackendError(Exception):
    """A start or lookup failed; the message is meant for the app's user.

    `reason` is a short, bounded word for metrics and reject records ("no_such_peer", ...);
    `code` is what the client is told (an additive wire field; see tsnet2.proto.codes).
    """

    def __init__(self, message: str, reason: str = "other",
                 code: ErrorCode = ErrorCode.OTHER) -> None:
        super().__init__(message)
        self.reason = reason
        self.code = code


@dataclasses.dataclass(frozen=True)
class DeviceConfig:
    """Daemon flags for the WireGuard device."""

    ifname: str = "tsnet2"
    listen_port: int = 41641
    backend: Literal["auto", "kernel", "userspace"] = "auto"
    advertise_endpoint: str | None = None
    guard: bool = True  # install the nftables audit guard with the device
    wireguard_go: str | None = None  # userspace binary; None: $TSNET2_WIREGUARD_GO or PATH


# The NFLOG group the guard copies refused SYNs to. Groups are per network namespace, and
# one daemon owns its namespace's tailnet device, so a fixed number is enough.
REFUSED_LOG_GROUP = 0x7473


class RefusalLog(Protocol):
    """Who records inbound flows the guard refused (the datapath)."""

    def start_refusal_log(self, group: int) -> None: ...
    def stop_refusal_log(self) -> None: ...


def _node_ips(node: dict[str, Any]) -> list[IPAddress]:
    out: list[IPAddress] = []
    for a in node.get("addresses") or []:
        with contextlib.suppress(ValueError):
            out.append(ipaddress.ip_address(a))
    return out


def whois_summary(node: dict[str, Any] | None) -> dict[str, str] | None:
    """The traffic log's compact WhoIs of a peer: node FQDN, stable node id, user login."""
    if node is None:
        return None
    out: dict[str, str] = {}
    if node.get("fqdn"):
        out["node"] = str(node["fqdn"])
    if node.get("stable_id"):
        out["node_id"] = str(node["stable_id"])
    login = (node.get("user") or {}).get("login_name")
    if login:
        out["user"] = str(login)
    return out


class Backend:
    """One tailnet node: registration, device, netmap and state, with change notification."""

    def __init__(self, state_dir: Path, device: DeviceConfig, token_file: str = "") -> None:
        """``token_file``: a projected ServiceAccount token (Kubernetes) the node registers
        with when its start params carry no auth key (read at every registration)."""
        self.state_dir = state_dir
        self.device_config = device
        self.token_file = token_file
        self.state = NodeState.NO_STATE
        self.state_since = time.monotonic()  # when `state` last changed
        self.params: StartParams | None = None  # the last start's, daemon defaults filled in
        self.domain = ""
        self.self_node: dict[str, Any] | None = None
        self.peers: list[dict[str, Any]] = []
        self.netmap_version = 0
        self.control_connected = False
        self.last_error = ""
        self._node: Node | None = None
        self._by_ip: dict[IPAddress, dict[str, Any]] = {}  # rebuilt on every netmap change
        # The same by canonical text, tailnet addresses only: a flow's addresses come from
        # the kernel as text, and parsing them with ipaddress is a measurable per-flow cost.
        self._by_text: dict[str, tuple[IPAddress, dict[str, Any]]] = {}
        self._guard: Guard | None = None
        self.certs = NodeCerts(state_dir / TLS_DIR)
        """The node's TLS certificate and the tailnet CA (kept while the node runs)."""
        self.refusal_log: RefusalLog | None = None
        self._control: ControlClient | None = None
        self._credential = ""
        self._poll_task: asyncio.Task[None] | None = None
        self._monitor_task: asyncio.Task[None] | None = None
        self.lost_reason: str | None = None  # why a running node died (device gone)
        self.on_lost: Callable[[], None] | None = None  # told once when `lost_reason` is set
        self._changed = asyncio.Condition()
        self._change_seq = 0
        self._lock = asyncio.Lock()

    # ---- lifecycle -------------------------------------------------------------------

    async def start(self, params: StartParams) -> None:
        """Bring the node up: register, create the device, apply the netmap, start polling.

        Idempotent while the node runs (later params are ignored, as in the prototype). A
        failed start leaves nothing behind and can be retried.
        """
        async with self._lock:
            if self.state in (NodeState.STARTING, NodeState.RUNNING):
                return
            if not params.control_url:
                raise BackendError(
                    "no control server: set Server.control_url or TS_CONTROL_URL for tsnet2d",
                    code=ErrorCode.CONTROL_UNAVAILABLE,
                )
            self.params = params
            self.lost_reason = None
            await self._set_state(NodeState.STARTING)
            try:
                await self._bring_up(params)
            except BaseException as exc:
                self.last_error = str(exc)
                await self._teardown(deregister=False)
                await self._set_state(NodeState.NEEDS_LOGIN if isinstance(exc, AuthError)
                                      else NodeState.STOPPED)
                raise
            self.last_error = ""
            await self._set_state(NodeState.RUNNING)
            if self._control is not None:
                self.certs.start(self._control, self._credential,
                                 lambda: (self.cert_domains() or [""])[0])

    async def _bring_up(self, params: StartParams) -> None:
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        key = await asyncio.to_thread(load_or_create_private_key, self.state_dir)
        try:
            # The traffic log signs its checkpoints with this key (the log writer loads the
            # same file; creating it is race-free); peers learn its public half from control.
            log_key = (await asyncio.to_thread(load_or_create_signing_key, self.state_dir)).public
        except SigningKeyError as exc:
            raise BackendError(f"traffic-log signing key: {exc}") from exc
        saved = self._load_node_file()
        cfg = self.device_config
        if cfg.advertise_endpoint:
            endpoints = [parse_endpoint(cfg.advertise_endpoint)]
        else:
            endpoints = await asyncio.to_thread(detect_endpoints, cfg.listen_port)
        self._control = ControlClient(params.control_url)
        credential = saved.get("node_credential", "")
        if saved.get("control_url") != params.control_url:
            credential = ""
        auth_key = params.auth_key
        token = ""
        if not auth_key and self.token_file:
            try:
                token = Path(self.token_file).read_text().strip()
            except OSError as exc:
                raise BackendError(f"cannot read the ServiceAccount token "
                                   f"{self.token_file}: {exc.strerror}") from exc
        if not credential and not auth_key and not token:
            raise BackendError(
                "no auth key: set Server.auth_key, or TS_AUTHKEY for tsnet2d, to join the tailnet",
                code=ErrorCode.AUTH_FAILED,
            )
        try:
            reg = await self._control.register(
                public_key=public_key_b64(key),
                hostname=params.hostname,
                endpoints=endpoints,
                ephemeral=params.ephemeral,
                tags=list(params.advertise_tags or ()),
                auth_key=auth_key or None,
                node_credential=credential or None,
                bearer_token=token or None,
                traffic_log_key=log_key,
            )
        except AuthError:
            if not credential or not (auth_key or token):
                raise
            # The saved credential was refused (the node was removed): join again with the key.
            log.warning("saved node credential refused; registering again with the auth key")
            reg = await self._control.register(
                public_key=public_key_b64(key), hostname=params.hostname, endpoints=endpoints,
                ephemeral=params.ephemeral, tags=list(params.advertise_tags or ()),
                auth_key=auth_key or None, node_credential=None, bearer_token=token or None,
                traffic_log_key=log_key,
            )
        self._credential = reg.node_credential
        self.domain = reg.domain
        self.self_node = reg.node
        self._save_node_file(
            {"control_url": params.control_url, "node_credential": reg.node_credential,
             "node": reg.node, "domain": reg.domain}
        )
        node = Node(ifname=cfg.ifname, listen_port=cfg.listen_port, backend=cfg.backend,
                    wireguard_go=cfg.wireguard_go)
        self._node = node
        await asyncio.to_thread(node.start, key)
        device = node.device
        log.info("device %s up: %s", cfg.ifname,
                 f"wireguard-go {device.path}" if isinstance(device, UserspaceDevice)
                 else f"{device.backend} WireGuard")
        v4, v6 = self._addresses(reg.node)
        await asyncio.to_thread(node.set_addresses, v4, v6)
        if cfg.guard:
            group = REFUSED_LOG_GROUP if self.refusal_log is not None else None
            guard = Guard(cfg.ifname, mark=DAEMON_MARK, log_group=group)
            self._guard = guard
            await asyncio.to_thread(guard.install)
            if self.refusal_log is not None:
                self.refusal_log.start_refusal_log(REFUSED_LOG_GROUP)
        netmap = await self._control.netmap(self._credential, since=0, timeout=0)
        await self._apply_netmap(netmap)
        self.control_connected = True
        loop = asyncio.get_running_loop()
        self._poll_task = loop.create_task(self._poll_loop(self._control),
                                           name="tsnet2d-netmap-poll")
        self._monitor_task = loop.create_task(self._monitor_loop(), name="tsnet2d-node-monitor")

    async def stop(self, *, deregister: bool | None = None) -> None:
        """Take the node down. Ephemeral nodes leave the tailnet (deregister) by default."""
        async with self._lock:
            if self.state == NodeState.NO_STATE:
                return
            if deregister is None:
                deregister = bool(self.params and self.params.ephemeral)
            await self._teardown(deregister=deregister)
            self.lost_reason = None  # handled: the node is down now
            await self._set_state(NodeState.NO_STATE)

    async def _teardown(self, *, deregister: bool) -> None:
        await self.certs.stop()
        for task in (self._poll_task, self._monitor_task):
            if task is not None and task is not asyncio.current_task():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._poll_task = self._monitor_task = None
        if self._control is not None:
            if deregister and self._credential:
                try:
                    await asyncio.wait_for(self._control.deregister(self._credential), 5)
                    self._forget_node_file()
                except (ControlError, TimeoutError) as exc:
                    log.warning("could not deregister from the control server: %s", exc)
            await self._control.aclose()
            self._control = None
        if self._guard is not None:
            try:
                await asyncio.to_thread(self._guard.remove)
            except NodeError as exc:
                log.warning("could not remove the nftables guard: %s", exc)
            self._guard = None
        if self.refusal_log is not None:
            self.refusal_log.stop_refusal_log()
        if self._node is not None:
            await asyncio.to_thread(self._node.close)
            self._node = None
        self.control_connected = False
        self.peers = []
        self._reindex()

    # ---- health ----------------------------------------------------------------------

    async def _monitor_loop(self) -> None:
        """Watch the device; when it dies, say so once (`lost_reason`, `on_lost`) and stop.

        The owner (the daemon) then takes the node down and, if it should be up, starts it
        again; the backend does not restart itself.
        """
        while True:
            await asyncio.sleep(NODE_CHECK_INTERVAL)
            node = self._node
            if node is None:
                return
            try:
                await asyncio.to_thread(node.check)
            except NodeError as exc:
                self._lost(str(exc))
                return

    def _lost(self, reason: str) -> None:
        if self.lost_reason is not None or self.state != NodeState.RUNNING:
            return
        log.error("node lost: %s", reason)
        self.lost_reason = reason
        self.last_error = f"node lost: {reason}"
        if self.on_lost is not None:
            self.on_lost()

    # ---- netmap ----------------------------------------------------------------------

    async def _poll_loop(self, control: ControlClient) -> None:
        delay = 0.1
        while True:
            try:
                netmap = await control.netmap(
                    self._credential, since=self.netmap_version, timeout=POLL_TIMEOUT
                )
            except ControlError as exc:
                if self.control_connected:
                    log.warning("control server unreachable (%s); keeping current peers", exc)
                    self.control_connected = False
                    await self._notify()
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)
                continue
            delay = 0.1
            if not self.control_connected:
                log.info("control server reachable again")
                self.control_connected = True
            if netmap.get("version", 0) != self.netmap_version:
                try:
                    await self._apply_netmap(netmap)
                except NodeError as exc:  # the device died under us
                    self._lost(f"cannot apply the netmap: {exc}")
                    return

    async def _apply_netmap(self, netmap: dict[str, Any]) -> None:
        self.self_node = netmap.get("self") or self.self_node
        self.domain = netmap.get("domain") or self.domain
        peers = [p for p in netmap.get("peers") or [] if isinstance(p, dict)]
        configs = [self._peer_config(p) for p in peers if p.get("public_key")]
        if self._node is not None:
            await asyncio.to_thread(self._node.apply_peers, configs)
        self.peers = peers
        self._reindex()
        self.netmap_version = int(netmap.get("version", 0))
        log.info("netmap version %d: %d peers", self.netmap_version, len(peers))
        await self._notify()

    @staticmethod
    def _peer_config(peer: dict[str, Any]) -> PeerConfig:
        allowed = []
        for ip in _node_ips(peer):
            allowed.append(f"{ip}/{32 if ip.version == 4 else 128}")
        endpoints = [str(e) for e in peer.get("endpoints") or []]
        return PeerConfig(
            public_key=str(peer["public_key"]),
            endpoint=endpoints[0] if endpoints else None,
            allowed_ips=allowed,
            # The keepalive makes a (re)started node handshake with every peer at once, so
            # peers holding a session from before a daemon restart switch over at once
            # instead of after a ~20 s re-key. (Two nodes configured at the very same
            # instant can cross handshakes and wait one retry, 5 s; rare.)
            persistent_keepalive=25,
        )

    @staticmethod
    def _addresses(node: dict[str, Any]) -> tuple[ipaddress.IPv4Address | None,
                                                  ipaddress.IPv6Address | None]:
        v4: ipaddress.IPv4Address | None = None
        v6: ipaddress.IPv6Address | None = None
        for ip in _node_ips(node):
            if isinstance(ip, ipaddress.IPv4Address):
                v4 = v4 or ip
            else:
                v6 = v6 or ip
        return v4, v6

    async def set_listeners(self, listeners: set[tuple[IPAddress, int]],
                            udp: set[tuple[IPAddress, int]] | None = None) -> None:
        """Open exactly these (tailnet address, port) pairs for inbound TCP flows, and
        ``udp`` for inbound UDP (the guard)."""
        if self._guard is not None:
            await asyncio.to_thread(self._guard.set_listeners, listeners, udp or ())

    # ---- queries ---------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """True once the node has addresses and a netmap."""
        return self.state == NodeState.RUNNING

    def addresses(self) -> tuple[ipaddress.IPv4Address | None, ipaddress.IPv6Address | None]:
        """Our tailnet addresses (None before start)."""
        if self.self_node is None or self.state != NodeState.RUNNING:
            return None, None
        return self._addresses(self.self_node)

    def cert_domains(self) -> list[str] | None:
        """Domains a certificate could be issued for: our FQDN without the trailing dot."""
        if self.self_node is None or self.state != NodeState.RUNNING:
            return None
        fqdn = str(self.self_node.get("fqdn", "")).rstrip(".")
        return [fqdn] if fqdn else None

    def nodes(self) -> Iterable[dict[str, Any]]:
        """Self first, then peers."""
        if self.self_node is not None:
            yield self.self_node
        yield from self.peers

    def node_by_ip(self, ip: IPAddress) -> dict[str, Any] | None:
        """The node (self or a peer) that owns a tailnet address, if any."""
        return self._by_ip.get(ip)

    def node_by_addr(self, text: str) -> dict[str, Any] | None:
        """The node that owns a tailnet address given as canonical text (as the kernel
        writes it: ``100.64.0.1``, ``fd7a:115c:a1e0::1``), if any."""
        hit = self._by_text.get(text)
        return hit[1] if hit is not None else None

    def _reindex(self) -> None:
        # Looked up once or twice per flow: index the netmap instead of walking it.
        by_ip: dict[IPAddress, dict[str, Any]] = {}
        for node in reversed(list(self.nodes())):  # self wins over a peer's stale entry
            for ip in _node_ips(node):
                by_ip[ip] = node
        self._by_ip = by_ip
        self._by_text = {str(ip): (ip, node) for ip, node in by_ip.items()
                         if ip in TAILNET_V4 or ip in TAILNET_V6}

    def resolve(self, host: str, family: int | None) -> IPAddress:
        """Turn a dial host (tailnet IP, hostname or FQDN) into a tailnet address.

        Raises BackendError with a message naming what was not found.
        """
        literal = host.strip("[]")
        hit = self._by_text.get(literal)
        if hit is not None and family in (None, hit[0].version):
            return hit[0]  # a node's tailnet address, as text: no parsing
        try:
            ip = ipaddress.ip_address(literal)
        except ValueError:
            ip = None
        if ip is not None:
            if ip not in TAILNET_V4 and ip not in TAILNET_V6:
                raise BackendError(f"{ip} is not a tailnet address (100.64.0.0/10 or "
                                   "fd7a:115c:a1e0::/48); tsnet2 dials tailnet peers only",
                                   "no_such_peer", ErrorCode.NO_SUCH_PEER)
            if self.node_by_ip(ip) is None:
                raise BackendError(f"no tailnet node has address {ip}", "no_such_peer",
                                   ErrorCode.NO_SUCH_PEER)
            return ip
        node = self.node_by_name(host)
        if node is None:
            raise BackendError(f"no tailnet node named {host!r}", "no_such_peer",
                               ErrorCode.NO_SUCH_PEER)
        candidates = [a for a in _node_ips(node) if family in (None, a.version)]
        if not candidates:
            raise BackendError(f"{host} has no IPv{family} tailnet address",
                               "no_such_peer", ErrorCode.NO_SUCH_PEER)
        return candidates[0]

    def node_by_name(self, name: str) -> dict[str, Any] | None:
        """The node called ``name``: its short name or FQDN, any case, with or without the
        trailing dot; None when no node is."""
        name = name.rstrip(".").lower()
        if not name:
            return None
        for node in self.nodes():
            if name in (str(node.get("name", "")).lower(),
                        str(node.get("fqdn", "")).rstrip(".").lower()):
                return node
        return None

    def peer_stats(self) -> dict[str, PeerState]:
        """WireGuard counters per peer public key (base64), empty when the device is down."""
        if self._node is None:
            return {}
        try:
            return dict(self._node.peer_stats())
        except NodeError as exc:
            log.warning("cannot read WireGuard peer state: %s", exc)
            return {}

    def peer_status_stats(self) -> dict[str, dict[str, Any]]:
        """`peer_stats` in the shape `tsnet2.proto.tailscale.status` takes."""
        out: dict[str, dict[str, Any]] = {}
        for key, st in self.peer_stats().items():
            hs = st.last_handshake
            out[key] = {
                "rx_bytes": st.rx_bytes,
                "tx_bytes": st.tx_bytes,
                "last_handshake": (datetime.datetime.fromtimestamp(hs, datetime.UTC)
                                   if hs else None),
                "cur_addr": st.endpoint or "",
                "active": bool(hs),
            }
        return out

    # ---- change notification (IPN bus) -----------------------------------------------

    async def _set_state(self, state: NodeState) -> None:
        if state != self.state:
            self.state_since = time.monotonic()
        self.state = state
        await self._notify()

    async def _notify(self) -> None:
        async with self._changed:
            self._change_seq += 1
            self._changed.notify_all()

    def down_error(self) -> BackendError:
        """Why the node is not running, as the error a client is told."""
        if self.state == NodeState.NEEDS_LOGIN:
            return BackendError(self.last_error or "the control server refused the node's "
                                "credentials", code=ErrorCode.AUTH_FAILED)
        if self.params is None:
            return BackendError("daemon: backend not started; call Start first",
                                code=ErrorCode.NOT_STARTED)
        if self.state == NodeState.STARTING:
            return BackendError("daemon: node is starting" + (
                f" (last attempt: {self.last_error})" if self.last_error else ""),
                code=ErrorCode.NODE_DOWN)
        return BackendError(f"daemon: node is not running: {self.last_error or 'stopped'}",
                            code=ErrorCode.NODE_DOWN)

    async def wait_running(self, timeout: float | None,
                           retrying: Callable[[], bool] | None = None) -> None:
        """Wait until the node runs; raise BackendError if it stops or fails meanwhile.

        While `retrying()` is true (someone will start the node again: `tsnet2d --up`),
        stopped and failed states are waited through, as the prototype's `up` does.
        """
        async def wait() -> None:
            async with self._changed:
                while self.state != NodeState.RUNNING:
                    if (self.state in (NodeState.NO_STATE, NodeState.STOPPED, NodeState.NEEDS_LOGIN)
                            and not (retrying is not None and retrying())):
                        raise self.down_error()
                    await self._changed.wait()
        async with asyncio.timeout(timeout):
            await wait()

    async def changes(self) -> AsyncIterator[int]:
        """Yield once now and then after every state or netmap change (for the IPN bus)."""
        seen = -1
        while True:
            async with self._changed:
                while self._change_seq == seen:
                    await self._changed.wait()
                seen = self._change_seq
            yield seen

    # ---- state file ------------------------------------------------------------------

    def _node_file(self) -> Path:
        return self.state_dir / NODE_FILE

    def _load_node_file(self) -> dict[str, Any]:
        try:
            data = json.loads(self._node_file().read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable %s: %s", self._node_file(), exc)
            return {}
        return data if isinstance(data, dict) else {}

    def _save_node_file(self, data: dict[str, Any]) -> None:
        path = self._node_file()
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
        os.replace(tmp, path)

    def _forget_node_file(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._node_file().unlink()
