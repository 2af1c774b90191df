"""TLS in the daemon: handshakes for ``listen_tls`` and TLS dials, and the relay that keeps
the plaintext in the traffic log.

The daemon, not the app, holds the node's key: it terminates TLS on a ``listen_tls``
listener's flows and originates it on a dial request with ``tls``, and relays *plaintext*
between the app's Unix socket and the TLS session. The log's ``data`` records are the
plaintext (as for a plain flow), and the ``open`` record says the flow was TLS
(:class:`~tsnet2.proto.tls.TLSInfo`).

The TLS engine is :class:`ssl.SSLObject` over two :class:`ssl.MemoryBIO`, driven by
:class:`TLSLayer`, an asyncio protocol on the plain TCP transport. So the same code runs on
asyncio's and uvloop's transports (neither's SSL transport is used), the daemon sees the
SSLObject before the handshake (SNI, per-listener ALPN), and half-closes work: ``write_eof``
sends ``close_notify`` and a TCP FIN while the peer may still answer, and a peer's
``close_notify`` (or its FIN without one) is an EOF for the app.

:class:`TLSSplice` is the copying :class:`~tsnet2.daemon.splice.Splice` with the peer side
on a :class:`TLSLayer`'s transport: it records what it forwards with ``Flow.data`` exactly as
the Splice does, and keeps its flow control, close records, ``pause_for_log`` and ``abort``.
TLS flows never take the zero-copy relay (the bytes must be decrypted in the daemon).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import weakref
from collections.abc import Sequence
from typing import Any, cast

from tsnet2.daemon.io import linger_zero
from tsnet2.daemon.splice import Splice
from tsnet2.proto.tls import TLSInfo

log = logging.getLogger("tsnet2d.tls")

__all__ = [
    "HANDSHAKE_TIMEOUT", "MAX_HANDSHAKES", "ServerTLS", "TLSHandshakeFailed", "TLSLayer",
    "TLSSplice", "client_handshake", "describe_tls_error", "server_handshake",
]

HANDSHAKE_TIMEOUT = 10.0
"""Seconds a TLS handshake (either side) may take; a peer that stalls it is dropped."""
MAX_HANDSHAKES = 64
"""TLS handshakes in progress at once per ``listen_tls`` listener; a flow beyond it is
refused at once (``reject`` reason ``over_limit``) instead of queued."""
READ_SIZE = 64 * 1024  # plaintext bytes taken from the TLS session per read

SNIMap = weakref.WeakKeyDictionary[ssl.SSLObject, str]


class TLSHandshakeFailed(Exception):
    """A TLS handshake failed, timed out or was cut; the message says why (for the
    ``reject`` record and the dial reply)."""


class TLSSessionError(ConnectionError):
    """A TLS error after the handshake (a corrupt record, an unexpected alert): the flow
    ends as on a socket error; the ``close`` record reads ``TLSSessionError: TLS: ...``."""


def describe_tls_error(exc: BaseException) -> str:
    """A handshake failure as words: ``certificate verify failed: Hostname mismatch, ...``
    for a verification error, the OpenSSL reason (``wrong version number``) for others."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        detail = str(exc.verify_message or "").rstrip(".")
        return f"certificate verify failed: {detail}" if detail else "certificate verify failed"
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or exc.strerror or str(exc)
        return str(reason).replace("_", " ").lower()
    if isinstance(exc, TimeoutError):
        return f"handshake timed out after {HANDSHAKE_TIMEOUT:g}s"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


class _Transport(asyncio.Transport):
    """The plaintext face of a :class:`TLSLayer`: what the relay's protocol writes to and
    reads from (a stream transport, like asyncio's SSL transport)."""

    def __init__(self, layer: TLSLayer) -> None:
        super().__init__()
        self._layer = layer

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "ssl_object":
            return self._layer.sslobj
        return self._layer.raw.get_extra_info(name, default)

    def is_closing(self) -> bool:
        return self._layer.closing or self._layer.raw.is_closing()

    def close(self) -> None:
        self._layer.close()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._layer.app = cast(asyncio.Protocol, protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return cast(asyncio.BaseProtocol, self._layer.app)

    def is_reading(self) -> bool:
        return not self._layer.paused

    def pause_reading(self) -> None:
        self._layer.pause_reading()

    def resume_reading(self) -> None:
        self._layer.resume_reading()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._layer.raw.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        return self._layer.raw.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._layer.raw.get_write_buffer_limits()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._layer.write(data)

    def write_eof(self) -> None:
        self._layer.write_eof()

    def can_write_eof(self) -> bool:
        return True

    def abort(self) -> None:
        self._layer.abort()


class TLSLayer(asyncio.Protocol):
    """A TLS session on a TCP transport: the handshake, then plaintext to ``app``.

    Attach it with ``loop.connect_accepted_socket(lambda: layer, sock)``; await
    :attr:`handshake` (its result is the :class:`TLSInfo`); then :meth:`attach` the
    protocol that gets the plaintext. Until then reading pauses after the handshake, so
    a peer cannot make the daemon buffer unbounded bytes before an app takes the flow.
    """

    def __init__(self, sslobj: ssl.SSLObject, incoming: ssl.MemoryBIO,
                 outgoing: ssl.MemoryBIO, *, sni: SNIMap | None = None,
                 peer_name: str = "") -> None:
        self.sslobj = sslobj
        self._in = incoming
        self._out = outgoing
        self._sni = sni
        self.peer_name = peer_name
        self.raw: asyncio.Transport = cast(asyncio.Transport, None)
        self.transport = _Transport(self)
        self.app: asyncio.Protocol | None = None
        self.handshake: asyncio.Future[TLSInfo] = asyncio.get_running_loop().create_future()
        self.paused = False
        self.closing = False
        self._tls_eof = False  # the peer's close_notify (or FIN) was passed on as an EOF
        self._raw_eof = False
        self._lost: tuple[Exception | None] | None = None  # the raw transport is gone
        self._fatal: Exception | None = None  # a TLS error that ended the session
        self._eof_sent = False
        self._resume_scheduled = False

    # ---- raw TCP side --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.raw = cast(asyncio.Transport, transport)
        self._do_handshake()

    def data_received(self, data: bytes) -> None:
        self._in.write(data)
        if not self.handshake.done():
            self._do_handshake()
        elif self.app is None:
            self.raw.pause_reading()  # held until attached (the bytes wait in the BIO)
        else:
            self._read_plaintext()

    def eof_received(self) -> bool:
        self._raw_eof = True
        self._in.write_eof()
        if not self.handshake.done():
            self._fail(ConnectionResetError("the peer closed the connection during the "
                                            "TLS handshake"))
            return False
        if self.app is not None:
            self._read_plaintext()
        return True  # keep our side open: the app may still answer (half-close)

    def connection_lost(self, exc: Exception | None) -> None:
        exc = exc or self._fatal
        self._lost = (exc,)
        if not self.handshake.done():
            self.handshake.set_exception(TLSHandshakeFailed(describe_tls_error(
                exc or ConnectionResetError("connection closed during the TLS handshake"))))
            self.handshake.exception()  # retrieved: whoever awaits it has given up
            return
        if self.app is not None:
            self.app.connection_lost(exc)

    def pause_writing(self) -> None:
        if self.app is not None:
            self.app.pause_writing()

    def resume_writing(self) -> None:
        if self.app is not None:
            self.app.resume_writing()

    # ---- TLS engine ------------------------------------------------------------------

    def _flush(self) -> None:
        if self._out.pending and not self.raw.is_closing():
            self.raw.write(self._out.read())

    def _fail(self, exc: Exception) -> None:
        """End the session on a TLS error: the raw connection is reset, the app (or the
        handshake's waiter) gets ``exc``."""
        if self._fatal is None:
            # Not the SSLError itself: its errno is OpenSSL's code, not an OS errno.
            self._fatal = TLSSessionError(f"TLS: {describe_tls_error(exc)}")
        if not self.handshake.done():
            self.handshake.set_exception(TLSHandshakeFailed(describe_tls_error(exc)))
            self.handshake.exception()
        self._flush()  # an alert, if OpenSSL made one
        self.abort()

    def _do_handshake(self) -> None:
        try:
            self.sslobj.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            if self._raw_eof:
                self._fail(ConnectionResetError("the peer closed the connection during "
                                                "the TLS handshake"))
            return
        except (ssl.SSLError, ValueError, OSError) as exc:
            self._fail(exc)
            return
        self._flush()
        cipher = self.sslobj.cipher()
        sni = self._sni.pop(self.sslobj, "") if self._sni is not None else (
            self.sslobj.server_hostname or "")
        info = TLSInfo(version=self.sslobj.version() or "",
                       cipher=cipher[0] if cipher else "",
                       sni=sni or "", alpn=self.sslobj.selected_alpn_protocol() or "",
                       peer_name=self.peer_name)
        self.raw.pause_reading()  # until attached; bytes already read wait in the BIO
        self.paused = True
        self.handshake.set_result(info)

    def _read_plaintext(self) -> None:
        """Hand the app what the TLS session has, until it pauses us or the BIO is dry."""
        app = self.app
        if app is None:
            return
        while not self.paused and self._lost is None and not self._tls_eof:
            try:
                chunk = self.sslobj.read(READ_SIZE)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                self._tls_eof = True
                app.eof_received()
                break
            except ssl.SSLEOFError:  # FIN without close_notify: an EOF for the app too
                self._tls_eof = True
                app.eof_received()
                break
            except (ssl.SSLError, ValueError) as exc:
                self._fail(exc)
                return
            if not chunk:
                break
            app.data_received(chunk)
        self._flush()  # session tickets, key updates, alerts
        if (self._raw_eof and not self._tls_eof and not self.paused and self._lost is None
                and not self._in.pending):
            self._tls_eof = True
            app.eof_received()

    def attach(self, app: asyncio.Protocol) -> None:
        """Give the plaintext to ``app`` from now on (after the handshake): it gets
        ``connection_made(self.transport)``, then what the peer sent meanwhile, then an EOF
        or the loss that already happened."""
        if not self.handshake.done() or self.handshake.exception() is not None:
            raise AssertionError("unreachable: attach after a successful handshake only")
        self.app = app
        self.paused = False
        if self._lost is None and not self._raw_eof:
            self.raw.resume_reading()
        app.connection_made(self.transport)
        self._read_plaintext()
        if self._lost is not None:
            app.connection_lost(self._lost[0])

    # ---- plaintext side (the relay's transport) --------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Encrypt ``data`` toward the peer."""
        if self.closing or self._lost is not None or self._eof_sent:
            return
        try:
            view = memoryview(data)
            while view:
                n = self.sslobj.write(view)
                view = view[n:]
        except (ssl.SSLError, ValueError) as exc:
            self._fail(exc)
            return
        self._flush()

    def write_eof(self) -> None:
        """Half-close: ``close_notify``, then a TCP FIN; the peer may still send."""
        if self._eof_sent or self._lost is not None:
            return
        self._eof_sent = True
        with contextlib.suppress(ssl.SSLError, ValueError):
            self.sslobj.unwrap()  # sends close_notify; the peer's comes later (or never)
        self._flush()
        if self.raw.can_write_eof() and not self.raw.is_closing():
            self.raw.write_eof()

    def close(self) -> None:
        """Close: ``close_notify`` (if not sent yet), then close the TCP connection once
        what is queued is written."""
        if self.closing:
            return
        self.closing = True
        if not self._eof_sent and self._lost is None and self.handshake.done():
            self._eof_sent = True
            with contextlib.suppress(ssl.SSLError, ValueError):
                self.sslobj.unwrap()
            self._flush()
        self.raw.close()

    def abort(self) -> None:
        """Drop what is queued, close now."""
        self.closing = True
        if self.raw is not None:
            self.raw.abort()

    def reset(self, *, rst: bool = True) -> None:
        """End a flow that never reached a relay: the peer gets a TCP reset (unless
        ``rst`` is false: then a plain close)."""
        if rst and self.raw is not None and not self.raw.is_closing():
            sock = self.raw.get_extra_info("socket")
            if sock is not None:
                linger_zero(sock)
        self.abort()

    def pause_reading(self) -> None:
        """Stop handing plaintext to the app (and reading the peer)."""
        self.paused = True
        if self._lost is None and not self.raw.is_closing():
            self.raw.pause_reading()

    def resume_reading(self) -> None:
        """Go on reading; what the BIO holds is handed over first (on the next turn of the
        loop, not from inside the caller)."""
        if not self.paused:
            return
        self.paused = False
        if self._lost is None and not self.raw.is_closing() and not self._raw_eof:
            self.raw.resume_reading()
        if not self._resume_scheduled:
            self._resume_scheduled = True
            asyncio.get_running_loop().call_soon(self._resumed)

    def _resumed(self) -> None:
        self._resume_scheduled = False
        if self.app is not None and self._lost is None:
            self._read_plaintext()


class ServerTLS:
    """Per-listener TLS settings on the node's shared server context.

    The node's :meth:`~tsnet2.daemon.certs.NodeCerts.server_context` is one object for every
    listener (renewals load into it). A listener's ALPN list is set on it from the SNI
    callback, which OpenSSL calls in the same step as the ALPN selection for that
    ClientHello (a single-threaded event loop: no other handshake runs in between); the
    callback also records the SNI the client sent.
    """

    def __init__(self, ctx: ssl.SSLContext) -> None:
        # No reference to ctx here: ctx holds this object (its callback), not the reverse.
        self.sni: SNIMap = weakref.WeakKeyDictionary()
        self._alpn: weakref.WeakKeyDictionary[ssl.SSLObject, list[str]] = (
            weakref.WeakKeyDictionary())
        ctx.set_alpn_protocols([])  # installs CPython's ALPN callback on the context
        ctx.sni_callback = self._on_sni

    def _on_sni(self, sslobj: Any, server_name: str | None, ctx: ssl.SSLContext) -> None:
        try:
            self.sni[sslobj] = server_name or ""
            ctx.set_alpn_protocols(self._alpn.get(sslobj, []))
        except Exception:  # never let a callback error abort OpenSSL's handshake oddly
            log.exception("TLS SNI callback")

    def wrap(self, ctx: ssl.SSLContext, alpn: Sequence[str] | None
             ) -> tuple[ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO]:
        """A server-side SSLObject of ``ctx`` offering ``alpn`` (None: no ALPN)."""
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        sslobj = ctx.wrap_bio(incoming, outgoing, server_side=True)
        if alpn:
            self._alpn[sslobj] = list(alpn)
        return sslobj, incoming, outgoing


_SERVER_TLS = "_tsnet2_server_tls"  # the context's attribute holding its ServerTLS


def server_tls(ctx: ssl.SSLContext) -> ServerTLS:
    """The :class:`ServerTLS` of the node's server context (one per context, kept on it)."""
    st = getattr(ctx, _SERVER_TLS, None)
    if not isinstance(st, ServerTLS):
        st = ServerTLS(ctx)
        setattr(ctx, _SERVER_TLS, st)
    return st


async def _run_handshake(sock: socket.socket, layer: TLSLayer, timeout: float) -> TLSInfo:
    loop = asyncio.get_running_loop()
    try:
        await loop.connect_accepted_socket(lambda: layer, sock)
    except BaseException:
        sock.close()
        raise
    try:
        async with asyncio.timeout(timeout):
            return await asyncio.shield(layer.handshake)
    except TimeoutError:
        layer.abort()
        raise TLSHandshakeFailed(describe_tls_error(TimeoutError())) from None
    except BaseException:
        layer.abort()
        raise


async def server_handshake(sock: socket.socket, ctx: ssl.SSLContext,
                           alpn: Sequence[str] | None,
                           timeout: float = HANDSHAKE_TIMEOUT) -> tuple[TLSLayer, TLSInfo]:
    """Terminate TLS on an accepted tailnet socket (owned from now on: on failure it is
    closed). Returns the layer (to :meth:`TLSLayer.attach` or :meth:`TLSLayer.abort`) and
    the session. Raises :class:`TLSHandshakeFailed`."""
    st = server_tls(ctx)
    try:
        sslobj, incoming, outgoing = st.wrap(ctx, alpn)
    except BaseException:
        sock.close()
        raise
    layer = TLSLayer(sslobj, incoming, outgoing, sni=st.sni)
    return layer, await _run_handshake(sock, layer, timeout)


async def client_handshake(sock: socket.socket, ctx: ssl.SSLContext, server_name: str,
                           alpn: Sequence[str] | None,
                           timeout: float = HANDSHAKE_TIMEOUT) -> tuple[TLSLayer, TLSInfo]:
    """Originate TLS on a connected tailnet socket (owned from now on: on failure it is
    closed), verifying the peer's certificate for ``server_name`` (the SNI sent too).
    The ALPN list is set on the shared ``ctx`` right before the session is created from
    it (OpenSSL copies it then; nothing runs in between). Raises
    :class:`TLSHandshakeFailed`."""
    try:
        ctx.set_alpn_protocols(list(alpn or ()))
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        sslobj = ctx.wrap_bio(incoming, outgoing, server_side=False,
                              server_hostname=server_name)
    except BaseException:
        sock.close()
        raise
    layer = TLSLayer(sslobj, incoming, outgoing, peer_name=server_name)
    return layer, await _run_handshake(sock, layer, timeout)


class TLSSplice(Splice):
    """The copying relay with the peer side on a :class:`TLSLayer` (plaintext)."""

    def __init__(self, flow: Any, layer: TLSLayer, **kw: Any) -> None:
        super().__init__(flow, **kw)
        self.layer = layer

    async def start(
        self, app_sock: socket.socket, peer_sock: socket.socket, pending: bytes = b""
    ) -> None:
        """Attach the TLS layer (``peer_sock`` is its socket, already on a transport) and
        the app's socket; ``pending`` goes to the peer first."""
        self.layer.attach(self.peer)
        await self._attach_app(app_sock, pending)
        if self.log_paused:  # paused before the sockets were attached: now it can apply
            self.pause_for_log(True)
