"""Test helper: read chained traffic-log lines, checking the chain as the writer built it."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from tsnet2.traffic.chain import CHAIN_KEYS, ZERO_HASH, canonical_body, chain_hash


def unchain(lines: Iterable[bytes], *, checkpoints: bool = False, strict: bool = True,
            validator: Any = None) -> list[dict[str, Any]]:
    """The records of ``lines`` without their chain keys (checkpoints left out unless asked).

    Every line is checked: the body's keys sorted with ``log_hash``, ``log_seq`` last; and,
    with ``strict``, each ``log_seq`` one more than the last chained record's and each
    ``log_hash`` recomputed from the previous one (a start checkpoint names its own prev).
    ``gap`` records are not chained. ``validator``: a JSON Schema validator for each record.
    """
    out: list[dict[str, Any]] = []
    prev: bytes | None = None
    last = 0
    for raw in lines:
        rec = json.loads(raw)
        if validator is not None:
            validator.validate(rec)
        keys = list(rec)
        if rec["kind"] == "gap":
            assert "log_seq" not in rec
            assert keys == sorted(keys)
            out.append(rec)
            continue
        assert keys[-2:] == list(CHAIN_KEYS), keys
        assert keys[:-2] == sorted(keys[:-2]), keys
        seq, digest = rec["log_seq"], bytes.fromhex(rec["log_hash"])
        if rec["kind"] == "checkpoint" and rec["reason"] == "start":
            prev = bytes.fromhex(rec["prev_hash"])
        elif strict or last:
            assert seq == last + 1, f"log_seq {seq} after {last}"
        if strict or prev is not None:
            assert chain_hash(prev or ZERO_HASH, seq, canonical_body(rec)) == digest, seq
        prev, last = digest, seq
        body = {k: v for k, v in rec.items() if k not in CHAIN_KEYS}
        if checkpoints or rec["kind"] != "checkpoint":
            out.append(body)
    return out
