"""The DNS responder (``--dns-listen``): tailnet names from the netmap, the rest forwarded.

A loopback UDP and TCP listener. A standard query (class IN, one question) for a node's
name (``name``, ``name.<tailnet domain>``; any case, trailing dot or not) is answered from
the netmap, authoritatively: A/AAAA with the node's tailnet addresses, NOERROR with no
answers for a type it has none of; a name under the tailnet domain that is no node gets
NXDOMAIN. Every other query is forwarded unchanged to the upstreams (``--dns-upstream``,
else the nameservers of /etc/resolv.conf at startup), UDP over UDP and TCP over TCP, in
order until one answers; none within :data:`FORWARD_TIMEOUT` seconds: SERVFAIL.

DNS queries are not traffic-log flows (names, not tailnet traffic); they are counted in
``tsnet2_dns_queries_total``. Bounds: :data:`MAX_OUTSTANDING` forwarded queries at once
(more get REFUSED), :data:`MAX_TCP_CLIENTS` TCP connections, :data:`TCP_IDLE_TIMEOUT`
seconds per TCP message, every task owned by the daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
import socket
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tsnet2.daemon import io
from tsnet2.daemon.backend import Backend, _node_ips
from tsnet2.daemon.metrics import Metrics
from tsnet2.proto import dns
from tsnet2.proto.dns import DnsError, Message, RCode, Record, RType

log = logging.getLogger("tsnet2d.dns")

TTL = 60  # seconds resolvers may cache a tailnet answer
FORWARD_TIMEOUT = 5.0  # seconds for a forwarded query, over every upstream
UPSTREAM_TIMEOUT = 2.0  # seconds one upstream gets before the next is tried
MAX_OUTSTANDING = 256  # forwarded queries at once (UDP and TCP); more are REFUSED
MAX_TCP_CLIENTS = 64
TCP_IDLE_TIMEOUT = 10.0  # seconds a TCP client has for each message (and between them)
RESOLV_CONF = Path("/etc/resolv.conf")

Addr = tuple[str, int]
_FAMILIES: dict[int, tuple[int, ...]] = {RType.A: (4,), RType.AAAA: (6,), RType.ANY: (4, 6)}


class DnsConfigError(ValueError):
    """A bad --dns-listen / --dns-upstream value; the message is printed as is."""


def parse_upstream(text: str) -> Addr:
    """``IP``, ``IP:PORT`` or ``[IPv6]:PORT`` (port 53 when not given)."""
    host, port = text, 53
    if text.startswith("[") or text.count(":") == 1:
        head, _, tail = text.rpartition(":")
        if not tail.isdigit() or not 1 <= int(tail) <= 65535:
            raise DnsConfigError(f"--dns-upstream {text!r}: bad port (want 1-65535)")
        host, port = head.strip("[]") if head.startswith("[") else head, int(tail)
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise DnsConfigError(f"--dns-upstream {text!r}: want an IP address with an "
                             "optional port (1.1.1.1, 10.0.0.10:53, [fd00::1]:53)") from None
    return str(ip), port


def resolv_conf_nameservers(path: Path = RESOLV_CONF) -> list[str]:
    """The ``nameserver`` addresses of a resolv.conf (none if it cannot be read)."""
    out: list[str] = []
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return out
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            with contextlib.suppress(ValueError):
                out.append(str(ipaddress.ip_address(parts[1].split("%")[0])))
    return out


def default_upstreams(listen: Addr, path: Path = RESOLV_CONF) -> tuple[Addr, ...]:
    """resolv.conf's nameservers on port 53, without the responder's own address."""
    return tuple((ip, 53) for ip in resolv_conf_nameservers(path)
                 if (ip, 53) != listen
                 and not (listen[1] == 53 and ipaddress.ip_address(ip).is_unspecified))


@dataclasses.dataclass(frozen=True)
class DnsConfig:
    """Where the responder listens and whom it forwards to."""

    listen: Addr
    upstreams: tuple[Addr, ...]


class DnsResponder:
    """The responder's sockets and tasks (owned by the daemon via `spawn`)."""

    def __init__(self, config: DnsConfig, backend: Backend, metrics: Metrics,
                 spawn: Callable[..., asyncio.Task[Any]]) -> None:
        self.config = config
        self.backend = backend
        self.metrics = metrics
        self._spawn = spawn
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: socket.socket | None = None
        self.outstanding = 0
        self.tcp_clients = 0

    async def start(self) -> None:
        """Bind UDP and TCP on the listen address (raises OSError)."""
        host, port = self.config.listen
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        tcp = socket.socket(fam, socket.SOCK_STREAM)
        try:
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            tcp.bind((host, port))
            port = tcp.getsockname()[1]  # port 0: UDP takes the same one
            tcp.listen(128)
            tcp.setblocking(False)
            loop = asyncio.get_running_loop()
            self._udp, _ = await loop.create_datagram_endpoint(
                lambda: _UdpProtocol(self), local_addr=(host, port), family=fam)
        except OSError as exc:
            tcp.close()
            raise OSError(exc.errno, f"--dns-listen {host}:{port}: {exc.strerror or exc}"
                          ) from exc
        except BaseException:
            tcp.close()
            raise
        self._tcp = tcp
        self._spawn(self._accept_loop(tcp), critical=True, name="dns tcp accept loop")
        if not self.config.upstreams:
            log.warning("DNS responder: no upstream nameserver (none in %s, no "
                        "--dns-upstream): names outside the tailnet get SERVFAIL",
                        RESOLV_CONF)
        log.info("DNS responder on %s:%d (UDP, TCP); upstreams %s", host, port,
                 ", ".join(f"{h}:{p}" for h, p in self.config.upstreams) or "none")

    @property
    def port(self) -> int:
        """The bound port."""
        return int(self._tcp.getsockname()[1]) if self._tcp is not None else 0

    def close(self) -> None:
        """Close both listeners (tasks are the daemon's: cancelled at shutdown)."""
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        if self._tcp is not None:
            self._tcp.close()
            self._tcp = None

    # ---- answers from the netmap -----------------------------------------------------

    def local_answer(self, msg: Message, max_size: int) -> tuple[bytes, str] | None:
        """The answer to a query about a tailnet name and its metric result, or None:
        forward it."""
        if msg.is_response or msg.opcode != 0 or len(msg.questions) != 1:
            return None
        q = msg.questions[0]
        if q.qclass != dns.CLASS_IN:
            return None
        name = q.name.rstrip(".").lower()
        b = self.backend
        domain = b.domain.rstrip(".").lower()
        under = bool(domain) and (name == domain or name.endswith("." + domain))
        node = b.node_by_name(name)
        if node is None:
            if not under:
                return None
            if not b.running:
                return dns.build_response(msg, RCode.SERVFAIL), "servfail"
            if name == domain:
                return dns.build_response(msg, RCode.NOERROR, authoritative=True), "tailnet"
            return dns.build_response(msg, RCode.NXDOMAIN, authoritative=True), "nxdomain"
        want = _FAMILIES.get(q.qtype, ())
        answers = tuple(
            Record(q.name, RType.A if ip.version == 4 else RType.AAAA, dns.CLASS_IN, TTL,
                   ip.packed)
            for ip in _node_ips(node) if ip.version in want)
        return (dns.build_response(msg, RCode.NOERROR, answers, authoritative=True,
                                   max_size=max_size), "tailnet")

    def decide(self, data: bytes, transport: str,
               max_size: int | None = None) -> tuple[bytes | None, Message | None]:
        """A reply now (bytes), or a query to forward (Message), or neither (drop)."""
        try:
            msg = dns.parse_message(data)
        except DnsError as exc:
            self.metrics.dns_query(transport, "bad_request")
            head = dns.parse_header(data)
            log.info("DNS: malformed %s query: %s", transport, exc)
            if head is None or head[1] & dns.FLAG_QR:
                return None, None
            return (dns.HEADER.pack(head[0], dns.FLAG_QR | (head[1] & 0x7900) | RCode.FORMERR,
                                    0, 0, 0, 0), None)
        if msg.is_response:
            self.metrics.dns_query(transport, "dropped")
            return None, None
        local = self.local_answer(msg, max_size or msg.udp_size)
        if local is not None:
            self.metrics.dns_query(transport, local[1])
            return local[0], None
        if self.outstanding >= MAX_OUTSTANDING:
            self.metrics.dns_query(transport, "refused")
            return dns.build_response(msg, RCode.REFUSED), None
        if not self.config.upstreams:
            self.metrics.dns_query(transport, "servfail")
            return dns.build_response(msg, RCode.SERVFAIL), None
        return None, msg

    # ---- UDP -------------------------------------------------------------------------

    def udp_received(self, data: bytes, addr: Any) -> None:
        reply, forward = self.decide(data, "udp")
        if reply is not None and self._udp is not None:
            self._udp.sendto(reply, addr)
        elif forward is not None:
            self.outstanding += 1
            self._spawn(self._forward_udp(data, forward, addr))

    async def _forward_udp(self, data: bytes, msg: Message, addr: Any) -> None:
        try:
            reply = await self._forward(data, msg, "udp")
        finally:
            self.outstanding -= 1
        if self._udp is not None:
            self._udp.sendto(reply, addr)

    async def _forward(self, data: bytes, msg: Message, transport: str) -> bytes:
        ask = self._ask_udp if transport == "udp" else self._ask_tcp
        loop = asyncio.get_running_loop()
        deadline = loop.time() + FORWARD_TIMEOUT
        for up in self.config.upstreams:
            left = deadline - loop.time()
            if left <= 0:
                break
            try:
                async with asyncio.timeout(min(UPSTREAM_TIMEOUT, left)):
                    reply: bytes = await ask(up, data)
            except (OSError, TimeoutError, DnsError) as exc:
                log.info("DNS: upstream %s:%d (%s): %s", up[0], up[1], transport,
                         exc or type(exc).__name__)
                continue
            head = dns.parse_header(reply)
            if head is None or head[0] != msg.id or not head[1] & dns.FLAG_QR:
                log.info("DNS: upstream %s:%d sent no answer to query %d", *up, msg.id)
                continue
            self.metrics.dns_query(transport, "forwarded")
            return reply
        self.metrics.dns_query(transport, "servfail")
        return dns.build_response(msg, RCode.SERVFAIL)

    @staticmethod
    async def _ask_udp(up: Addr, data: bytes) -> bytes:
        fam = socket.AF_INET6 if ":" in up[0] else socket.AF_INET
        qid = struct.unpack_from(">H", data)[0]
        with socket.socket(fam, socket.SOCK_DGRAM) as s:
            s.setblocking(False)
            s.connect(up)  # only the upstream's datagrams are read
            s.send(data)
            while True:
                reply = await io.recv(s, 65535)
                head = dns.parse_header(reply)
                if head is not None and head[0] == qid:
                    return reply

    # ---- TCP -------------------------------------------------------------------------

    async def _accept_loop(self, lsock: socket.socket) -> None:
        while True:
            conn = await io.accept_next(lsock, "DNS tcp")
            if self.tcp_clients >= MAX_TCP_CLIENTS:
                self.metrics.dns_query("tcp", "refused")
                conn.close()
                continue
            self.tcp_clients += 1
            self._spawn(self._tcp_client(conn))

    async def _tcp_client(self, sock: socket.socket) -> None:
        try:
            while True:
                try:
                    async with asyncio.timeout(TCP_IDLE_TIMEOUT):
                        size = await _recv_exactly(sock, 2)
                        if size is None:
                            return
                        data = await _recv_exactly(sock, struct.unpack(">H", size)[0])
                except TimeoutError:
                    return
                if data is None:
                    return
                reply, forward = self.decide(data, "tcp", max_size=65535)
                if forward is not None:
                    self.outstanding += 1
                    try:
                        reply = await self._forward(data, forward, "tcp")
                    finally:
                        self.outstanding -= 1
                if reply is None:
                    return
                await io.sendall(sock, struct.pack(">H", len(reply)) + reply)
        except OSError as exc:
            log.info("DNS tcp client: %s", exc)
        finally:
            self.tcp_clients -= 1
            sock.close()

    @staticmethod
    async def _ask_tcp(up: Addr, data: bytes) -> bytes:
        fam = socket.AF_INET6 if ":" in up[0] else socket.AF_INET
        with socket.socket(fam, socket.SOCK_STREAM) as s:
            s.setblocking(False)
            await io.connect(s, up)
            await io.sendall(s, struct.pack(">H", len(data)) + data)
            size = await _recv_exactly(s, 2)
            if size is None:
                raise DnsError("upstream closed the connection")
            reply = await _recv_exactly(s, struct.unpack(">H", size)[0])
            if reply is None:
                raise DnsError("upstream closed the connection mid-answer")
            return reply


async def _recv_exactly(sock: socket.socket, n: int) -> bytes | None:
    """n bytes, or None at EOF (a clean EOF before the first byte, or mid-way)."""
    buf = bytearray()
    while len(buf) < n:
        chunk = await io.recv(sock, n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, responder: DnsResponder) -> None:
        self.responder = responder

    def datagram_received(self, data: bytes, addr: Any) -> None:
        try:
            self.responder.udp_received(data, addr)
        except Exception:  # one bad datagram must not end the endpoint
            log.exception("DNS: internal error on a UDP query")

    def error_received(self, exc: Exception) -> None:
        log.info("DNS udp: %s", exc)


__all__ = ["DnsConfig", "DnsConfigError", "DnsResponder", "default_upstreams",
           "parse_upstream", "resolv_conf_nameservers"]
