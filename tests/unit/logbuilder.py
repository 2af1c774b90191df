"""A pure traffic-log writer for tests of ``tsnet2 log verify``: chained records, signed
checkpoints, clean and crashed restarts and lost records, as lines of text (no files, no
clock). It follows the writer's rules (tsnet2/traffic/log.py and chain.py): the first record
of a run is a ``start`` checkpoint; a clean restart continues from the ``close`` checkpoint;
a crashed one from the last checkpoint, past the numbers the crashed run had reserved."""

from __future__ import annotations

import hashlib

from tsnet2.traffic import chain, records
from tsnet2.traffic.signing import SigningKey

RESERVE = 100
"""log_seq numbers a run reserves at a time (the daemon reserves far more)."""


class LogBuilder:
    """Build a log run by run: ``start()``, records, ``periodic()``, ``stop()`` or
    ``crash()``, ``start()`` again. ``lines`` holds what was written."""

    def __init__(self, key: SigningKey | None = None, *, node: str | None = "a.ts.net.",
                 t0: int = 1_800_000_000_000_000_000) -> None:
        self.key = key or SigningKey.generate()
        self.node = node
        self.t = self.t0 = t0
        self.lines: list[str] = []
        self.seq = 0
        self.prev = chain.ZERO_HASH
        self.saved = (0, chain.ZERO_HASH.hex())  # the chain state file: its last checkpoint
        self.reserved = 1
        self.clean = True
        self.open: dict[str, tuple[int, int]] = {}  # conn_id -> (bytes_in, bytes_out)
        self.n = 0

    def tick(self) -> int:
        self.t += 1_000_000
        return self.t

    def emit(self, line: bytes, *, write: bool = True) -> int:
        """Chain ``line``; append it to :attr:`lines` unless ``write`` is false (a lost
        record). Returns its ``log_seq``."""
        self.seq += 1
        chained, self.prev = chain.link(line, self.prev, self.seq)
        if self.seq >= self.reserved:
            self.reserved = self.seq + RESERVE
        if write:
            self.lines.append(chained.decode())
        return self.seq

    def _checkpoint(self, reason: str, **start: object) -> int:
        head_seq, head_hash = (self.seq, self.prev.hex()) if not start else (
            start["prev_seq"], start["prev_hash"])
        line = records.checkpoint_record(
            reason=reason, key=self.key.public, head_seq=int(str(head_seq)),
            head_hash=str(head_hash), seq=self.seq + 1, t=self.tick(), sign=self.key.sign,
            node=self.node,
            **start)  # type: ignore[arg-type]
        seq = self.emit(line)
        self.saved = (seq, self.prev.hex())
        return seq

    def start(self) -> int:
        """The ``start`` checkpoint of a new run (and the closes of flows a crash left open)."""
        unclean = not self.clean
        prev_seq, prev_hash = (self.seq, self.prev.hex()) if self.clean else self.saved
        if unclean:
            self.seq = self.reserved - 1
        self.prev = bytes.fromhex(prev_hash)
        seq = self._checkpoint("start", prev_seq=prev_seq, prev_hash=prev_hash,
                               unclean=unclean)
        self.clean = False
        for cid, (bytes_in, bytes_out) in sorted(self.open.items()):
            self.emit(records.close_record(conn_id=cid, bytes_in=bytes_in, bytes_out=bytes_out,
                                           duration_ms=5, t=self.tick(),
                                           error="daemon restart: tsnet2d (pid 1) stopped"))
        self.open.clear()
        return seq

    def periodic(self) -> int:
        return self._checkpoint("periodic")

    def stop(self) -> int:
        """Close open flows as cut, then the ``close`` checkpoint."""
        for cid, (bytes_in, bytes_out) in sorted(self.open.items()):
            self.emit(records.close_record(conn_id=cid, bytes_in=bytes_in, bytes_out=bytes_out,
                                           duration_ms=5, t=self.tick(),
                                           error=records.CUT_ERROR))
        self.open.clear()
        seq = self._checkpoint("close")
        self.clean = True
        return seq

    def crash(self) -> None:
        """The daemon dies: nothing more is written; the state file keeps its checkpoint."""

    def flow(self, out: bytes = b"", inn: bytes = b"", *, chunk: int = 8, close: bool = True,
             conn_id: str | None = None) -> str:
        """One flow: open, data both ways in chunks, close (unless ``close`` is false)."""
        self.n += 1
        cid = conn_id or self._cid()
        self.emit(records.open_record(conn_id=cid, direction="out", local="100.64.0.1:1",
                                      remote="100.64.0.2:2", whois={"node": "b.ts.net."},
                                      t=self.tick()))
        for direction, data in (("app->peer", out), ("peer->app", inn)):
            for i, piece in enumerate(records.chunks(data, chunk), 1):
                self.emit(records.data_record(conn_id=cid, direction=direction,  # type: ignore[arg-type]
                                              seq=i, data=piece, t=self.tick()))
        if close:
            self.emit(records.close_record(conn_id=cid, bytes_in=len(inn), bytes_out=len(out),
                                           duration_ms=3, t=self.tick()))
        else:
            self.open[cid] = (len(inn), len(out))
        return cid

    def _cid(self) -> str:
        """A conn_id unique across builders (the daemon's are random)."""
        seed = f"{self.key.public} {self.t0}".encode()
        return hashlib.sha256(seed).hexdigest()[:8] + f"{self.n:08x}"

    def reject(self) -> None:
        self.n += 1
        self.emit(records.reject_record(conn_id=self._cid(), direction="in",
                                        remote="100.64.0.3:3", reason="no_listener",
                                        t=self.tick()))

    def gap(self, first: int, last: int, *, error: str = "write: no space left on device",
            dropped: dict[str, int] | None = None) -> None:
        """A ``gap`` line (not chained) declaring ``first``..``last`` lost."""
        line = records.gap_record(dropped=dropped or {"data": last - first + 1}, error=error,
                                  since=self.tick(), t=self.tick(), first_seq=first,
                                  last_seq=last)
        self.lines.append(line.decode())

    def seq_of(self, index: int) -> int:
        """The ``log_seq`` of ``lines[index]``."""
        import json

        return int(json.loads(self.lines[index])["log_seq"])


def simple_log(key: SigningKey | None = None, t0: int = 1_800_000_000_000_000_000) -> LogBuilder:
    """Two runs with a clean restart between: flows, a reject, periodic checkpoints."""
    b = LogBuilder(key, t0=t0)
    b.start()
    b.flow(b"hello world, this is a test", b"pong")
    b.reject()
    b.periodic()
    b.flow(b"x" * 20)
    b.periodic()
    b.flow(b"", b"yy")
    b.stop()
    b.start()
    b.flow(b"second run", b"ok")
    b.periodic()
    b.flow(b"abc")
    b.stop()
    return b
