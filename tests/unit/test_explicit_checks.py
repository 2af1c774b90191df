"""Conditions that used to be ``assert`` statements are real checks: a misuse raises a typed
error that says what is wrong (and they survive ``python -O``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tsnet2.traffic.journal import FlowJournal
from tsnet2.traffic.sinks import FileSink
from tsnet2.traffic.verify import Lines


def test_file_sink_without_path_or_descriptor() -> None:
    sink = FileSink(None)
    with pytest.raises(ValueError, match="neither a path nor a descriptor"):
        sink.open()


def test_file_sink_written_after_close_is_ebadf(tmp_path: Path) -> None:
    """A closed, size-limited file sink answers EBADF (it used to trip an assert)."""
    sink = FileSink(str(tmp_path / "traffic.jsonl"), max_bytes=10)
    sink.open()
    sink.close()
    result = sink.write("flow", 1, b'{"k":"x"}\n')
    assert result.error is not None and result.error.errno == 9  # EBADF


def test_lines_of_stdin_need_stdin() -> None:
    with pytest.raises(ValueError, match="no stdin was given"):
        list(Lines(["-"]))


def test_journal_compaction_keeps_writing(tmp_path: Path) -> None:
    """Compaction swaps the journal's descriptor; the next entry goes to the new file."""
    journal = FlowJournal(str(tmp_path / "flows.journal"))
    journal.start()
    try:
        journal.opened("c1", 1)
        fd = journal._fd
        assert fd is not None
        assert journal._compact(fd) == journal._fd != fd
        journal.opened("c2", 2)
        data = Path(journal.path).read_bytes()
        assert b'"c1"' in data and b'"c2"' in data
    finally:
        journal.close()


def test_no_assert_statements_in_product_code() -> None:
    """``python -O`` strips asserts: a condition worth checking gets a real check."""
    import ast

    root = Path(__file__).resolve().parents[2]
    found = []
    for path in [*root.joinpath("tsnet2").rglob("*.py"),
                 *root.joinpath("operator", "tsnet2_operator").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Assert):
                found.append(f"{path.relative_to(root)}:{node.lineno}")
    assert found == [], f"assert statements in product code: {found}"
