"""The open-flow journal: which flows a traffic log has opened and not closed yet, kept in a
small file of the daemon's state directory, so that a daemon restarted after a crash (``kill
-9``, OOM kill, power loss of the container) writes the ``close`` records its predecessor
could not. It works whatever the log's sink is (a file, stdout, a pipe): the journal never
reads the log.

One JSON object per line, appended with one ``write`` each:

* ``{"k":"o","id":CONN_ID,"t":OPEN_NS,"pid":PID}`` -- a flow was opened (its ``open``
  record is written);
* ``{"k":"n","id":CONN_ID,"i":BYTES_IN,"o":BYTES_OUT}`` -- the bytes logged so far, written
  at most once a second per flow (so the counts a restart reports are at most a second
  behind the flow's ``data`` records);
* ``{"k":"c","id":CONN_ID}`` -- the flow's ``close`` record is written.

The file is rewritten with only the live flows when it grows past :data:`COMPACT_BYTES`.
A journal that cannot be written is switched off with one error in the log: it never stops
a flow. A torn last line (the crash hit a write) is ignored.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

log = logging.getLogger("tsnet2.traffic.journal")

COMPACT_BYTES = 1 << 20
"""Rewrite the journal with only the live flows when it grows past this size."""
MAX_READ_BYTES = 64 << 20
"""A journal larger than this (it is compacted at 1 MiB) is not read: its flows are lost."""
COUNT_INTERVAL = 1.0
"""Seconds between two byte-count lines of one flow."""


@dataclass
class Orphan:
    """A flow the previous daemon opened and never closed."""

    conn_id: str
    opened_ns: int
    bytes_in: int = 0
    bytes_out: int = 0
    pid: int = 0


def parse(data: bytes) -> list[Orphan]:
    """The flows of a journal's content that were opened and not closed, in opening order.
    Lines that are not journal entries (a torn last line) are skipped."""
    live: dict[str, Orphan] = {}
    for raw in data.split(b"\n"):
        try:
            entry = json.loads(raw)
        except ValueError:
            continue
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), str):
            continue
        kind, conn_id = entry.get("k"), entry["id"]
        if kind == "o" and isinstance(entry.get("t"), int):
            pid = entry.get("pid")
            live[conn_id] = Orphan(conn_id, entry["t"], pid=pid if isinstance(pid, int) else 0)
        elif kind == "n" and conn_id in live:
            i, o = entry.get("i"), entry.get("o")
            if isinstance(i, int) and isinstance(o, int) and i >= 0 and o >= 0:
                live[conn_id].bytes_in, live[conn_id].bytes_out = i, o
        elif kind == "c":
            live.pop(conn_id, None)
    return list(live.values())


def _line(entry: dict[str, object]) -> bytes:
    return json.dumps(entry, separators=(",", ":")).encode() + b"\n"


class FlowJournal:
    """The journal file at ``path`` (see the module docstring). Not thread-safe: the traffic
    log calls it under its own lock."""

    def __init__(self, path: str) -> None:
        """Remember the path; nothing is opened until :meth:`start`."""
        self.path = path
        self._fd: int | None = None
        self._size = 0
        self._live: dict[str, Orphan] = {}
        self._pid = os.getpid()

    def recover(self) -> list[Orphan]:
        """The flows the previous process left open (empty when there is no journal)."""
        try:
            with open(self.path, "rb") as fh:
                data = fh.read(MAX_READ_BYTES + 1)
        except FileNotFoundError:
            return []
        except OSError as exc:
            log.error("flow journal %s cannot be read (%s): flows a crashed daemon left "
                      "open stay without a close record", self.path, exc)
            return []
        if len(data) > MAX_READ_BYTES:
            log.error("flow journal %s is larger than %d bytes: not read", self.path,
                      MAX_READ_BYTES)
            return []
        return parse(data)

    def start(self) -> None:
        """Begin a fresh journal (the old one's orphans must have been closed by now)."""
        try:
            self._fd = self._create(b"")
        except OSError as exc:
            self._off(exc)

    def _create(self, content: bytes) -> int:
        """Write ``content`` to a new file and put it in place atomically; its fd."""
        tmp = f"{self.path}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            if content:
                os.write(fd, content)
            os.replace(tmp, self.path)
        except OSError:
            os.close(fd)
            raise
        os.close(fd)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        self._size = len(content)
        return fd

    def _off(self, exc: OSError) -> None:
        log.error("flow journal %s cannot be written (%s): switched off; a crash now leaves "
                  "open flows without a close record", self.path, exc)
        if self._fd is not None:
            os.close(self._fd)
        self._fd = None

    def _append(self, entry: dict[str, object]) -> None:
        fd = self._fd
        if fd is None:
            return
        line = _line(entry)
        try:
            if self._size + len(line) > COMPACT_BYTES:
                fd = self._compact(fd)
            os.write(fd, line)
            self._size += len(line)
        except OSError as exc:
            self._off(exc)

    def _compact(self, old: int) -> int:
        """Replace the journal (open as ``old``) by the live flows only; return the new
        descriptor (also :attr:`_fd`)."""
        content = b"".join(
            _line({"k": "o", "id": f.conn_id, "t": f.opened_ns, "pid": self._pid})
            + _line({"k": "n", "id": f.conn_id, "i": f.bytes_in, "o": f.bytes_out})
            for f in self._live.values())
        fd = self._create(content)
        os.close(old)
        self._fd = fd
        return fd

    def opened(self, conn_id: str, opened_ns: int) -> None:
        """A flow's ``open`` record is written."""
        self._live[conn_id] = Orphan(conn_id, opened_ns, pid=self._pid)
        self._append({"k": "o", "id": conn_id, "t": opened_ns, "pid": self._pid})

    def counted(self, conn_id: str, bytes_in: int, bytes_out: int) -> None:
        """The flow's bytes logged so far. The traffic log's flows call it at most every
        :data:`COUNT_INTERVAL` (the throttle lives with the flow, off the lock)."""
        flow = self._live.get(conn_id)
        if flow is None:
            return
        flow.bytes_in, flow.bytes_out = bytes_in, bytes_out
        self._append({"k": "n", "id": conn_id, "i": bytes_in, "o": bytes_out})

    def closed(self, conn_id: str) -> None:
        """The flow's ``close`` record is written (or it could not be, and never will)."""
        if self._live.pop(conn_id, None) is None:
            return
        self._append({"k": "c", "id": conn_id})

    def close(self) -> None:
        """Close the file (it stays: the next :meth:`recover` finds nothing open in it
        after a clean shutdown, which closed every flow)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
