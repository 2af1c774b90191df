"""Check a traffic log (``tsnet2 log verify``): its hash chain, signed checkpoints and flows.

A pure function of the log's lines, streamed: memory grows with the number of flows, nodes
and problems, not with the size of the log.

**Input.** Lines come from files (a rotated set, oldest first) or a collector. A record is
the JSON object from a line's first ``{`` (a collector's prefix before it is ignored).
Two wrappings are undone first:

* kubelet/CRI container logs, ``<RFC 3339 time> <stdout|stderr> <P|F> <content>``: the
  ``stderr`` stream is ignored; ``P`` (partial) pieces are joined with the stream's
  following pieces up to its ``F`` piece (containerd splits lines over 16 KiB, and a
  ``data`` record of 16 KiB of payload is about 22 KiB);
* a JSON object without ``kind`` whose ``log`` or ``message`` string holds the line (Docker
  json-file, Fluent Bit, Vector); its ``stream`` ``stderr`` is ignored. Docker splits long
  lines too: a ``log`` piece (with ``stream`` and ``time`` beside it) that does not end in a
  newline continues in the next one; Fluent Bit's CRI parser says so with ``logtag`` ``P``.

A line (joined or not) longer than :data:`MAX_LINE` is a problem, never read whole.

**The chain** (:mod:`~tsnet2.traffic.chain`). Records carry ``log_seq``/``log_hash``;
``log_hash`` is recomputed from the parsed record and the ``log_hash`` before it, so a
collector that re-serializes the JSON does not matter. Records are grouped into *chains* by
that linkage: a record joins the chain whose last record it links to (same node, next
``log_seq``, hash matches). A ``start`` checkpoint links to the ``prev_seq``/``prev_hash``
it names: after a clean restart that is the previous run's last record; after a crash an
earlier checkpoint, and the crashed run's records after it are a *crash tail*, unsigned
(the restart's ``log_seq`` jumps past numbers the crashed run may have used; they are not
missing). A record that links to nothing waits up to :data:`WINDOW` records for its
predecessor (reordered input is checked in ``log_seq`` order, and the reorder reported);
after that it stays the first record of a separate chain. At the end of the input the
chains are joined by ``log_seq``: the *node* (log key) of a chain is the key of its
checkpoints; a chain without checkpoints joins the nearest chain before it. Between two
joined chains, numbers that no record has are *missing* (declared or not by a ``gap``
record, which is not chained and only explains), and a record whose recomputed hash does
not link to the one before is *altered*.

**Signatures.** A checkpoint signs the ``log_seq``/``log_hash`` of the record before it
with the node's Ed25519 key. Verification runs backwards: the records from a signed head
back to the previous break in the chain are *verified*. A checkpoint whose signature does
not verify, whose head is not the record before it, or (with ``--key``) whose key is not
pinned, vouches for nothing and is a problem; an attacker who edits a record and recomputes
every later ``log_hash`` is caught at the next checkpoint (its signed head no longer
matches). Records after a node's last checkpoint are its *unsigned tail* (normal in a live
log). Without pinned keys anyone able to rewrite the whole log could re-sign it: the keys
seen are reported as not pinned, and a key that changes within a node is a problem.

**Old logs.** Records without chain fields (written before the chain) get the flow checks
only. Such records before the first chained record are an unchained prefix (an upgrade);
after it they are a problem (anyone could have added them).

**Flows**, per ``conn_id`` (as before the chain): one ``open`` and one ``close``, no
``data`` before the ``open`` or after the ``close``, ``data`` of each direction numbered
1, 2, 3, ... without holes, ``close`` totals not above the logged bytes; a flow without
``close`` is open (a failure unless ``allow_open``).

Each finding is a :class:`Problem` located by ``log_seq`` (or by line when it has none);
:meth:`Report.ok` decides which findings fail.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import re
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from tsnet2.traffic.chain import (
    CHECKPOINT_REASONS,
    ZERO_HASH,
    canonical_body,
    chain_hash,
    checkpoint_message,
    decode_key,
)
from tsnet2.traffic.signing import verify_signature

__all__ = [
    "ALWAYS_FAIL",
    "KINDS",
    "MAX_LINE",
    "NOTES",
    "WINDOW",
    "Lines",
    "Problem",
    "Report",
    "TooLong",
    "ordered",
    "record_of",
    "verify",
]

MAX_LINE = 1 << 20
"""Longest record line (joined from its pieces) that is read: 1 MiB."""

WINDOW = 4096
"""Records a record may arrive early or late and still be checked in ``log_seq`` order."""

WINDOW_BYTES = 32 << 20
"""Bytes of records waiting for their predecessor that are kept (beyond: not re-checked)."""

MAX_PROBLEMS = 10_000
"""Problems kept in the report; more are only counted (``problems_omitted``)."""

MAX_CHAINS = 20_000
"""Breaks in the chain that are followed; past them, records that do not link are not."""

KINDS = ("open", "data", "close", "reject", "gap", "checkpoint")
"""Record kinds this verifier knows."""

ALWAYS_FAIL = ("altered", "missing", "reordered", "duplicate", "unchecked", "unchained",
               "key", "fork", "line", "flow")
"""Problem kinds that always fail."""

NOTES = ("crash-tail", "unpinned", "unchained-prefix", "new-chain", "unchained-log")
"""Finding kinds that never fail. The rest fail unless allowed: ``open-end`` and ``unsigned``
(``allow_open``; ``unsigned`` also ``allow_unsigned_tail``), ``begins-late`` (fails only
with ``require_start``)."""

_HEX64 = re.compile(r"[0-9a-f]{64}")
_CRI = re.compile(r"\s*(\d{4}-\d\d-\d\dT\S+) (stdout|stderr) ([PF])(?: |$)")
_DOCKER_PIECE = 16 * 1024
_MAX_GAPS = 1000
_MAX_CKPTS = 64
_MAX_NAMES = 16


@dataclass
class Problem:
    """One finding: ``kind`` (see :data:`ALWAYS_FAIL` and :data:`NOTES`), where it is
    (``first_seq``..``last_seq`` of ``node``, and the input ``line``), and what it is."""

    kind: str
    message: str
    first_seq: int | None = None
    last_seq: int | None = None
    line: int | None = None
    node: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    chain: Any = field(default=None, repr=False, compare=False)

    @property
    def where(self) -> str:
        """``log_seq 20..25``, ``line 7`` or (the whole log) empty."""
        if self.first_seq is not None:
            if self.last_seq is not None and self.last_seq != self.first_seq:
                return f"log_seq {self.first_seq}..{self.last_seq}"
            return f"log_seq {self.first_seq}"
        return f"line {self.line}" if self.line is not None else ""

    def __str__(self) -> str:
        return f"{self.where}: {self.message}" if self.where else self.message

    def as_json(self) -> dict[str, Any]:
        """The problem as a JSON object."""
        out: dict[str, Any] = {"kind": self.kind, "first_seq": self.first_seq,
                               "last_seq": self.last_seq, "line": self.line,
                               "node": self.node, "message": self.message}
        out.update(self.extra)
        return out


@dataclass
class Report:
    """What :func:`verify` found. ``nodes``: one JSON object per node (chain), see
    :func:`verify`; ``problems``: the findings that fail (some only without an ``allow_``
    option); ``notes``: the ones that never fail (:data:`NOTES`)."""

    records: int = 0
    chained_records: int = 0
    unchained_records: int = 0
    foreign_lines: int = 0
    flows: int = 0
    closed: int = 0
    restart_closes: int = 0
    rejects: int = 0
    gap_records_lost: int = 0
    gaps: list[dict[str, Any]] = field(default_factory=list)
    open_flows: list[str] = field(default_factory=list)
    close_without_open: list[str] = field(default_factory=list)
    without_open: list[str] = field(default_factory=list)
    pinned_keys: list[str] = field(default_factory=list)
    nodes: list[dict[str, Any]] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    notes: list[Problem] = field(default_factory=list)
    problems_omitted: int = 0
    omitted_fail: bool = False

    def failures(self, *, allow_open: bool = False, allow_unsigned_tail: bool = False,
                 require_start: bool = False) -> list[Problem]:
        """The problems that fail under these options."""
        allowed = set(NOTES)
        if allow_open:
            allowed |= {"open-end", "unsigned"}
        if allow_unsigned_tail:
            allowed.add("unsigned")
        if not require_start:
            allowed.add("begins-late")
        return [p for p in self.problems if p.kind not in allowed]

    def ok(self, allow_open: bool = False, *, allow_unsigned_tail: bool = False,
           require_start: bool = False) -> bool:
        """No failing problem, and no open flow unless ``allow_open`` (a live log, whose
        unsigned tail and missing ``close`` checkpoint are then allowed too)."""
        return (not self.omitted_fail and not self.failures(
            allow_open=allow_open, allow_unsigned_tail=allow_unsigned_tail,
            require_start=require_start) and (allow_open or not self.open_flows))

    def as_json(self) -> dict[str, Any]:
        """The report as a JSON object."""
        out = {k: v for k, v in self.__dict__.items()
               if k not in ("problems", "notes", "omitted_fail")}
        out["problems"] = [p.as_json() for p in self.problems]
        out["notes"] = [p.as_json() for p in self.notes]
        return out


def record_of(line: str) -> dict[str, Any] | None:
    """The tsnet2 record in ``line`` (from its first ``{``), or None."""
    start = line.find("{")
    if start < 0 or len(line) - start > MAX_LINE:
        return None
    doc = _loads(line[start:])
    if doc is None or doc.get("kind") not in KINDS or not isinstance(doc.get("t"), str):
        return None
    return doc


def _loads(text: str) -> dict[str, Any] | None:
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return doc if isinstance(doc, dict) else None


# ---- input: undo collector wrappings ----------------------------------------------------


@dataclass
class _Partial:
    line: int
    parts: list[str] = field(default_factory=list)
    size: int = 0
    overflow: bool = False


class _Unwrap:
    """Physical lines -> (line number, record object) and skipped lines."""

    def __init__(self, max_line: int, problem: Callable[[Problem], None]) -> None:
        self.max_line = max_line
        self.problem = problem
        self.partial: dict[str, _Partial] = {}
        self.skipped = 0

    def feed(self, n: int, line: str) -> tuple[int, dict[str, Any]] | None:
        if isinstance(line, TooLong) or len(line) > 2 * self.max_line + 4096:
            m = _CRI.match(line[:200])
            if m and m.group(2) != "stdout":
                self.skipped += 1
                return None
            if m:  # a piece too long: the line it belongs to is lost
                p = self.partial.setdefault("cri", _Partial(n))
                p.overflow, p.parts = True, []
                if m.group(3) == "P":
                    return None
                del self.partial["cri"]
                n = p.line
            self.problem(Problem("line", f"a line of more than {self.max_line} bytes: not "
                                 "read", line=n))
            return None
        return self._text(n, line.rstrip("\r\n"), 0)

    def _text(self, n: int, text: str, depth: int) -> tuple[int, dict[str, Any]] | None:
        m = _CRI.match(text)
        if m:
            if m.group(2) != "stdout":
                self.skipped += 1
                return None
            got = self._piece("cri", n, text[m.end():], m.group(3) == "F")
            if got is None:
                return None
            n, text = got
        brace = text.find("{")
        if brace < 0:
            if text.strip():
                self.skipped += 1
            return None
        if len(text) - brace > self.max_line:
            self.problem(Problem("line", f"a record line of {len(text) - brace} bytes, over "
                                 f"the {self.max_line}-byte limit: not checked", line=n))
            return None
        doc = _loads(text[brace:])
        if doc is None:
            self.skipped += 1
            return None
        if "kind" in doc or depth >= 2:
            return n, doc
        for name in ("log", "message"):
            inner = doc.get(name)
            if isinstance(inner, str):
                break
        else:
            self.skipped += 1
            return None
        stream = doc.get("stream")
        if stream == "stderr":
            self.skipped += 1
            return None
        key = f"json:{stream}"
        if isinstance(doc.get("logtag"), str):  # Fluent Bit's CRI parser
            got = self._piece(key, n, inner, doc["logtag"] != "P")
        elif name == "log" and "stream" in doc and "time" in doc:  # Docker json-file
            # Docker splits a line into 16 KiB pieces; only the last ends with a newline.
            # (A shorter piece without one is whole: some collectors strip the newline.)
            partial = not inner.endswith("\n") and len(inner.encode(errors="replace")) >= (
                _DOCKER_PIECE)
            got = self._piece(key, n, inner, not partial)
        else:
            got = n, inner
        if got is None:
            return None
        return self._text(got[0], got[1].rstrip("\r\n"), depth + 1)

    def _piece(self, key: str, n: int, content: str, final: bool) -> tuple[int, str] | None:
        p = self.partial.get(key)
        if p is None:
            if final:
                return n, content
            p = self.partial[key] = _Partial(n)
        if not p.overflow:
            if p.size + len(content) > self.max_line:
                p.overflow, p.parts = True, []
            else:
                p.parts.append(content)
                p.size += len(content)
        if not final:
            return None
        del self.partial[key]
        if p.overflow:
            self.problem(Problem("line", f"a line joined from partial pieces is over the "
                                 f"{self.max_line}-byte limit: not checked", line=p.line))
            return None
        return p.line, "".join(p.parts)

    def finish(self) -> None:
        for p in self.partial.values():
            self.problem(Problem("line", "a partial line whose last piece never came (the "
                                 "input ends inside it)", line=p.line))
        self.partial.clear()


# ---- flows --------------------------------------------------------------------------------


@dataclass
class _Ev:
    kind: str
    cid: str
    line: int
    log_seq: int | None
    chain: Any
    direction: str = ""
    seq: Any = None
    length: Any = None
    bytes_in: Any = None
    bytes_out: Any = None
    restart: bool = False

    @property
    def chained(self) -> bool:
        return self.log_seq is not None


def _event(doc: dict[str, Any], line: int, log_seq: int | None) -> _Ev | None:
    kind = doc.get("kind")
    if kind not in ("open", "data", "close", "reject"):
        return None
    ev = _Ev(str(kind), str(doc.get("conn_id")), line, log_seq, None)
    if kind == "data":
        ev.direction, ev.seq, ev.length = str(doc.get("dir")), doc.get("seq"), doc.get("len")
    elif kind == "close":
        ev.bytes_in, ev.bytes_out = doc.get("bytes_in"), doc.get("bytes_out")
        ev.restart = str(doc.get("error", "")).startswith("daemon restart")
    return ev


@dataclass
class _Flow:
    opens: int = 0
    closes: int = 0
    early: _Ev | None = None
    seq: dict[str, int] = field(default_factory=lambda: {"app->peer": 0, "peer->app": 0})
    logged: dict[str, int] = field(default_factory=lambda: {"app->peer": 0, "peer->app": 0})


class _Flows:
    def __init__(self, rep: Report, problem: Callable[[Problem], None]) -> None:
        self.rep = rep
        self.problem = problem
        self.flows: dict[str, _Flow] = {}

    def _bad(self, ev: _Ev, message: str) -> None:
        self.problem(Problem("flow", message, ev.log_seq, ev.log_seq, ev.line, chain=ev.chain))

    def feed(self, ev: _Ev) -> None:
        rep, cid = self.rep, ev.cid
        if ev.kind == "reject":
            rep.rejects += 1
            return
        f = self.flows.get(cid)
        if f is None:
            f = self.flows[cid] = _Flow()
        if ev.kind == "open":
            f.opens += 1
            if f.opens > 1:
                self._bad(ev, f"flow {cid} opened a second time")
            if f.closes:
                self._bad(ev, f"flow {cid} opened after its close")
            if f.early is not None and f.opens == 1:
                self._bad(f.early, f"flow {cid}: data before its open")
                f.early = None
            return
        if ev.kind == "data":
            direction = ev.direction
            if direction not in f.seq:
                self._bad(ev, f"flow {cid}: data direction {direction!r}")
                return
            if not f.opens:
                if ev.chained:  # its open may be in an older file, or (reordered) later
                    f.early = f.early or ev
                else:
                    self._bad(ev, f"flow {cid}: data before its open")
            if f.closes:
                self._bad(ev, f"flow {cid}: data after its close")
            seq, want = ev.seq, f.seq[direction] + 1
            if isinstance(seq, int):
                if seq > want and (f.opens or want > 1):
                    self._bad(ev, f"flow {cid} {direction}: data records {want}..{seq - 1} "
                              "are missing")
                elif seq < want:
                    self._bad(ev, f"flow {cid} {direction}: data record {seq} again or out "
                              f"of order (expected {want})")
                f.seq[direction] = max(f.seq[direction], seq)
            if isinstance(ev.length, int):
                f.logged[direction] += ev.length
            return
        f.closes += 1
        if f.closes > 1:
            self._bad(ev, f"flow {cid} closed a second time")
            return
        if ev.restart:
            rep.restart_closes += 1
        for key, total, direction in (("bytes_in", ev.bytes_in, "peer->app"),
                                      ("bytes_out", ev.bytes_out, "app->peer")):
            if isinstance(total, int) and total > f.logged[direction] and (
                    f.opens or not ev.chained):
                self._bad(ev, f"flow {cid}: close says {key}={total} but its data records "
                          f"hold {f.logged[direction]} bytes {direction}")

    def finish(self) -> None:
        rep = self.rep
        for cid, f in self.flows.items():
            if f.opens:
                rep.flows += 1
                if f.closes:
                    rep.closed += 1
                else:
                    rep.open_flows.append(cid)
            elif f.closes:
                rep.close_without_open.append(cid)
            elif f.early is not None:
                rep.without_open.append(cid)


# ---- the chain ----------------------------------------------------------------------------


@dataclass
class _Ck:
    reason: str
    key: str
    head_seq: int
    head_hash: str
    valid: bool
    node: str | None = None
    prev_seq: int = 0
    prev_hash: str = ZERO_HASH.hex()
    unclean: bool = False


@dataclass
class _Rec:
    seq: int
    hash: bytes
    body: bytes
    line: int
    ck: _Ck | None
    ev: _Ev | None


@dataclass
class _Run:
    """Records ``start``..``end`` linked to each other, hash by hash."""

    start: int
    end: int
    linked: bool  # the start record's own content is covered (linked from a known hash)
    signed: int  # the highest log_seq a valid checkpoint vouches for (start - 1: none)
    crash: bool = False  # a crash restart continues from inside this run

    @property
    def vstart(self) -> int:
        return self.start if self.linked else self.start + 1


class _Chain:
    def __init__(self, ident: int, rec: _Rec, born: int, linked: bool) -> None:
        self.id = ident
        self.first_seq, self.first_hash, self.first_line = rec.seq, rec.hash, rec.line
        self.first_body: bytes | None = rec.body
        self.first_ck = rec.ck
        self.start = rec.ck if rec.ck is not None and rec.ck.reason == "start" else None
        self.head_seq, self.head_hash, self.head_line = rec.seq, rec.hash, rec.line
        self.runs = [_Run(rec.seq, rec.seq, linked, rec.seq - 1)]
        self.keys: dict[str, int] = {}
        self.names: dict[str, None] = {}
        self.ckpts: OrderedDict[int, bytes] = OrderedDict()
        self.last_ok: tuple[int, str] | None = None  # last valid, matching checkpoint
        self.records = 1
        self.checkpoints = 0
        self.restarts: list[dict[str, Any]] = []
        self.missing: list[tuple[int, int]] = []
        self.born = born
        self.rooted = self.start is not None
        self.events: list[_Ev] = []
        self.merged: _Chain | None = None
        self.duplicate = False

    def final(self) -> _Chain:
        c = self
        while c.merged is not None:
            c = c.merged
        return c

    def run_at(self, seq: int) -> _Run | None:
        for run in reversed(self.runs):
            if run.start <= seq <= run.end:
                return run
            if run.end < seq:
                return None
        return None

    def hash_at(self, seq: int) -> bytes | None:
        if seq == self.head_seq:
            return self.head_hash
        return self.ckpts.get(seq)


class _Verifier:
    def __init__(self, keys: Iterable[str | bytes], window: int, max_line: int) -> None:
        self.rep = Report()
        self.pins: dict[bytes, str] = {}
        for k in keys:
            raw = k if isinstance(k, bytes) else decode_key(k)
            if len(raw) != 32:
                raise ValueError(f"an Ed25519 public key has 32 bytes, got {len(raw)}")
            self.pins[raw] = base64.b64encode(raw).decode()
        self.rep.pinned_keys = sorted(self.pins.values())
        self.window = max(1, window)
        self.unwrap = _Unwrap(max_line, self.problem)
        self.flows = _Flows(self.rep, self.problem)
        self.chains: list[_Chain] = []
        self.by_next: dict[int, list[_Chain]] = {}  # head_seq + 1 -> chains ending there
        self.waiting: dict[int, list[_Chain]] = {}  # first_seq -> chains that may be joined
        self.young: deque[_Chain] = deque()  # chains whose flows wait (born order)
        self.bodied: deque[_Chain] = deque()  # chains holding their first record's body
        self.body_bytes = 0
        self.recent: OrderedDict[bytes, tuple[int, int, bytes, _Chain]] = OrderedDict()
        self.count = 0  # chained records so far
        self.prefix: list[int] = []  # first and last line of the unchained prefix
        self.prefix_count = 0
        self.overflow = False
        self.dups: tuple[Problem, int, int] | None = None  # the last duplicate, lines

    # -- problems --

    def problem(self, p: Problem) -> None:
        if p.kind in NOTES:
            if len(self.rep.notes) < MAX_PROBLEMS:
                self.rep.notes.append(p)
            return
        if len(self.rep.problems) < MAX_PROBLEMS:
            self.rep.problems.append(p)
            return
        self.rep.problems_omitted += 1
        if p.kind in ALWAYS_FAIL:
            self.rep.omitted_fail = True

    # -- records --

    def line(self, n: int, text: str) -> None:
        got = self.unwrap.feed(n, text)
        if got is None:
            return
        n, doc = got
        kind = doc.get("kind")
        chained = "log_seq" in doc or "log_hash" in doc
        if not isinstance(kind, str) or (not chained and (
                kind not in KINDS or not isinstance(doc.get("t"), str))):
            self.unwrap.skipped += 1
            return
        self.rep.records += 1
        if kind == "gap":
            self.gap(n, doc)
            if not chained:
                return
        if not chained:
            self.unchained(n, doc)
            return
        self.rep.chained_records += 1
        seq, hexhash = doc.get("log_seq"), doc.get("log_hash")
        if (type(seq) is not int or seq < 1 or not isinstance(hexhash, str)
                or not _HEX64.fullmatch(hexhash)):
            self.problem(Problem("altered", "altered: its log_seq/log_hash are not a sequence "
                                 f"number and a SHA-256 ({seq!r:.20}, {hexhash!r:.70})", line=n))
            return
        try:
            body = canonical_body(doc)
        except (ValueError, TypeError, RecursionError):
            self.problem(Problem("altered", "altered: it holds a value JSON cannot encode",
                                 seq, seq, n))
            return
        issues: list[tuple[str, str]] = []
        ck = self.checkpoint(doc, issues) if kind == "checkpoint" else None
        rec = _Rec(seq, bytes.fromhex(hexhash), body, n, ck, _event(doc, n, seq))
        self.count += 1
        chain = self.place(rec)
        for pkind, message in issues:
            self.problem(Problem(pkind, message, seq, seq, n, chain=chain))
        self.expire()

    def unchained(self, n: int, doc: dict[str, Any]) -> None:
        self.rep.unchained_records += 1
        if self.count:
            self.problem(Problem("unchained", "unchained: a record without log_seq/log_hash "
                                 "in a chained log (nothing protects it)", line=n))
        else:
            self.prefix_count += 1
            self.prefix[1:] = [n]
            if len(self.prefix) == 1:
                self.prefix.append(n)
        ev = _event(doc, n, None)
        if ev is not None:
            self.flows.feed(ev)

    def gap(self, n: int, doc: dict[str, Any]) -> None:
        dropped, kinds = doc.get("dropped"), doc.get("kinds")
        if isinstance(dropped, dict):  # an early draft of the record: kind -> count
            kinds = dropped
            dropped = sum(v for v in dropped.values() if type(v) is int)
        total = dropped if type(dropped) is int and dropped > 0 else 0
        self.rep.gap_records_lost += total
        if len(self.rep.gaps) < _MAX_GAPS:
            first, last = doc.get("first_seq"), doc.get("last_seq")
            self.rep.gaps.append({
                "line": n, "dropped": total, "kinds": kinds if isinstance(kinds, dict) else {},
                "error": str(doc.get("error", "")), "since": doc.get("since"),
                "sink": doc.get("sink"),
                "first_seq": first if type(first) is int else None,
                "last_seq": last if type(last) is int else None})

    def checkpoint(self, doc: dict[str, Any], issues: list[tuple[str, str]]) -> _Ck:
        reason, key, sig, t = doc.get("reason"), doc.get("key"), doc.get("sig"), doc.get("t")
        head_seq, head_hash = doc.get("head_seq"), doc.get("head_hash")
        node = doc.get("node")
        ck = _Ck(str(reason), str(key), head_seq if type(head_seq) is int else -1,
                 str(head_hash), False, node if isinstance(node, str) else None)
        bad: list[str] = []
        if reason not in CHECKPOINT_REASONS:
            bad.append(f"reason {reason!r:.20}")
        if type(head_seq) is not int or head_seq < 0:
            bad.append("head_seq")
        if not isinstance(head_hash, str) or not _HEX64.fullmatch(head_hash):
            bad.append("head_hash")
        if not isinstance(t, str):
            bad.append("t")
        raw = b""
        if isinstance(key, str):
            with contextlib.suppress(ValueError):
                raw = decode_key(key)
        if len(raw) != 32:
            bad.append("key")
        signature = b""
        if isinstance(sig, str):
            with contextlib.suppress(binascii.Error, ValueError):
                signature = base64.b64decode(sig, validate=True)
        if len(signature) != 64:
            bad.append("sig")
        if reason == "start":
            pseq, phash = doc.get("prev_seq"), doc.get("prev_hash")
            if type(pseq) is not int or pseq < 0 or not isinstance(phash, str) or (
                    not _HEX64.fullmatch(phash)):
                bad.append("prev_seq/prev_hash")
            else:
                ck.prev_seq, ck.prev_hash = pseq, phash
                if pseq != head_seq or phash != head_hash:
                    bad.append("head (not its prev_seq/prev_hash)")
            ck.unclean = doc.get("unclean") is True
        if bad:
            issues.append(("altered", f"altered: a checkpoint with a bad {', '.join(bad)}"))
            return ck
        if not (isinstance(t, str) and isinstance(head_hash, str) and type(head_seq) is int):
            raise AssertionError("unreachable: bad t, head_hash or head_seq were reported above")
        own = doc.get("log_seq")
        message = checkpoint_message(key=str(key), head_seq=head_seq, head_hash=head_hash, t=t,
                                     reason=str(reason), seq=own if type(own) is int else -1)
        if not verify_signature(raw, signature, message):
            issues.append(("altered", "altered: the checkpoint's signature does not verify"))
            return ck
        ck.key = base64.b64encode(raw).decode()
        if self.pins and raw not in self.pins:
            issues.append(("key", f"key: the checkpoint is signed by {ck.key}, not by a key "
                                  "given with --key"))
            return ck
        ck.valid = True
        return ck

    # -- chaining, as records come --

    def place(self, rec: _Rec) -> _Chain:
        seen = self.recent.get(rec.hash)
        if seen is not None and seen[0] == rec.seq:
            seq, line, prev, chain = seen
            chain = chain.final()
            if chain_hash(prev, rec.seq, rec.body) == rec.hash:
                run = self.dups
                if (run is not None and run[0].last_seq == seq - 1 and run[2] + 1 == rec.line
                        and run[0].chain is chain):  # a run of duplicated lines: one problem
                    run[0].last_seq = seq
                    run[0].message = (f"duplicate: the same records as lines {run[1]}..{line} "
                                      "again")
                    self.dups = (run[0], run[1], rec.line)
                else:
                    p = Problem("duplicate", f"duplicate: the same record as line {line} again",
                                seq, seq, rec.line, chain=chain)
                    self.problem(p)
                    self.dups = (p, line, rec.line)
            else:
                self.problem(Problem("altered", f"altered: a second record with the log_hash "
                                     f"of line {line} but other content", seq, seq, rec.line,
                                     chain=chain))
            return chain
        for c in self.by_next.get(rec.seq, ()):
            if chain_hash(c.head_hash, rec.seq, rec.body) == rec.hash:
                self.append(c, rec)
                return c
        return self.new_chain(rec)

    def remember(self, rec: _Rec, prev: bytes, c: _Chain) -> None:
        self.recent[rec.hash] = (rec.seq, rec.line, prev, c)
        if len(self.recent) > self.window:
            self.recent.popitem(last=False)

    def new_chain(self, rec: _Rec) -> _Chain:
        ck = rec.ck
        if len(self.chains) >= MAX_CHAINS:
            if not self.overflow:
                self.overflow = True
                self.problem(Problem("unchecked", f"unchecked: more than {MAX_CHAINS} breaks "
                                     "in the chain; records that do not link are not followed "
                                     "from here on", rec.seq, rec.seq, rec.line))
            self.rep.omitted_fail = True
            c = self.chains[-1]
            return c.final()
        start = ck if ck is not None and ck.reason == "start" else None
        linked = False
        if start is not None:
            prev = bytes.fromhex(start.prev_hash)
            linked = chain_hash(prev, rec.seq, rec.body) == rec.hash
        c = _Chain(len(self.chains), rec, self.count, linked)
        self.chains.append(c)
        if start is not None:
            if linked:
                self.remember(rec, prev, c)
            else:
                self.problem(Problem("altered", "altered: the start checkpoint's log_hash is "
                                     "not the hash of its content and prev_hash", rec.seq,
                                     rec.seq, rec.line, chain=c))
            c.first_body = None
            if start.valid and start.prev_seq == 0:
                c.last_ok = (rec.seq, start.reason)
        else:
            self.young.append(c)
            self.waiting.setdefault(rec.seq, []).append(c)
            self.bodied.append(c)
            self.body_bytes += len(rec.body)
            self.trim_bodies()
        if ck is not None:
            self.note_ck(c, rec, ck)
        self.by_next.setdefault(rec.seq + 1, []).append(c)
        if rec.ev is not None:
            rec.ev.chain = c
            self.emit(c, rec.ev)
        self.pull(c)
        return c

    def append(self, c: _Chain, rec: _Rec) -> None:
        ps, ph = c.head_seq, c.head_hash
        self.unindex_head(c)
        c.runs[-1].end = rec.seq
        c.head_seq, c.head_hash, c.head_line = rec.seq, rec.hash, rec.line
        c.records += 1
        self.remember(rec, ph, c)
        ck = rec.ck
        if ck is not None:
            self.note_ck(c, rec, ck)
            if ck.valid:
                if self.check_head(c, rec.seq, rec.line, ck, ps, ph):
                    c.last_ok = (rec.seq, ck.reason)
                else:  # the chain breaks here: nothing after vouches for what came before
                    c.runs[-1].end = ps
                    c.runs.append(_Run(rec.seq, rec.seq, False, rec.seq - 1))
        self.by_next.setdefault(c.head_seq + 1, []).append(c)
        if rec.ev is not None:
            rec.ev.chain = c
            self.emit(c, rec.ev)
        self.pull(c)

    def pull(self, c: _Chain) -> None:
        """Join the waiting chains whose first record links to ``c``'s head."""
        while True:
            for f in self.waiting.get(c.head_seq + 1, ()):
                if f is not c and f.first_body is not None and chain_hash(
                        c.head_hash, f.first_seq, f.first_body) == f.first_hash:
                    self.merge(c, f, good=True, late=f.rooted)
                    break
            else:
                return

    def note_ck(self, c: _Chain, rec: _Rec, ck: _Ck) -> None:
        """``rec`` (in ``c``) is the checkpoint ``ck``."""
        c.ckpts[rec.seq] = rec.hash
        if len(c.ckpts) > _MAX_CKPTS:
            c.ckpts.popitem(last=False)
        if ck.reason == "start" and rec.seq != c.first_seq:
            c.restarts.append({"log_seq": rec.seq, "clean": not ck.unclean,
                               "prev_seq": ck.prev_seq, "line": rec.line})
        if not ck.valid:
            return
        c.checkpoints += 1
        if ck.node and len(c.names) < _MAX_NAMES:
            c.names[ck.node] = None
        self.add_key(c, ck.key, rec.seq, rec.line)

    def add_key(self, c: _Chain, key: str, seq: int, line: int | None) -> None:
        if key in c.keys:
            return
        if c.keys and not self.pins:
            self.problem(Problem("key", f"key: the signing key changes to {key} (was "
                                 f"{', '.join(c.keys)}): give both with --key if the node "
                                 "really has a new key", seq, seq, line, chain=c))
        c.keys[key] = seq

    def check_head(self, c: _Chain, seq: int, line: int, ck: _Ck, ps: int, ph: bytes) -> bool:
        """A valid checkpoint at ``seq`` whose predecessor in ``c`` is (``ps``, ``ph``):
        True (and ``ps`` is signed) when its signed head is that record."""
        run = c.run_at(ps)
        if ck.head_seq == ps and ck.head_hash == ph.hex():
            if run is not None:
                run.signed = max(run.signed, ps)
            return True
        first = ps if run is None else min(ps, max(run.vstart, run.signed + 1))
        self.problem(Problem("altered", f"altered: these records do not match the head signed "
                             f"by the checkpoint at log_seq {seq} (line {line}): one was "
                             "changed, removed or added, and the log_hash of the rest recomputed",
                             first, ps, line, chain=c, extra={"checkpoint_seq": seq}))
        return False

    def merge(self, a: _Chain, f: _Chain, *, good: bool, late: bool = False) -> None:
        """Append chain ``f`` (its first_seq is past ``a``'s head) to ``a``; ``good``: its
        first record links to ``a``'s head."""
        lead = f.first_ck
        if (f.first_seq == a.head_seq + 1 and lead is not None and lead.valid
                and (f.start is None or lead.prev_seq == a.head_seq)):
            if self.check_head(a, f.first_seq, f.first_line, lead, a.head_seq, a.head_hash):
                if f.last_ok is None:
                    f.last_ok = (f.first_seq, lead.reason)
            else:
                good = False
        if f.first_seq == a.head_seq + 1 and f.first_line < a.head_line:
            extra = (" (more than the reorder window apart: flows checked in input order)"
                     if late else "")
            self.problem(Problem("reordered", f"reordered: log_seq {f.first_seq} (line "
                                 f"{f.first_line}) came before log_seq {a.head_seq} (line "
                                 f"{a.head_line}){extra}", a.head_seq, f.first_seq,
                                 a.head_line, chain=a))
        self.unindex_head(a)
        self.unindex_head(f)
        self.unwait(f)
        if good and f.runs[0].start == a.head_seq + 1:
            ra, r0 = a.runs[-1], f.runs[0]
            ra.end, ra.signed = r0.end, max(ra.signed, r0.signed)
            a.runs.extend(f.runs[1:])
        else:
            if f.start is None:
                f.runs[0].linked = False
            a.runs.extend(f.runs)
        a.head_seq, a.head_hash, a.head_line = f.head_seq, f.head_hash, f.head_line
        a.records += f.records
        a.checkpoints += f.checkpoints
        for k, s in f.keys.items():
            self.add_key(a, k, s, None)
        for name in f.names:
            if len(a.names) < _MAX_NAMES:
                a.names[name] = None
        a.ckpts.update(f.ckpts)
        while len(a.ckpts) > _MAX_CKPTS:
            a.ckpts.popitem(last=False)
        a.restarts.extend(f.restarts)
        a.missing.extend(f.missing)
        a.last_ok = f.last_ok
        if a.rooted:
            if not f.rooted:
                for ev in f.events:
                    self.flows.feed(ev)
        else:
            a.events.extend(f.events)
        f.events = []
        f.rooted = True
        f.merged = a
        self.by_next.setdefault(a.head_seq + 1, []).append(a)

    def unindex_head(self, c: _Chain) -> None:
        lst = self.by_next.get(c.head_seq + 1)
        if lst is not None and c in lst:
            lst.remove(c)
            if not lst:
                del self.by_next[c.head_seq + 1]

    def unwait(self, c: _Chain) -> None:
        lst = self.waiting.get(c.first_seq)
        if lst is not None and c in lst:
            lst.remove(c)
            if not lst:
                del self.waiting[c.first_seq]
        if c.first_body is not None:
            self.body_bytes -= len(c.first_body)
            c.first_body = None

    def trim_bodies(self) -> None:
        while self.body_bytes > WINDOW_BYTES and self.bodied:
            c = self.bodied.popleft()
            if c.merged is None:
                self.unwait(c)

    def emit(self, c: _Chain, ev: _Ev) -> None:
        if c.rooted:
            self.flows.feed(ev)
        else:
            c.events.append(ev)

    def root(self, c: _Chain) -> None:
        if c.rooted:
            return
        c.rooted = True
        for ev in c.events:
            self.flows.feed(ev)
        c.events = []

    def expire(self) -> None:
        while self.young:
            c = self.young[0]
            if c.merged is None and not c.rooted and c.born > self.count - self.window:
                return
            self.young.popleft()
            if c.merged is None:
                self.root(c)

    # -- at the end of the input --

    def finish(self) -> Report:
        self.unwrap.finish()
        while self.young:
            c = self.young.popleft()
            if c.merged is None:
                self.root(c)
        self.join()
        self.flows.finish()
        self.rep.foreign_lines = self.unwrap.skipped
        self.report()
        return self.rep

    def missing_problem(self, c: _Chain, first: int, last: int, line: int, why: str) -> None:
        c.missing.append((first, last))
        gaps = [g for g in self.rep.gaps if g["first_seq"] is not None
                and g["last_seq"] is not None and g["first_seq"] <= last
                and g["last_seq"] >= first]
        extra: dict[str, Any] = {"declared": False}
        if gaps:
            covered = all(any(g["first_seq"] <= s <= g["last_seq"] for g in gaps)
                          for s in range(first, min(last, first + 10_000) + 1))
            g = gaps[0]
            sink = f" ({g['sink']})" if g.get("sink") else ""
            note = (f"{'declared' if covered else 'partly declared'} lost by the daemon: gap "
                    f"record at line {g['line']}{sink}: {g['error']}")
            extra = {"declared": covered, "gap_line": g["line"], "gap_error": g["error"]}
        else:
            note = "no gap record declares them"
        self.problem(Problem("missing", f"missing ({note}){why}", first, last, line, chain=c,
                             extra=extra))

    def join(self) -> None:
        """Join the chains by log_seq (see the module docstring), oldest first."""
        done: list[_Chain] = []
        for x in sorted((c for c in self.chains if c.merged is None),
                        key=lambda c: (c.first_seq, c.start is None, -c.records)):
            done = [c for c in done if c.merged is None]
            if x.start is not None:
                self.join_start(x, x.start, done)
            else:
                self.join_fragment(x, done)
            if x.merged is None:
                done.append(x)

    def join_start(self, x: _Chain, ck: _Ck, done: list[_Chain]) -> None:
        """Place ``x``, which begins with the start checkpoint ``ck``, among ``done``."""
        p, ph = ck.prev_seq, bytes.fromhex(ck.prev_hash)
        live = [c for c in done if not c.duplicate]
        if p == 0:
            for c in live:
                if c.first_hash == x.first_hash and c.first_seq == x.first_seq:
                    x.duplicate = True
                    return
            for c in live:
                if set(c.keys) & set(x.keys):
                    self.problem(Problem("new-chain", f"new chain: the log starts again at "
                                         f"log_seq {x.first_seq} (line {x.first_line}) with "
                                         "the same key (its chain state was lost)",
                                         x.first_seq, x.first_seq, x.first_line, chain=x))
                    return
            return
        for c in live:
            if c.first_seq <= p <= c.head_seq and c.hash_at(p) == ph:
                self.link_start(c, x, ck, p)
                return
        same = [c for c in live if not c.keys or not x.keys or set(c.keys) & set(x.keys)]
        inside = [c for c in same if c.first_seq <= p <= c.head_seq]
        if inside:
            self.problem(Problem("fork", f"fork: the restart at log_seq {x.first_seq} (line "
                                 f"{x.first_line}) continues from log_seq {p}, but with a "
                                 "log_hash this log does not have there", x.first_seq,
                                 x.first_seq, x.first_line, chain=inside[0]))
            return
        below = [c for c in same if c.head_seq < p]
        if below:
            c = max(below, key=lambda c: c.head_seq)
            self.missing_problem(c, c.head_seq + 1, p, x.first_line,
                                 f"; the restart at log_seq {x.first_seq} continues from "
                                 f"log_seq {p}")
            self.merge(c, x, good=False)

    def link_start(self, c: _Chain, x: _Chain, ck: _Ck, p: int) -> None:
        """``x`` begins with a restart (``ck``) that continues from ``c``'s record ``p``."""
        if x.first_seq <= c.head_seq:
            x.duplicate = True
            self.problem(Problem("fork", f"fork: log_seq {x.first_seq}..{c.head_seq} are used "
                                 f"twice: by the records up to line {c.head_line} and from the "
                                 f"restart at line {x.first_line}", x.first_seq, c.head_seq,
                                 x.first_line, chain=c))
            return
        if ck.valid:
            run = c.run_at(p)
            if run is not None:
                run.signed = max(run.signed, p)
        if p < c.head_seq:
            c.runs[-1].crash = True
            if not ck.unclean:
                self.problem(Problem("fork", f"fork: the clean restart at log_seq "
                                     f"{x.first_seq} (line {x.first_line}) continues from "
                                     f"log_seq {p}, yet records come after it", p + 1,
                                     c.head_seq, x.first_line, chain=c))
        x.restarts.insert(0, {"log_seq": x.first_seq, "clean": not ck.unclean,
                              "prev_seq": p, "line": x.first_line})
        good = p == c.head_seq and x.first_seq == p + 1 and x.runs[0].linked
        self.merge(c, x, good=good)

    def join_fragment(self, x: _Chain, done: list[_Chain]) -> None:
        f = x.first_seq
        cands = [c for c in done if not c.duplicate]
        if x.keys:
            cands = [c for c in cands if not c.keys or set(c.keys) & set(x.keys)]
        over = [c for c in cands if c.first_seq <= f <= c.head_seq]
        if over:
            c = over[0]
            x.duplicate = True
            last = min(x.head_seq, c.head_seq)
            self.problem(Problem("duplicate", f"duplicate: log_seq {f}..{last} appear again "
                                 f"from line {x.first_line} (with other content, or more than "
                                 f"{self.window} records after the first)", f, last,
                                 x.first_line, chain=c))
            return
        below = [c for c in cands if c.head_seq < f]
        if not below:
            return
        c = max(below, key=lambda c: (c.head_seq, bool(set(c.keys) & set(x.keys))))
        if c.head_seq == f - 1:
            if x.first_body is None:
                self.problem(Problem("unchecked", "unchecked: its link to the record before "
                                     "it was not checked (they came too far apart, or too "
                                     "many records waited)", f, f, x.first_line, chain=c))
                self.merge(c, x, good=False, late=True)
            elif chain_hash(c.head_hash, f, x.first_body) == x.first_hash:
                self.merge(c, x, good=True, late=True)
            else:
                self.problem(Problem("altered", "altered (hash mismatch: its log_hash is not "
                                     "the hash of its content and the record before it)", f, f,
                                     x.first_line, chain=c))
                self.merge(c, x, good=False)
            return
        self.missing_problem(c, c.head_seq + 1, f - 1, x.first_line, "")
        self.merge(c, x, good=False)

    def report(self) -> None:
        rep = self.rep
        nodes = [c for c in self.chains if c.merged is None]
        index = {c.id: i for i, c in enumerate(nodes)}
        for p in [*rep.problems, *rep.notes]:
            if p.chain is not None:
                p.node = index.get(p.chain.final().id)
                p.chain = None
        if self.prefix and rep.chained_records:
            self.problem(Problem("unchained-prefix", f"{self.prefix_count} records "
                                 f"(lines {self.prefix[0]}..{self.prefix[-1]}) before the chain "
                                 "begins carry no log_seq/log_hash (written by an older "
                                 "tsnet2): their flows are checked, but nothing protects them",
                                 line=self.prefix[0]))
        elif rep.records and not rep.chained_records:
            self.problem(Problem("unchained-log", "no record carries a hash chain "
                                 "(written by an older tsnet2): only the flows are checked"))
        if rep.chained_records and not self.pins:
            keys = sorted({k for c in nodes for k in c.keys})
            self.problem(Problem("unpinned", "the checkpoint keys are not pinned (give "
                                 "--key): anyone who could rewrite the whole log could have "
                                 "signed it with a key of their own; keys seen: "
                                 f"{', '.join(keys) or 'none'}", extra={"keys": keys}))
        for i, c in enumerate(nodes):
            rep.nodes.append(self.node(i, c))
        for found in (rep.problems, rep.notes):
            found.sort(key=lambda p: (-1 if p.node is None else p.node,
                                      -1 if p.first_seq is None else p.first_seq, p.line or 0))

    def node(self, i: int, c: _Chain) -> dict[str, Any]:
        verified: list[list[int]] = []
        unverified: list[list[int]] = []
        crash: list[list[int]] = []
        tail: list[int] | None = None
        for k, run in enumerate(c.runs):
            if run.signed >= run.vstart:
                if verified and verified[-1][1] + 1 >= run.vstart:
                    verified[-1][1] = run.signed
                else:
                    verified.append([run.vstart, run.signed])
            lo, hi = max(run.signed + 1, run.start), run.end
            last = k == len(c.runs) - 1
            if last and c.last_ok is not None and c.last_ok[0] == c.head_seq:
                hi -= 1  # a final checkpoint is the end, not a tail
            if lo > hi or c.duplicate:
                continue
            if run.crash:
                crash.append([lo, hi])
                self.problem(Problem("crash-tail", "crash tail: the daemon stopped "
                                     "without closing the log, and no checkpoint signs these "
                                     "last records of that run (the restart continues from its "
                                     "last saved checkpoint)", lo, hi, node=i))
            elif last:
                tail = [lo, hi]
                self.problem(Problem("unsigned", "unsigned tail: no checkpoint signs these "
                                     "records (yet: a live log)", lo, hi, node=i))
            else:
                unverified.append([lo, hi])
        closed = c.last_ok == (c.head_seq, "close")
        from_start = c.start is not None and c.start.prev_seq == 0
        if c.duplicate:
            self.problem(Problem("duplicate", "duplicate: a second copy of these records "
                                 f"(from line {c.first_line})", c.first_seq, c.head_seq,
                                 c.first_line, node=i))
        else:
            if not closed:
                self.problem(Problem("open-end", f"open end: the log ends at log_seq "
                                     f"{c.head_seq} without a close checkpoint (the daemon is "
                                     "still running, crashed, or the rest is not in the "
                                     "input)", c.head_seq, c.head_seq, c.head_line, node=i))
            if not from_start:
                if c.start is not None:
                    since = f"a restart from log_seq {c.start.prev_seq}, which is not in the input"
                elif c.first_seq > 1:
                    since = f"log_seq {c.first_seq - 1} and before are not in the input"
                else:
                    since = "not with a start checkpoint"
                self.problem(Problem("begins-late", f"begins late: the chain begins at "
                                     f"log_seq {c.first_seq} ({since}; older rotated files?)",
                                     c.first_seq, c.first_seq, c.first_line, node=i))
        keys = list(c.keys)
        return {
            "node": i, "key": keys[-1] if keys else None, "keys": keys,
            "pinned": bool(keys) and all(k in self.pins.values() for k in keys),
            "names": list(c.names), "first_seq": c.first_seq, "last_seq": c.head_seq,
            "first_line": c.first_line, "last_line": c.head_line, "records": c.records,
            "checkpoints": c.checkpoints, "verified": verified, "unverified": unverified,
            "unsigned_tail": tail, "crash_tails": crash,
            "missing": [list(m) for m in c.missing], "restarts": c.restarts,
            "closed": closed, "from_start": from_start, "duplicate": c.duplicate,
        }


def verify(lines: Iterable[str], *, keys: Iterable[str | bytes] = (), window: int = WINDOW,
           max_line: int = MAX_LINE) -> Report:
    """Check the records of ``lines`` (in log order; see the module docstring).

    ``keys``: pinned public keys (base64, ``ed25519:`` prefix allowed, or 32 raw bytes);
    checkpoints signed by another key vouch for nothing. ``window``: how many records apart
    a record and its predecessor may arrive and still be checked in order (and an identical
    duplicate recognized). Raises :class:`ValueError` for a key that is not one.

    Each of :attr:`Report.nodes` (one per chain left after joining) has: ``node`` (its index,
    as in :attr:`Problem.node`), ``key`` (the last), ``keys``, ``pinned``, ``names`` (of its
    checkpoints), ``first_seq``/``last_seq``, ``first_line``/``last_line``, ``records``,
    ``checkpoints`` (valid ones), ``verified``/``unverified`` (``[first, last]`` log_seq
    ranges: signed, or cut off from a signature by a break), ``unsigned_tail`` (a range or
    None), ``crash_tails``, ``missing``, ``restarts`` (``log_seq``, ``clean``, ``prev_seq``,
    ``line``), ``closed`` (ends with a valid ``close`` checkpoint), ``from_start`` (begins
    with a new log's ``start`` checkpoint) and ``duplicate`` (a second copy of records).
    """
    v = _Verifier(keys, window, max_line)
    for n, line in enumerate(lines, 1):
        v.line(n, line)
    return v.finish()


# ---- reading files ----------------------------------------------------------------------


class TooLong(str):
    """The beginning of a line longer than the reader's limit (the rest was skipped)."""

    __slots__ = ()


def _read(fh: IO[bytes], limit: int) -> Iterator[str]:
    while True:
        chunk = fh.readline(limit + 1)
        if not chunk:
            return
        if len(chunk) > limit and not chunk.endswith(b"\n"):
            while True:
                more = fh.readline(1 << 20)
                if not more or more.endswith(b"\n"):
                    break
            yield TooLong(chunk[:200].decode("utf-8", errors="replace"))
            continue
        yield chunk.decode("utf-8", errors="replace")


class Lines:
    """The lines of ``paths`` (``-``: ``stdin``), read with a bounded line length; remembers
    where each file begins so :meth:`where` can name a line as ``file:line``."""

    def __init__(self, paths: list[str], stdin: IO[bytes] | None = None,
                 max_line: int = MAX_LINE) -> None:
        self.paths = paths
        self.stdin = stdin
        self.limit = 2 * max_line + 4096
        self.starts: list[tuple[int, str]] = []

    def __iter__(self) -> Iterator[str]:
        n = 0
        for path in self.paths:
            self.starts.append((n + 1, path))
            if path == "-":
                if self.stdin is None:
                    raise ValueError("the path '-' names standard input, but no stdin was given")
                for line in _read(self.stdin, self.limit):
                    n += 1
                    yield line
                continue
            with open(path, "rb") as fh:
                for line in _read(fh, self.limit):
                    n += 1
                    yield line

    def where(self, line: int | None) -> str | None:
        """``path:N`` of global line ``line``."""
        if line is None:
            return None
        best: tuple[int, str] | None = None
        for start, path in self.starts:
            if start <= line:
                best = (start, path)
        if best is None:
            return None
        return f"{best[1]}:{line - best[0] + 1}"


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
