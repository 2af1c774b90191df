"""tsnet2d's Prometheus metrics: one `Metrics` object, one private registry, no global state.

API for wiring (the daemon calls these at each event; all are cheap, thread-safe, never block):

    m = Metrics(peers=lambda: peer_samples(backend.peers, backend.peer_stats()),
                before_scrape=refresh)   # optional: e.g. copy backend state into set_* below

    # flows (direction: "in" = a peer connected to our listener, "out" = the app dialed)
    m.flow_opened(direction)                       # after the `open` record is written
    m.flow_bytes(direction, stream, nbytes)        # per read; stream "app->peer"|"peer->app"
    m.flow_bytes_counter(direction)                # the same, children bound once (per flow:
                                                   #   Splice(on_bytes=add), add made per direction)
    m.flow_closed(direction, result, duration_s)   # once per opened flow; result "ok"|"error"|"cut"
    m.flow_refused(direction, reason)              # a flow that never opened (see REFUSE_REASONS)
    # accept slots (parked app connections waiting for inbound flows)
    m.tls_handshake(direction, result, seconds)    # a TLS handshake of the daemon ended
    m.slot_parked(+1) / m.slot_parked(-1)          # a slot joins / leaves a listener's queue
    m.slot_wait(seconds)                           # how long an inbound flow waited for a slot
    m.slot_dropped(reason)                         # removed without a flow (SLOT_DROP_REASONS)
    # traffic log
    m.log_record(kind, nbytes)                     # TrafficLog.on_record = m.log_record
    m.log_dropped(reason)                          # a record not written (LOG_DROP_REASONS)
    m.log_write_error()                            # a failed write to the log file
    m.set_log_queue(nbytes, stalled, log_seq)      # stdout's queue, fail-closed stall, chain
    # node and coordination
    m.set_node_up(bool)                            # backend state RUNNING or not
    m.set_control_connected(bool)                  # Backend.control_connected changed
    m.set_netmap_version(int)                      # Backend.netmap_version changed
    m.node_start_failed(code)                      # a start attempt of --up failed (ErrorCode)
    m.node_lost()                                  # a running node's device died
    m.set_sessions(n)                              # control connections now open
    m.connection_refused(reason)                   # a connection refused (CONN_REFUSE_REASONS)
    m.egress_request(proto, result)                # an egress proxy request ended
    m.dns_query(transport, result)                 # the DNS responder answered a query
    m.udp_datagram(stream)                         # one UDP datagram relayed (tsnet2.daemon.udp)
    m.udp_dropped(reason)                          # one UDP datagram dropped (UDP_DROP_REASONS)
    m.tls_cert_renewal(result, not_after)          # a certificate request ended ("ok"|"error")
    m.render() -> bytes                            # text exposition format (HealthServer uses it)

Label values are bounded by construction: `direction`, `stream` and `result` outside their
fixed sets raise ValueError (a bug in the caller); an unknown `reason` is counted as
"other"; at most `MAX_RECORD_KINDS` traffic-log record kinds get their own series, the rest
are "other". Per-peer WireGuard counters come from the `peers` callback, called on every
scrape (no background task); the `peer` label is the peer's hostname, so its cardinality is
the tailnet's size. Every metric is listed in docs/metrics.md.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Literal, Protocol

from tsnet2._version import __version__
from tsnet2.daemon.prom import (
    Collector,
    Counter,
    CounterFamily,
    Family,
    Gauge,
    GaugeFamily,
    Histogram,
    Registry,
)
from tsnet2.proto.codes import ErrorCode

log = logging.getLogger("tsnet2d.metrics")

FlowDirection = Literal["in", "out"]
Stream = Literal["app->peer", "peer->app"]
FlowResult = Literal["ok", "error", "cut"]

DIRECTIONS: tuple[FlowDirection, ...] = ("in", "out")
STREAMS: tuple[Stream, ...] = ("app->peer", "peer->app")
RESULTS: tuple[FlowResult, ...] = ("ok", "error", "cut")

OTHER = "other"
#: Why a flow never opened, per direction (anything else is counted as "other").
REFUSE_REASONS: dict[str, tuple[str, ...]] = {
    "out": (
        "bad_request",  # unsupported network or malformed address
        "not_running",  # the node is not up
        "no_such_peer",  # the name or address is not in the netmap
        "dial_failed",  # the TCP connect to the peer failed
        "dial_timeout",  # the TCP connect timed out
        "app_gone",  # the app hung up before the dial reply reached it
        "log_unavailable",  # the `open` record could not be written
        "tls_failed",  # a TLS dial's handshake or certificate check failed
        OTHER,
    ),
    "in": (
        "no_listener",  # no listener registered for the port
        "listener_closed",  # the listener went away while the flow waited
        "no_slot",  # no parked accept slot within the slot wait limit
        "log_unavailable",
        "target_failed",  # a serve flow's target in the pod could not be connected
        "tls_failed",  # a listen_tls flow's handshake failed or timed out
        "tls_busy",  # a listen_tls listener had its maximum of handshakes in progress
        OTHER,
    ),
}
#: Why a parked accept slot went away without a flow.
SLOT_DROP_REASONS: tuple[str, ...] = (
    "app_closed",  # the app closed (or wrote to) the parked connection
    "over_limit",  # the listener already had its maximum of parked slots
    "unknown_listener",  # the accept request named no registered listener
    "listener_closed",  # released with its listener
    "handoff_failed",  # the accept header could not be written; the flow went to another slot
    OTHER,
)
#: Why a traffic-log record was not written.
LOG_DROP_REASONS: tuple[str, ...] = (
    "disk_full",  # ENOSPC / EDQUOT
    "write_error",  # any other write failure
    "not_open",  # the log is closed or was never opened
    "payload_cap",  # the flow's payload cap was reached (metadata still logged)
    "queue_full",  # stdout's reader was behind and its queue full (policy continue)
    OTHER,
)
#: Why a socket connection was refused before its channel was served.
CONN_REFUSE_REASONS: tuple[str, ...] = (
    "uid",  # SO_PEERCRED: the peer's uid is not allowed
    "sessions",  # MAX_SESSIONS control connections already open
    "localapi",  # MAX_LOCALAPI_CONNECTIONS LocalAPI connections already open
    "handshakes",  # MAX_HANDSHAKES connections had not named their channel yet
    OTHER,
)
#: The egress proxy's protocols and how its requests ended (tsnet2.daemon.egress).
EGRESS_PROTOS: tuple[str, ...] = ("socks5", "http-connect", "http-proxy", "unknown")
EGRESS_RESULTS: tuple[str, ...] = (
    "ok", "bad_request", "timeout", "not_tailnet", "dial_failed", "not_running",
    "log_unavailable", "over_limit", "app_gone", OTHER,
)
#: The DNS responder's answers (tsnet2.daemon.dns).
DNS_TRANSPORTS: tuple[str, ...] = ("udp", "tcp")
DNS_RESULTS: tuple[str, ...] = (
    "tailnet", "nxdomain", "forwarded", "servfail", "refused", "bad_request", "dropped", OTHER,
)
#: Why the daemon dropped a UDP datagram (tsnet2.daemon.udp).
UDP_DROP_REASONS: tuple[str, ...] = (
    "too_large",  # a frame from the app over max_datagram (answered with a notice)
    "app_slow",  # the app's channel buffer was full (the app does not read)
    "send_failed",  # the kernel refused the datagram (buffer full, ICMP error)
    "not_tailnet",  # sendto an address that is no tailnet node's (answered with a notice)
    "flow_limit",  # a new peer for a listener that has its maximum of flows
    "no_channel",  # a listener's packet channel is not attached
    "log_unavailable",  # the traffic log could not take the flow's records
    OTHER,
)
#: How a request for the node's TLS certificate ended (tsnet2.daemon.certs).
TLS_RENEWAL_RESULTS: tuple[str, ...] = ("ok", "error")
_ERROR_CODES = frozenset(c.value for c in ErrorCode)
RECORD_KINDS: tuple[str, ...] = ("open", "data", "close")
MAX_RECORD_KINDS = 16
_KIND_RE = re.compile(r"[a-z][a-z0-9_]{0,31}")

# Seconds. Flows range from a health probe (milliseconds) to a long-lived stream (hours).
FLOW_DURATION_BUCKETS = (0.005, 0.025, 0.1, 0.5, 1.0, 5.0, 30.0, 60.0, 300.0, 1800.0, 3600.0,
                         4 * 3600.0)
# Seconds. An inbound flow waits at most SLOT_WAIT (10 s) for a slot.
SLOT_WAIT_BUCKETS = (0.001, 0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Seconds. A TLS handshake in the daemon is given up after 10 s.
TLS_HANDSHAKE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
TLS_RESULTS: tuple[str, ...] = ("ok", "error")


@dataclasses.dataclass(frozen=True)
class PeerSample:
    """One peer's WireGuard counters at scrape time.

    `name` is the peer's hostname (or another bounded identifier such as its node id);
    `last_handshake` is unix seconds, or None if the device never completed one.
    """

    name: str
    rx_bytes: int
    tx_bytes: int
    last_handshake: float | None


PeerSource = Callable[[], Iterable[PeerSample]]


class _DevicePeer(Protocol):
    """What `peer_samples` reads from a device peer (`tsnet2.node.PeerState` fits)."""

    rx_bytes: int
    tx_bytes: int
    last_handshake: float | None


UNKNOWN_PEER = "unknown"


def peer_samples(
    netmap_peers: Iterable[Mapping[str, Any]], stats: Mapping[str, _DevicePeer]
) -> list[PeerSample]:
    """Join device counters (keyed by base64 public key) with netmap peers for their names.

    A device peer missing from the netmap (a moment after it left) is named "unknown".
    Meant for the daemon's callback: `lambda: peer_samples(backend.peers, backend.peer_stats())`.
    """
    names: dict[str, str] = {}
    for p in netmap_peers:
        key = p.get("public_key")
        if key:
            names[str(key)] = str(p.get("name") or p.get("stable_id") or UNKNOWN_PEER)
    return [
        PeerSample(names.get(key, UNKNOWN_PEER), st.rx_bytes, st.tx_bytes, st.last_handshake)
        for key, st in stats.items()
    ]


class PeerCollector(Collector):
    """Per-peer WireGuard metrics, read fresh from `source()` at every scrape.

    Samples with the same name are merged (bytes summed, latest handshake kept), so the
    exposition never repeats a series. A failing source is logged and counted in
    `tsnet2_peer_stats_errors_total`; the rest of the scrape still succeeds.
    """

    def __init__(self, source: PeerSource | None) -> None:
        """Collect from `source`; None reports no peers."""
        self.source = source
        self.errors = 0
        self._lock = threading.Lock()

    def _families(self) -> tuple[Family, Family, Family, Family, Family]:
        return (
            CounterFamily("tsnet2_peer_receive_bytes",
                          "Bytes received from a peer over WireGuard.", labels=["peer"]),
            CounterFamily("tsnet2_peer_transmit_bytes",
                          "Bytes transmitted to a peer over WireGuard.", labels=["peer"]),
            GaugeFamily("tsnet2_peer_last_handshake_timestamp_seconds",
                        "Unix time of the last WireGuard handshake with a peer "
                        "(0 if none yet).", labels=["peer"]),
            GaugeFamily("tsnet2_peers", "Peers configured on the WireGuard device."),
            CounterFamily("tsnet2_peer_stats_errors",
                          "Scrapes where the WireGuard peer counters could not be read."),
        )

    def names(self) -> list[str]:
        """The exposition names of its families (for the registry's clash check)."""
        return [f.exposition_name() for f in self._families()]

    def collect(self) -> Iterator[Family]:
        """Call the source once and yield the per-peer families."""
        rx, tx, hs, count, errors = self._families()
        merged: dict[str, list[float]] = {}
        if self.source is not None:
            try:
                samples = list(self.source())
            except Exception:
                log.warning("cannot read WireGuard peer counters for /metrics", exc_info=True)
                with self._lock:
                    self.errors += 1
                samples = []
            for s in samples:
                cur = merged.setdefault(s.name, [0.0, 0.0, 0.0])
                cur[0] += s.rx_bytes
                cur[1] += s.tx_bytes
                cur[2] = max(cur[2], s.last_handshake or 0.0)
        for name in sorted(merged):
            r, t, h = merged[name]
            rx.add_metric([name], r)
            tx.add_metric([name], t)
            hs.add_metric([name], h)
        count.add_metric([], len(merged))
        errors.add_metric([], self.errors)
        yield from (rx, tx, hs, count, errors)


class Metrics:
    """Every tsnet2d metric, in a registry of its own (several can live in one process)."""

    def __init__(
        self,
        peers: PeerSource | None = None,
        *,
        before_scrape: Callable[[], None] | None = None,
    ) -> None:
        """Create the metrics.

        `peers` is called at each scrape for the WireGuard counters; `before_scrape` (if
        given) at the start of each `render()`, so state that is cheap to read (node up,
        control connected, netmap version) can be copied in then instead of at each change.
        Either failing is logged; the scrape still succeeds.
        """
        self.before_scrape = before_scrape
        r = self.registry = Registry()
        self._lock = threading.Lock()
        self._kinds: set[str] = set(RECORD_KINDS) | {OTHER}

        Gauge("tsnet2_build_info", "Always 1; the version label is tsnet2d's version.",
              ["version"], registry=r).labels(__version__).set(1)
        self.flows_opened = Counter(
            "tsnet2_flows_opened_total", "Flows opened (the `open` record was written).",
            ["direction"], registry=r)
        self.flows_closed = Counter(
            "tsnet2_flows_closed_total", "Flows closed, by how they ended.",
            ["direction", "result"], registry=r)
        self.flows_refused = Counter(
            "tsnet2_flows_refused_total", "Flows that never opened, by reason.",
            ["direction", "reason"], registry=r)
        self.flows_active = Gauge(
            "tsnet2_flows_active", "Flows open now.", ["direction"], registry=r)
        self.flow_bytes_total = Counter(
            "tsnet2_flow_bytes_total", "Bytes spliced, by flow direction and byte stream.",
            ["direction", "stream"], registry=r)
        self.flow_duration = Histogram(
            "tsnet2_flow_duration_seconds", "Lifetime of closed flows.",
            ["direction"], buckets=FLOW_DURATION_BUCKETS, registry=r)
        self.slots_parked = Gauge(
            "tsnet2_accept_slots_parked", "Accept slots parked by the app, over all listeners.",
            registry=r)
        self.slot_wait_seconds = Histogram(
            "tsnet2_accept_slot_wait_seconds",
            "Time an inbound flow waited for a parked accept slot (handed over or given up).",
            buckets=SLOT_WAIT_BUCKETS, registry=r)
        self.tls_handshakes = Counter(
            "tsnet2_tls_handshakes_total",
            "TLS handshakes the daemon did (in: listen_tls, out: TLS dials), by result.",
            ["direction", "result"], registry=r)
        self.tls_handshake_seconds = Histogram(
            "tsnet2_tls_handshake_seconds", "Duration of the daemon's TLS handshakes.",
            ["direction"], buckets=TLS_HANDSHAKE_BUCKETS, registry=r)
        self.slots_dropped = Counter(
            "tsnet2_accept_slots_dropped_total", "Accept slots removed without a flow, by reason.",
            ["reason"], registry=r)
        self.log_records = Counter(
            "tsnet2_traffic_log_records_total", "Traffic-log records written, by kind.",
            ["kind"], registry=r)
        self.log_bytes = Counter(
            "tsnet2_traffic_log_written_bytes_total", "Bytes written to the traffic log, by kind.",
            ["kind"], registry=r)
        self.log_drops = Counter(
            "tsnet2_traffic_log_dropped_records_total",
            "Traffic-log records not written, by reason.", ["reason"], registry=r)
        self.log_errors = Counter(
            "tsnet2_traffic_log_write_errors_total", "Failed writes to the traffic log.",
            registry=r)
        self.log_queue = Gauge(
            "tsnet2_traffic_log_queue_bytes",
            "Bytes of traffic-log records waiting for the reader of stdout.", registry=r)
        self.log_stalled = Gauge(
            "tsnet2_traffic_log_stalled",
            "1 while stdout's reader is behind and flows are paused and refused (fail-closed).",
            registry=r)
        self.log_seq = Gauge(
            "tsnet2_traffic_log_seq",
            "log_seq of the last traffic-log record (the hash chain's length).", registry=r)
        self.node_up = Gauge(
            "tsnet2_node_up", "1 while the node runs (has tailnet addresses and a netmap).",
            registry=r)
        self.control_connected = Gauge(
            "tsnet2_control_connected", "1 while the coordination server answers netmap polls.",
            registry=r)
        self.netmap_version = Gauge(
            "tsnet2_netmap_version", "Version of the last netmap applied (0 before the first).",
            registry=r)
        self.node_start_failures = Counter(
            "tsnet2_node_start_failures_total",
            "Failed attempts of tsnet2d --up to start the node, by error code.", ["code"],
            registry=r)
        self.node_losses = Counter(
            "tsnet2_node_lost_total",
            "Times a running node's WireGuard device died and the node was taken down.",
            registry=r)
        self.sessions = Gauge(
            "tsnet2_clients", "Control connections (apps, CLI) open now.", registry=r)
        self.connections_refused = Counter(
            "tsnet2_connections_refused_total",
            "Socket connections refused, by reason (uid, a limit reached).", ["reason"],
            registry=r)
        self.egress_requests = Counter(
            "tsnet2_egress_requests_total",
            "Egress proxy requests (SOCKS5, HTTP CONNECT, absolute-form HTTP), by protocol "
            "and how they ended (ok: a flow opened).", ["proto", "result"], registry=r)
        self.dns_queries = Counter(
            "tsnet2_dns_queries_total",
            "DNS responder queries, by transport and answer (tailnet: from the netmap).",
            ["transport", "result"], registry=r)
        self.udp_datagrams = Counter(
            "tsnet2_udp_datagrams_total",
            "UDP datagrams relayed, by stream (app->peer, peer->app).", ["stream"], registry=r)
        self.udp_drops = Counter(
            "tsnet2_udp_datagrams_dropped_total",
            "UDP datagrams the daemon dropped, by reason.", ["reason"], registry=r)
        # The node's TLS certificate (tsnet2.daemon.certs).
        self.tls_cert_expiry = Gauge(
            "tsnet2_tls_cert_expiry_timestamp_seconds",
            "Unix time the node's TLS certificate expires (0 while it has none).", registry=r)
        self.tls_cert_renewals = Counter(
            "tsnet2_tls_cert_renewals_total",
            "Requests for the node's TLS certificate (first issue and renewals), by result.",
            ["result"], registry=r)
        for tls_result in TLS_RENEWAL_RESULTS:
            self.tls_cert_renewals.labels(tls_result)
        self.peer_collector = PeerCollector(peers)
        r.register(self.peer_collector, self.peer_collector.names())

        # Every series of a bounded label set exists from the start, at 0.
        for d in DIRECTIONS:
            self.flows_opened.labels(d)
            self.flows_active.labels(d)
            self.flow_duration.labels(d)
            for res in RESULTS:
                self.flows_closed.labels(d, res)
            for s in STREAMS:
                self.flow_bytes_total.labels(d, s)
            for reason in REFUSE_REASONS[d]:
                self.flows_refused.labels(d, reason)
            self.tls_handshake_seconds.labels(d)
            for tres in TLS_RESULTS:
                self.tls_handshakes.labels(d, tres)
        for reason in SLOT_DROP_REASONS:
            self.slots_dropped.labels(reason)
        for kind in RECORD_KINDS:
            self.log_records.labels(kind)
            self.log_bytes.labels(kind)
        for reason in LOG_DROP_REASONS:
            self.log_drops.labels(reason)
        for reason in CONN_REFUSE_REASONS:
            self.connections_refused.labels(reason)
        for p in EGRESS_PROTOS:
            for eres in EGRESS_RESULTS:
                self.egress_requests.labels(p, eres)
        for t in DNS_TRANSPORTS:
            for dres in DNS_RESULTS:
                self.dns_queries.labels(t, dres)
        for s in STREAMS:
            self.udp_datagrams.labels(s)
        for reason in UDP_DROP_REASONS:
            self.udp_drops.labels(reason)

    # ---- flows -----------------------------------------------------------------------

    def flow_opened(self, direction: FlowDirection) -> None:
        """A flow opened (its `open` record is written): counts it and marks it active."""
        d = _direction(direction)
        self.flows_opened.labels(d).inc()
        self.flows_active.labels(d).inc()

    def flow_bytes(self, direction: FlowDirection, stream: Stream, nbytes: int) -> None:
        """`nbytes` were read on one side of a flow and forwarded (stream as in the log)."""
        d = _direction(direction)
        if stream not in STREAMS:
            raise ValueError(f'stream must be "app->peer" or "peer->app", got {stream!r}')
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes}")
        self.flow_bytes_total.labels(d, stream).inc(nbytes)

    def flow_bytes_counter(self, direction: FlowDirection) -> Callable[[Stream, int], None]:
        """`flow_bytes` for one direction, its counter children bound once (per-flow hook).

        Returns ``add(stream, nbytes)``; the daemon makes one per direction and hands the
        same function to every flow of that direction.
        """
        d = _direction(direction)
        children = {s: self.flow_bytes_total.labels(d, s) for s in STREAMS}

        def add(stream: Stream, nbytes: int) -> None:
            children[stream].inc(nbytes)

        return add

    def flow_closed(self, direction: FlowDirection, result: FlowResult, duration_s: float) -> None:
        """An opened flow ended: "ok" (clean), "error" (a socket failed), "cut" (shutdown)."""
        d = _direction(direction)
        if result not in RESULTS:
            raise ValueError(f'result must be "ok", "error" or "cut", got {result!r}')
        self.flows_closed.labels(d, result).inc()
        self.flows_active.labels(d).dec()
        self.flow_duration.labels(d).observe(max(0.0, float(duration_s)))

    def flow_refused(self, direction: FlowDirection, reason: str) -> None:
        """A flow that never opened (dial failure, no slot, ...); see `REFUSE_REASONS`."""
        d = _direction(direction)
        self.flows_refused.labels(d, reason if reason in REFUSE_REASONS[d] else OTHER).inc()

    def tls_handshake(self, direction: FlowDirection, result: str, seconds: float) -> None:
        """A TLS handshake of the daemon ended: ``"ok"`` or ``"error"`` (failed, timed
        out), after ``seconds``."""
        d = _direction(direction)
        if result not in TLS_RESULTS:
            raise ValueError(f'result must be "ok" or "error", got {result!r}')
        self.tls_handshakes.labels(d, result).inc()
        self.tls_handshake_seconds.labels(d).observe(max(0.0, float(seconds)))

    # ---- accept slots ----------------------------------------------------------------

    def slot_parked(self, delta: int = 1) -> None:
        """Parked slots changed by `delta` (+1 when one is queued, -1 when it leaves)."""
        self.slots_parked.inc(delta)

    def slot_wait(self, seconds: float) -> None:
        """An inbound flow waited `seconds` for a slot (observed when handed over or given up)."""
        self.slot_wait_seconds.observe(max(0.0, float(seconds)))

    def slot_dropped(self, reason: str) -> None:
        """A parked slot went away without a flow; see `SLOT_DROP_REASONS`."""
        self.slots_dropped.labels(reason if reason in SLOT_DROP_REASONS else OTHER).inc()

    # ---- traffic log -----------------------------------------------------------------

    def log_record(self, kind: str, nbytes: int) -> None:
        """A traffic-log record of `kind` and `nbytes` was written (`TrafficLog.on_record`)."""
        k = self._kind(kind)
        self.log_records.labels(k).inc()
        self.log_bytes.labels(k).inc(max(0, nbytes))

    def log_dropped(self, reason: str) -> None:
        """A record was not written; see `LOG_DROP_REASONS`."""
        self.log_drops.labels(reason if reason in LOG_DROP_REASONS else OTHER).inc()

    def log_write_error(self) -> None:
        """A write to the traffic log failed."""
        self.log_errors.inc()

    def _kind(self, kind: str) -> str:
        if kind in self._kinds:
            return kind
        if not _KIND_RE.fullmatch(kind):
            return OTHER
        with self._lock:
            if len(self._kinds) >= MAX_RECORD_KINDS + 1:  # + "other"
                return OTHER
            self._kinds.add(kind)
        return kind

    # ---- node ------------------------------------------------------------------------

    def set_node_up(self, up: bool) -> None:
        """The node runs (True) or not (False)."""
        self.node_up.set(1 if up else 0)

    def set_log_queue(self, nbytes: int, stalled: bool, log_seq: int) -> None:
        """stdout's queued bytes, whether fail-closed flows are paused, the chain's head."""
        self.log_queue.set(nbytes)
        self.log_stalled.set(1 if stalled else 0)
        self.log_seq.set(log_seq)

    def set_control_connected(self, connected: bool) -> None:
        """The coordination server is reachable (True) or not (False)."""
        self.control_connected.set(1 if connected else 0)

    def set_netmap_version(self, version: int) -> None:
        """The netmap version now applied."""
        self.netmap_version.set(version)

    def node_start_failed(self, code: str) -> None:
        """A start attempt failed; `code` is a tsnet2.proto.ErrorCode value (bounded)."""
        self.node_start_failures.labels(code if code in _ERROR_CODES else OTHER).inc()

    def node_lost(self) -> None:
        """A running node died (its device went away) and was taken down."""
        self.node_losses.inc()

    def set_sessions(self, n: int) -> None:
        """Control connections open now."""
        self.sessions.set(n)

    def connection_refused(self, reason: str) -> None:
        """A socket connection was refused; see `CONN_REFUSE_REASONS`."""
        self.connections_refused.labels(
            reason if reason in CONN_REFUSE_REASONS else OTHER).inc()

    def egress_request(self, proto: str, result: str) -> None:
        """An egress proxy request ended (`EGRESS_PROTOS`, `EGRESS_RESULTS`)."""
        self.egress_requests.labels(proto if proto in EGRESS_PROTOS else "unknown",
                                    result if result in EGRESS_RESULTS else OTHER).inc()

    def dns_query(self, transport: str, result: str) -> None:
        """The DNS responder answered (or dropped) a query (`DNS_RESULTS`)."""
        self.dns_queries.labels(transport if transport in DNS_TRANSPORTS else "udp",
                                result if result in DNS_RESULTS else OTHER).inc()

    def udp_datagram(self, stream: Stream) -> None:
        """One UDP datagram was relayed in `stream` ("app->peer" or "peer->app")."""
        if stream not in STREAMS:
            raise ValueError(f'stream must be "app->peer" or "peer->app", got {stream!r}')
        self.udp_datagrams.labels(stream).inc()

    def udp_dropped(self, reason: str) -> None:
        """The daemon dropped a UDP datagram; see `UDP_DROP_REASONS`."""
        self.udp_drops.labels(reason if reason in UDP_DROP_REASONS else OTHER).inc()

    def tls_cert_renewal(self, result: str, not_after: float | None = None) -> None:
        """A certificate request ended: "ok" (``not_after``: the new expiry, unix seconds)
        or "error"."""
        if result not in TLS_RENEWAL_RESULTS:
            raise ValueError(f'result must be "ok" or "error", got {result!r}')
        self.tls_cert_renewals.labels(result).inc()
        if not_after is not None:
            self.tls_cert_expiry.set(not_after)

    def set_tls_cert_expiry(self, not_after: float) -> None:
        """The certificate in use expires at ``not_after`` (unix seconds; 0: none)."""
        self.tls_cert_expiry.set(not_after)

    # ---- exposition ------------------------------------------------------------------

    def render(self) -> bytes:
        """Every metric in the Prometheus text exposition format (version 0.0.4)."""
        if self.before_scrape is not None:
            try:
                self.before_scrape()
            except Exception:
                log.warning("before_scrape hook failed; serving the last values", exc_info=True)
        return self.registry.render()


def _direction(direction: str) -> FlowDirection:
    if direction == "in":
        return "in"
    if direction == "out":
        return "out"
    raise ValueError(f'flow direction must be "in" or "out", got {direction!r}')


__all__ = [
    "LOG_DROP_REASONS",
    "REFUSE_REASONS",
    "SLOT_DROP_REASONS",
    "UDP_DROP_REASONS",
    "Metrics",
    "PeerCollector",
    "PeerSample",
    "peer_samples",
]
