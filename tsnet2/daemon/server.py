"""tsnet2d's socket server: one Unix socket, four channels, one owner for every task.

Every connection starts with one byte naming its channel (`tsnet2.proto.ChannelKind`). The
daemon checks the peer's uid (SO_PEERCRED) before reading anything, reads the byte within
`KIND_TIMEOUT`, and hands the socket to that channel's handler. Handlers run as tasks owned by
the `Daemon`; shutdown cancels and awaits all of them, cuts live flows (each gets its `close`
record) and takes the node down.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import fcntl
import logging
import os
import signal
import socket
import stat
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from tsnet2 import proto
from tsnet2.control.client import ControlError
from tsnet2.daemon.backend import Backend, BackendError, DeviceConfig, StartParams, State
from tsnet2.daemon.datapath import Datapath, ListenError
from tsnet2.daemon.health import HealthServer
from tsnet2.daemon.io import peer_uid
from tsnet2.daemon.localapi import LocalAPI, LocalAPIConnection
from tsnet2.daemon.metrics import Metrics, peer_samples
from tsnet2.node import NodeError
from tsnet2.traffic import ErrorPolicy, LogMode, TrafficLog

log = logging.getLogger("tsnet2d")

KIND_TIMEOUT = 10.0  # seconds a new connection has to name its channel
SHUTDOWN_TIMEOUT = 10.0  # seconds shutdown waits for handlers after cancelling them
LOG_PROBE_INTERVAL = 5.0  # seconds between recovery attempts of an unwritable traffic log


class DaemonError(Exception):
    """The daemon cannot run as configured (message printed as `tsnet2d: <message>`)."""


@dataclasses.dataclass
class DaemonConfig:
    """Everything tsnet2d is told by flags and environment."""

    socket_path: Path
    state_dir: Path
    traffic_log: str
    traffic_log_mode: LogMode = "payload"
    traffic_log_max_bytes: int | None = None
    traffic_log_keep: int = 5
    traffic_log_payload_cap: int | None = None
    traffic_log_on_error: ErrorPolicy = "fail-closed"
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


class Daemon:
    """The tsnet2d process: socket, channels, backend, traffic log."""

    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.backend = Backend(config.state_dir, config.device)
        self.traffic = TrafficLog(
            config.traffic_log, mode=config.traffic_log_mode,
            max_bytes=config.traffic_log_max_bytes, keep=config.traffic_log_keep,
            payload_cap=config.traffic_log_payload_cap, on_error=config.traffic_log_on_error,
        )
        self.metrics = Metrics(
            peers=lambda: peer_samples(self.backend.peers, self.backend.peer_stats()),
            before_scrape=self._refresh_metrics,
        )
        self.traffic.on_record = self.metrics.log_record
        self.traffic.on_drop = self._log_dropped
        self.datapath = Datapath(self.backend, self.traffic, self.spawn, self.metrics)
        self.backend.refusal_log = self.datapath
        self.health: HealthServer | None = None
        self.localapi = LocalAPI(self.backend)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stop = asyncio.Event()
        self._lock_fd: int | None = None
        self._listen_sock: socket.socket | None = None

    # ---- task ownership --------------------------------------------------------------

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run `coro` as a task the daemon owns: logged if it fails, cancelled at shutdown."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("internal error in %s", task.get_name(), exc_info=task.exception())

    def stop(self) -> None:
        """Ask `run` to shut down (signal handlers call this)."""
        self._stop.set()

    # ---- run -------------------------------------------------------------------------

    async def run(self, ready: Callable[[], None] | None = None) -> None:
        """Serve until `stop()`; `ready` is called once the socket accepts connections."""
        loop = asyncio.get_running_loop()
        self._prepare_state_dir()
        try:
            self.traffic.open()
            self._listen_sock = self._bind()
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
            if self.config.auto_start:
                self.spawn(self._auto_start())
            accept = self.spawn(self._accept_loop(self._listen_sock))
            self.spawn(self._probe_traffic_log())
            await self._stop.wait()
            accept.cancel()
        finally:
            await self._shutdown()

    async def _auto_start(self) -> None:
        try:
            await self.backend.start(self._start_params({}))
        except Exception as exc:
            log.error("start failed: %s", exc)

    async def _shutdown(self) -> None:
        log.info("shutting down")
        if self._listen_sock is not None:
            self._listen_sock.close()
            with contextlib.suppress(FileNotFoundError):
                self.config.socket_path.unlink()
        await self.datapath.close_all()
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=SHUTDOWN_TIMEOUT)
        await self.backend.stop()
        if self.health is not None:
            await self.health.close()
        self.traffic.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _prepare_state_dir(self) -> None:
        d = self.config.state_dir
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(d / "tsnet2d.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DaemonError(f"another tsnet2d is running with state dir {d}") from None
        self._lock_fd = fd

    def _bind(self) -> socket.socket:
        c = self.config
        mode = c.socket_mode
        if mode is None:
            # --allow-any-uid: the peer check admits every uid, so the file must too (an app
            # container often runs as another uid than the sidecar). Else the daemon's uid
            # and group, which --socket-group can name.
            mode = SOCKET_MODE_ANY_UID if c.allow_uids is None else SOCKET_MODE
        sock = bind_unix_socket(c.socket_path, mode, c.socket_group)
        sock.setblocking(False)
        return sock

    # ---- health and metrics ----------------------------------------------------------

    def _log_dropped(self, kind: str, reason: str) -> None:
        if reason in ("closed", "not_open"):
            self.metrics.log_dropped("not_open")
            return
        self.metrics.log_write_error()
        self.metrics.log_dropped("disk_full" if reason in ("ENOSPC", "EDQUOT")
                                 else "write_error")

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

    def _healthz(self) -> tuple[bool, str]:
        v4, v6 = self.backend.addresses()
        if v4 is not None or v6 is not None:
            return True, "ok"
        reason = self.backend.last_error or f"node is {self.backend.state.name.lower()}"
        return False, f"no tailnet address: {reason}"

    def _readyz(self) -> tuple[bool, str]:
        if self._listen_sock is None:
            return False, "socket not listening"
        if not self.backend.running:
            return False, f"node is {self.backend.state.name.lower()}"
        if not self.traffic.healthy and self.config.traffic_log_on_error == "fail-closed":
            return False, "traffic log cannot be written; new flows are refused"
        return True, "ok"

    # ---- connections -----------------------------------------------------------------

    async def _accept_loop(self, lsock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(lsock)
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.error("accept: %s; backing off", exc)
                    await asyncio.sleep(0.1)
                    continue
                raise
            conn.setblocking(False)
            self.spawn(self._serve_conn(conn))

    async def _serve_conn(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        spliced = False  # True once a running splice owns `sock` (it closes it then)
        try:
            allowed = self.config.allow_uids
            if allowed is not None:
                uid = peer_uid(sock)
                if uid not in allowed:
                    log.warning("refused connection from uid %d (allowed: %s)",
                                uid, ",".join(map(str, sorted(allowed))))
                    return
            try:
                async with asyncio.timeout(KIND_TIMEOUT):
                    first = await loop.sock_recv(sock, 1)
            except TimeoutError:
                log.warning("connection did not name a channel within %.0fs", KIND_TIMEOUT)
                return
            if not first:
                return
            try:
                kind = proto.parse_channel_byte(first[0])
            except proto.ProtocolError as exc:
                log.warning("refused connection: %s", exc)
                return
            if kind == proto.ChannelKind.CONTROL:
                await self._control(sock)
            elif kind == proto.ChannelKind.LOCALAPI:
                await LocalAPIConnection(self.localapi, sock).serve()
            elif kind == proto.ChannelKind.DIAL:
                spliced = await self.datapath.dial(
                    sock, proto.LineReader(proto.MAX_HEADER_LINE))
            else:
                spliced = await self.datapath.park(
                    sock, proto.LineReader(proto.MAX_HEADER_LINE))
        except proto.ProtocolError as exc:
            log.warning("closing connection: %s", exc)
        except TimeoutError:
            log.warning("closing connection: header not received in time")
        except OSError as exc:
            log.info("connection ended: %s", exc)
        finally:
            if not spliced:
                sock.close()

    # ---- control channel -------------------------------------------------------------

    async def _control(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        core = proto.ControlServerCore()
        write_lock = asyncio.Lock()
        requests: set[asyncio.Task[None]] = set()
        owner = object()  # identifies this connection's listeners

        async def send(data: bytes) -> None:
            async with write_lock:
                await loop.sock_sendall(sock, data)

        async def handle(req: proto.Request) -> None:
            try:
                result = await self._call(req.method, req.params or {}, owner)
            except (BackendError, ListenError, ControlError, NodeError, ValueError,
                    TimeoutError, proto.ProtocolError) as exc:
                log.warning("control: %s failed: %s", req.method, _message(exc))
                await send(core.reply_error(req.id, _message(exc)))
                return
            except Exception as exc:
                log.exception("control: %s: internal error", req.method)
                await send(core.reply_error(req.id, f"daemon: internal error: {exc}"))
                return
            await send(core.reply(req.id, result))
            if req.method == "close":
                # Owned by the daemon, not this connection: the app hangs up right after
                # the reply, and that must not cut the node's teardown short.
                self.spawn(self._close_node())

        try:
            while True:
                data = await loop.sock_recv(sock, 65536)
                if not data:
                    return
                for item in core.receive_data(data):
                    if isinstance(item, proto.ProtocolError):
                        log.warning("control: %s", item)
                        continue
                    task = loop.create_task(handle(item))
                    requests.add(task)
                    task.add_done_callback(requests.discard)
        finally:
            for t in list(requests):
                t.cancel()
            for t in list(requests):
                with contextlib.suppress(asyncio.CancelledError, OSError):
                    await t
            await self.datapath.release_owner(owner)

    async def _call(self, method: str, params: dict[str, Any], owner: object) -> dict[str, Any]:
        b = self.backend
        if method == "start":
            await b.start(self._start_params(params))
            return {}
        if method == "up":
            if b.state == State.NO_STATE:
                raise BackendError("daemon: backend not started; call Start first")
            await b.wait_running(None)
            v4, v6 = b.addresses()
            return {
                "tailscale_ips": [str(ip) for ip in (v4, v6) if ip is not None] or None,
                "node_name": str((b.self_node or {}).get("name", "")),
                "cert_domains": b.cert_domains(),
            }
        if method == "close":
            return {}
        if method == "tailscale_ips":
            v4, v6 = b.addresses()
            out: dict[str, Any] = {}
            if v4 is not None:
                out["v4"] = str(v4)
            if v6 is not None:
                out["v6"] = str(v6)
            return out
        if method == "cert_domains":
            return {"domains": b.cert_domains()}
        if method == "register_listener":
            lst = await self.datapath.register_listener(
                _str(params, "network"), _str(params, "addr"), owner
            )
            return {"listener_id": lst.id, "addr": lst.addr}
        if method == "unregister_listener":
            await self.datapath.unregister_listener(_str(params, "listener_id"))
            return {}
        raise BackendError(f'daemon: unknown method "{method}"')

    async def _close_node(self) -> None:
        """The `close` RPC: the node goes down; the daemon keeps serving and can start again."""
        await self.datapath.close_all()
        await self.backend.stop()

    def _start_params(self, p: dict[str, Any]) -> StartParams:
        c = self.config
        tags = p.get("advertise_tags") or list(c.advertise_tags)
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise ValueError("daemon: advertise_tags must be a list of strings")
        return StartParams(
            hostname=_str(p, "hostname") or c.hostname or socket.gethostname(),
            control_url=_str(p, "control_url") or c.control_url,
            auth_key=_str(p, "auth_key") or c.auth_key,
            token_file=c.token_file,
            ephemeral=bool(p.get("ephemeral")) or c.ephemeral,
            advertise_tags=tuple(tags),
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
    socket, is a `DaemonError`. A missing parent directory is created with
    `socket_dir_mode(mode)` (and `group`); an existing one is left as it is, with a warning
    when it keeps out whom `mode` lets in.
    """
    size = len(os.fsencode(path))
    if size > MAX_SOCKET_PATH:
        raise DaemonError(f"socket path {path} is too long for a Unix socket ({size} bytes, "
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
            raise DaemonError(f"cannot create socket directory {parent}: {exc.strerror}") from exc
        return
    except OSError as exc:
        raise DaemonError(f"cannot use socket directory {parent}: {exc.strerror}") from exc
    if not stat.S_ISDIR(st.st_mode):
        raise DaemonError(f"{parent} is not a directory; pick another --socket path")
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
        raise DaemonError(f"{path} exists and is not a socket; remove it or pick another "
                          "--socket path")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # stale socket left by a daemon that died
    else:
        raise DaemonError(f"another tsnet2d is listening on {path}")
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
                raise DaemonError(f"another tsnet2d is listening on {path}") from None
            raise
        bound = True
        fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if (not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.geteuid()
                    or stat.S_IMODE(st.st_mode)):
                bound = False  # not ours to remove
                raise DaemonError(f"cannot listen on {path}: it was replaced while the socket "
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
            raise DaemonError(f"cannot {doing} {path}: {exc.strerror}{hint}") from exc
        raise
    return sock


def _str(params: dict[str, Any], key: str) -> str:
    v = params.get(key, "")
    if v is None:
        return ""
    if not isinstance(v, str):
        raise ValueError(f"daemon: parameter {key!r} must be a string")
    return v


def _message(exc: BaseException) -> str:
    msg = str(exc) or type(exc).__name__
    return msg if msg.startswith("daemon:") else f"daemon: {msg}"


__all__ = [
    "MAX_SOCKET_PATH", "SOCKET_MODE", "SOCKET_MODE_ANY_UID", "Daemon", "DaemonConfig",
    "DaemonError", "bind_unix_socket", "socket_dir_mode",
]
