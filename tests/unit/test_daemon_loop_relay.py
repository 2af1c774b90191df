"""tsnet2d --event-loop and --relay: which loop and which relay a daemon gets."""

from __future__ import annotations

import asyncio
import builtins
import sys
from pathlib import Path
from typing import Any

import pytest

from tsnet2.daemon import cli, zerocopy
from tsnet2.daemon.datapath import Datapath
from tsnet2.traffic import TrafficLog


def test_auto_and_uvloop_pick_uvloop_when_installed() -> None:
    uvloop = pytest.importorskip("uvloop")
    assert cli.loop_factory("auto") is uvloop.new_event_loop
    assert cli.loop_factory("uvloop") is uvloop.new_event_loop
    assert cli.loop_factory("asyncio") is asyncio.new_event_loop


def _without_uvloop(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def fake_import(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "uvloop":
            raise ImportError("No module named 'uvloop'")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "uvloop", raising=False)
    monkeypatch.setattr(builtins, "__import__", fake_import)


def test_auto_falls_back_to_asyncio_without_uvloop(monkeypatch: pytest.MonkeyPatch) -> None:
    _without_uvloop(monkeypatch)
    assert cli.loop_factory("auto") is asyncio.new_event_loop
    with pytest.raises(ValueError, match=r"uvloop is not installed.*--event-loop asyncio"):
        cli.loop_factory("uvloop")


def test_uvloop_asked_for_but_missing_exits_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    _without_uvloop(monkeypatch)
    argv = ["--socket", str(tmp_path / "s.sock"), "--state-dir", str(tmp_path / "st"),
            "--event-loop", "uvloop"]
    assert cli.main(argv) == cli.USAGE_EXIT
    assert "tsnet2d: --event-loop uvloop: uvloop is not installed" in capsys.readouterr().err


def test_help_names_loop_and_relay() -> None:
    text = cli.build_parser().format_help()
    assert "--event-loop {auto,uvloop,asyncio}" in text
    assert "--relay {auto,copy}" in text


@pytest.mark.parametrize(("mode", "relay", "zero_copy"), [
    ("payload", "auto", False), ("metadata", "auto", True), ("off", "auto", True),
    ("metadata", "copy", False), ("off", "copy", False),
])
def test_datapath_relays_with_splice_only_without_payload(
        tmp_path: Path, mode: str, relay: Any, zero_copy: bool) -> None:
    """splice(2) only where the log needs no bytes, and only when not told to copy."""
    log = TrafficLog(str(tmp_path / "t.jsonl"), mode=mode)  # type: ignore[arg-type]
    dp = Datapath(backend=None, traffic=log, spawn=None, relay=relay)  # type: ignore[arg-type]
    assert (dp.pipes is not None) == (zero_copy and zerocopy.available())


def test_datapath_refuses_an_unknown_relay(tmp_path: Path) -> None:
    log = TrafficLog(str(tmp_path / "t.jsonl"))
    with pytest.raises(ValueError, match='relay must be "auto" or "copy"'):
        Datapath(backend=None, traffic=log, spawn=None, relay="fast")  # type: ignore[arg-type]


@pytest.mark.skipif(not zerocopy.available(), reason="os.splice is Linux-only")
def test_pipe_pool_reuses_clean_pipes_and_closes_dirty_ones() -> None:
    import os

    pool = zerocopy.PipePool(keep=1, limit=2)
    a, b = pool.take(), pool.take()
    assert a is not None and b is not None and pool.in_use == 2
    assert pool.take() is None  # the limit: the caller copies instead
    pool.give(a)
    pool.give(b)  # over `keep`: closed
    assert (pool.in_use, pool.kept) == (0, 1)
    with pytest.raises(OSError):
        os.fstat(b[0])
    again = pool.take()
    assert again == a  # reused
    assert again is not None
    os.write(again[1], b"left over")
    pool.give(again, dirty=True)  # may hold bytes: never reused
    with pytest.raises(OSError):
        os.fstat(again[0])
    assert (pool.in_use, pool.kept) == (0, 0)
    pool.clear()


def test_unusable_state_dir_is_a_clear_error(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """No traceback: the daemon says which state dir it cannot use and why, and exits 1."""
    (tmp_path / "file").write_text("")
    argv = ["--socket", str(tmp_path / "s.sock"), "--state-dir", str(tmp_path / "file" / "st"),
            "--event-loop", "asyncio"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert f"tsnet2d: cannot use state dir {tmp_path / 'file' / 'st'}: Not a directory" in err
    assert "Traceback" not in err
