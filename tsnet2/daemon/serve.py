"""Serve: inbound tailnet ports the daemon forwards to a target inside the pod.

Two sources of forwarding listeners, one flow path:

- ``tsnet2d --serve PORT=[MODE:]TARGET`` (:mod:`tsnet2.proto.serve`): owned by the daemon,
  bound on the node's tailnet addresses whenever the node runs (:class:`ServeRules` binds
  them again after the node restarts);
- a library ``listen_socket``: a ``register_listener`` with a ``forward`` Unix socket the
  app owns in the daemon's socket directory (checked by :func:`check_forward_socket`);
  owned by the app's control session like any listener.

Each inbound flow: the daemon connects the target (:data:`TARGET_TIMEOUT`), writes the
``open`` record (``via: "serve"``, ``target``, the caller's WhoIs) and relays the flow as a
library flow is relayed (:meth:`Datapath._splice`): ``tcp`` as is, ``proxy`` after a PROXY
v2 header, ``http`` through :class:`~tsnet2.proto.httpident.RequestRewriter` (copying). A
target that refuses, is missing or does not accept in time: a ``reject`` record with reason
``target_failed`` and the caller's connection reset.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tsnet2.daemon import io
from tsnet2.daemon.backend import Backend, whois_summary
from tsnet2.daemon.datapath import Datapath, ListenerRegistration, ListenError, _sockaddr
from tsnet2.daemon.io import reset
from tsnet2.daemon.splice import Relay, Splice, _Side
from tsnet2.proto import ErrorCode
from tsnet2.proto.httpident import RequestRewriter, Rewrite, identity_headers
from tsnet2.proto.proxyv2 import encode_proxy_v2, identity_tlvs
from tsnet2.proto.serve import SERVE_MODES, ServeMode, ServeRule, ServeTarget
from tsnet2.traffic import Flow, TrafficLogError

log = logging.getLogger("tsnet2d.serve")

TARGET_TIMEOUT = 5.0  # seconds to connect a serve target inside the pod
RULES_OWNER = "tsnet2d --serve"  # the owner of the daemon's own serve listeners


class ForwardError(ListenError):
    """A forward socket the daemon will not use; the message is for the app (code
    ``permission_denied`` for a socket of another uid, else ``bad_request``)."""

    def __init__(self, message: str, code: ErrorCode = ErrorCode.BAD_REQUEST) -> None:
        super().__init__(message, code)


@dataclasses.dataclass(frozen=True)
class Forward:
    """What a forwarding listener does with its flows."""

    mode: ServeMode
    target: ServeTarget
    inode: tuple[int, int] | None = None  # (st_dev, st_ino) of a registered forward socket

    async def inbound(self, dp: Datapath, lst: ListenerRegistration,
                      conn: socket.socket) -> None:
        """Serve one accepted tailnet connection (see the module docstring)."""
        await serve_flow(dp, lst, self, conn)


def check_forward_socket(path: str, socket_dir: Path, uid: int) -> ServeTarget:
    """The checks on a library ``listen_socket`` registration: ``path`` must be an absolute
    path directly in ``socket_dir`` (the directory of the daemon's own socket), name a Unix
    socket that is not a symlink, owned by ``uid`` (the registering connection's, from
    SO_PEERCRED; uid 0 may name any socket there). Raises :class:`ForwardError`."""
    if not os.path.isabs(path) or "\0" in path:
        raise ForwardError(f"daemon: forward socket {path!r}: not an absolute path")
    p = Path(path)
    if os.path.normpath(path) != path or p.parent != socket_dir:
        raise ForwardError(f"daemon: forward socket {path!r} is not in the daemon's socket "
                           f"directory {socket_dir}; bind it there")
    try:
        st = os.lstat(p)
    except OSError as exc:
        raise ForwardError(f"daemon: forward socket {path!r}: {exc.strerror}") from None
    if stat.S_ISLNK(st.st_mode):
        raise ForwardError(f"daemon: forward socket {path!r} is a symlink; refused")
    if not stat.S_ISSOCK(st.st_mode):
        raise ForwardError(f"daemon: forward socket {path!r} is not a Unix socket")
    if uid != 0 and st.st_uid != uid:
        raise ForwardError(f"daemon: forward socket {path!r} belongs to uid {st.st_uid}, "
                           f"not to the registering client's uid {uid}; refused",
                           ErrorCode.PERMISSION_DENIED)
    return ServeTarget(path=path)


def forward_for(path: str, mode: str, socket_dir: Path, uid: int) -> Forward:
    """The :class:`Forward` of a ``register_listener`` with ``forward_socket``: ``mode``
    checked (empty: ``tcp``), the socket checked (:func:`check_forward_socket`) and its
    identity remembered, so a socket replaced after the check is refused per flow."""
    mode = mode or "tcp"
    if mode not in SERVE_MODES:
        raise ForwardError(f"daemon: forward_mode {mode!r}: want one of "
                           f"{', '.join(SERVE_MODES)}")
    target = check_forward_socket(path, socket_dir, uid)
    st = os.lstat(path)
    return Forward(mode, target, (st.st_dev, st.st_ino))


def _same_socket(fwd: Forward) -> str:
    """Empty when a registered forward socket is still the one checked, else why not."""
    if fwd.inode is None:
        return ""
    try:
        st = os.lstat(fwd.target.path)
    except OSError as exc:
        return exc.strerror or str(exc)
    if not stat.S_ISSOCK(st.st_mode) or (st.st_dev, st.st_ino) != fwd.inode:
        return "the socket was replaced since it was registered"
    return ""


async def connect_target(target: ServeTarget, timeout: float = TARGET_TIMEOUT) -> socket.socket:
    """A connected non-blocking socket to ``target``; OSError or TimeoutError otherwise."""
    if target.is_unix:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        addr: Any = target.path
    else:
        fam = socket.AF_INET6 if ":" in target.host else socket.AF_INET
        s = socket.socket(fam, socket.SOCK_STREAM)
        addr = (target.host, target.port)
    try:
        s.setblocking(False)
        async with asyncio.timeout(timeout):
            await io.connect(s, addr)
        if not target.is_unix:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except BaseException:
        s.close()
        raise
    return s


def _identity(node: dict[str, Any] | None) -> dict[str, Any]:
    if node is None:
        return {}
    user = node.get("user") or {}
    return {
        "user_login": "" if node.get("tags") else str(user.get("login_name") or ""),
        "user_name": "" if node.get("tags") else str(user.get("display_name") or ""),
        "node_name": str(node.get("fqdn") or "").rstrip("."),
        "node_id": str(node.get("stable_id") or ""),
        "tags": [str(t) for t in node.get("tags") or ()],
    }


async def serve_flow(dp: Datapath, lst: ListenerRegistration, fwd: Forward,
                     conn: socket.socket) -> None:
    """Connect the target, log, relay; or reject with ``target_failed``."""
    try:
        remote_addr = conn.getpeername()
        local_addr = conn.getsockname()
        remote, local = _sockaddr(remote_addr), _sockaddr(local_addr)
    except OSError:
        conn.close()
        return
    target_text = str(fwd.target)
    if not dp._log_ready("in", remote=remote, local=local, listener_id=lst.id,
                         via="serve", target=target_text):
        reset(conn)
        return
    try:
        replaced = _same_socket(fwd)
        if replaced:
            raise OSError(replaced)
        target = await connect_target(fwd.target)
    except (OSError, TimeoutError) as exc:
        why = (f"timed out after {TARGET_TIMEOUT:g}s" if isinstance(exc, TimeoutError)
               else (exc.strerror or str(exc)))
        dp._refuse("in", "target_failed", remote=remote, local=local, listener_id=lst.id,
                   error=f"serve target {target_text}: {why}", via="serve",
                   target=target_text)
        reset(conn)
        return
    except BaseException:
        reset(conn)
        raise
    node = None
    with contextlib.suppress(ValueError):
        node = dp._node_at(remote)
    try:
        flow = dp.traffic.open_flow(direction="in", local=local, remote=remote,
                                    whois=whois_summary(node), listener_id=lst.id,
                                    via="serve", target=target_text)
    except TrafficLogError as exc:  # fail-closed: no record, no flow
        reset(conn)
        target.close()
        dp._refuse("in", "log_unavailable", remote=remote, local=local, listener_id=lst.id,
                   error=f"traffic log unavailable: {exc}", via="serve", target=target_text)
        return
    except BaseException:
        reset(conn)
        target.close()
        raise
    ident = _identity(node)
    peer_ip = str(remote_addr[0])
    if fwd.mode in ("proxy", "http+proxy"):
        header = encode_proxy_v2(
            (peer_ip, int(remote_addr[1])), (str(local_addr[0]), int(local_addr[1])),
            identity_tlvs(conn_id=flow.conn_id, user_login=ident.get("user_login", ""),
                          user_name=ident.get("user_name", ""),
                          node_name=ident.get("node_name", ""),
                          node_id=ident.get("node_id", "")))
        # Written by the daemon, before the relay: not a peer byte, not in the log.
        try:
            async with asyncio.timeout(TARGET_TIMEOUT):
                await io.sendall(target, header)
        except (OSError, TimeoutError) as exc:
            target.close()
            reset(conn)
            flow.close(f"serve target {target_text}: PROXY header not sent: {exc}")
            return
    if fwd.mode in ("http", "http+proxy"):
        rewriter = RequestRewriter(identity_headers(peer_ip=peer_ip, **ident))
        await dp._splice("in", flow, target, conn, b"",
                         relay=lambda f, **kw: HttpSplice(f, rewriter, **kw))
    else:
        await dp._splice("in", flow, target, conn, b"")


class _TargetSide(_Side):
    """The target's side of an http flow: what it was sent is counted in the caller's
    bytes, while its write buffer holds rewritten ones; the delivered count stays within
    0..sent."""

    @property
    def delivered(self) -> int:
        """Caller bytes that reached the target (at most what was read)."""
        return max(0, self.sent - self.unsent)


class HttpSplice(Splice):
    """The copying relay with the identity rewriter on the caller→target direction.

    Data records hold the caller's bytes as received (before the rewrite) and the target's
    bytes as sent; ``bytes_in``/``bytes_out`` count the same (the headers the daemon adds or
    removes are not the caller's bytes). An answer the daemon writes itself (431, 400) is not
    logged as data; the close record names it.
    """

    def __init__(self, flow: Flow, rewriter: RequestRewriter, **kw: Any) -> None:
        super().__init__(flow, **kw)
        self.app = _TargetSide(self, "app->peer")
        self.rewriter = rewriter

    def forward(self, side: _Side, data: bytes) -> None:
        if side is not self.peer:
            # The target's bytes go on unchanged; the rewriter watches them for the answer
            # to an Upgrade/CONNECT, which releases the caller's bytes held since.
            super().forward(side, data)
            if self.error is None:
                self._emit(self.rewriter.response(data), counted=0)
            return
        if not self.record(side, data):
            return
        self._emit(self.rewriter.feed(data), counted=len(data))

    def _emit(self, rw: Rewrite, counted: int) -> None:
        """Send a rewrite's bytes on; ``counted`` caller bytes are accounted as sent to the
        target (held ones included), not the rewritten ones."""
        app = self.app
        if app.transport is None:
            raise AssertionError("unreachable: reading starts only once both are attached")
        if rw.to_target and not app.transport.is_closing():
            app.write(rw.to_target)
        app.sent += counted - len(rw.to_target)
        if rw.close:
            if self.error is None:
                self.error = f"serve: {rw.error}"
            peer = self.peer
            if peer.transport is not None and not peer.transport.is_closing():
                peer.transport.write(rw.to_peer)
                peer.transport.close()
            if not app.transport.is_closing():
                app.transport.close()


class ServeRules:
    """The daemon's ``--serve`` rules: bound whenever the node runs."""

    def __init__(self, rules: Sequence[ServeRule], dp: Datapath, backend: Backend) -> None:
        self.rules = list(rules)
        self.dp = dp
        self.backend = backend
        self.ids: dict[int, str] = {}  # rule port -> listener id while bound
        self._failed: set[int] = set()

    async def run(self) -> None:
        """Bind the rules each time the node is running and they are not bound (the node
        went down and came back: its listeners were dropped with it)."""
        if not self.rules:
            return
        async for _ in self.backend.changes():
            if self.backend.running:
                await self.ensure()
            else:
                await self.release()

    async def release(self) -> None:
        """The node is not running: drop what is still bound (the node's teardown drops
        every listener; one bound again in the middle of it would outlive the node)."""
        ids, self.ids = self.ids, {}
        for lid in ids.values():
            if lid in self.dp.listeners:
                await self.dp.unregister_listener(lid)

    async def ensure(self) -> None:
        """Bind every rule that is not bound now."""
        for rule in self.rules:
            lid = self.ids.get(rule.port)
            if lid is not None and lid in self.dp.listeners:
                continue
            try:
                lst = await self.dp.register_listener(
                    "tcp", f":{rule.port}", RULES_OWNER,
                    forward=Forward(rule.mode, rule.target))
            except ListenError as exc:
                if rule.port not in self._failed:
                    log.error("--serve %s: cannot bind: %s", rule, exc)
                    self._failed.add(rule.port)
                continue
            self._failed.discard(rule.port)
            self.ids[rule.port] = lst.id
            log.info("--serve %s: listening on %s", rule, lst.addr)


__all__ = ["RULES_OWNER", "TARGET_TIMEOUT", "Forward", "ForwardError", "HttpSplice",
           "Relay", "ServeRules", "check_forward_socket", "connect_target", "forward_for",
           "serve_flow"]
