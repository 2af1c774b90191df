"""The open-flow journal (tsnet2/traffic/journal.py): parsing, compaction, failure. The
crash itself (a real process killed mid-flow) is in tests/integration/test_traffic_crash.py."""

from __future__ import annotations

from pathlib import Path

from tsnet2.traffic.journal import COMPACT_BYTES, FlowJournal, Orphan, parse


def test_parse_skips_torn_and_foreign_lines() -> None:
    data = b"\n".join([
        b'{"k":"o","id":"a","t":5,"pid":9}',
        b'{"k":"n","id":"a","i":3,"o":4}',
        b'{"k":"o","id":"b","t":6,"pid":9}',
        b'not json',
        b'{"k":"c","id":"b"}',
        b'{"k":"n","id":"zz","i":1,"o":1}',  # never opened
        b'{"k":"n","id":"a","i":-1,"o":4}',  # nonsense counts are ignored
        b'{"k":"o","id":"c","t":7',  # torn by the crash
    ])
    assert parse(data) == [Orphan("a", 5, 3, 4, 9)]


def test_the_journal_is_compacted_to_its_live_flows(tmp_path: Path) -> None:
    path = tmp_path / "j"
    j = FlowJournal(str(path))
    j.start()
    j.opened("keep", 1)
    n = 0
    while path.stat().st_size < COMPACT_BYTES - 200:
        j.opened(f"f{n:08d}", 2)
        j.closed(f"f{n:08d}")
        n += 1
    for _ in range(10):
        j.opened("x", 3)
        j.closed("x")
    assert path.stat().st_size < 1000  # rewritten with only "keep"
    j.close()
    assert [o.conn_id for o in FlowJournal(str(path)).recover()] == ["keep"]


def test_a_journal_that_cannot_be_written_is_switched_off(tmp_path: Path) -> None:
    j = FlowJournal(str(tmp_path / "missing-dir" / "j"))
    j.start()  # cannot create: off, with an error in the log, never an exception
    j.opened("a", 1)
    j.counted("a", 1, 1)
    j.closed("a")
    j.close()
    assert FlowJournal(str(tmp_path / "missing-dir" / "j")).recover() == []
