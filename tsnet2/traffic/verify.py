"""Check a traffic log for whole flows (``tsnet2 log verify``): a pure function of its lines.

Lines may come from files (a rotated set) or from a log collector, with other text around
the records (a kubelet container log prefixes each line with a time and a stream name):
a record is the JSON object that starts at a line's first ``{``; lines without one, or that
are not tsnet2 records, are counted as foreign and otherwise ignored.

What it checks, per ``conn_id``:

* one ``open`` and one ``close`` (a second of either is a problem; a flow without ``close``
  is *open*, which fails unless ``allow_open``: a live log has open flows);
* no ``data`` before the ``open`` or after the ``close``;
* ``data`` records of each direction numbered 1, 2, 3, ... without holes (a hole is a lost
  record);
* the ``close`` totals are not above the bytes of the flow's ``data`` records (the daemon
  logs every byte before it forwards it).

``gap`` records (the daemon's own report of records it could not write) are summed. A
``close`` without its ``open`` is reported separately: the ``open`` may sit in an older
rotated file that was not given.

Not checked yet: a per-node sequence number and a hash chain (records are not chained yet),
so an edited or deleted *whole flow* goes unnoticed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MAX_LINE = 1 << 20
KINDS = ("open", "data", "close", "reject", "gap")


@dataclass
class _Flow:
    opens: int = 0
    closes: int = 0
    first_line: int = 0
    seq: dict[str, int] = field(default_factory=lambda: {"app->peer": 0, "peer->app": 0})
    logged: dict[str, int] = field(default_factory=lambda: {"app->peer": 0, "peer->app": 0})
    close: dict[str, Any] | None = None


@dataclass
class Report:
    """What :func:`verify` found."""

    records: int = 0
    foreign_lines: int = 0
    flows: int = 0
    closed: int = 0
    restart_closes: int = 0
    rejects: int = 0
    gap_records_lost: int = 0
    open_flows: list[str] = field(default_factory=list)
    close_without_open: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def ok(self, allow_open: bool = False) -> bool:
        """No problem (and no open flow unless ``allow_open``)."""
        return not self.problems and (allow_open or not self.open_flows)

    def as_json(self) -> dict[str, Any]:
        """The report as a JSON object."""
        return dict(self.__dict__)


def record_of(line: str) -> dict[str, Any] | None:
    """The tsnet2 record in ``line`` (from its first ``{``), or None."""
    start = line.find("{")
    if start < 0 or len(line) - start > MAX_LINE:
        return None
    try:
        doc = json.loads(line[start:])
    except ValueError:
        return None
    if not isinstance(doc, dict) or doc.get("kind") not in KINDS or not isinstance(
            doc.get("t"), str):
        return None
    return doc


def verify(lines: Iterable[str]) -> Report:
    """Check the records of ``lines`` (in log order; see the module docstring)."""
    rep = Report()
    flows: dict[str, _Flow] = {}
    for n, line in enumerate(lines, 1):
        r = record_of(line)
        if r is None:
            if line.strip():
                rep.foreign_lines += 1
            continue
        rep.records += 1
        kind = r["kind"]
        if kind == "reject":
            rep.rejects += 1
            continue
        if kind == "gap":
            dropped = r.get("dropped") or {}
            rep.gap_records_lost += sum(v for v in dropped.values() if isinstance(v, int))
            continue
        cid = str(r.get("conn_id"))
        f = flows.get(cid)
        if kind == "open":
            if f is None:
                f = flows[cid] = _Flow(first_line=n)
            f.opens += 1
            if f.opens > 1:
                rep.problems.append(f"line {n}: flow {cid} opened a second time")
            if f.closes:
                rep.problems.append(f"line {n}: flow {cid} opened after its close")
            continue
        if f is None:
            f = flows[cid] = _Flow(first_line=n)
        if kind == "data":
            direction = str(r.get("dir"))
            if direction not in f.seq:
                rep.problems.append(f"line {n}: flow {cid}: data direction {direction!r}")
                continue
            if not f.opens:
                rep.problems.append(f"line {n}: flow {cid}: data before its open")
            if f.closes:
                rep.problems.append(f"line {n}: flow {cid}: data after its close")
            seq = r.get("seq")
            want = f.seq[direction] + 1
            if isinstance(seq, int):
                if seq > want:
                    rep.problems.append(f"line {n}: flow {cid} {direction}: data records "
                                        f"{want}..{seq - 1} are missing")
                elif seq < want:
                    rep.problems.append(f"line {n}: flow {cid} {direction}: data record "
                                        f"{seq} again or out of order (expected {want})")
                f.seq[direction] = max(f.seq[direction], seq)
            length = r.get("len")
            if isinstance(length, int):
                f.logged[direction] += length
            continue
        # close
        f.closes += 1
        if f.closes > 1:
            rep.problems.append(f"line {n}: flow {cid} closed a second time")
            continue
        f.close = r
        if str(r.get("error", "")).startswith("daemon restart"):
            rep.restart_closes += 1
        for key, direction in (("bytes_in", "peer->app"), ("bytes_out", "app->peer")):
            total = r.get(key)
            if isinstance(total, int) and total > f.logged[direction]:
                rep.problems.append(f"line {n}: flow {cid}: close says {key}={total} but its "
                                    f"data records hold {f.logged[direction]} bytes "
                                    f"{direction}")
    for cid, f in flows.items():
        if f.opens:
            rep.flows += 1
            if f.closes:
                rep.closed += 1
            else:
                rep.open_flows.append(cid)
        elif f.closes:
            rep.close_without_open.append(cid)
    return rep


def ordered(paths: Iterable[str]) -> list[str]:
    """``paths`` with each rotated set oldest first: ``log.3``, ``log.2``, ``log.1``, ``log``
    (the order the daemon wrote them); other paths keep their place."""
    out = list(paths)
    rot = re.compile(r"^(.*)\.([0-9]+)$")

    def key(p: str) -> tuple[str, int]:
        m = rot.match(p)
        if m and Path(m.group(1)).name:
            return m.group(1), -int(m.group(2))
        return p, 0

    bases = {key(p)[0] for p in out}
    if len(bases) == 1 and len(out) > 1:
        return sorted(out, key=key)
    return out
