"""``tsnet2 log verify`` on the hash chain and signed checkpoints (tsnet2/traffic/verify.py):
logs built record by record (tests/unit/logbuilder.py), intact, damaged, forged, crashed,
reordered and wrapped by container log collectors. Every problem is asserted by log_seq."""

from __future__ import annotations

import base64
import io
import json
import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.logbuilder import LogBuilder, simple_log
from tsnet2.cli import main
from tsnet2.traffic import chain, records
from tsnet2.traffic.signing import SigningKey
from tsnet2.traffic.verify import Lines, Problem, Report, ordered, verify


def _seq(line: str) -> int:
    return int(json.loads(line)["log_seq"])


def _found(rep: Report, kind: str) -> list[tuple[int | None, int | None]]:
    return [(p.first_seq, p.last_seq) for p in [*rep.problems, *rep.notes] if p.kind == kind]


def _kinds(rep: Report) -> set[str]:
    return {p.kind for p in rep.problems}


def _index(b: LogBuilder, pred: str) -> int:
    """The first line whose record has kind ``pred`` (or ``kind/reason``)."""
    for i, line in enumerate(b.lines):
        r = json.loads(line)
        if pred in (r["kind"], f"{r['kind']}/{r.get('reason')}"):
            return i
    raise AssertionError(pred)


def _relink(lines: list[str], start: int) -> list[str]:
    """What an attacker can do without the key: recompute every log_hash from ``start`` on
    so the chain links again (checkpoints keep their signed heads)."""
    out = list(lines[:start])
    prev = bytes.fromhex(json.loads(lines[start - 1])["log_hash"]) if start else chain.ZERO_HASH
    for line in lines[start:]:
        r = json.loads(line)
        seq = r["log_seq"]
        body = chain.canonical_body(r)
        digest = chain.chain_hash(prev, seq, body)
        out.append(body[:-1].decode() + f',"log_hash":"{digest.hex()}","log_seq":{seq}}}\n')
        prev = digest
    return out


# ---- intact ---------------------------------------------------------------------------------


def test_an_intact_rotated_set_passes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    b = simple_log()
    lines = b.lines
    third = len(lines) // 3
    for name, part in (("t.jsonl.2", lines[:third]), ("t.jsonl.1", lines[third:2 * third]),
                       ("t.jsonl", lines[2 * third:])):
        (tmp_path / name).write_text("".join(part))
    files = ordered([str(tmp_path / n) for n in ("t.jsonl", "t.jsonl.1", "t.jsonl.2")])
    rep = verify(Lines(files), keys=[b.key.public])
    assert rep.ok(require_start=True) and rep.problems == [] and rep.notes == []
    (node,) = rep.nodes
    last = len(lines)
    assert node["verified"] == [[1, last - 1]] and node["closed"] and node["pinned"]
    assert node["first_seq"] == 1 and node["last_seq"] == last and node["missing"] == []
    assert [r["clean"] for r in node["restarts"]] == [True]
    assert rep.flows == rep.closed == 5 and rep.rejects == 1
    # Without --key: the same, and the key is reported as not pinned.
    rep = verify(lines)
    assert rep.ok() and _found(rep, "unpinned") == [(None, None)]
    assert b.key.public in rep.notes[0].message
    # The command, with and without a pinned key (ed25519: prefix accepted).
    assert main(["log", "verify", "--key", f"ed25519:{b.key.public}", *files]) == 0
    out = capsys.readouterr().out
    assert out.endswith("OK\n") and f"verified (signed): 1..{last - 1}" in out
    assert main(["log", "verify", "--json", *files]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is True and doc["problems"] == [] and doc["nodes"][0]["closed"]
    assert doc["notes"][0]["kind"] == "unpinned"


def test_reserialized_json_still_verifies() -> None:
    b = simple_log()
    # Other key order, spaces, \\u escapes for non-ASCII: the hash is of the parsed record.
    lines = [json.dumps(dict(reversed(json.loads(x).items())), indent=None) for x in b.lines]
    assert lines[0] != b.lines[0].rstrip("\n")
    rep = verify(lines, keys=[b.key.public])
    assert rep.ok(require_start=True) and rep.problems == [], rep.problems


def test_a_new_key_without_chain_state_is_a_new_node() -> None:
    one, two = simple_log(), simple_log()
    rep = verify(one.lines + two.lines, keys=[one.key.public, two.key.public])
    assert rep.ok(require_start=True), rep.problems
    assert [n["keys"] for n in rep.nodes] == [[one.key.public], [two.key.public]]
    # The same key starting over at 1 (the chain state file was lost): a note.
    three = simple_log(one.key, t0=1_900_000_000_000_000_000)
    rep = verify(one.lines + three.lines)
    assert rep.ok(require_start=True) and len(rep.nodes) == 2
    assert _found(rep, "new-chain") == [(1, 1)]
    # The same log twice is a duplicate, though: one problem for the whole run of lines.
    rep = verify(one.lines + one.lines)
    n = len(one.lines)
    assert _found(rep, "duplicate") == [(1, n)] and not rep.ok()
    assert f"the same records as lines 1..{n} again" in rep.problems[0].message
    rep = verify(one.lines + one.lines, window=4)  # too far apart to compare
    assert _found(rep, "duplicate") == [(1, n)] and not rep.ok()


def test_interleaved_nodes_are_told_apart_by_their_chains() -> None:
    one, two = simple_log(), simple_log()
    rnd = random.Random(7)
    a, b = list(one.lines), list(two.lines)
    mixed = []
    while a or b:  # each node's lines in order, the two interleaved at random
        src = a if (a and (not b or rnd.random() < 0.5)) else b
        mixed.append(src.pop(0))
    rep = verify(mixed)
    assert rep.ok(require_start=True), rep.problems
    assert len(rep.nodes) == 2 and all(n["closed"] for n in rep.nodes)


# ---- damage ---------------------------------------------------------------------------------


@pytest.mark.parametrize("what", ["data", "checkpoint/periodic", "open", "reject",
                                  "checkpoint/start"])
def test_a_deleted_line_is_missing(what: str) -> None:
    b = simple_log()
    i = _index(b, what)
    if what == "checkpoint/start":  # the second run's start (the first: begins late)
        i = [k for k, x in enumerate(b.lines) if '"reason":"start"' in x][1]
    gone = _seq(b.lines[i])
    lines = b.lines[:i] + b.lines[i + 1:]
    rep = verify(lines)
    assert _found(rep, "missing") == [(gone, gone)], rep.problems
    assert not rep.ok()
    assert "no gap record declares them" in rep.problems[0].message


def test_deleting_the_first_line_begins_late() -> None:
    b = simple_log()
    rep = verify(b.lines[1:])
    assert _found(rep, "begins-late") == [(2, 2)]
    assert rep.ok() and not rep.ok(require_start=True)  # like rotated-away files


def test_an_edited_byte_in_a_payload_is_altered() -> None:
    b = simple_log()
    i = _index(b, "data")
    line = b.lines[i]
    r = json.loads(line)
    payload = r["payload_b64"]
    edited = base64.b64encode(b"J" + base64.b64decode(payload)[1:]).decode()
    assert edited != payload
    b.lines[i] = line.replace(payload, edited)
    rep = verify(b.lines)
    assert _found(rep, "altered") == [(r["log_seq"], r["log_seq"])], rep.problems
    assert "hash mismatch" in rep.problems[0].message
    (node,) = rep.nodes
    # What came before the edit up to the last signed checkpoint is no longer vouched for;
    # the rest of the chain still verifies from the next checkpoint.
    assert node["unverified"] and node["verified"][-1][1] == len(b.lines) - 1
    assert r["log_seq"] not in [s for a, z in node["verified"] for s in range(a, z + 1)]


def test_a_swapped_pair_is_reordered_and_checked_in_order() -> None:
    b = simple_log()
    i = _index(b, "data")
    s1, s2 = _seq(b.lines[i]), _seq(b.lines[i + 1])
    b.lines[i], b.lines[i + 1] = b.lines[i + 1], b.lines[i]
    rep = verify(b.lines)
    assert _kinds(rep) == {"reordered"}, rep.problems
    assert _found(rep, "reordered") == [(s1, s2)]
    assert rep.nodes[0]["verified"] == [[1, len(b.lines) - 1]]  # the chain itself is whole


def test_a_record_moved_beyond_the_window_is_still_placed() -> None:
    b = simple_log()
    i = _index(b, "open")
    moved = _seq(b.lines[i])
    line = b.lines.pop(i)
    b.lines.insert(i + 12, line)
    rep = verify(b.lines, window=4)
    assert _kinds(rep) - {"flow"} == {"reordered"}, rep.problems
    assert any(p.first_seq is not None and p.last_seq is not None
               and p.first_seq <= moved <= p.last_seq for p in rep.problems)
    assert "reorder window" in " ".join(str(p) for p in rep.problems)


def test_a_duplicated_line_is_a_duplicate() -> None:
    b = simple_log()
    i = _index(b, "data")
    b.lines.insert(i + 2, b.lines[i])
    rep = verify(b.lines)
    s = _seq(b.lines[i])
    assert _found(rep, "duplicate") == [(s, s)] and _kinds(rep) == {"duplicate"}
    assert f"the same record as line {i + 1}" in rep.problems[0].message


def test_a_truncated_tail_is_unsigned_and_open() -> None:
    b = LogBuilder()
    b.start()
    b.flow(b"abc")
    b.periodic()
    signed = b.seq
    b.flow(b"0123456789", close=False)
    cut = b.seq
    b.stop()
    lines = b.lines[:cut]  # the close of the flow and the close checkpoint are gone
    rep = verify(lines)
    assert _found(rep, "unsigned") == [(signed, cut)]
    assert _found(rep, "open-end") == [(cut, cut)]
    assert len(rep.open_flows) == 1 and _kinds(rep) == {"unsigned", "open-end"}
    assert not rep.ok() and not rep.ok(allow_unsigned_tail=True)
    assert rep.ok(allow_open=True)
    (node,) = rep.nodes
    assert node["verified"] == [[1, signed - 1]] and node["unsigned_tail"] == [signed, cut]
    # A log cut right after a periodic checkpoint: no tail, but no close checkpoint either.
    rep = verify(b.lines[:signed])
    assert _kinds(rep) == {"open-end"} and rep.ok(allow_open=True)


# ---- forgery --------------------------------------------------------------------------------


def test_checkpoints_of_another_key_do_not_count_when_keys_are_pinned() -> None:
    b = simple_log()
    other = SigningKey.generate()
    rep = verify(b.lines, keys=[other.public])
    ckpts = [_seq(x) for x in b.lines if '"kind":"checkpoint"' in x]
    assert _found(rep, "key") == [(s, s) for s in ckpts]
    assert rep.nodes[0]["verified"] == [] and not rep.ok()
    assert verify(b.lines, keys=[other.public, b.key.public]).ok()


def test_a_bad_signature_is_altered() -> None:
    b = simple_log()
    i = _index(b, "checkpoint/periodic")
    r = json.loads(b.lines[i])
    r["sig"] = base64.b64encode(SigningKey.generate().sign(b"x")).decode()
    b.lines[i] = json.dumps(r)
    lines = _relink(b.lines, i)  # and the chain relinked: only the signature is wrong
    rep = verify(lines)
    seq = r["log_seq"]
    assert (seq, seq) in _found(rep, "altered")
    assert "signature does not verify" in " ".join(p.message for p in rep.problems
                                                    if p.first_seq == seq)
    # Relinking changed every later log_hash: the next checkpoint's signed head no longer
    # matches, so nothing from the last good checkpoint on is vouched for.
    assert any(p.extra.get("checkpoint_seq", 0) > seq for p in rep.problems)


def test_an_edit_with_every_later_hash_recomputed_fails_at_the_next_checkpoint() -> None:
    b = simple_log()
    i = _index(b, "close")
    r = json.loads(b.lines[i])
    r["bytes_in"] = 0  # hide some bytes
    b.lines[i] = json.dumps(r)
    lines = _relink(b.lines, i)
    rep = verify(lines)
    edited = r["log_seq"]
    nxt = next(_seq(x) for x in lines[i:] if '"kind":"checkpoint"' in x)
    alt = [p for p in rep.problems if p.kind == "altered"]
    assert alt and alt[0].extra["checkpoint_seq"] == nxt
    assert alt[0].first_seq is not None and alt[0].last_seq is not None
    assert alt[0].first_seq <= edited <= alt[0].last_seq == nxt - 1
    assert "hash mismatch" not in " ".join(p.message for p in alt)  # the chain links
    assert not rep.nodes[0]["closed"] and not rep.ok()


def test_resigning_with_a_new_key_is_a_key_change() -> None:
    b = simple_log()
    p1, i = [k for k, x in enumerate(b.lines) if '"reason":"periodic"' in x][:2]
    evil = SigningKey.generate()
    out = list(b.lines[:i])
    for line in b.lines[i:]:  # re-sign every checkpoint from here with the attacker's key
        r = json.loads(line)
        if r["kind"] == "checkpoint":
            r["key"] = evil.public
            msg = chain.checkpoint_message(key=evil.public, head_seq=r["head_seq"],
                                           head_hash=r["head_hash"], t=r["t"],
                                           reason=r["reason"], seq=r["log_seq"])
            r["sig"] = base64.b64encode(evil.sign(msg)).decode()
        out.append(json.dumps(r))
    out = _relink(out, i)
    first = _seq(out[i])
    rep = verify(out)  # unpinned: the key changes, and nothing says the new one is the node's
    assert _found(rep, "key") == [(first, first)] and not rep.ok()
    rep = verify(out, keys=[b.key.public])  # pinned: those checkpoints do not count
    resigned = [_seq(x) for x in out[i:] if '"kind":"checkpoint"' in x]
    assert _found(rep, "key") == [(s, s) for s in resigned]
    assert rep.nodes[0]["verified"] == [[1, _seq(out[p1]) - 1]]
    assert _found(rep, "unsigned") == [(_seq(out[p1]), resigned[-1])]
    assert not rep.ok()


# ---- restarts and lost records --------------------------------------------------------------


def test_a_crash_restart_leaves_an_unsigned_tail_and_skips_numbers() -> None:
    b = LogBuilder()
    b.start()
    b.flow(b"before")
    b.periodic()
    saved = b.seq
    left = b.flow(b"left open", close=False)
    crashed_last = b.seq
    b.crash()
    start = b.start()
    b.flow(b"after")
    b.stop()
    assert start > crashed_last + 1  # numbers were skipped
    rep = verify(b.lines, keys=[b.key.public])
    assert rep.ok(require_start=True), rep.problems
    assert _found(rep, "crash-tail") == [(saved + 1, crashed_last)]
    assert _found(rep, "missing") == []
    (node,) = rep.nodes
    assert node["crash_tails"] == [[saved + 1, crashed_last]]
    assert node["restarts"] == [{"log_seq": start, "clean": False, "prev_seq": saved,
                                 "line": crashed_last + 1}]
    assert node["verified"] == [[1, saved], [start, b.seq - 1]]
    assert rep.restart_closes == 1 and left not in rep.open_flows and not rep.open_flows


def test_a_restart_whose_predecessor_is_missing() -> None:
    b = simple_log()
    i = [k for k, x in enumerate(b.lines) if '"reason":"start"' in x][1]
    gone = _seq(b.lines[i - 1])  # the first run's close checkpoint
    rep = verify(b.lines[:i - 1] + b.lines[i:])
    assert _found(rep, "missing") == [(gone, gone)]


def test_gap_records_declare_missing_numbers() -> None:
    b = LogBuilder()
    b.start()
    b.flow(b"abc")
    lost_first = b.seq + 1
    b.emit(records.reject_record(conn_id="aa", direction="in", remote="x:1",
                                 reason="no_listener", t=b.tick()), write=False)
    b.emit(records.reject_record(conn_id="ab", direction="in", remote="x:1",
                                 reason="no_listener", t=b.tick()), write=False)
    lost_last = b.seq
    b.gap(lost_first, lost_last, dropped={"reject": 2})
    b.flow(b"def")
    silent = b.seq + 1
    b.emit(records.reject_record(conn_id="ac", direction="in", remote="x:1",
                                 reason="no_listener", t=b.tick()), write=False)
    b.stop()
    rep = verify(b.lines)
    assert _found(rep, "missing") == [(lost_first, lost_last), (silent, silent)]
    declared, undeclared = (p for p in rep.problems if p.kind == "missing")
    assert declared.extra["declared"] is True and "no space left" in declared.message
    assert declared.extra["gap_error"] == "write: no space left on device"
    assert undeclared.extra["declared"] is False
    assert rep.gap_records_lost == 2 and rep.gaps[0]["kinds"] == {"reject": 2}
    assert rep.gaps[0]["first_seq"] == lost_first


# ---- old logs -------------------------------------------------------------------------------


def _unchained() -> list[str]:
    t = 1_800_000_000_000_000_000
    out = [records.open_record(conn_id="f1", direction="out", local="a:1", remote="b:2",
                               whois=None, t=t)]
    out += [records.data_record(conn_id="f1", direction="app->peer", seq=i, data=b"abcd", t=t)
            for i in (1, 2, 3)]
    out.append(records.close_record(conn_id="f1", bytes_in=0, bytes_out=12, duration_ms=1, t=t))
    out.append(records.gap_record(dropped={"data": 3}, error="EIO", since=t, t=t))
    return [x.decode() for x in out]


def test_old_unchained_logs_get_the_flow_checks() -> None:
    lines = _unchained()
    rep = verify(lines)
    assert rep.ok() and rep.problems == [] and rep.flows == rep.closed == 1
    assert rep.gap_records_lost == 3  # dropped is the total, kinds the counts
    assert [p.kind for p in rep.notes] == ["unchained-log"] and rep.nodes == []
    del lines[2]
    rep = verify(lines)
    assert "data records 2..2 are missing" in str(rep.problems[0])
    assert rep.problems[0].line == 3 and rep.problems[0].first_seq is None


def test_unchained_records_before_the_chain_are_a_prefix_after_it_a_problem() -> None:
    b = simple_log()
    rep = verify(_unchained()[:5] + b.lines)
    assert rep.ok(require_start=True), rep.problems
    assert _found(rep, "unchained-prefix") == [(None, None)]
    lines = [*b.lines[:6], _unchained()[0], *b.lines[6:]]
    rep = verify(lines)
    assert [(p.kind, p.line) for p in rep.problems] == [("unchained", 7)]


# ---- collectors -----------------------------------------------------------------------------


def _big_log() -> LogBuilder:
    """A log with a data record of a full 16 KiB chunk (a line of about 22 KiB)."""
    b = LogBuilder()
    b.start()
    b.flow(bytes(range(256)) * 64 + b"tail", b"ok", chunk=16384)
    b.stop()
    assert max(len(x) for x in b.lines) > 16384
    return b


def test_cri_partial_lines_are_joined_and_stderr_ignored() -> None:
    b = _big_log()
    out = []
    size = 8192  # containerd's max_container_log_line_size (16 KiB by default): P, P, F
    for n, line in enumerate(b.lines):
        text = line.rstrip("\n")
        pieces = [text[i:i + size] for i in range(0, len(text), size)]
        for k, piece in enumerate(pieces):
            tag = "F" if k == len(pieces) - 1 else "P"
            out.append(f"2026-12-03T01:02:03.{n:09d}Z stdout {tag} {piece}\n")
            if tag == "P":  # the daemon's own log lines come between the pieces
                out.append('2026-12-03T01:02:03Z stderr P {"kind":"open","log_seq":1\n')
                out.append("2026-12-03T01:02:03Z stderr F tsnet2d: INFO a log line\n")
    assert sum(" stdout P " in x for x in out) == 2
    rep = verify(out, keys=[b.key.public])
    assert rep.ok(require_start=True), rep.problems
    assert rep.chained_records == len(b.lines) and rep.foreign_lines == len(out) - sum(
        " stdout " in x for x in out)
    # A piece lost from the middle: that record is not read, and so it is missing.
    i = next(k for k, x in enumerate(out) if " stdout P " in x)
    rep = verify(out[:i] + out[i + 1:])
    assert {p.kind for p in rep.problems} >= {"missing"}


def test_docker_json_file_and_other_collectors() -> None:
    b = _big_log()
    docker = []
    for line in b.lines:
        pieces = [line[i:i + 16384] for i in range(0, len(line), 16384)]
        for piece in pieces:  # only the last piece ends with the newline
            docker.append(json.dumps({"log": piece, "stream": "stdout",
                                      "time": "2026-12-03T01:02:03.000000001Z"}))
        docker.append(json.dumps({"log": "tsnet2d: INFO x\n", "stream": "stderr",
                                  "time": "2026-12-03T01:02:03Z"}))
    assert len(docker) > 2 * len(b.lines)
    rep = verify(docker)
    assert rep.ok(require_start=True) and rep.chained_records == len(b.lines), rep.problems
    stripped = [json.dumps({"log": x.rstrip("\n"), "stream": "stdout", "time": "t"})
                for x in simple_log().lines]  # a collector that drops the newline
    assert verify(stripped).ok(require_start=True)
    vector = [json.dumps({"message": x.rstrip("\n"), "kubernetes": {"pod": "p"}})
              for x in b.lines]
    assert verify(vector).ok(require_start=True)
    fluent_cri = [json.dumps({"time": "t", "stream": "stdout", "logtag": "F", "log": x})
                  for x in b.lines]
    assert verify(fluent_cri).ok(require_start=True)
    # Fluent Bit without a CRI parser: the kubelet's line inside "log".
    raw = [json.dumps({"log": f"2026-12-03T01:02:03Z stdout F {x}"}) for x in b.lines]
    assert verify(raw).ok(require_start=True)


def test_overlong_lines_are_a_problem_not_a_crash() -> None:
    b = simple_log()
    i = _index(b, "data")
    text = b.lines[i].rstrip("\n")
    out = [f"2026-12-03T01:02:03Z stdout F {x}" for x in b.lines]
    out[i] = f"2026-12-03T01:02:03Z stdout P {text[:50]}"
    out.insert(i + 1, f"2026-12-03T01:02:03Z stdout P {'x' * 3000}")
    out.insert(i + 2, f"2026-12-03T01:02:03Z stdout F {text[50:]}")
    assert max(len(x) for x in b.lines) < 2000
    rep = verify(out, max_line=2000)
    assert ("line", i + 1) in [(p.kind, p.line) for p in rep.problems]
    s = _seq(b.lines[i])
    assert (s, s) in _found(rep, "missing")
    # The reader bounds a physical line too, and a partial line cut by the end is reported.
    data = ("x" * 9000 + "\n" + b.lines[0]).encode()
    got = list(Lines(["-"], io.BytesIO(data), max_line=1000))
    assert len(got) == 2 and len(got[0]) <= 200 and got[1] == b.lines[0]
    rep = verify([f"2026-12-03T01:02:03Z stdout P {b.lines[0][:20]}"])
    assert [(p.kind, p.line) for p in rep.problems] == [("line", 1)]


def test_the_command_bounds_its_output(tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    b = simple_log()
    for _ in range(60):
        b.flow(b"z")
    b.stop()
    path = tmp_path / "t.jsonl"
    path.write_text("".join(b.lines[::2]))  # every other line: dozens of problems
    assert main(["log", "verify", str(path)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert len([x for x in out if x.startswith("problem: ")]) == 50
    assert any(x.startswith("... and ") and "more problems" in x for x in out)
    assert out[-1] == "FAILED"
    first = next(x for x in out if x.startswith("problem: "))
    assert first.startswith("problem: log_seq 2: missing") and f"[{path}:2]" in first
    assert main(["log", "verify", "--json", str(path)]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is False and len(doc["problems"]) > 50
    assert {"kind", "first_seq", "last_seq", "line", "node", "message", "fails", "at"} <= set(
        doc["problems"][0])
    assert {"verified", "unverified", "unsigned_tail", "crash_tails", "missing", "restarts",
            "closed", "keys", "pinned"} <= set(doc["nodes"][0])


# ---- any single damage is found -------------------------------------------------------------


_INTACT = simple_log()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(op=st.sampled_from(["edit", "delete", "swap"]), where=st.integers(0, 10**9),
       other=st.integers(0, 10**9), byte=st.integers(0, 255))
def test_any_single_edit_deletion_or_swap_is_detected(op: str, where: int, other: int,
                                                      byte: int) -> None:
    lines = [x.encode() for x in _INTACT.lines]
    if op == "edit":
        blob = bytearray(b"".join(lines))
        pos = where % len(blob)
        if blob[pos] == byte:
            return
        blob[pos] = byte
        text = bytes(blob).decode("utf-8", errors="replace")
        damaged = text.splitlines(keepends=True)
    elif op == "delete":
        i = where % len(lines)
        damaged = [x.decode() for k, x in enumerate(lines) if k != i]
    else:
        i, j = where % len(lines), other % len(lines)
        if i == j:
            return
        lines[i], lines[j] = lines[j], lines[i]
        damaged = [x.decode() for x in lines]

    def parsed(ls: list[str]) -> list[object]:
        out: list[object] = []
        for x in ls:
            try:
                out.append(json.loads(x))
            except ValueError:
                out.append(x)
        return out

    if parsed(damaged) == parsed(_INTACT.lines):
        return  # the same records (an escape spelled otherwise): nothing to find
    rep = verify(damaged)
    assert not rep.ok(require_start=True), (op, where, other, byte, rep.problems)
    assert all(isinstance(p, Problem) for p in rep.problems)
