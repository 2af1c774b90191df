"""The stdout sink with a reader that stalls or goes away, under each policy, and the hash
chain across restarts (clean and after SIGKILL), against real pipes and processes."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.chained import unchain
from tsnet2.traffic import TrafficLog, TrafficLogError
from tsnet2.traffic import log as log_module
from tsnet2.traffic.signing import load_chain_state, load_or_create_signing_key

REPO = Path(__file__).resolve().parents[2]
BUFFER = 64 << 10
F_SETPIPE_SZ = 1031


class Pipe:
    """A pipe with a small kernel buffer whose reader starts only when told to."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe()
        fcntl.fcntl(self.w, F_SETPIPE_SZ, 4096)
        self.data = bytearray()
        self._thread: threading.Thread | None = None

    def start_reading(self) -> None:
        def run() -> None:
            while chunk := os.read(self.r, 65536):
                self.data += chunk

        self._thread = threading.Thread(target=run)
        self._thread.start()

    def finish(self) -> list[bytes]:
        """Close the write end, read to EOF; the lines read."""
        os.close(self.w)
        if self._thread is None:
            self.start_reading()
        assert self._thread is not None
        self._thread.join(30)
        assert not self._thread.is_alive()
        os.close(self.r)
        assert self.data.endswith(b"\n")
        return bytes(self.data).splitlines()


@pytest.fixture
def pipe() -> Iterator[Pipe]:
    p = Pipe()
    yield p
    for fd in (p.r, p.w):
        with contextlib.suppress(OSError):
            os.close(fd)


def _open(log: TrafficLog) -> Any:
    return log.open_flow(direction="out", local="100.64.0.1:5000", remote="100.64.0.2:80",
                         whois=None)


def test_fail_closed_pauses_and_refuses_while_the_reader_stalls(pipe: Pipe) -> None:
    events: list[bool] = []
    resumed = threading.Event()

    def pressure(stalled: bool) -> None:
        events.append(stalled)
        if not stalled:
            resumed.set()

    log = TrafficLog("-", stdout_fd=pipe.w, buffer=BUFFER, chunk_size=1024)
    log.on_pressure = pressure
    with log:
        flow = _open(log)
        logged = 0
        while not log.stalled:  # nobody reads: the pipe fills, then the queue
            flow.data("app->peer", b"x" * 1024)
            logged += 1024
            assert logged < 4 * BUFFER, "the log never said it was stalled"
        assert events == [True]
        assert log.queued_bytes >= BUFFER // 2
        with pytest.raises(TrafficLogError, match="stalled"):
            log.check_writable()
        with pytest.raises(TrafficLogError, match="stalled"):
            _open(log)
        log.reject(direction="out", remote="100.64.0.3:80", reason="log_unavailable")
        # Established flows must pause; one that goes on anyway is refused at the limit.
        with pytest.raises(TrafficLogError, match="stalled"):
            for _ in range(BUFFER // 1024 + 1):
                flow.data("app->peer", b"y" * 1024)
                logged += 1024
        assert log.queued_bytes <= BUFFER
        flow.close(bytes_out=logged)  # a close record always gets in
        pipe.start_reading()
        assert resumed.wait(30)
        assert events == [True, False] and not log.stalled
        log.check_writable()
    records = unchain(pipe.finish(), checkpoints=True)  # nothing lost: the chain is whole
    kinds = [r["kind"] for r in records]
    assert kinds[0] == kinds[-1] == "checkpoint"
    assert kinds.count("open") == 1 and kinds.count("reject") == 1
    assert kinds.count("close") == 1 and kinds.index("close") > kinds.index("reject")
    data = [r for r in records if r["kind"] == "data"]
    assert sum(r["len"] for r in data) == logged
    assert log.dropped == 0 and log.refused >= 1


def test_continue_counts_what_a_stalled_reader_misses(pipe: Pipe) -> None:
    drops: list[tuple[str, str]] = []
    log = TrafficLog("-", stdout_fd=pipe.w, buffer=BUFFER, chunk_size=1024,
                     on_error="continue")
    log.on_drop = lambda kind, reason: drops.append((kind, reason))
    log.on_pressure = lambda stalled: pytest.fail("continue never pauses flows")
    with log:
        flow = _open(log)
        for _ in range(4 * BUFFER // 1024):
            flow.data("app->peer", b"z" * 1024)  # never raises, never waits
        log.check_writable()
        assert not log.stalled and log.dropped > 0
        lost = log.dropped
        assert drops == [("data", "queue_full")] * lost
        pipe.start_reading()
        flow.close()
    lines = pipe.finish()
    recs = [json.loads(line) for line in lines]
    gaps = [r for r in recs if r["kind"] == "gap"]
    chained = [r for r in recs if r["kind"] != "gap"]
    seqs = [r["log_seq"] for r in chained]
    assert seqs == sorted(seqs)
    missing = set(range(1, seqs[-1] + 1)) - set(seqs)
    assert sum(g["dropped"] for g in gaps) == len(missing) == lost
    for s in missing:  # every lost record is inside a gap record's range
        assert any(g["first_seq"] <= s <= g["last_seq"] for g in gaps)
    assert all(g["kinds"] == {"data": g["dropped"]} and "queue full" in g["error"]
               for g in gaps)
    # each gap record stands where its first lost record would have been
    for i, r in enumerate(recs):
        if r["kind"] == "gap":
            assert recs[i - 1]["log_seq"] == r["first_seq"] - 1


@pytest.mark.parametrize("policy", ["fail-closed", "continue"])
def test_a_reader_that_goes_away(pipe: Pipe, policy: str, caplog: pytest.LogCaptureFixture
                                 ) -> None:
    caplog.set_level(logging.ERROR, logger="tsnet2.traffic")
    unhealthy = threading.Event()
    log = TrafficLog("-", stdout_fd=pipe.w, buffer=BUFFER, on_error=policy)  # type: ignore[arg-type]
    with log:
        flow = _open(log)
        os.close(pipe.r)
        pipe.r = os.open(os.devnull, os.O_RDONLY)  # keep the fixture's cleanup simple
        # the writer thread finds out (EPIPE) at its next write; health follows
        for _ in range(3000):
            try:
                flow.data("app->peer", b"after the reader left")
            except TrafficLogError:
                assert policy == "fail-closed"
            if not log.healthy:
                unhealthy.set()
                break
            threading.Event().wait(0.01)
        assert unhealthy.is_set()
        if policy == "fail-closed":
            with pytest.raises(TrafficLogError, match="cannot be written"):
                log.check_writable()
            with pytest.raises(TrafficLogError):
                _open(log)
        else:
            log.check_writable()
            _open(log)
    assert log.dropped >= 1
    assert any("EPIPE" in r.getMessage() for r in caplog.records)


def test_close_does_not_wait_forever_for_a_stalled_reader(
    pipe: Pipe, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(log_module, "CLOSE_DRAIN_TIMEOUT", 0.2)
    caplog.set_level(logging.ERROR, logger="tsnet2.traffic")
    log = TrafficLog("-", stdout_fd=pipe.w, buffer=BUFFER, chunk_size=1024,
                     on_error="continue", state_dir=tmp_path)
    with log:
        flow = _open(log)
        for _ in range(BUFFER // 1024):
            flow.data("app->peer", b"q" * 1024)
    assert any("never reached stdout" in r.getMessage() for r in caplog.records)
    state = load_chain_state(tmp_path)
    assert state is not None and not state.clean  # the next start knows records were lost


# ---------------------------------------------------------------------------- restarts


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines()


def test_the_chain_goes_on_across_a_clean_restart(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    for _ in range(2):
        with TrafficLog(str(path), state_dir=tmp_path) as log:
            flow = _open(log)
            flow.data("app->peer", b"hello")
            flow.close()
            assert log.checkpoint()
            assert not log.checkpoint()  # nothing new since the last one
    recs = unchain(_lines(path), checkpoints=True)  # one unbroken chain, 1..N
    ckpts = [r for r in recs if r["kind"] == "checkpoint"]
    assert [c["reason"] for c in ckpts] == ["start", "periodic", "close"] * 2
    second_start = ckpts[3]
    assert second_start["prev_seq"] == second_start["head_seq"] > 0
    assert "unclean" not in second_start
    key = load_or_create_signing_key(tmp_path).public
    assert {c["key"] for c in ckpts} == {key}
    state = load_chain_state(tmp_path)
    assert state is not None and state.clean and state.key == key


CRASH = r'''
import os, signal, sys
from tsnet2.traffic import TrafficLog
log = TrafficLog(sys.argv[1], state_dir=sys.argv[2])
log.open()
flow = log.open_flow(direction="out", local="a:1", remote="b:2", whois=None)
flow.data("app->peer", b"signed")
log.checkpoint()
flow.data("app->peer", b"unsigned tail")
os.kill(os.getpid(), signal.SIGKILL)
'''


def test_after_a_crash_the_chain_restarts_past_the_reserved_numbers(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    proc = subprocess.run([sys.executable, "-c", CRASH, str(path), str(tmp_path)],
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60,
                          check=False, capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    crashed = unchain(_lines(path), checkpoints=True)
    periodic = [r for r in crashed if r.get("reason") == "periodic"]
    assert len(periodic) == 1
    state = load_chain_state(tmp_path)
    assert state is not None and not state.clean
    with TrafficLog(str(path), state_dir=tmp_path):
        pass
    recs = [json.loads(line) for line in _lines(path)]
    start = recs[len(crashed)]
    assert start["kind"] == "checkpoint" and start["reason"] == "start"
    assert start["unclean"] is True
    # it chains from the crashed run's last checkpoint ...
    p = recs[len(periodic) and [r.get("reason") for r in recs].index("periodic")]
    assert (start["prev_seq"], start["prev_hash"]) == (p["log_seq"], p["log_hash"])
    # ... and numbers on from past everything the crashed run could have used
    assert start["log_seq"] == state.reserved > recs[len(crashed) - 1]["log_seq"]
    # the restarted run's own records chain from there
    unchain([line for line in _lines(path)][len(crashed):], checkpoints=True)


def test_losses_while_a_gap_record_is_written_are_not_forgotten() -> None:
    """The writer takes the pending gap out while it writes its record: losses counted
    meanwhile start a new gap; a gap record that could not be written is put back whole."""
    from tsnet2.traffic.sinks import Sink

    sink = Sink("stdout", named=False)
    sink.lose("data", 5, "queue full")
    sink.lose("data", 6, "queue full")
    line, taken = sink.take_gap()
    assert json.loads(line)["dropped"] == 2 and not sink.gap
    sink.lose("close", 9, "queue full")  # while the gap record is on its way
    assert sink.gap == {"close": 1} and (sink.gap_first, sink.gap_last) == (9, 9)
    sink.put_back(taken)  # ... and it failed: one gap with all three
    assert sink.gap == {"data": 2, "close": 1}
    assert (sink.gap_first, sink.gap_last) == (5, 9)
    assert sink.gap_since == taken.since
    rec = json.loads(sink.gap_line())
    assert (rec["dropped"], rec["first_seq"], rec["last_seq"]) == (3, 5, 9)
