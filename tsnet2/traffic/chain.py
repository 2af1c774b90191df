"""The traffic log's hash chain and signed checkpoints (pure; no I/O but the key file helpers).

Every record the daemon writes (``open``, ``data``, ``close``, ``reject``, ``checkpoint``)
carries two fields appended after its other keys:

* ``log_seq``: the node's record number, 1, 2, 3, ... across restarts and rotations (a
  restart after a crash skips numbers: see ``checkpoint`` below);
* ``log_hash``: ``SHA-256(prev || b"<log_seq>\\n" || body)`` in lowercase hex, where
  ``prev`` is the 32-byte hash of the record before it (``log_seq - 1``; for a segment's
  ``start`` checkpoint, the ``prev_hash`` it names) and ``body`` the record *without* the
  two chain fields, encoded canonically: keys sorted, compact, Go's escaping
  (:func:`canonical_body`). A verifier recomputes it from the parsed record, so a collector
  that re-serializes the JSON (other key order or spacing) does not break the chain.

``gap`` records (a sink's report of records it could not write) are not in the chain: they
name the ``log_seq`` range they cover (``first_seq``..``last_seq``).

A ``checkpoint`` record is in the chain and signs its predecessor with the log's Ed25519 key
(``<state-dir>/traffic-log.key``): ``head_seq``/``head_hash`` are the ``log_seq``/``log_hash``
of the record just before it, ``key`` the base64 public key, ``sig`` the base64 signature of
:func:`checkpoint_message`. ``reason`` is ``start`` (the first record a daemon writes),
``periodic`` or ``close`` (the last record of a clean shutdown). A ``start`` checkpoint also
names the head it continues from, ``prev_seq``/``prev_hash`` (0 and 64 zeros for a new log):
after a clean shutdown, the previous ``close`` checkpoint (its own ``log_seq`` is then
``prev_seq + 1``); after a crash, the last checkpoint the previous run persisted, and its
``log_seq`` is past every number the crashed run may have used (``unclean: true``), so the
crashed run's records after that checkpoint are an unsigned tail.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Mapping
from typing import Any

from tsnet2.proto.gojson import go_json

__all__ = [
    "CHAIN_KEYS",
    "CHECKPOINT_REASONS",
    "ZERO_HASH",
    "canonical_body",
    "chain_hash",
    "checkpoint_message",
    "decode_key",
    "encode_key",
    "link",
    "sort_keys",
]

CHAIN_KEYS = ("log_hash", "log_seq")
"""The fields the chain adds to every chained record."""

CHECKPOINT_REASONS = ("start", "periodic", "close")
"""Why a checkpoint was written."""

ZERO_HASH = bytes(32)
"""``prev`` of the very first record of a log (``prev_hash`` is then 64 zeros)."""

_DOMAIN = b"tsnet2 traffic-log checkpoint v1\n"


def sort_keys(obj: Any) -> Any:
    """``obj`` with the keys of every mapping in it sorted (how Go marshals a map)."""
    if isinstance(obj, Mapping):
        return {k: sort_keys(obj[k]) for k in sorted(obj)}
    if isinstance(obj, list | tuple):
        return [sort_keys(v) for v in obj]
    return obj


def canonical_body(record: Mapping[str, Any]) -> bytes:
    """The canonical bytes of a parsed record without its chain fields (no newline).

    For a record the daemon wrote this is exactly the line without the chain suffix.
    """
    return go_json(sort_keys({k: v for k, v in record.items() if k not in CHAIN_KEYS}))


def chain_hash(prev: bytes, seq: int, body: bytes) -> bytes:
    """``SHA-256(prev || b"<seq>\\n" || body)``: the 32-byte ``log_hash`` of a record."""
    if len(prev) != 32:
        raise ValueError(f"prev must be a 32-byte hash, got {len(prev)} bytes")
    if seq < 1:
        raise ValueError(f"log_seq must be >= 1, got {seq}")
    h = hashlib.sha256(prev)
    h.update(b"%d\n" % seq)
    h.update(body)
    return h.digest()


def link(line: bytes, prev: bytes, seq: int) -> tuple[bytes, bytes]:
    """Chain one record line (``{...}\\n``, as :mod:`~tsnet2.traffic.records` writes it).

    Returns ``(chained line, its hash)``: the line with ``"log_hash"`` and ``"log_seq"``
    appended after its other keys.
    """
    if not line.endswith(b"}\n"):
        raise ValueError("a record line ends with '}\\n'")
    body = line[:-1]
    digest = chain_hash(prev, seq, body)
    return (b"%s,\"log_hash\":\"%s\",\"log_seq\":%d}\n"
            % (body[:-1], digest.hex().encode(), seq)), digest


def checkpoint_message(*, key: str, head_seq: int, head_hash: str, t: str, reason: str,
                       seq: int) -> bytes:
    """The bytes a checkpoint's ``sig`` signs: a fixed domain string, then the base64 public
    key, ``head_seq``, ``head_hash`` (hex), the record's time ``t``, its ``reason`` and its own
    ``log_seq``, one per line (so a periodic checkpoint cannot pass for a ``close`` one, nor
    move in the chain)."""
    return b"%s%s\n%d\n%s\n%s\n%s\n%d\n" % (_DOMAIN, key.encode(), head_seq,
                                              head_hash.encode(), t.encode(), reason.encode(),
                                              seq)


def encode_key(raw: bytes) -> str:
    """Base64 (standard, padded) of a 32-byte Ed25519 public key."""
    if len(raw) != 32:
        raise ValueError(f"an Ed25519 public key has 32 bytes, got {len(raw)}")
    return base64.b64encode(raw).decode("ascii")


def decode_key(text: str) -> bytes:
    """The 32 raw bytes of a base64 Ed25519 public key (``ed25519:`` prefix allowed).

    Raises :class:`ValueError` with a message that says what is wrong.
    """
    s = text.strip()
    s = s.removeprefix("ed25519:")
    try:
        raw = base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"not a base64 Ed25519 public key: {text[:60]!r}") from None
    if len(raw) != 32:
        raise ValueError(f"an Ed25519 public key has 32 bytes; {text[:60]!r} has {len(raw)}")
    return raw

