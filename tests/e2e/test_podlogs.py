"""Reading and following a container's kubelet log files the way a collector does, on files
this test writes (the real ones are read by the cluster suite)."""

from __future__ import annotations

import gzip
import os
import sys
import time
from pathlib import Path

import pytest

from tests.e2e import podlogs
from tests.e2e.kube import wait_for


def test_container_log_dir() -> None:
    assert str(podlogs.container_log_dir("/var/log/pods", "ns", "web-0", "u-1", "tsnet2d")) \
        == "/var/log/pods/ns_web-0_u-1/tsnet2d"


def test_log_file_order_is_oldest_first() -> None:
    names = ["1.log", "0.log", "0.log.20260519-160610", "0.log.20260519-150000.gz",
             "1.log.20260519-170000", "notes.txt", "0.log.tmp"]
    assert podlogs.log_file_order(names) == [
        "0.log.20260519-150000.gz", "0.log.20260519-160610", "0.log",
        "1.log.20260519-170000", "1.log"]


def test_read_container_log_joins_rotated_files(tmp_path: Path) -> None:
    (tmp_path / "0.log.20260519-150000.gz").write_bytes(gzip.compress(b"a\n"))
    (tmp_path / "0.log.20260519-160000").write_bytes(b"b\n")
    (tmp_path / "0.log").write_bytes(b"c\n")
    assert podlogs.read_container_log(tmp_path) == "a\nb\nc\n"


def _append(path: Path, data: bytes) -> None:
    with path.open("ab") as f:
        f.write(data)


def test_file_follower_keeps_what_a_rotated_or_deleted_file_held(tmp_path: Path) -> None:
    """Started before the file exists; reads the old file to its end after a rotation
    (rename, then the runtime writes a little more to it before it reopens), and after
    the file and its directory are removed (the pod was deleted)."""
    directory = tmp_path / "ns_web_u" / "tsnet2d"
    with podlogs.FileFollower(directory, poll=0.01) as follower:
        directory.mkdir(parents=True)
        current = directory / "0.log"
        _append(current, b"one\n")
        wait_for(lambda: follower.text() == "one\n", 10, "the first line")
        rotated = directory / "0.log.20260519-160610"
        current.rename(rotated)
        _append(rotated, b"two\n")  # still written by the runtime: not reopened yet
        _append(current, b"")        # the runtime reopened: an empty new file
        time.sleep(0.05)
        _append(current, b"three\n")
        wait_for(lambda: follower.text() == "one\ntwo\nthree\n", 10, "the rotated lines",
                 follower.text)
        # The pod is deleted: the kubelet removes its directory; the open file is still read.
        _append(current, b"four\n")
        os.unlink(current)
        os.unlink(rotated)
        directory.rmdir()
        assert follower.stop() == "one\ntwo\nthree\nfour\n"


def test_file_follower_stop_reads_what_is_left(tmp_path: Path) -> None:
    (tmp_path / "0.log").write_bytes(b"x" * 100)
    follower = podlogs.FileFollower(tmp_path, poll=30)  # it will not poll again by itself
    wait_for(lambda: len(follower.text()) == 100, 10, "the first read")
    _append(tmp_path / "0.log", b"tail\n")
    assert follower.stop().endswith("xtail\n")
    follower.close()


@pytest.mark.timeout(60)
def test_process_follower_collects_the_output_and_ends_the_command() -> None:
    code = "import sys, time; print('a', flush=True); print('b', flush=True); time.sleep(60)"
    with podlogs.ProcessFollower([sys.executable, "-c", code], grace=0.5) as follower:
        wait_for(lambda: follower.text() == "a\nb\n", 20, "the output", follower.text)
        assert follower.stop() == "a\nb\n"
