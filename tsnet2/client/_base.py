"""The non-I/O half shared by :class:`tsnet2.Server` and :class:`tsnet2.AsyncServer`.

Configuration fields, argument validation, RPC parameter building, result parsing,
the lifecycle state machine and error mapping live here; the sync and asyncio
faces only move bytes (the httpx ``BaseClient`` pattern).
"""

from __future__ import annotations

import enum
import ipaddress
import json
import os
import secrets
import socket
from collections.abc import Callable, Iterator, Sequence, Sized
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address
from typing import Any

from tsnet2 import proto
from tsnet2.client.errors import (
    AddressError,
    AddressInUseError,
    AuthKeyError,
    ClosedError,
    DaemonError,
    DaemonUnavailableError,
    DialError,
    Error,
    HostnameConflictError,
    LimitError,
    NoCertificateError,
    NodeDownError,
    NoSuchPeerError,
    NotSupportedError,
    PeerOfflineError,
    PermissionDeniedError,
    ProtocolError,
    TLSError,
)
from tsnet2.proto.tls import check_alpn as _check_alpn

IPAddress = IPv4Address | IPv6Address
TailnetAddr = tuple[IPAddress, int]
"""A tailnet endpoint: ``(ip_address, port)``."""

LogFunc = Callable[[str], None]
FallbackTCPHandler = Callable[[TailnetAddr, TailnetAddr], tuple[Callable[[Any], None] | None, bool]]
"""Shape of a fallback TCP handler (Go: ``func(src, dst) (handler, intercept)``)."""

# Timeouts (seconds). Go tsnet2 uses the same numbers (seed-spec §2.8).
START_TIMEOUT = 30.0
RPC_TIMEOUT = 5.0
LISTEN_TLS_TIMEOUT = 15.0
"""``register_listener`` with TLS: the daemon waits up to 10 s for a node's first
certificate being requested (docs/tls.md)."""
SHUTDOWN_RPC_TIMEOUT = 2.0
SLOT_CONNECT_TIMEOUT = 5.0
BACKOFF_INITIAL = 0.05
BACKOFF_MAX = 1.0
LOCALAPI_TIMEOUT = 30.0
RECONNECT_TIMEOUT = 10.0
"""Default ``reconnect_timeout``: how long a call waits for a restarted daemon."""
RECONNECT_BACKOFF_INITIAL = 0.05
RECONNECT_BACKOFF_MAX = 0.25
"""While the daemon is down the socket is polled at least every 250 ms."""
REPARK_CONNECT_TIMEOUT = 0.25
"""How long re-parking one dropped accept slot may try to connect before backing off."""
REPARK_BACKOFF_MAX = 0.25

SUPPORTED_NETWORKS = ("tcp", "tcp4", "tcp6")
UDP_NETWORKS = ("udp", "udp4", "udp6")
"""Networks of ``dial``/``listen``/``listen_packet`` that carry datagrams (docs/udp.md)."""
NO_SOCKET_MESSAGE = (
    "socket_path is required (pass Server(socket_path=...) or set TSNET2_SOCKET): not implemented"
)
TUN_MESSAGE = "Tun is not supported (the daemon owns the device)"

_FIELDS = frozenset(
    {
        "dir",
        "hostname",
        "control_url",
        "auth_key",
        "ephemeral",
        "socket_path",
        "traffic_log_path",
        "advertise_tags",
        "port",
        "store",
        "logf",
        "user_logf",
        "tun",
        "connect_timeout",
        "accept_slots",
        "reconnect_timeout",
        "join",
    }
)


class ServerState(enum.Enum):
    """Lifecycle of a Server: UNOPENED -> STARTED -> CLOSED (CLOSED is final)."""

    UNOPENED = "unopened"
    STARTED = "started"
    CLOSED = "closed"


@dataclass(frozen=True)
class Status:
    """The node's status, returned by ``Server.up()``.

    Attributes:
        tailscale_ips: the node's tailnet addresses, IPv4 first.
        cert_domains: DNS names the node can get TLS certificates for, or None.
        node_name: the node's name (its hostname in the tailnet).
        backend_state: the LocalAPI ``BackendState`` (``"Running"`` once up).
        self: the LocalAPI status ``Self`` object (Tailscale field names).
        raw: the whole LocalAPI ``/localapi/v0/status`` document.
    """

    tailscale_ips: list[IPAddress]
    cert_domains: list[str] | None
    node_name: str
    backend_state: str
    self: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------
# address helpers


def parse_tailnet_addr(s: str) -> TailnetAddr | None:
    """Parse a daemon-supplied ``ip:port`` into ``(ip_address, port)``; "" gives None."""
    if not s:
        return None
    try:
        host, port = proto.split_host_port(s)
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError as exc:
        raise ProtocolError(f"daemon sent a malformed address {s!r}: {exc}") from None
    return ip, port


def sockaddr(addr: TailnetAddr) -> tuple[str, int]:
    """A tailnet endpoint as ``getpeername()`` returns it: ``(ip string, port)``."""
    return str(addr[0]), addr[1]


def check_network(op: str, network: str, *, udp: bool = False) -> None:
    """Reject every network except tcp, tcp4 and tcp6 (with ``udp``: only udp, udp4,
    udp6)."""
    if network in (UDP_NETWORKS if udp else SUPPORTED_NETWORKS):
        return
    if udp:
        raise AddressError(f"{op}: unsupported network {network!r} (want udp, udp4 or udp6)")
    if network.startswith("udp"):
        raise NotSupportedError(f"{op}: unsupported network {network!r} here; UDP goes "
                                "through dial() and listen()/listen_packet()")
    raise AddressError(f"{op}: unsupported network {network!r} (want tcp, tcp4 or tcp6)")


def udp_unsupported(op: str, path: str) -> NotSupportedError:
    """The daemon answered a UDP request without ``max_datagram``: it has no UDP."""
    return NotSupportedError(f"{op}: the daemon at {path} does not relay UDP (an older "
                             "tsnet2d, or the prototype's); upgrade the daemon")


def check_dial_args(op: str, network: str, addr: str, *, udp: bool = False) -> None:
    """Validate dial arguments before any socket is touched."""
    check_network(op, network, udp=udp)
    try:
        host, _ = proto.split_host_port(addr)
    except ValueError as exc:
        raise AddressError(f"{op}: {exc}") from None
    if not host:
        raise AddressError(f"{op}: bad addr {addr!r}: missing host")


def check_listen_args(op: str, network: str, addr: str, *, udp: bool = False) -> None:
    """Validate listen arguments (network and bind address) before any socket is touched."""
    check_network(op, network, udp=udp)
    try:
        if udp:
            from tsnet2.proto.udp import parse_udp_listen_addr
            parse_udp_listen_addr(network, addr)
            return
        proto.parse_listen_addr(network, addr)
    except ValueError as exc:
        raise AddressError(f"{op}: {exc}") from None


# ---------------------------------------------------------------------------
# result parsing


def as_object(op: str, value: Any) -> dict[str, Any]:
    """Return an RPC result as a dict (None means ``{}``); ProtocolError otherwise."""
    if value is None:
        return {}
    if isinstance(value, bytes | str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise ProtocolError(f"{op}: daemon sent a result that is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ProtocolError(f"{op}: daemon sent a {type(value).__name__} result, want an object")
    return value


_RPC_ERRORS: dict[proto.ErrorCode, type[DaemonError]] = {
    proto.ErrorCode.ADDRESS_IN_USE: AddressInUseError,
    proto.ErrorCode.AUTH_FAILED: AuthKeyError,
    proto.ErrorCode.HOSTNAME_CONFLICT: HostnameConflictError,
    proto.ErrorCode.LIMIT: LimitError,
    proto.ErrorCode.NO_CERTIFICATE: NoCertificateError,
}


def rpc_result(op: str, method: proto.Method, response: proto.Response) -> Any:
    """Map a control-channel response to its typed result (``tsnet2.proto.methods``), or
    raise the typed error its code names (DaemonError by default; NodeDownError when the
    node is not running). A result of the wrong shape is a ProtocolError."""
    if response.error is not None:
        msg = f"{op}: {response.error}"
        if response.code == proto.ErrorCode.NODE_DOWN:
            raise NodeDownError(msg)
        cls = _RPC_ERRORS.get(response.code or proto.ErrorCode.OTHER, DaemonError)
        raise cls(msg, method=str(method), daemon_message=str(response.error))
    try:
        return proto.decode_result(method, as_object(op, response.result))
    except proto.WireError as exc:
        raise ProtocolError(f"{op}: daemon sent a malformed result: {exc}") from None


def dial_error(op: str, reply: proto.DialReply) -> Error:
    """The typed error for a failed dial reply."""
    msg = f"{op}: {reply.err or 'dial failed'}"
    code = reply.code
    if code == proto.ErrorCode.NO_SUCH_PEER:
        return NoSuchPeerError(msg)
    if code == proto.ErrorCode.PEER_OFFLINE:
        return PeerOfflineError(msg)
    if code == proto.ErrorCode.TLS_FAILED:
        return TLSError(msg)
    return refused_error(msg, code) or DialError(msg)


def refused_error(msg: str, code: proto.ErrorCode | str | None) -> Error | None:
    """The typed error for a channel the daemon refused or closed with a reason."""
    if code == proto.ErrorCode.PERMISSION_DENIED:
        return PermissionDeniedError(msg)
    if code == proto.ErrorCode.NODE_DOWN:
        return NodeDownError(msg)
    if code in (proto.ErrorCode.LIMIT, proto.ErrorCode.SHUTDOWN):
        return DaemonUnavailableError(msg)
    return None


def _ip(op: str, key: str, value: str) -> IPAddress:
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        raise ProtocolError(f"{op}: daemon sent a malformed {key!r}: {value!r}") from None


def build_status(up: proto.UpResult, raw_status: dict[str, Any]) -> Status:
    """Combine the ``up`` RPC result and the LocalAPI status into a Status."""
    ips = [_ip("tsnet2.up", "tailscale_ips", s) for s in up.tailscale_ips or ()]
    self_obj = raw_status.get("Self")
    backend_state = raw_status.get("BackendState", "")
    return Status(
        tailscale_ips=ips,
        cert_domains=None if up.cert_domains is None else list(up.cert_domains),
        node_name=up.node_name,
        backend_state=backend_state if isinstance(backend_state, str) else str(backend_state),
        self=dict(self_obj) if isinstance(self_obj, dict) else {},
        raw=raw_status,
    )


def parse_tailscale_ips(
    result: proto.TailscaleIPsResult,
) -> tuple[IPv4Address | None, IPv6Address | None]:
    """``tailscale_ips`` result -> (v4 or None, v6 or None), each of its family."""
    op = "tsnet2.tailscale_ips"
    v4: IPv4Address | None = None
    v6: IPv6Address | None = None
    if result.v4:
        ip = _ip(op, "v4", result.v4)
        if not isinstance(ip, IPv4Address):
            raise ProtocolError(f"{op}: daemon sent an IPv6 address as 'v4': {ip}")
        v4 = ip
    if result.v6:
        ip = _ip(op, "v6", result.v6)
        if not isinstance(ip, IPv6Address):
            raise ProtocolError(f"{op}: daemon sent an IPv4 address as 'v6': {ip}")
        v6 = ip
    return v4, v6


def parse_cert_domains(result: proto.CertDomainsResult) -> list[str] | None:
    """``cert_domains`` result -> list or None."""
    return None if result.domains is None else list(result.domains)


def parse_register_result(result: proto.RegisterListenerResult) -> tuple[str, str]:
    """``register_listener`` result -> (listener_id, addr); the id must not be empty."""
    if not result.listener_id:
        raise ProtocolError(f"tsnet2.listen: daemon sent a malformed register result: {result!r}")
    return result.listener_id, result.addr


# ---------------------------------------------------------------------------
# the shared base


class ServerBase:
    """Configuration and lifecycle shared by Server and AsyncServer (no I/O here)."""

    dir: str
    hostname: str
    control_url: str
    auth_key: str
    ephemeral: bool
    socket_path: str
    traffic_log_path: str
    advertise_tags: list[str] | None
    port: int
    store: Any
    logf: LogFunc | None
    user_logf: LogFunc | None
    tun: Any
    connect_timeout: float
    accept_slots: int
    reconnect_timeout: float
    join: bool

    def __init__(
        self,
        *,
        dir: str = "",
        hostname: str = "",
        control_url: str = "",
        auth_key: str = "",
        ephemeral: bool = False,
        socket_path: str | None = None,
        traffic_log_path: str = "",
        advertise_tags: Sequence[str] | None = None,
        port: int = 0,
        store: Any = None,
        logf: LogFunc | None = None,
        user_logf: LogFunc | None = None,
        tun: Any = None,
        connect_timeout: float = 10.0,
        accept_slots: int = 2,
        reconnect_timeout: float = RECONNECT_TIMEOUT,
        join: bool = True,
    ) -> None:
        object.__setattr__(self, "_frozen", False)
        self.dir = dir
        self.hostname = hostname
        self.control_url = control_url
        self.auth_key = auth_key
        self.ephemeral = ephemeral
        self.socket_path = (
            socket_path if socket_path is not None else os.environ.get("TSNET2_SOCKET", "")
        )
        self.traffic_log_path = traffic_log_path
        self.advertise_tags = list(advertise_tags) if advertise_tags is not None else None
        self.port = port
        self.store = store
        self.logf = logf
        self.user_logf = user_logf
        self.tun = tun
        self.connect_timeout = connect_timeout
        self.accept_slots = accept_slots
        self.reconnect_timeout = reconnect_timeout
        self.join = join
        self._state = ServerState.UNOPENED
        self._setup()

    def _setup(self) -> None:
        """Initialise the I/O face's private state (overridden by the faces)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _FIELDS and getattr(self, "_frozen", False):
            raise AttributeError(
                f"tsnet2: {type(self).__name__}.{name} cannot change after the server started"
            )
        object.__setattr__(self, name, value)

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} hostname={self.hostname!r} "
            f"socket_path={self.socket_path!r} state={self._state.value}>"
        )

    # -- state ------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True once close() has been called."""
        return self._state is ServerState.CLOSED

    def _check_startable(self, op: str) -> None:
        """Raise the error start() would raise before touching the socket."""
        if self._state is ServerState.CLOSED:
            raise ClosedError(f"{op}: server is closed")
        if not self.socket_path:
            raise NotSupportedError(f"{op}: {NO_SOCKET_MESSAGE}")
        if self.tun is not None:
            raise NotSupportedError(f"{op}: {TUN_MESSAGE}")
        if self.connect_timeout < 0:
            raise ValueError(f"{op}: connect_timeout must be >= 0, got {self.connect_timeout!r}")
        if self.accept_slots < 1:
            raise ValueError(f"{op}: accept_slots must be >= 1, got {self.accept_slots!r}")
        if self.reconnect_timeout < 0:
            raise ValueError(
                f"{op}: reconnect_timeout must be >= 0, got {self.reconnect_timeout!r}"
            )

    @property
    def reconnects(self) -> bool:
        """True when a dead control channel is re-established (``reconnect_timeout > 0``)."""
        return self.reconnect_timeout > 0

    def _mark_started(self) -> None:
        object.__setattr__(self, "_frozen", True)
        self._state = ServerState.STARTED

    def _start_params(self) -> proto.StartParams:
        """The ``start`` RPC params; every key is always sent (seed-spec §2.2)."""
        return proto.StartParams(
            hostname=self.hostname,
            control_url=self.control_url,
            auth_key=self.auth_key,
            ephemeral=bool(self.ephemeral),
            advertise_tags=tuple(self.advertise_tags) if self.advertise_tags else None,
        )

    def _log(self, msg: str) -> None:
        if self.logf is not None:
            self.logf(msg)

    # -- methods that never touch the daemon ---------------------------------

    def get_root_path(self) -> str:
        """Return the ``dir`` field verbatim ("" when unset); the daemon keeps the real state."""
        return self.dir

    def register_fallback_tcp_handler(self, cb: FallbackTCPHandler) -> Callable[[], None]:
        """Not supported yet: ``cb`` is never called. Returns a deregister function (a no-op)."""
        self._log("tsnet2: register_fallback_tcp_handler is not supported; handler ignored")

        def deregister() -> None:
            """Remove the fallback handler (a no-op: it was never installed)."""

        return deregister


# ---------------------------------------------------------------------------
# reconnection (pure parts shared by both faces)


def backoff_delays(
    initial: float = RECONNECT_BACKOFF_INITIAL, cap: float = RECONNECT_BACKOFF_MAX
) -> Iterator[float]:
    """Sleep lengths between connect attempts: ``initial`` doubling up to ``cap``, forever."""
    delay = initial
    while True:
        yield delay
        delay = min(delay * 2, cap)


def gone_message(op: str, path: str) -> str:
    """The fail-loudly message when reconnection is disabled (``reconnect_timeout=0``)."""
    return (
        f"{op}: the daemon at {path} went away and reconnect_timeout is 0; "
        "start a new Server (or set reconnect_timeout > 0 to reconnect automatically)"
    )


def reconnect_failed_message(op: str, path: str, timeout: float, cause: BaseException) -> str:
    """The daemon did not come back within ``reconnect_timeout``."""
    return (
        f"{op}: the daemon at {path} went away and did not come back within "
        f"reconnect_timeout={timeout:g}s ({cause}); check that tsnet2d is running, "
        "then retry the call (or raise reconnect_timeout)"
    )


def restart_refused_message(op: str, path: str, cause: DaemonError) -> str:
    """The restarted daemon answered the re-sent ``start`` (or ``up``) with an error."""
    return (
        f"{op}: reconnected to the restarted daemon at {path}, but it refused "
        f"{cause.method!r}: {cause.daemon_message}; check the daemon's log and configuration"
    )


def relisten_failed_message(path: str, addr: str, cause: BaseException) -> str:
    """A listener could not be registered again on the restarted daemon."""
    detail = cause.daemon_message if isinstance(cause, DaemonError) else str(cause)
    return (
        f"tsnet2.accept: the daemon at {path} restarted and listener {addr} could not be "
        f"registered again: {detail}; close this listener and listen again "
        "(another listener may now hold the port)"
    )


def relisten_params(network: str, bound_addr: str, forward_socket: str = "",
                    forward_mode: str = "", tls: bool = False,
                    alpn: tuple[str, ...] | None = None) -> proto.RegisterListenerParams:
    """``register_listener`` params that re-create a listener on the same bound address.

    The bound address (as the daemon reported it, port 0 already resolved) is used,
    not the one the app asked for, so a ``":0"`` listener keeps its port. A socket
    listener (``listen_socket``) keeps its forward socket and mode, a ``listen_tls``
    listener its TLS and ALPN list.
    """
    return proto.RegisterListenerParams(network=network, addr=bound_addr,
                                        forward_socket=forward_socket,
                                        forward_mode=forward_mode, tls=tls, alpn=alpn)


def check_tls_echo(op: str, path: str, result: proto.RegisterListenerResult) -> None:
    """Raise NotSupportedError if a daemon asked for a ``listen_tls`` listener did not
    echo ``tls`` (an older tsnet2d, or the prototype's, which listens without TLS); the
    caller unregisters the listener first."""
    if not result.tls:
        raise NotSupportedError(
            f"{op}: the daemon at {path} does not terminate TLS (an older tsnet2d, or the "
            "prototype's); upgrade tsnet2d, or use listen() and do TLS in the app (the "
            "traffic log then holds only ciphertext)")


def tls_dial_options(op: str, server_name: str | None,
                     alpn: Sequence[str] | None) -> proto.TLSDialOptions:
    """The ``tls`` object of a ``dial_tls`` request (AddressError for a bad name or
    ALPN list)."""
    try:
        return proto.TLSDialOptions(server_name=server_name or "",
                                    alpn=None if alpn is None else tuple(alpn))
    except proto.WireError as exc:
        raise AddressError(f"{op}: {exc}") from None


def check_alpn(op: str, alpn: Sequence[str] | None) -> tuple[str, ...] | None:
    """A ``listen_tls`` ALPN list as a tuple (AddressError if a name or the count is
    out of bounds: 1-255 ASCII characters each, at most 16)."""
    if alpn is None:
        return None
    if isinstance(alpn, str):
        raise AddressError(f"{op}: alpn must be a list of protocol names, like ['h2'], "
                           f"not the string {alpn!r}")
    try:
        return _check_alpn(tuple(alpn), op)
    except proto.WireError as exc:
        raise AddressError(str(exc)) from None


def check_tls_reply(op: str, path: str, reply: proto.DialReply) -> None:
    """Raise NotSupportedError if a TLS dial's successful reply has no ``tls`` (a daemon
    that ignored the request's ``tls`` and connected in plain TCP)."""
    if reply.tls is None:
        raise NotSupportedError(
            f"{op}: the daemon at {path} does not originate TLS (an older tsnet2d, or the "
            "prototype's); upgrade tsnet2d, or dial() and do TLS in the app (the traffic "
            "log then holds only ciphertext)")


def check_relisten_addr(old_addr: str, new_addr: str) -> None:
    """Raise ProtocolError if the daemon bound a re-registered listener somewhere else."""
    old_port = old_addr.rpartition(":")[2]
    new_port = new_addr.rpartition(":")[2]
    if old_port != new_port:
        raise ProtocolError(
            f"tsnet2.listen: the daemon bound {new_addr!r} when asked for {old_addr!r}"
        )


SOCKET_IDENTITIES = ("http", "proxy", "http+proxy", "tcp")
"""``Server.listen_socket(identity=...)`` values (the daemon's forward modes)."""
MAX_SOCKET_PATH = 107  # bytes of sun_path, without the terminating NUL


def bind_forward_socket(op: str, daemon_socket: str) -> tuple[socket.socket, str]:
    """A listening ``AF_UNIX`` socket, mode 0600, under a unique name in the directory of
    the daemon's socket (where the daemon accepts forward sockets): ``(socket, path)``.
    The mode is set before ``listen()``, so nobody else can connect in between."""
    directory = os.path.dirname(os.path.abspath(daemon_socket))
    path = os.path.join(directory, f"tsnet2-fwd-{os.getpid()}-{secrets.token_hex(6)}.sock")
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise AddressError(f"{op}: socket path {path!r} is longer than {MAX_SOCKET_PATH} "
                           "bytes; use a shorter socket directory")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        try:
            os.chmod(path, 0o600)
            sock.listen(128)
        except BaseException:
            os.unlink(path)
            raise
    except OSError as exc:
        sock.close()
        raise DaemonUnavailableError(f"{op}: cannot create a socket in {directory}: "
                                     f"{exc.strerror or exc}") from exc
    except BaseException:
        sock.close()
        raise
    return sock, path


class ListenerBinding:
    """Which daemon registration a listener belongs to, and whether its slots match it.

    ``gen`` is the server's connection generation the ``listener_id`` was issued
    under; ``slots_gen`` the generation its parked slots were made for. A reconnect
    calls :meth:`rebind` (new id, new generation); the listener sees
    :meth:`slots_stale`, drops its old slots and parks new ones. A listener that
    could not be registered again is :meth:`lose`-d: ``lost`` holds the message
    accept() raises.
    """

    def __init__(self, network: str, addr: str, listener_id: str, gen: int,
                 forward_socket: str = "", forward_mode: str = "", tls: bool = False,
                 alpn: tuple[str, ...] | None = None) -> None:
        self.network = network
        self.addr = addr
        self.listener_id = listener_id
        self.gen = gen
        self.slots_gen = gen
        self.lost: str | None = None
        self.forward_socket = forward_socket  # listen_socket: the app's Unix socket
        self.forward_mode = forward_mode
        self.tls = tls  # listen_tls: the daemon terminates TLS (kept across restarts)
        self.alpn = alpn

    def rebind(self, listener_id: str, addr: str, gen: int) -> None:
        """Record the id the restarted daemon gave this listener (id first, then gen)."""
        self.listener_id = listener_id
        self.addr = addr
        self.gen = gen

    def lose(self, message: str) -> None:
        """Mark the listener as not registered with the daemon any more."""
        self.lost = message

    def slots_stale(self) -> bool:
        """True if the parked slots were made for an earlier registration."""
        return self.slots_gen != self.gen

    def mark_slots_current(self) -> None:
        """The old slots are dropped; new ones will be parked for the current id."""
        self.slots_gen = self.gen


class ListenerBase:
    """What both listener faces share: the daemon binding and the names derived from it."""

    _binding: ListenerBinding
    _closed: bool
    _slots: Sized  # parked accept slots (a list or a dict, per face)

    @property
    def network(self) -> str:
        """The network: "tcp", "tcp4" or "tcp6"."""
        return self._binding.network

    @property
    def addr(self) -> str:
        """The bound address as the daemon reported it, like ``":8080"``."""
        return self._binding.addr

    @property
    def tls(self) -> bool:
        """True for a ``listen_tls`` listener: the daemon terminates TLS and its accepted
        connections carry plaintext (and ``.tls``, the session)."""
        return self._binding.tls

    @property
    def listener_id(self) -> str:
        """The daemon's id for this listener (a new one after a daemon restart)."""
        return self._binding.listener_id

    @property
    def port(self) -> int:
        """The bound port number (0 if the daemon's addr has none)."""
        port = self.addr.rpartition(":")[2]
        return int(port) if port.isdigit() else 0

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"slots={len(self._slots)}"
        return f"<{type(self).__name__} {self.network} {self.addr} id={self.listener_id} {state}>"
