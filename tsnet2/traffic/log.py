"""The JSONL traffic-log writer: chained records to a file, to standard output, or both.

Besides writing, the writer keeps the log *complete* and *checkable*:

- every record is chained (``log_seq``/``log_hash``, :mod:`tsnet2.traffic.chain`) and a
  signed ``checkpoint`` record is written at start, periodically (:meth:`TrafficLog.checkpoint`)
  and at close; with a ``state_dir`` the chain continues across restarts;
- a file sink is written in the caller's thread (one ``os.write`` per record, size-based
  rotation that never splits a record); a stream sink (stdout, a pipe) goes through a
  bounded queue and a writer thread (:mod:`tsnet2.traffic.sinks`), so a stalled reader never
  blocks the caller;
- an explicit policy (``fail-closed`` or ``continue``) for a log that cannot be written or
  is stalled, with a ``gap`` record once writing works again;
- a per-flow payload cap that keeps byte accounting exact, and ``close`` records for flows
  still open when the log is closed -- or, after a crash, when it is next opened.

See docs/traffic-log.md.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

from tsnet2.proto.ids import new_id
from tsnet2.traffic.chain import ZERO_HASH, link
from tsnet2.traffic.journal import COUNT_INTERVAL, FlowJournal, Orphan
from tsnet2.traffic.records import (
    CUT_ERROR,
    DEFAULT_CHUNK_SIZE,
    DataDir,
    FlowDir,
    FlowVia,
    RejectReason,
    checkpoint_record,
    chunks,
    close_record,
    data_record,
    open_record,
    reject_record,
)
from tsnet2.traffic.signing import (
    ChainState,
    SigningKey,
    load_chain_state,
    load_or_create_signing_key,
    save_chain_state,
)
from tsnet2.traffic.sinks import FileSink, Result, StreamSink, errno_reason

__all__ = ["ErrorPolicy", "Flow", "LogMode", "TrafficLog", "TrafficLogError"]

log = logging.getLogger("tsnet2.traffic")

LogMode = Literal["payload", "metadata", "off"]
"""``payload``: every byte (prototype behaviour); ``metadata``: data records without
``payload_b64``; ``off``: nothing is written (flows still count bytes)."""

ErrorPolicy = Literal["fail-closed", "continue"]
"""What a log that cannot keep up does. ``fail-closed``: a failed write raises
:class:`TrafficLogError` (the daemon refuses new flows and cuts flows whose bytes cannot be
logged), and a stalled stream sink refuses new flows and pauses established ones;
``continue``: lost records are counted and reported by a ``gap`` record."""

_MODES = ("payload", "metadata", "off")
_POLICIES = ("fail-closed", "continue")
_DATA_DIRS = ("app->peer", "peer->app")
_FLOW_DIRS = ("in", "out")
_JOURNAL_INTERVAL_NS = int(COUNT_INTERVAL * 1e9)
_CHAIN_OVERHEAD = 110  # bytes the chain fields add to a line, at most
_RESERVE = 1 << 20  # log_seq numbers reserved in the chain state at a time
DEFAULT_BUFFER = 4 << 20
"""Bytes of records a stream sink (stdout) may queue in memory while its reader is slow."""
CLOSE_DRAIN_TIMEOUT = 5.0
"""Seconds :meth:`TrafficLog.close` waits for a slow stdout reader to take the last records."""


class TrafficLogError(Exception):
    """The traffic log could not be opened or written (disk full, stalled reader, closed...).

    ``errno`` is the OS error number when there is one (``ENOSPC``, ``EROFS``, ``EIO``...).
    """

    def __init__(self, message: str, errno: int | None = None) -> None:
        """Create the error with a message that names the path and the cause."""
        super().__init__(message)
        self.errno = errno


@dataclass
class _Outcome:
    """What one emitted record did; hooks, log lines and errors are handled after unlocking."""

    kind: str = ""
    nbytes: int = 0
    accepted: bool = False  # at least one sink wrote or queued it
    file_result: Result | None = None  # what the file sink did with it
    error: OSError | None = None  # the file sink's write failed
    lost_stream: str = ""  # why the stream sink lost it (queue_full, not_open)
    stalled: bool = False  # fail-closed: the stream sink would not take it (full)
    unwritable: bool = False  # fail-closed: the stream sink is failing (its reader is gone)
    stall_started: bool = False  # this record started a stall of the stream sink


RESTART_ERROR = "daemon restart"
"""How the ``close`` record of a flow left open by a crashed daemon starts."""


def _restart_close(orphan: Orphan) -> bytes:
    """The ``close`` record a restarted daemon writes for a flow its predecessor left open."""
    now = time.time_ns()
    return close_record(
        conn_id=orphan.conn_id,
        bytes_in=orphan.bytes_in,
        bytes_out=orphan.bytes_out,
        duration_ms=max(0, now - orphan.opened_ns) // 1_000_000,
        error=f"{RESTART_ERROR}: tsnet2d (pid {orphan.pid}) stopped without closing this "
        "flow; byte counts as journaled, at most 1 s behind its data records",
        t=now,
    )


def _paths(path: str | Sequence[str] | None) -> tuple[str | None, bool]:
    """Split the configured sinks into (file path or None, stdout?)."""
    if path is None:
        return None, False
    items = [path] if isinstance(path, str) else list(path)
    files = [p for p in items if p != "-"]
    stdout = len(files) < len(items)
    if len(items) - len(files) > 1 or len(files) > 1:
        raise ValueError("a traffic log has at most one file and one '-' (stdout); got "
                         + ", ".join(map(repr, items)))
    if not items:
        return None, False
    return (files[0] if files else None), stdout


class TrafficLog:
    """Append-only JSONL traffic log with a hash chain and signed checkpoints.

    ``path``: a file (created with mode 0600; an existing file keeps its mode), ``"-"``
    for standard output, a list with one of each for both, or ``None`` to discard.

    - A file is written in the caller's thread, one ``os.write`` per record (continued
      only after a short write) under a lock, so lines never interleave and are visible at
      once; there is no fsync. ``max_bytes``/``keep``: rotate before a record would make
      the file larger than ``max_bytes`` (``path`` -> ``path.1`` -> ... -> ``path.<keep>``,
      the oldest deleted); a record is never split.
    - Standard output, when it is a pipe, socket or terminal, gets a writer thread and a
      queue of at most ``buffer`` bytes (a regular file on stdout is written like a file).
    - ``payload_cap``: bytes of payload logged per flow and direction; later data records
      carry ``"truncated":true`` and ``len``/``seq`` but no payload.
    - ``on_error``: the :data:`ErrorPolicy`.
    - ``journal``: a file (in the daemon's state directory) where the flows opened and not
      yet closed are kept (:mod:`tsnet2.traffic.journal`). :meth:`open` writes a ``close``
      record, with :data:`RESTART_ERROR`, for every flow the previous process left open
      (it crashed), so every ``open`` has exactly one ``close`` across restarts.
    - ``state_dir``: where the checkpoint signing key (``traffic-log.key``) and the chain
      state (``traffic-chain.json``) live, so the chain continues across restarts. Without
      it, ``signing_key`` (or a new random key) signs and each open starts a new chain.

    Hooks (called outside the lock): ``on_record(kind, nbytes)`` once per record accepted
    by a sink; ``on_drop(kind, reason)`` per record a sink lost (``reason``: an errno name
    such as ``ENOSPC``, ``queue_full``, ``closed`` or ``not_open``);
    ``on_pressure(stalled)`` when a fail-closed stdout queue starts or stops refusing new
    flows (from the writer thread or the caller's: hop to your event loop).
    """

    def __init__(
        self,
        path: str | Sequence[str] | None,
        mode: LogMode = "payload",
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        *,
        max_bytes: int | None = None,
        keep: int = 5,
        payload_cap: int | None = None,
        on_error: ErrorPolicy = "fail-closed",
        journal: str | None = None,
        buffer: int = DEFAULT_BUFFER,
        state_dir: str | os.PathLike[str] | None = None,
        signing_key: SigningKey | None = None,
        stdout_fd: int = 1,
    ) -> None:
        """Configure the log; nothing is opened until :meth:`open` (or ``with``).

        ``stdout_fd``: the descriptor ``"-"`` writes to (tests give a pipe).
        """
        if mode not in _MODES:
            raise ValueError(f"traffic log mode must be one of {', '.join(_MODES)}; got {mode!r}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if max_bytes is not None and max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1 (or None for no rotation), got {max_bytes}")
        if keep < 0:
            raise ValueError(f"keep must be >= 0, got {keep}")
        if payload_cap is not None and payload_cap < 0:
            raise ValueError(f"payload_cap must be >= 0 (or None for no cap), got {payload_cap}")
        if on_error not in _POLICIES:
            raise ValueError(f"on_error must be one of {', '.join(_POLICIES)}; got {on_error!r}")
        if buffer < 64 << 10:
            raise ValueError(f"buffer must be >= 65536 bytes, got {buffer}")
        self._file_path, self._stdout = _paths(path)
        self.path = " and ".join(p for p in (self._file_path, "-" if self._stdout else None)
                                 if p) or None
        """The sinks, for messages: a path, ``-``, ``<path> and -``, or None."""
        self.mode: LogMode = mode
        self.chunk_size = chunk_size
        self.max_bytes = max_bytes
        self.keep = keep
        self.payload_cap = payload_cap
        self.on_error: ErrorPolicy = on_error
        self.buffer = buffer
        self._stdout_fd = stdout_fd
        self.on_record: Callable[[str, int], None] | None = None
        self.on_drop: Callable[[str, str], None] | None = None
        self.on_pressure: Callable[[bool], None] | None = None
        self.node: str | None = None
        """The node's name, written into checkpoints once set."""
        self.dropped = 0
        """Records lost since the log was created (every sink, every policy)."""
        self.refused = 0
        """Records refused under ``fail-closed`` because stdout's queue was full."""
        self._file: FileSink | None = None
        self._stream: StreamSink | None = None
        self._opened = False
        self._closing = False
        self._closed = False
        self._flows: dict[str, Flow] = {}
        self._journal = FlowJournal(journal) if journal and self.writes_records else None
        self._state_dir = Path(state_dir) if state_dir is not None else None
        self._signer = signing_key
        self._seq = 0
        self._prev = ZERO_HASH
        self._reserved = 0
        self._since_checkpoint = 0
        self._checkpoint_state: ChainState | None = None
        self.reconciled = 0
        """Flows of a crashed predecessor closed by :meth:`open`."""
        self._lock = threading.Lock()
        self._state_lock = threading.Lock()

    # ---- state ---------------------------------------------------------------------------

    @property
    def writes_records(self) -> bool:
        """True when records reach a file or stdout (not ``off``, not discarding)."""
        return self.mode != "off" and self.path is not None

    @property
    def healthy(self) -> bool:
        """False from a failed write until a write succeeds again (see :meth:`probe`).

        Health is learned from writes: an idle log stays healthy until a write fails.
        """
        return all(s.healthy for s in self._sinks())

    @property
    def stalled(self) -> bool:
        """``fail-closed`` and stdout's reader is behind: new flows are refused and
        established flows should pause (see ``on_pressure``) until it catches up."""
        return self._stream is not None and self._stream.stalled

    @property
    def queued_bytes(self) -> int:
        """Bytes of records waiting for stdout's reader."""
        return self._stream.queued if self._stream is not None else 0

    @property
    def rotations(self) -> int:
        """Completed rotations of the file."""
        return self._file.rotations if self._file is not None else 0

    @property
    def log_seq(self) -> int:
        """The ``log_seq`` of the last record (0 before the first)."""
        return self._seq

    @property
    def active_flows(self) -> int:
        """Flows opened and not yet closed."""
        return len(self._flows)

    def _sinks(self) -> list[FileSink | StreamSink]:
        return [s for s in (self._file, self._stream) if s is not None]

    def check_writable(self) -> None:
        """Raise :class:`TrafficLogError` if a new flow must be refused now.

        That is: the log is closed, or the policy is ``fail-closed`` and the log is
        unhealthy even after one :meth:`probe`, or stdout's reader is behind. Call it
        before dialling a peer or handing an inbound flow to the app; :meth:`open_flow`
        applies the same policy by itself.
        """
        if self._closing or self._closed:
            raise TrafficLogError(f"traffic log {self.path} is closed")
        if self.on_error == "continue":
            return
        stream = self._stream
        if stream is not None and stream.stalled:
            raise TrafficLogError(
                f"traffic log stdout is stalled: {stream.queued} bytes of records wait "
                "for its reader (the container runtime or log collector); refusing new flows "
                "until it catches up")
        if self.healthy or self.probe():
            return
        bad = next(s for s in self._sinks() if not s.healthy)
        raise TrafficLogError(
            f"traffic log {self.path} cannot be written ({bad.label}: {bad.gap_error}); "
            "refusing new flows until it can",
            bad.last_errno,
        )

    def probe(self) -> bool:
        """Try to recover; return :attr:`healthy`.

        When a sink lost records since its last successful write, this writes the ``gap``
        record that reports them (stdout: asks its writer to). When nothing is pending it
        does no I/O. Never raises; cheap enough to call every second and before every new
        flow.
        """
        if not self.writes_records:
            return True
        result = None
        with self._lock:
            if self._file is not None:
                result = self._file.probe()
        if self._stream is not None and not self._stream.healthy:
            self._stream.kick()
        if result is not None:
            self._report_file(result, "gap")
        return self.healthy

    # ---- open / close --------------------------------------------------------------------

    def open(self) -> None:
        """Open the sinks and start the chain. Idempotent; raises :class:`TrafficLogError`.

        Writes the ``start`` checkpoint first, then a ``close`` record for each flow a
        crashed predecessor left open (``journal``).
        """
        with self._lock:
            if self._closed or self._closing:
                raise TrafficLogError("traffic log is closed; create a new TrafficLog")
            if self._opened:
                return
            if not self.writes_records:
                self._opened = True
                return
            self._open_sinks()
            try:
                start_state = self._start_chain()
            except Exception:
                self._close_sinks(0)
                raise
            self._opened = True
        outcome = self._emit_checkpoint("start", start_state)
        orphans = self._journal.recover() if self._journal is not None else []
        for o in orphans:
            with self._lock:
                out = self._emit("close", _restart_close(o), always=True)
            if out.accepted:
                self.reconciled += 1
            log.warning("traffic log: flow %s was left open by a daemon that stopped without "
                        "closing it (pid %d): close record %s", o.conn_id, o.pid,
                        "written" if out.accepted else "lost")
            self._after(out, raise_errors=False)
        if self._journal is not None:
            self._journal.start()
        if not outcome.accepted:
            log.error("traffic log %s: the start checkpoint could not be written", self.path)

    def _open_sinks(self) -> None:
        named = self._file_path is not None and self._stdout
        try:
            if self._file_path is not None:
                self._file = FileSink(self._file_path, max_bytes=self.max_bytes,
                                      keep=self.keep, named=named)
                self._file.open()
            if self._stdout:
                st = os.fstat(self._stdout_fd)
                if stat.S_ISREG(st.st_mode):  # `tsnet2d > file`: written like a file
                    if self._file is not None:
                        raise TrafficLogError("standard output is a regular file: give the "
                                              "traffic log only one file")
                    self._file = FileSink("-", fd=self._stdout_fd, label="stdout")
                else:
                    self._stream = StreamSink(self._stdout_fd, limit=self.buffer,
                                              fail_closed=self.on_error == "fail-closed",
                                              named=named)
                    self._stream.on_lost = self._stream_lost
                    self._stream.on_pressure = self._stream_pressure
                    self._stream.on_health = self._stream_health
                    self._stream.start()
        except OSError as e:
            self._close_sinks(0)
            raise TrafficLogError(
                f"cannot open traffic log {self._file_path or '-'}: {e.strerror}", e.errno
            ) from e

    def _close_sinks(self, drain: float) -> int:
        left = 0
        if self._stream is not None:
            left = self._stream.close(drain)
        if self._file is not None:
            self._file.close()
        return left

    def _start_chain(self) -> ChainState:
        """Load the key and chain state; return the state the start checkpoint names."""
        prev = ChainState()
        unclean = False
        if self._state_dir is not None:
            try:
                if self._signer is None:
                    self._signer = load_or_create_signing_key(self._state_dir)
                saved = load_chain_state(self._state_dir)
            except (OSError, ValueError) as exc:
                raise TrafficLogError(f"traffic log chain state in {self._state_dir}: {exc}",
                                      getattr(exc, "errno", None)) from exc
            if saved is not None:
                prev = saved
                if saved.key and saved.key != self._signer.public:
                    log.warning("traffic log: the signing key changed (was %s); checkpoints "
                                "from now on verify with %s", saved.key, self._signer.public)
                unclean = not saved.clean
        elif self._signer is None:
            self._signer = SigningKey.generate()
        # After a clean stop the chain goes on from its last record; after a crash, from
        # the last checkpoint, past every number the crashed run may have used.
        self._seq = prev.seq if not unclean else prev.reserved - 1
        self._prev = bytes.fromhex(prev.hash)
        # Numbers this run may use before it must raise (and persist) the reservation: the
        # start checkpoint's state carries it, so no record waits for the file.
        self._reserved = self._seq + 1 + _RESERVE
        prev.clean = not unclean
        return prev

    def close(self) -> None:
        """Close the log. Idempotent; never closes stdout.

        Flows still open get their ``close`` record first, with ``error`` set to
        :data:`~tsnet2.traffic.records.CUT_ERROR` and their read byte counts; close your
        flows before (with delivered counts) to record more precise totals. Then a
        ``close`` checkpoint ends the chain, and stdout's writer gets up to
        :data:`CLOSE_DRAIN_TIMEOUT` seconds to hand the rest to a slow reader.
        """
        with self._lock:
            if self._closed:
                return
            self._closing = True
            flows = list(self._flows.values())
        for flow in flows:
            try:
                flow.close(cut=True)
            except TrafficLogError as exc:
                log.warning("traffic log: close record of cut flow %s lost: %s", flow.conn_id, exc)
        last: ChainState | None = None
        if self._opened and self.writes_records:
            out = self._emit_checkpoint("close", None)
            last = self._checkpoint_state if out.accepted else None
        with self._lock:
            self._closed = True
            if self._journal is not None:
                self._journal.close()
        left = self._close_sinks(CLOSE_DRAIN_TIMEOUT)
        if last is not None and self._state_dir is not None:
            last.clean = left == 0 and (self._file is None or self._file.healthy)
            self._persist(last)
        if left:
            log.error("traffic log: %d records never reached stdout: its reader did not take "
                      "them within %.0fs of shutdown", left, CLOSE_DRAIN_TIMEOUT)
        for sink in self._sinks():
            if sink.gap:
                log.error("traffic log %s closed with %d records that could not be written (%s)",
                          sink.label, sum(sink.gap.values()), sink.gap_error)

    def __enter__(self) -> Self:
        """Open the log."""
        self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the log."""
        self.close()

    # ---- checkpoints ----------------------------------------------------------------------

    def checkpoint(self) -> bool:
        """Write a ``periodic`` checkpoint if records were written since the last one.

        Returns True when one was written. The daemon calls it every few seconds; records
        after the last checkpoint are an *unsigned tail* until the next one.
        """
        if not self.writes_records or not self._opened or self._closing or self._closed:
            return False
        if not self._since_checkpoint:
            return False
        return self._emit_checkpoint("periodic", None).accepted

    def _emit_checkpoint(self, reason: str, start: ChainState | None) -> _Outcome:
        signer = self._signer
        if signer is None:
            raise TrafficLogError(f"traffic log {self.path} has no signing key: open() it "
                                  "before writing checkpoints")
        with self._lock:
            line = checkpoint_record(
                reason=reason, key=signer.public,
                head_seq=start.seq if start is not None else self._seq,
                head_hash=start.hash if start is not None else self._prev.hex(),
                seq=self._seq + 1, t=time.time_ns(), sign=signer.sign,
                node=self.node,
                prev_seq=start.seq if start is not None else None,
                prev_hash=start.hash if start is not None else None,
                unclean=start is not None and not start.clean)
            out = self._emit("checkpoint", line, always=True, reserve=False)
            self._since_checkpoint = 0
            state = ChainState(key=signer.public, seq=self._seq, hash=self._prev.hex(),
                               clean=False, reserved=self._reserved)
            self._checkpoint_state = state
        if reason != "close":
            self._persist(state)
        self._after(out, raise_errors=False)
        return out

    def _persist(self, state: ChainState) -> None:
        if self._state_dir is None:
            return
        with self._state_lock:
            try:
                save_chain_state(self._state_dir, state)
            except OSError as exc:
                log.error("traffic log: cannot save the chain state in %s (%s); a restart "
                          "will start a new chain segment", self._state_dir, exc)

    # ---- records -------------------------------------------------------------------------

    def write_record(self, kind: str, line: bytes) -> None:
        """Chain and write one complete line (already ending in ``\\n``). Used by :class:`Flow`.

        Raises :class:`TrafficLogError` when the log is not open or closed, and, under
        the ``fail-closed`` policy, when the write fails or stdout's queue is full (under
        ``continue`` the record is counted in :attr:`dropped` and reported to ``on_drop``).
        """
        if not self.writes_records:
            return
        with self._lock:
            self._check_open()
            out = self._emit(kind, line)
        self._after(out, raise_errors=self.on_error == "fail-closed")

    def open_flow(
        self,
        *,
        direction: FlowDir,
        local: str,
        remote: str,
        whois: Mapping[str, Any] | None,
        listener_id: str | None = None,
        proto: str = "tcp",
        conn_id: str | None = None,
        via: FlowVia | None = None,
        target: str | None = None,
        tls: Mapping[str, Any] | None = None,
    ) -> Flow:
        """Write the ``open`` record of a new flow and return it.

        ``proto="udp"``: a UDP flow (count its datagrams with :meth:`Flow.datagram`; its
        ``close`` record carries ``proto`` and the datagram counts). ``tls``: the session
        the daemon terminated or originated (``TLSInfo.to_json()``).

        Raises :class:`TrafficLogError` when the log is closed or not open, or when the
        write fails (or stdout is stalled) under ``fail-closed`` (the flow then does not
        exist: refuse it and :meth:`reject` it with reason ``log_unavailable``).
        """
        if direction not in _FLOW_DIRS:
            raise ValueError(f'flow direction must be "in" or "out", got {direction!r}')
        flow = Flow(self, conn_id or new_id(), proto=proto)
        out = _Outcome()
        with self._lock:
            if self._closing or self._closed:
                raise TrafficLogError(f"traffic log {self.path} is closed")
            opened_ns = time.time_ns()
            if self.writes_records:
                self._check_open()
                if self.on_error == "fail-closed" and self.stalled:
                    raise TrafficLogError(f"traffic log stdout is stalled ({self.queued_bytes} "
                                          "bytes wait for its reader); flow refused")
                line = open_record(
                    conn_id=flow.conn_id,
                    direction=direction,
                    local=local,
                    remote=remote,
                    whois=whois,
                    listener_id=listener_id,
                    proto=proto,
                    via=via,
                    target=target,
                    tls=tls,
                    t=opened_ns,
                )
                out = self._emit("open", line)
            refused = self.on_error == "fail-closed" and (out.error is not None or out.stalled)
            if not refused:
                self._flows[flow.conn_id] = flow
                if self._journal is not None and out.accepted:
                    self._journal.opened(flow.conn_id, opened_ns)
        self._after(out, raise_errors=self.on_error == "fail-closed")
        return flow

    def reject(
        self,
        *,
        direction: FlowDir,
        remote: str,
        reason: RejectReason,
        local: str | None = None,
        error: str | None = None,
        whois: Mapping[str, Any] | None = None,
        listener_id: str | None = None,
        proto: str = "tcp",
        conn_id: str | None = None,
        via: FlowVia | None = None,
        target: str | None = None,
    ) -> str:
        """Write a ``reject`` record for a flow that never opened; return its ``conn_id``.

        Never raises :class:`TrafficLogError` (the flow is refused anyway): a record that
        cannot be written is counted in :attr:`dropped` and reported to ``on_drop``
        whatever the policy. Raises :class:`ValueError` for an unknown reason.
        """
        cid = conn_id or new_id()
        line = reject_record(
            conn_id=cid,
            direction=direction,
            remote=remote,
            reason=reason,
            local=local,
            error=error,
            whois=whois,
            listener_id=listener_id,
            proto=proto,
            via=via,
            target=target,
            t=time.time_ns(),
        )
        if not self.writes_records:
            return cid
        with self._lock:
            if not self._opened or self._closed:
                self.dropped += 1
                state = "closed" if self._closed or self._closing else "not_open"
                out = None
            else:
                out = self._emit("reject", line, lossy=True)
        if out is None:
            self._notify_drop("reject", state)
        else:
            self._after(out, raise_errors=False)
        return cid

    # ---- internals -----------------------------------------------------------------------

    def _check_open(self) -> None:
        if not self._opened or self._closed:
            state = "closed" if self._closed or self._closing else "not open"
            raise TrafficLogError(f"traffic log {self.path} is {state}")

    def _emit(self, kind: str, line: bytes, *, always: bool = False, lossy: bool = False,
              reserve: bool = True) -> _Outcome:
        """Chain ``line`` and hand it to every sink (the lock is held).

        ``always``: stdout queues it even past its limit (close, checkpoint); ``lossy``: a
        full fail-closed stdout queue loses it instead of refusing it (reject). Without
        either, a fail-closed stdout that cannot take the record refuses it before it gets
        a ``log_seq`` (``_Outcome.stalled``).
        """
        out = _Outcome(kind=kind)
        stream = self._stream
        if (stream is not None and self.on_error == "fail-closed" and not always and not lossy
                and not stream.admits(len(line) + _CHAIN_OVERHEAD)):
            if stream.healthy:
                out.stalled = True
            else:
                out.unwritable = True
            self.refused += 1
            return out
        self._seq += 1
        line, self._prev = link(line, self._prev, self._seq)
        self._since_checkpoint += 1
        if reserve and self._seq >= self._reserved and self._state_dir is not None:
            # Before this record exists anywhere: a crash from here on restarts past it.
            self._reserved = self._seq + _RESERVE
            last = self._checkpoint_state
            if last is None:
                raise AssertionError("unreachable: the start checkpoint sets the chain state")
            self._checkpoint_state = dataclasses.replace(last, reserved=self._reserved)
            self._persist(self._checkpoint_state)
        out.nbytes = len(line)
        if self._file is not None:
            r = out.file_result = self._file.write(kind, self._seq, line)
            if r.error is None:
                out.accepted = True
            else:
                out.error = r.error
                self.dropped += 1
        if stream is not None:
            lost, out.stall_started = stream.offer(kind, self._seq, line, always=always)
            if lost:
                out.lost_stream = lost
                self.dropped += 1
            else:
                out.accepted = True
        return out

    def _after(self, out: _Outcome, *, raise_errors: bool) -> None:
        """Hooks and log lines for an emitted record, then the policy's error."""
        if out.file_result is not None:
            self._report_file(out.file_result, out.kind)
        hook = self.on_record
        if hook is not None and out.accepted:
            hook(out.kind, out.nbytes)
        if out.lost_stream:
            self._notify_drop(out.kind, out.lost_stream)
        if out.stall_started:
            self._stream_pressure(True)
        if not raise_errors:
            return
        if out.unwritable:
            raise self._stream_error("; refusing flows until it can")
        if out.stalled:
            raise TrafficLogError(
                f"traffic log stdout is stalled: {self.queued_bytes} bytes of records wait for "
                "its reader; this record was refused (fail-closed)")
        if out.error is not None:
            exc = out.error
            raise TrafficLogError(
                f"cannot write traffic log {self._file_path}: {exc.strerror or exc}", exc.errno
            ) from exc
        if out.lost_stream and self.on_error == "fail-closed":
            raise self._stream_error("")

    def _stream_error(self, then: str) -> TrafficLogError:
        """stdout cannot take records: the error to raise (``then``: what happens now)."""
        stream = self._stream
        if stream is None:
            raise AssertionError("unreachable: only the stdout sink refuses or loses records")
        return TrafficLogError(f"traffic log stdout cannot be written ({stream.gap_error}){then}",
                               stream.last_errno)

    def _report_file(self, r: Result, kind: str) -> None:
        sink = self._file
        if sink is None:
            raise AssertionError("unreachable: a file result comes from the file sink")
        if r.recovered:
            log.warning("traffic log %s is writable again; a gap record reports %d dropped "
                        "records", sink.path, r.recovered)
        exc = r.error
        if exc is None:
            return
        if r.became_unhealthy:
            action = ("refusing new flows" if self.on_error == "fail-closed"
                      else "counting dropped records")
            log.error("traffic log %s cannot be written (%s); policy %s: %s", sink.path,
                      sink.gap_error, self.on_error, action)
        if kind != "gap":
            self._notify_drop(kind, errno_reason(exc))

    def _stream_lost(self, kind: str, reason: str, n: int) -> None:
        with self._lock:
            self.dropped += n
        for _ in range(n):
            self._notify_drop(kind, reason)

    def _stream_pressure(self, stalled: bool) -> None:
        if stalled:
            log.error("traffic log stdout: %d bytes of records wait for its reader; refusing "
                      "new flows and pausing flows until it catches up (fail-closed)",
                      self.queued_bytes)
        else:
            log.warning("traffic log stdout caught up; flows resume")
        hook = self.on_pressure
        if hook is not None:
            hook(stalled)

    def _stream_health(self, healthy: bool, error: str, recovered: int) -> None:
        if recovered:
            log.warning("traffic log stdout is writable again; a gap record reports %d "
                        "dropped records", recovered)
        if not healthy:
            log.error("traffic log stdout cannot be written (%s); policy %s", error,
                      self.on_error)

    def _notify_drop(self, kind: str, reason: str) -> None:
        hook = self.on_drop
        if hook is not None:
            hook(kind, reason)

    def _journal_counts(self, flow: Flow) -> None:
        """Journal ``flow``'s byte counts (:class:`Flow` calls it once a second at most)."""
        if self._journal is not None:
            with self._lock:
                self._journal.counted(flow.conn_id, flow.bytes_in, flow.bytes_out)

    def _write_close(self, flow: Flow, line: bytes | None) -> None:
        """Write ``flow``'s close record (when records are written) and forget the flow."""
        with self._lock:
            self._flows.pop(flow.conn_id, None)
            if self._journal is not None:
                self._journal.closed(flow.conn_id)
            if line is None:
                return
            self._check_open()
            out = self._emit("close", line, always=True)
        self._after(out, raise_errors=self.on_error == "fail-closed")


class Flow:
    """One logged connection: counts bytes and writes its ``data`` and ``close`` records.

    Safe to use from the two copy loops of a splice at once.
    """

    def __init__(self, log: TrafficLog, conn_id: str, proto: str = "tcp") -> None:
        """Create a flow; use :meth:`TrafficLog.open_flow` instead."""
        self._log = log
        self.conn_id = conn_id
        self.proto = proto
        """``tcp`` or ``udp`` (as in the ``open`` record)."""
        self.bytes_in = 0
        """Bytes read peer->app so far."""
        self.bytes_out = 0
        """Bytes read app->peer so far."""
        self.datagrams_in = 0
        """UDP datagrams peer->app so far (:meth:`datagram`)."""
        self.datagrams_out = 0
        """UDP datagrams app->peer so far (:meth:`datagram`)."""
        self._seq = {"app->peer": 0, "peer->app": 0}
        cap = log.payload_cap
        self._cap_left: dict[str, int | None] = {"app->peer": cap, "peer->app": cap}
        self.truncated = False
        """True once the payload cap left some bytes out of the log."""
        self._started_ns = time.monotonic_ns()
        self._journal_due_ns = self._started_ns + _JOURNAL_INTERVAL_NS
        self._closed = False
        self._lock = threading.Lock()

    @property
    def closed(self) -> bool:
        """True once :meth:`close` wrote (or tried to write) the close record."""
        return self._closed

    def data(self, direction: DataDir, data: bytes | bytearray | memoryview) -> None:
        """Count ``data`` and log it as chunks of at most ``chunk_size`` bytes.

        ``seq`` starts at 1 per direction and counts every record, written or dropped.
        Past the payload cap the chunks carry ``"truncated":true`` and no payload (a read
        that crosses the cap is split at it). Bytes are counted even when the write fails
        (they were read from the socket). Raises :class:`TrafficLogError` after
        :meth:`close`, and on a write failure under the ``fail-closed`` policy: then do
        not forward ``data``, cut the flow.
        """
        view = memoryview(data).cast("B")
        self._account(direction, view.nbytes, view)

    def datagram(self, direction: DataDir, data: bytes | bytearray | memoryview) -> None:
        """Count one UDP datagram and log it like :meth:`data` (one ``data`` record: a
        datagram is never larger than a chunk). Raises as :meth:`data` does."""
        view = memoryview(data).cast("B")
        self._account(direction, view.nbytes, view, datagram=True)

    def count(self, direction: DataDir, nbytes: int) -> None:
        """Like :meth:`data` for ``nbytes`` bytes relayed without being read into memory
        (zero-copy): the same counts and the same ``data`` records (``len``, ``seq``, no
        payload). Only for a log that records no payload (modes ``metadata`` and ``off``):
        raises ValueError in ``payload`` mode, where the bytes themselves must be logged.
        """
        if self._log.mode == "payload" and self._log.writes_records:
            raise ValueError("traffic log mode payload logs the bytes: use Flow.data(), "
                             "not Flow.count()")
        if nbytes < 0:
            raise ValueError(f"byte count must be >= 0, got {nbytes}")
        self._account(direction, nbytes, None)

    def _account(self, direction: DataDir, n: int, view: memoryview | None, *,
                 datagram: bool = False) -> None:
        """Count ``n`` bytes read in ``direction`` and write their ``data`` records; the
        payload comes from ``view`` (None: no payload, lengths only). ``datagram``: the
        bytes are one UDP datagram (counted; an empty one still gets its record)."""
        if direction not in _DATA_DIRS:
            raise ValueError(
                f'data direction must be "app->peer" or "peer->app", got {direction!r}'
            )
        log = self._log
        with self._lock:
            if self._closed:
                raise TrafficLogError(f"flow {self.conn_id} is closed")
            if direction == "peer->app":
                self.bytes_in += n
                self.datagrams_in += datagram
            else:
                self.bytes_out += n
                self.datagrams_out += datagram
            if not log.writes_records:
                return
            if n == 0:
                if datagram:  # an empty datagram is still a datagram: one record of len 0
                    self._seq[direction] += 1
                    log.write_record("data", data_record(
                        conn_id=self.conn_id, direction=direction, seq=self._seq[direction],
                        data=b"" if log.mode == "payload" else 0, t=time.time_ns(),
                        include_payload=log.mode == "payload"))
                return
            size = log.chunk_size
            if view is None or log.mode != "payload":
                for start in range(0, n, size):  # lengths only
                    self._seq[direction] += 1
                    log.write_record("data", data_record(
                        conn_id=self.conn_id, direction=direction, seq=self._seq[direction],
                        data=min(size, n - start), t=time.time_ns(), include_payload=False))
            else:
                full, rest = view, view[n:]
                left = self._cap_left[direction]
                if left is not None:
                    full, rest = view[:left], view[left:]
                    self._cap_left[direction] = max(0, left - n)
                    if rest.nbytes:
                        self.truncated = True
                for part, payload in ((full, True), (rest, False)):
                    for chunk in chunks(part, size):
                        self._seq[direction] += 1
                        log.write_record("data", data_record(
                            conn_id=self.conn_id, direction=direction,
                            seq=self._seq[direction], data=chunk, t=time.time_ns(),
                            include_payload=payload, truncated=not payload))
            if log._journal is not None:  # the counts a restart would report, once a second
                now = time.monotonic_ns()
                if now >= self._journal_due_ns:
                    self._journal_due_ns = now + _JOURNAL_INTERVAL_NS
                    log._journal_counts(self)

    def close(
        self,
        error: str | None = None,
        *,
        bytes_in: int | None = None,
        bytes_out: int | None = None,
        cut: bool = False,
    ) -> None:
        """Write the ``close`` record exactly once (later calls do nothing).

        ``bytes_in``/``bytes_out``: the bytes actually *delivered* (written to the app /
        the peer); by default the bytes read (:attr:`bytes_in`/:attr:`bytes_out`). A
        delivered count cannot exceed the read count (:class:`ValueError`, nothing
        written). ``cut=True``: the daemon ended the flow because it is shutting down;
        ``error`` defaults to :data:`~tsnet2.traffic.records.CUT_ERROR`. ``duration_ms``
        is whole milliseconds since the flow was opened (monotonic clock). Raises
        :class:`TrafficLogError` when the write fails under ``fail-closed`` (the flow is
        closed all the same).
        """
        with self._lock:
            if self._closed:
                return
            total_in = self.bytes_in if bytes_in is None else bytes_in
            total_out = self.bytes_out if bytes_out is None else bytes_out
            for name, value, read in (
                ("bytes_in", total_in, self.bytes_in),
                ("bytes_out", total_out, self.bytes_out),
            ):
                if not 0 <= value <= read:
                    raise ValueError(
                        f"flow {self.conn_id}: delivered {name}={value} must be between 0 "
                        f"and the {read} bytes read"
                    )
            if cut and not error:
                error = CUT_ERROR
            self._closed = True
            duration_ms = (time.monotonic_ns() - self._started_ns) // 1_000_000
            line = None
            if self._log.writes_records:
                udp = self.proto == "udp"
                line = close_record(
                    conn_id=self.conn_id,
                    bytes_in=total_in,
                    bytes_out=total_out,
                    duration_ms=duration_ms,
                    error=error,
                    proto="udp" if udp else None,
                    datagrams_in=self.datagrams_in if udp else None,
                    datagrams_out=self.datagrams_out if udp else None,
                    t=time.time_ns(),
                )
            self._log._write_close(self, line)
