"""tsnet2d's socket server: one Unix socket, four channels, one owner for every task.

Every connection starts with one byte naming its channel (`tsnet2.proto.ChannelKind`). The
daemon reads the byte within `KIND_TIMEOUT`, checks the peer's uid (SO_PEERCRED; a refused
peer is told why, in its channel's own format, before the daemon hangs up) and hands the
socket to that channel's handler. Handlers run as tasks owned by the `Daemon`; shutdown
cancels and awaits all of them, cuts live flows (each gets its `close` record) and takes the
node down.

The node belongs to the daemon, not to a client (DESIGN §2.11). Each control connection is a
`Session`; a session that called `start` *holds* the node. A session's `close` releases its
own listeners and its hold; the node goes down only when the last hold is released and the
daemon was not started with `--up`. With `--up` a supervisor starts the node, retries with a
capped backoff for as long as it takes, and starts it again when it is lost. When the node
goes away every session and parked slot is told (`node_down`) and closed, so clients
reconnect and register their listeners again, as after a daemon restart.

Every client-controlled resource is bounded: control sessions per daemon, requests in flight
per session (the daemon stops reading until replies drain), listeners per session, parked
slots per listener, connections that have not named their channel, LocalAPI connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import errno
import fcntl
import logging
import os
import signal
import socket
import stat
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine

# asyncio.to_thread's executor, imported now: a daemon that dropped privileges may no longer
# be able to read the standard library when it first needs it.
from concurrent.futures import ThreadPoolExecutor  # noqa: F401
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from tsnet2 import proto
from tsnet2.controlclient import AuthError, ControlError
from tsnet2.daemon import io
from tsnet2.daemon.backend import Backend, BackendError, DeviceConfig, NodeState
from tsnet2.daemon.datapath import Datapath, ListenError
from tsnet2.daemon.health import HealthServer
from tsnet2.daemon.io import TCP_KEEPALIVE_IDLE, peer_uid
from tsnet2.daemon.localapi import LocalAPI, LocalAPIConnection
from tsnet2.daemon.metrics import Metrics, peer_samples
from tsnet2.daemon.watchdog import Watchdog
from tsnet2.daemon.zerocopy import RelayMode
from tsnet2.node import NodeError
from tsnet2.proto import ErrorCode, methods
from tsnet2.proto.serve import ServeRule
from tsnet2.traffic import ErrorPolicy, LogMode, TrafficLog

if TYPE_CHECKING:
    from tsnet2.daemon.dns import DnsConfig, DnsResponder
    from tsnet2.daemon.egress import Egress, EgressConfig
    from tsnet2.daemon.serve import ServeRules

log = logging.getLogger("tsnet2d")

KIND_TIMEOUT = 10.0  # seconds a new connection has to name its channel
SHUTDOWN_TIMEOUT = 10.0  # seconds shutdown waits for handlers after cancelling them
LOG_PROBE_INTERVAL = 5.0  # seconds between recovery attempts of an unwritable traffic log

# Bounds on what clients can make the daemon hold (DESIGN §2.2: bounded everything).
MAX_SESSIONS = 256  # control connections at once
MAX_INFLIGHT = 32  # requests one control connection may have in progress; then reading stops
MAX_LISTENERS_PER_SESSION = 64  # listeners one control connection may register
MAX_HANDSHAKES = 256  # connections that have not named their channel yet
MAX_LOCALAPI_CONNECTIONS = 64  # LocalAPI connections at once
REFUSAL_TIMEOUT = 1.0  # seconds to deliver a refusal before hanging up anyway

# The --up supervisor: first retry after START_RETRY_MIN seconds, doubling to START_RETRY_MAX.
START_RETRY_MIN = 1.0
START_RETRY_MAX = 60.0
NODE_DOWN_GRACE = 90.0  # /healthz fails when a node that should run has been down this long
WATCHDOG_TIMEOUT = 30.0  # the process exits when its event loop is stuck this long


class DaemonFatalError(Exception):
    """tsnet2d cannot run as configured, or must stop (a critical task ended): the message
    is printed as `tsnet2d: <message>` and the process exits 1."""


@dataclasses.dataclass
class DaemonConfig:
    """Everything tsnet2d is told by flags and environment."""

    socket_path: Path
    state_dir: Path
    traffic_log: str | tuple[str, ...]
    traffic_log_mode: LogMode = "payload"
    traffic_log_max_bytes: int | None = None
    traffic_log_keep: int = 5
    traffic_log_payload_cap: int | None = None
    traffic_log_on_error: ErrorPolicy = "fail-closed"
    traffic_log_buffer: int = 4 << 20
    traffic_log_checkpoint: float = 10.0
    device: DeviceConfig = dataclasses.field(default_factory=DeviceConfig)
    allow_uids: frozenset[int] | None = None  # None: any uid; default: our own
    socket_mode: int | None = None  # None: 0666 with any uid, else 0660
    socket_group: int | None = None  # None: as created (our gid, or a setgid dir's)
    hostname: str = ""
    control_url: str = ""
    auth_key: str = ""
    token_file: str = ""
    ephemeral: bool = False
    advertise_tags: tuple[str, ...] = ()
    auto_start: bool = False
    metrics_addr: tuple[str, int] | None = None
    watchdog_timeout: float = WATCHDOG_TIMEOUT  # 0: off
    node_down_grace: float = NODE_DOWN_GRACE
    tcp_keepalive: float = TCP_KEEPALIVE_IDLE  # 0: off
    relay: RelayMode = "auto"  # "auto": splice(2) when no payload is logged; "copy"
    egress: EgressConfig | None = None  # --egress-listen / --egress-socket
    dns: DnsConfig | None = None  # --dns-listen / --dns-upstream
    serve: tuple[ServeRule, ...] = ()  # --serve: tailnet ports forwarded into the pod
    udp_idle_timeout: float = 60.0  # --udp-idle-timeout (tsnet2.daemon.udp.UDP_IDLE_TIMEOUT)


@dataclasses.dataclass(eq=False)
class Session:
    """One control connection: the node hold and listeners it owns, and how to reach it."""

    sock: socket.socket
    core: proto.ControlServerCore
    write_lock: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)
    holds_node: bool = False  # it called `start` (and has not called `close`)
    closed: bool = False

    async def send(self, data: bytes) -> None:
        """Write one frame (frames never interleave)."""
        async with self.write_lock:
            await io.sendall(self.sock, data)

    async def hang_up(self, message: str, code: ErrorCode) -> None:
        """Tell the client why (an id-0 error frame), then end the connection."""
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(REFUSAL_TIMEOUT):
                await self.send(self.core.refuse(message, code))
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # the session's reader sees EOF and ends


P = TypeVar("P", bound=proto.WireDocument)
R = TypeVar("R", bound=proto.WireDocument)


@dataclasses.dataclass(frozen=True)
class ControlRoute(Generic[P, R]):
    """A control method's handler, typed by the method's spec in `tsnet2.proto.methods`."""

    spec: proto.MethodSpec[P, R]
    handler: Callable[[P, Session], Awaitable[R]]

    async def call(self, params: dict[str, Any] | None, session: Session) -> dict[str, Any]:
        """Decode the request's params (WireError if bad), run, encode the result."""
        return self.spec.encode_result(await self.handler(self.spec.decode_params(params),
                                                          session))


JOURNAL_FILE = "traffic-flows.journal"
"""The open-flow journal in the state directory (:mod:`tsnet2.traffic.journal`)."""


class Daemon:
    """The tsnet2d process: socket, channels, backend, traffic log."""

    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.backend = Backend(config.state_dir, config.device, token_file=config.token_file)
        self.traffic = TrafficLog(
            config.traffic_log, mode=config.traffic_log_mode,
            max_bytes=config.traffic_log_max_bytes, keep=config.traffic_log_keep,
            payload_cap=config.traffic_log_payload_cap, on_error=config.traffic_log_on_error,
            # Flows open at a crash get their close record from the next start.
            journal=str(config.state_dir / JOURNAL_FILE),
            buffer=config.traffic_log_buffer,
            # The checkpoint key and chain state: the chain goes on across restarts.
            state_dir=config.state_dir,
        )
        self.metrics = Metrics(
            peers=lambda: peer_samples(self.backend.peers, self.backend.peer_stats()),
            before_scrape=self._refresh_metrics,
        )
        self.traffic.on_record = self.metrics.log_record
        self.traffic.on_drop = self._log_dropped
        self.traffic.on_pressure = self._log_pressure
        self.datapath = Datapath(self.backend, self.traffic, self.spawn, self.metrics,
                                 keepalive_idle=config.tcp_keepalive, relay=config.relay,
                                 udp_idle_timeout=config.udp_idle_timeout)
        self.backend.refusal_log = self.datapath
        # Where apps' forward sockets must be (listen_socket): the directory of --socket.
        self.socket_dir = Path(os.path.abspath(config.socket_path)).parent
        self.backend.certs.configure(bundle_dir=self.socket_dir, metrics=self.metrics)
        self.backend.on_lost = self._wake_supervisor
        # Serve, egress and DNS load their modules only when configured: a daemon without
        # them starts no smaller for code it never runs.
        self.serve_rules: ServeRules | None = None
        if config.serve:
            from tsnet2.daemon.serve import ServeRules
            self.serve_rules = ServeRules(config.serve, self.datapath, self.backend)
        self.egress: Egress | None = None
        if config.egress is not None:
            from tsnet2.daemon.egress import Egress
            self.egress = Egress(
                config.egress, self.datapath, self.spawn, allow_uids=config.allow_uids,
                bind_unix=lambda path: bind_unix_socket(path, self._socket_mode(),
                                                        config.socket_group))
        self.dns: DnsResponder | None = None
        if config.dns is not None:
            from tsnet2.daemon.dns import DnsResponder
            self.dns = DnsResponder(config.dns, self.backend, self.metrics, self.spawn)
        self.health: HealthServer | None = None
        self.localapi = LocalAPI(self.backend)
        self.control_routes: dict[str, ControlRoute[Any, Any]] = {}
        self.route(methods.START, self._start)
        self.route(methods.UP, self._up)
        self.route(methods.CLOSE, self._close)
        self.route(methods.TAILSCALE_IPS, self._tailscale_ips)
        self.route(methods.CERT_DOMAINS, self._cert_domains)
        self.route(methods.REGISTER_LISTENER, self._register_listener)
        self.route(methods.UNREGISTER_LISTENER, self._unregister_listener)
        if self.control_routes.keys() != proto.METHODS.keys():
            raise RuntimeError("control methods without a handler: "
                               f"{sorted(proto.METHODS.keys() - self.control_routes.keys())}")
        self.sessions: set[Session] = set()
        self._handshakes = 0
        self._localapi_conns = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._critical: set[asyncio.Task[Any]] = set()
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()  # the supervisor looks at the node again
        self._fatal: str | None = None
        self._stopping = False
        self._lock_fd: int | None = None
        self._listen_sock: socket.socket | None = None
        self._accept_task: asyncio.Task[None] | None = None
        self._watchdog: Watchdog | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0

    # ---- task ownership --------------------------------------------------------------

    def spawn(self, coro: Coroutine[Any, Any, Any], *, critical: bool = False,
              name: str | None = None) -> asyncio.Task[Any]:
        """Run `coro` as a task the daemon owns: logged if it fails, cancelled at shutdown.

        A `critical` task (the socket's accept loop, the node supervisor) must run as long
        as the daemon does: if it ends, the daemon stops and exits 1, so whoever runs it
        (the kubelet, systemd) starts a healthy one instead of keeping a deaf one alive.
        """
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        if critical:
            self._critical.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        failed = not task.cancelled() and task.exception() is not None
        if failed:
            log.error("internal error in %s", task.get_name(), exc_info=task.exception())
        if task in self._critical:
            self._critical.discard(task)
            if not self._stopping:
                why = (f"{task.get_name()} failed: {task.exception()!r}" if failed
                       else f"{task.get_name()} ended")
                self._fatal = self._fatal or why
                log.critical("%s; stopping so that a healthy daemon can be started", why)
                self.stop()

    def stop(self) -> None:
        """Ask `run` to shut down (signal handlers call this)."""
        self._stop.set()

    # ---- run -------------------------------------------------------------------------

    async def run(self, ready: Callable[[], None] | None = None) -> None:
        """Serve until `stop()`; `ready` is called once the socket accepts connections.

        Raises DaemonFatalError after a clean shutdown if a critical task died (exit status 1).
        """
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._loop_thread = threading.get_ident()
        self._prepare_state_dir()
        if self.config.watchdog_timeout > 0:
            self._watchdog = Watchdog(self.config.watchdog_timeout)
            self._watchdog.start(loop)
        try:
            self.traffic.open()
            self._listen_sock = self._bind()
            try:
                if self.egress is not None:
                    self.egress.start()
                if self.dns is not None:
                    await self.dns.start()
            except OSError as exc:
                raise DaemonFatalError(f"cannot listen on {exc.strerror}") from exc
            for sig in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.add_signal_handler(sig, self.stop)
            if self.config.metrics_addr is not None:
                self.health = HealthServer(self.metrics, healthz=self._healthz,
                                           readyz=self._readyz)
                host, port = await self.health.start(*self.config.metrics_addr)
                log.info("metrics and health on http://%s:%d", host, port)
            if ready is not None:
                ready()
            self.spawn(self._supervise(), critical=True, name="node supervisor")
            self._accept_task = self.spawn(self._accept_loop(self._listen_sock), critical=True,
                                           name="socket accept loop")
            self.spawn(self._probe_traffic_log())
            if self.serve_rules is not None:
                self.spawn(self.serve_rules.run(), name="serve rules")
            self.spawn(self._checkpoints(), name="traffic-log checkpoints")
            await self._stop.wait()
        finally:
            self._stopping = True
            await self._shutdown()
            if self._watchdog is not None:
                self._watchdog.stop()
        if self._fatal is not None:
            raise DaemonFatalError(self._fatal)

    # ---- the node's lifetime ---------------------------------------------------------

    def _wake_supervisor(self) -> None:
        self._wake.set()

    def holds(self) -> int:
        """How many control sessions hold the node (called `start`, not yet `close`)."""
        return sum(1 for s in self.sessions if s.holds_node)

    def _retrying(self) -> bool:
        return self.config.auto_start and not self._stopping

    async def _supervise(self) -> None:
        """Take a lost node down (telling every client); with --up, keep the node up.

        Start attempts back off from START_RETRY_MIN to START_RETRY_MAX seconds and go on
        for as long as it takes; each failure is logged with its reason and counted in
        `tsnet2_node_start_failures_total`.
        """
        delay = START_RETRY_MIN
        b = self.backend
        while True:
            self._wake.clear()
            if b.lost_reason is not None:
                reason = b.lost_reason
                self.metrics.node_lost()
                await self.take_node_down(f"daemon: the node went away ({reason}); "
                                          "reconnecting clients register again",
                                          deregister=False)
                b.last_error = f"node lost: {reason}"
            if self.config.auto_start and b.state not in (NodeState.STARTING, NodeState.RUNNING):
                try:
                    await b.start(b.params or self._start_params(proto.StartParams()))
                except (BackendError, ControlError, NodeError, OSError, ValueError) as exc:
                    self.metrics.node_start_failed(_code(exc))
                    log.warning("node start failed: %s; next attempt in %.0fs",
                                _message(exc), delay)
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(delay):
                            await self._wake.wait()
                    delay = min(delay * 2, START_RETRY_MAX)
                    continue
                log.info("node is up")
                delay = START_RETRY_MIN
                continue
            if b.lost_reason is None:
                await self._wake.wait()

    async def take_node_down(self, message: str, *, deregister: bool | None) -> None:
        """The node goes down: every session and parked slot is told `message` (code
        node_down) and closed, listeners go, live flows are cut, the device is removed.

        Sessions are hung up last: a client reconnects as soon as it is told, and by then
        its old listeners must be gone and the node stopped, so that what it registers again
        is bound afresh once the node is back (not refused as taken by its former self).
        """
        sessions = list(self.sessions)
        await self.datapath.node_down(message)
        await self.backend.stop(deregister=deregister)
        if sessions:
            await asyncio.gather(*(s.hang_up(message, ErrorCode.NODE_DOWN) for s in sessions))

    async def _shutdown(self) -> None:
        log.info("shutting down")
        for s in list(self.sessions):
            s.closed = True  # no more refusal frames: the socket is about to close
        if self._listen_sock is not None:
            self._listen_sock.close()
            with contextlib.suppress(FileNotFoundError):
                self.config.socket_path.unlink()
        if self.egress is not None:
            self.egress.close()
        if self.dns is not None:
            self.dns.close()
        await self.datapath.close_all()
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=SHUTDOWN_TIMEOUT)
        await self.backend.stop()
        if self.health is not None:
            await self.health.close()
        self.traffic.close()  # a slow stdout reader gets a few seconds; nothing else is left
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _prepare_state_dir(self) -> None:
        d = self.config.state_dir
        try:
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(d / "tsnet2d.lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            hint = (" (tsnet2d runs as root with CAP_NET_ADMIN: it creates the WireGuard "
                    "device and the nftables guard; the injected sidecar does)"
                    if os.geteuid() != 0 else "")
            raise DaemonFatalError(
                f"cannot use state dir {d}: {exc.strerror or exc}{hint}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DaemonFatalError(f"another tsnet2d is running with state dir {d}") from None
        self._lock_fd = fd

    def _socket_mode(self) -> int:
        c = self.config
        mode = c.socket_mode
        if mode is None:
            # --allow-any-uid: the peer check admits every uid, so the file must too (an app
            # container often runs as another uid than the sidecar). Else the daemon's uid
            # and group, which --socket-group can name.
            mode = SOCKET_MODE_ANY_UID if c.allow_uids is None else SOCKET_MODE
        return mode

    def _bind(self) -> socket.socket:
        c = self.config
        sock = bind_unix_socket(c.socket_path, self._socket_mode(), c.socket_group)
        sock.setblocking(False)
        return sock

    # ---- health and metrics ----------------------------------------------------------

    def _log_dropped(self, kind: str, reason: str) -> None:
        if reason in ("closed", "not_open"):
            self.metrics.log_dropped("not_open")
            return
        if reason == "queue_full":  # stdout's reader is behind: nothing failed
            self.metrics.log_dropped(reason)
            return
        self.metrics.log_write_error()
        self.metrics.log_dropped("disk_full" if reason in ("ENOSPC", "EDQUOT")
                                 else "write_error")

    def _log_pressure(self, stalled: bool) -> None:
        """stdout's reader fell behind (or caught up): pause (resume) every flow.

        Called from the data path (a record started the stall: pause now, before another
        read) or from the log's writer thread (hop to the loop). The datapath reads the
        log's current state, so the order of the calls does not matter.
        """
        loop = self._loop
        if loop is None:
            return
        if threading.get_ident() == self._loop_thread:
            self.datapath.log_pressure()
            return
        with contextlib.suppress(RuntimeError):  # the loop is gone: nothing to pause
            loop.call_soon_threadsafe(self.datapath.log_pressure)

    async def _checkpoints(self) -> None:
        """Sign the chain's head every --traffic-log-checkpoint seconds (when it moved)."""
        while True:
            await asyncio.sleep(self.config.traffic_log_checkpoint)
            fqdn = str((self.backend.self_node or {}).get("fqdn", "")).rstrip(".")
            if fqdn:
                self.traffic.node = fqdn
            await asyncio.to_thread(self.traffic.checkpoint)

    async def _probe_traffic_log(self) -> None:
        """While the traffic log is unhealthy, try it every few seconds (recovery)."""
        while True:
            await asyncio.sleep(LOG_PROBE_INTERVAL)
            if not self.traffic.healthy:
                await asyncio.to_thread(self.traffic.probe)

    def _refresh_metrics(self) -> None:
        b = self.backend
        self.metrics.set_node_up(b.running)
        self.metrics.set_control_connected(b.control_connected)
        self.metrics.set_netmap_version(b.netmap_version)
        t = self.traffic
        self.metrics.set_log_queue(t.queued_bytes, t.stalled, t.log_seq)

    def _healthz(self) -> tuple[bool, str]:
        """Liveness: can this process serve? A failure makes the kubelet restart it.

        Fails when the socket's accept loop is gone, or when a node that should run (--up,
        or held by a client) has been down for longer than `node_down_grace` seconds. A
        stuck event loop cannot answer at all (and the watchdog ends the process).
        """
        if self._accept_task is None or self._accept_task.done():
            return False, "the socket's accept loop is not running"
        b = self.backend
        if b.state != NodeState.RUNNING and (self.config.auto_start or self.holds()):
            down = time.monotonic() - b.state_since
            if down > self.config.node_down_grace:
                reason = b.last_error or f"node is {b.state.name.lower()}"
                return False, f"node down for {down:.0f}s: {reason}"
        return True, "ok"

    def _readyz(self) -> tuple[bool, str]:
        if self._listen_sock is None:
            return False, "socket not listening"
        if not self.backend.running:
            return False, f"node is {self.backend.state.name.lower()}"
        if not self.traffic.healthy and self.config.traffic_log_on_error == "fail-closed":
            return False, "traffic log cannot be written; new flows are refused"
        if self.traffic.stalled:
            return False, "traffic log stdout is behind; flows are paused and new ones refused"
        return True, "ok"

    # ---- connections -----------------------------------------------------------------

    async def _accept_loop(self, lsock: socket.socket) -> None:
        while True:
            conn = await io.accept_next(lsock, "socket")
            if self._handshakes >= MAX_HANDSHAKES:
                # Connections that have not named their channel: a flood, not clients.
                self.metrics.connection_refused("handshakes")
                conn.close()
                continue
            conn.setblocking(False)
            self._handshakes += 1  # until it names its channel (counted here: no lag)
            self.spawn(self._serve_conn(conn))

    async def _serve_conn(self, sock: socket.socket) -> None:
        spliced = False  # True once a running splice owns `sock` (it closes it then)
        try:
            try:
                try:
                    first = sock.recv(1)  # mostly there already: no timer then
                except (BlockingIOError, InterruptedError):
                    async with asyncio.timeout(KIND_TIMEOUT):
                        first = await io.recv(sock, 1)
            except TimeoutError:
                log.warning("connection did not name a channel within %.0fs", KIND_TIMEOUT)
                return
            finally:
                self._handshakes -= 1
            if not first:
                return
            try:
                kind = proto.parse_channel_byte(first[0])
            except proto.WireError as exc:
                log.warning("refused connection: %s", exc)
                return
            allowed = self.config.allow_uids
            if allowed is not None:
                uid = peer_uid(sock)
                if uid not in allowed:
                    log.warning("refused %s connection from uid %d (allowed: %s)", kind.name,
                                uid, ",".join(map(str, sorted(allowed))))
                    self.metrics.connection_refused("uid")
                    await self._refuse(sock, kind, ErrorCode.PERMISSION_DENIED, (
                        f"daemon: uid {uid} may not use this socket; run the app as uid "
                        f"{', '.join(map(str, sorted(allowed)))}, or start tsnet2d with "
                        f"--allow-uid {uid} (or --allow-any-uid)"))
                    return
            if kind == proto.ChannelKind.CONTROL:
                if len(self.sessions) >= MAX_SESSIONS:
                    self.metrics.connection_refused("sessions")
                    await self._refuse(sock, kind, ErrorCode.LIMIT, (
                        f"daemon: {MAX_SESSIONS} clients are connected, the most this daemon "
                        "serves at once; close unused Servers"))
                    return
                await self._control(sock)
            elif kind == proto.ChannelKind.LOCALAPI:
                if self._localapi_conns >= MAX_LOCALAPI_CONNECTIONS:
                    self.metrics.connection_refused("localapi")
                    await self._refuse(sock, kind, ErrorCode.LIMIT, (
                        f"daemon: {MAX_LOCALAPI_CONNECTIONS} LocalAPI connections are open, "
                        "the most this daemon serves at once"))
                    return
                self._localapi_conns += 1
                try:
                    await LocalAPIConnection(self.localapi, sock).serve()
                finally:
                    self._localapi_conns -= 1
            elif kind == proto.ChannelKind.DIAL:
                spliced = await self.datapath.dial(
                    sock, proto.LineReader(proto.MAX_HEADER_LINE))
            else:
                spliced = await self.datapath.park(
                    sock, proto.LineReader(proto.MAX_HEADER_LINE))
        except proto.WireError as exc:
            log.warning("closing connection: %s", exc)
        except TimeoutError:
            log.warning("closing connection: header not received in time")
        except OSError as exc:
            log.info("connection ended: %s", exc)
        finally:
            if not spliced:
                sock.close()

    async def _refuse(self, sock: socket.socket, kind: proto.ChannelKind, code: ErrorCode,
                      message: str) -> None:
        """Tell a client, in its channel's format, why the daemon hangs up; then drain a
        little of what it sent (closing with unread data would reset the connection and
        lose the message)."""
        if kind == proto.ChannelKind.CONTROL:
            data = proto.ControlServerCore().refuse(message, code)
        elif kind == proto.ChannelKind.DIAL:
            data = proto.encode_dial_reply(False, err=message, code=code)
        elif kind == proto.ChannelKind.ACCEPT:
            data = proto.encode_accept_refusal(message, code)
        else:
            body = message.encode() + b"\n"
            status = b"403 Forbidden" if code == ErrorCode.PERMISSION_DENIED else (
                b"503 Service Unavailable")
            data = (b"HTTP/1.1 " + status + b"\r\nContent-Type: text/plain; charset=utf-8"
                    b"\r\nConnection: close\r\nContent-Length: " + str(len(body)).encode()
                    + b"\r\n\r\n" + body)
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(REFUSAL_TIMEOUT):
                await io.sendall(sock, data)
                sock.shutdown(socket.SHUT_WR)
                drained = 0
                while drained < 65536 and (chunk := await io.recv(sock, 4096)):
                    drained += len(chunk)

    # ---- control channel -------------------------------------------------------------

    async def _control(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        core = proto.ControlServerCore()
        session = Session(sock, core)
        requests: set[asyncio.Task[None]] = set()
        # At most MAX_INFLIGHT requests in progress: the reader waits for a free place
        # before it takes the next one, so a client that pipelines without reading its
        # replies stalls only itself (its replies fill the socket, its handlers wait).
        places = asyncio.Semaphore(MAX_INFLIGHT)

        async def handle(req: proto.ControlRequest) -> None:
            held = session.holds_node
            try:
                result = await self._call(req, session)
            except (BackendError, ListenError, ControlError, NodeError, ValueError,
                    TimeoutError, proto.WireError) as exc:
                log.warning("control: %s failed: %s", req.method, _message(exc))
                await session.send(core.reply_error(req.id, _message(exc), _code(exc)))
                return
            except Exception as exc:
                log.exception("control: %s: internal error", req.method)
                await session.send(core.reply_error(req.id, f"daemon: internal error: {exc}"))
                return
            await session.send(core.reply(req.id, result))
            if req.method == proto.Method.CLOSE and held and self.holds() == 0 \
                    and not self.config.auto_start:
                # The last hold is gone. Owned by the daemon, not this connection: the app
                # hangs up right after the reply, and that must not cut the teardown short.
                self.spawn(self._close_node(), name="node close")

        def done(task: asyncio.Task[None]) -> None:
            requests.discard(task)
            places.release()

        self.sessions.add(session)
        self.metrics.set_sessions(len(self.sessions))
        try:
            while True:
                data = await io.recv(sock, 65536)
                if not data:
                    return
                for item in core.receive_data(data):
                    if isinstance(item, proto.WireError):
                        log.warning("control: %s", item)
                        if isinstance(item, proto.FrameError) and item.id:
                            await session.send(core.reply_error(
                                item.id, f"daemon: bad request: {item}", ErrorCode.BAD_REQUEST))
                        continue
                    await places.acquire()
                    task = loop.create_task(handle(item))
                    requests.add(task)
                    task.add_done_callback(done)
        finally:
            self.sessions.discard(session)
            self.metrics.set_sessions(len(self.sessions))
            session.closed = True
            for t in list(requests):
                t.cancel()
            for t in list(requests):
                with contextlib.suppress(asyncio.CancelledError, OSError):
                    await t
            await self.datapath.release_owner(session)

    def _node_hostname(self) -> str | None:
        """The hostname this daemon's node has (or will have with --up), if settled."""
        b = self.backend
        if b.params is not None and b.state in (NodeState.STARTING, NodeState.RUNNING):
            return b.params.hostname
        if self.config.auto_start:
            return self.config.hostname or socket.gethostname()
        return None

    def route(self, spec: proto.MethodSpec[P, R],
              handler: Callable[[P, Session], Awaitable[R]]) -> None:
        """Answer a control method (`tsnet2.proto.methods`) with `handler`; a duplicate is
        a programming error."""
        if spec.method in self.control_routes:
            raise ValueError(f"duplicate control method {spec.method!r}")
        self.control_routes[spec.method] = ControlRoute(spec, handler)

    async def _call(self, req: proto.ControlRequest, session: Session) -> dict[str, Any]:
        """Decode a request's params, run its handler, encode the result (one schema:
        `tsnet2.proto.methods`). Bad params and unknown methods raise WireError."""
        route = self.control_routes.get(req.method)
        if route is None:
            raise proto.UnknownMethodError(req.method)
        return await route.call(req.params, session)

    # ---- control methods -------------------------------------------------------------

    async def _start(self, params: proto.StartParams, session: Session) -> proto.Empty:
        wanted = params.hostname
        have = self._node_hostname()
        if wanted and have is not None and wanted.lower() != have.lower():
            raise BackendError(
                f"daemon: this daemon's node is {have!r}, but this Server asked for "
                f"{wanted!r}; one tsnet2d runs one node: leave hostname unset, use "
                f"{have!r}, or run another tsnet2d", code=ErrorCode.HOSTNAME_CONFLICT)
        await self.backend.start(self._start_params(params))
        session.holds_node = True
        return proto.Empty()

    async def _up(self, _: proto.Empty, session: Session) -> proto.UpResult:
        b = self.backend
        if b.state == NodeState.NO_STATE and not self._retrying():
            raise b.down_error()
        await b.wait_running(None, retrying=self._retrying)
        v4, v6 = b.addresses()
        domains = b.cert_domains()
        return proto.UpResult(
            tailscale_ips=tuple(str(ip) for ip in (v4, v6) if ip is not None) or None,
            node_name=str((b.self_node or {}).get("name", "")),
            cert_domains=None if domains is None else tuple(domains),
        )

    async def _close(self, _: proto.Empty, session: Session) -> proto.Empty:
        # This client's listeners and hold only; the node stays while others hold it.
        await self.datapath.release_owner(session)
        session.holds_node = False
        return proto.Empty()

    def _check_started_node_runs(self) -> None:
        b = self.backend
        if b.state != NodeState.RUNNING and (b.params is not None or self._retrying()):
            raise b.down_error()  # started once: "not running" is news, not an empty answer

    async def _tailscale_ips(self, _: proto.Empty, session: Session) -> proto.TailscaleIPsResult:
        self._check_started_node_runs()
        v4, v6 = self.backend.addresses()
        return proto.TailscaleIPsResult(v4=None if v4 is None else str(v4),
                                        v6=None if v6 is None else str(v6))

    async def _cert_domains(self, _: proto.Empty, session: Session) -> proto.CertDomainsResult:
        self._check_started_node_runs()
        domains = self.backend.cert_domains()
        return proto.CertDomainsResult(None if domains is None else tuple(domains))

    async def _register_listener(self, params: proto.RegisterListenerParams,
                                 session: Session) -> proto.RegisterListenerResult:
        owned = sum(1 for x in self.datapath.listeners.values() if x.owner is session)
        if owned >= MAX_LISTENERS_PER_SESSION:
            raise ListenError(f"daemon: this client has {owned} listeners, the most one "
                              "client may register; close some", ErrorCode.LIMIT)
        forward = None
        if params.forward_socket:  # tsnet2's extension: a listen_socket registration
            from tsnet2.daemon.serve import forward_for
            forward = forward_for(params.forward_socket, params.forward_mode,
                                  self.socket_dir, peer_uid(session.sock))
        lst = await self.datapath.register_listener(params.network, params.addr, session,
                                                    forward=forward, tls=params.tls,
                                                    alpn=params.alpn)
        return proto.RegisterListenerResult(
            listener_id=lst.id, addr=lst.addr, forward_socket=params.forward_socket,
            tls=lst.tls is not None,
            max_datagram=lst.udp.limit if lst.udp is not None else 0)

    async def _unregister_listener(self, params: proto.UnregisterListenerParams,
                                   session: Session) -> proto.Empty:
        lid = params.listener_id
        other = self.datapath.listeners.get(lid)
        if other is not None and other.owner is not session:
            # Another client's listener: succeed as the prototype does for unknown ids,
            # but leave it alone (a client cannot close what it does not own).
            log.warning("control: unregister_listener %s by a client that does not own "
                        "it; ignored", lid)
            return proto.Empty()
        await self.datapath.unregister_listener(lid)
        return proto.Empty()

    async def _close_node(self) -> None:
        """The last hold was released (and no --up): the node goes down; the daemon keeps
        serving and a later `start` brings it up again."""
        if self.holds() or self.config.auto_start:
            return  # someone took hold again meanwhile
        await self.take_node_down("daemon: the node was stopped: its last client closed it",
                                  deregister=None)

    def _start_params(self, p: proto.StartParams) -> proto.StartParams:
        """The app's start params, with the daemon's flags for what it left empty."""
        c = self.config
        return proto.StartParams(
            hostname=p.hostname or c.hostname or socket.gethostname(),
            control_url=p.control_url or c.control_url,
            auth_key=p.auth_key or c.auth_key,
            ephemeral=p.ephemeral or c.ephemeral,
            advertise_tags=p.advertise_tags or c.advertise_tags,
        )


# ---- the socket file ---------------------------------------------------------------------

SOCKET_MODE = 0o660  # default: the daemon's uid and the socket's group
SOCKET_MODE_ANY_UID = 0o666  # default with --allow-any-uid: whoever can reach the path
MAX_SOCKET_PATH = 107  # bytes of sun_path, without the terminating NUL


def socket_dir_mode(mode: int) -> int:
    """Mode of a socket directory tsnet2d creates: rwx for itself, r-x for the classes
    (group, other) that the socket's `mode` lets in, so that they can reach the socket."""
    return 0o700 | (0o050 if mode & 0o070 else 0) | (0o005 if mode & 0o007 else 0)


def bind_unix_socket(path: Path, mode: int, group: int | None,
                     backlog: int = 512) -> socket.socket:
    """A listening Unix socket at `path` with `mode` (and `group`), never more open than that.

    Linux creates a socket file with the socket's own mode: it is set to 0000 before `bind`,
    so the path appears at `path` closed to everyone but root, then gets its group and mode
    through an `O_PATH | O_NOFOLLOW` descriptor checked to be that fresh socket (a name another
    process swapped for a symlink or a file of its own is refused, never chmod'ed), then the
    socket listens. Bound at its real path, it shows as such in `ss -xl`/`/proc/net/unix`.
    A stale socket left by a dead daemon is replaced; a live one, or anything that is not a
    socket, is a `DaemonFatalError`. A missing parent directory is created with
    `socket_dir_mode(mode)` (and `group`); an existing one is left as it is, with a warning
    when it keeps out whom `mode` lets in.
    """
    size = len(os.fsencode(path))
    if size > MAX_SOCKET_PATH:
        raise DaemonFatalError(f"socket path {path} is too long for a Unix socket ({size} bytes, "
                          f"at most {MAX_SOCKET_PATH})")
    _prepare_socket_dir(path.parent, mode, group)
    _remove_stale_socket(path)
    return _bind_in_place(path, mode, group, backlog)


def _prepare_socket_dir(parent: Path, mode: int, group: int | None) -> None:
    want = socket_dir_mode(mode)
    try:
        st = parent.stat()
    except FileNotFoundError:
        try:
            parent.mkdir(mode=want, parents=True, exist_ok=True)
            os.chmod(parent, want)  # mkdir's mode went through the umask
            if group is not None:
                os.chown(parent, -1, group)
        except OSError as exc:
            raise DaemonFatalError(
                f"cannot create socket directory {parent}: {exc.strerror}") from exc
        return
    except OSError as exc:
        raise DaemonFatalError(f"cannot use socket directory {parent}: {exc.strerror}") from exc
    if not stat.S_ISDIR(st.st_mode):
        raise DaemonFatalError(f"{parent} is not a directory; pick another --socket path")
    dmode = stat.S_IMODE(st.st_mode)
    if mode & 0o007 and not dmode & 0o001:
        log.warning("socket directory %s is mode %04o: other users cannot reach the socket "
                    "(socket mode %04o); give the directory o+x", parent, dmode, mode)
    elif (mode & 0o070 and group is not None and not dmode & 0o001
          and not (dmode & 0o010 and st.st_gid == group)):
        log.warning("socket directory %s (mode %04o, group %d) keeps group %d from reaching "
                    "the socket; give the directory o+x, or that group and g+x",
                    parent, dmode, st.st_gid, group)


def _remove_stale_socket(path: Path) -> None:
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise DaemonFatalError(f"{path} exists and is not a socket; remove it or pick another "
                          "--socket path")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # stale socket left by a daemon that died
    else:
        raise DaemonFatalError(f"another tsnet2d is listening on {path}")
    finally:
        probe.close()


def _bind_in_place(path: Path, mode: int, group: int | None, backlog: int) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    bound = False
    doing = "listen on"
    try:
        os.fchmod(sock.fileno(), 0)  # the mode the socket file is created with
        try:
            sock.bind(str(path))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise DaemonFatalError(f"another tsnet2d is listening on {path}") from None
            raise
        bound = True
        fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if (not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.geteuid()
                    or stat.S_IMODE(st.st_mode)):
                bound = False  # not ours to remove
                raise DaemonFatalError(f"cannot listen on {path}: it was replaced while the socket "
                                  "was made")
            if group is not None:
                doing = f"give group {group}"
                os.chown(f"/proc/self/fd/{fd}", -1, group)
            doing = f"give mode {mode:04o}"
            os.chmod(f"/proc/self/fd/{fd}", mode)
        finally:
            os.close(fd)
        doing = "listen on"
        sock.listen(backlog)
    except BaseException as exc:
        sock.close()
        if bound:
            with contextlib.suppress(OSError):
                path.unlink()
        if isinstance(exc, OSError):
            hint = (" (a tsnet2d that is not root can only use its own groups)"
                    if exc.errno == errno.EPERM and doing.startswith("give group") else "")
            raise DaemonFatalError(f"cannot {doing} {path}: {exc.strerror}{hint}") from exc
        raise
    return sock


def _message(exc: BaseException) -> str:
    msg = str(exc) or type(exc).__name__
    return msg if msg.startswith("daemon:") else f"daemon: {msg}"


def _code(exc: BaseException) -> ErrorCode:
    """The error code a client is told for a failed call."""
    if isinstance(exc, BackendError | ListenError):
        return exc.code
    if isinstance(exc, AuthError):
        return ErrorCode.AUTH_FAILED
    if isinstance(exc, ControlError):
        return ErrorCode.CONTROL_UNAVAILABLE
    if isinstance(exc, ValueError | proto.WireError):
        return ErrorCode.BAD_REQUEST
    return ErrorCode.OTHER


_PR_SET_DUMPABLE = 4


def no_dumps() -> None:
    """Make this process non-dumpable: a process of the same uid can then no longer ptrace
    it or copy its sockets with pidfd_getfd (that takes CAP_SYS_PTRACE, which the injector
    refuses to app containers). Also keeps keys out of core dumps."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
            log.warning("prctl(PR_SET_DUMPABLE, 0) failed: %s", os.strerror(ctypes.get_errno()))
    except (OSError, AttributeError) as exc:
        log.warning("cannot make tsnet2d non-dumpable: %s", exc)


__all__ = [
    "MAX_SOCKET_PATH", "SOCKET_MODE", "SOCKET_MODE_ANY_UID", "Daemon", "DaemonConfig",
    "DaemonFatalError", "bind_unix_socket", "socket_dir_mode",
]
