"""The traffic log on real failing file systems: a full tmpfs (fail-closed and continue,
recovery after space is freed, no half record left behind), a read-only tmpfs, and an ext4
file system shut down under the log (EIO). Needs root (mount)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from tests.require import needs
from tsnet2.traffic import TrafficLog, TrafficLogError, load_schema, reject_record

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("mount") is None,
    reason=needs("root", "mounting a small tmpfs needs root and mount(8)"),
)

PAGE = os.sysconf("SC_PAGE_SIZE")
T_NS = 1_779_206_770_123_450_000


def run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)


@contextlib.contextmanager
def mounted(mnt: Path, options: str) -> Iterator[Path]:
    """A tmpfs with ``options`` at ``mnt`` (created), unmounted on exit."""
    mnt.mkdir()
    res = run("mount", "-t", "tmpfs", "-o", f"{options},mode=0700", "tmpfs", str(mnt))
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    try:
        yield mnt
    finally:
        res = run("umount", str(mnt))
        assert res.returncode == 0, res.stderr


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs, unmounted after the test."""
    with mounted(tmp_path / "mnt", "size=64k") as mnt:
        yield mnt


@pytest.fixture
def validator() -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(load_schema())


def fill(directory: Path) -> Path:
    """Take every free page of the file system with a filler file; return it."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * PAGE)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


def align_to_page(log: TrafficLog, path: Path) -> None:
    """Pad the log with one valid reject record so its size is a whole number of pages:
    then every later record needs a new page (and fails once the disk is full)."""
    # the chain keys the writer appends: ,"log_hash":"<64 hex>","log_seq":N
    chain = 89 + len(str(log.log_seq + 1))
    base = chain + len(
        reject_record(
            conn_id="0" * 16, direction="out", remote="x", reason="no_slot", error="p", t=T_NS
        )
    )
    need = (-path.stat().st_size) % PAGE
    if need < base:
        need += PAGE
    line = reject_record(
        conn_id="0" * 16,
        direction="out",
        remote="x",
        reason="no_slot",
        error="p" * (need - base + 1),
        t=T_NS,
    )
    assert len(line) + chain == need
    log.write_record("reject", line)
    assert path.stat().st_size % PAGE == 0


def records(validator: jsonschema.Draft202012Validator, path: Path) -> list[dict[str, Any]]:
    raw = path.read_bytes()
    assert raw.endswith(b"\n"), "the log ends in a partial record"
    out = []
    for line in raw.splitlines():
        rec = json.loads(line)
        validator.validate(rec)
        if rec["kind"] != "checkpoint":  # the chain's: tests/unit/test_traffic_stream.py
            out.append(rec)
    return out


def test_full_disk_fail_closed_then_recovers(
    tmpfs: Path, validator: jsonschema.Draft202012Validator
) -> None:
    path = tmpfs / "traffic.jsonl"
    drops: list[tuple[str, str]] = []
    with TrafficLog(str(path)) as log:
        log.on_drop = lambda kind, reason: drops.append((kind, reason))
        a = log.open_flow(direction="in", local="a:1", remote="b:2", whois=None)
        a.data("peer->app", b"before")
        align_to_page(log, path)
        filler = fill(tmpfs)
        size = path.stat().st_size

        with pytest.raises(TrafficLogError) as info:
            a.data("peer->app", b"x" * 100)
        assert info.value.errno == errno.ENOSPC
        assert not log.healthy
        with pytest.raises(TrafficLogError, match="refusing new flows"):
            log.check_writable()
        with pytest.raises(TrafficLogError):
            log.open_flow(direction="out", local="a:1", remote="c:3", whois=None)
        log.reject(direction="out", remote="c:3", reason="log_unavailable")
        assert not log.probe()
        assert log.dropped == 3 and log.active_flows == 1
        assert drops == [("data", "ENOSPC"), ("open", "ENOSPC"), ("reject", "ENOSPC")]
        assert path.stat().st_size == size  # nothing half-written

        filler.unlink()  # space again
        log.check_writable()  # probes: writes the gap record
        assert log.healthy
        b = log.open_flow(direction="out", local="a:1", remote="c:3", whois=None)
        b.close()
        a.close(bytes_in=6)
    recs = records(validator, path)
    gap = [r for r in recs if r["kind"] == "gap"]
    assert len(gap) == 1
    assert (gap[0]["dropped"], gap[0]["kinds"]) == (3, {"data": 1, "open": 1, "reject": 1})
    assert gap[0]["error"].startswith("ENOSPC") and gap[0]["since"] <= gap[0]["t"]
    assert [r["kind"] for r in recs[recs.index(gap[0]) :]] == ["gap", "open", "close", "close"]
    a_data = [r for r in recs if r.get("conn_id") == a.conn_id and r["kind"] == "data"]
    assert [r["seq"] for r in a_data] == [1]  # seq 2 was dropped, the gap says so
    assert recs[-1]["bytes_in"] == 6


def test_full_disk_continue_counts_and_recovers(
    tmpfs: Path, validator: jsonschema.Draft202012Validator
) -> None:
    path = tmpfs / "traffic.jsonl"
    drops: list[tuple[str, str]] = []
    with TrafficLog(str(path), on_error="continue", chunk_size=10) as log:
        log.on_drop = lambda kind, reason: drops.append((kind, reason))
        a = log.open_flow(direction="out", local="a:1", remote="b:2", whois=None)
        align_to_page(log, path)
        filler = fill(tmpfs)
        a.data("app->peer", b"y" * 25)  # three chunks, all dropped, no exception
        log.check_writable()  # continue: flows are not refused
        b = log.open_flow(direction="in", local="a:1", remote="c:3", whois=None)
        b.data("peer->app", b"z")
        b.close()
        assert not log.healthy and log.dropped == 6
        assert [k for k, _ in drops] == ["data"] * 3 + ["open", "data", "close"]
        assert {r for _, r in drops} == {"ENOSPC"}

        filler.unlink()
        a.data("app->peer", b"w")  # the first write after recovery brings the gap record
        assert log.healthy
        a.close()
    recs = records(validator, path)
    gap = next(r for r in recs if r["kind"] == "gap")
    assert gap["kinds"] == {"close": 1, "data": 4, "open": 1} and gap["dropped"] == 6
    a_recs = [r for r in recs if r.get("conn_id") == a.conn_id]
    assert [r["seq"] for r in a_recs if r["kind"] == "data"] == [4]  # 1-3 lost, visible
    assert a_recs[-1]["bytes_out"] == 26  # the close still has every byte


def test_short_write_is_undone(tmpfs: Path, validator: jsonschema.Draft202012Validator) -> None:
    """A record that only partly fits is removed, not left as half a line."""
    path = tmpfs / "traffic.jsonl"
    with TrafficLog(str(path), on_error="continue") as log:
        flow = log.open_flow(direction="out", local="a:1", remote="b:2", whois=None)
        filler = fill(tmpfs)
        size = path.stat().st_size
        assert size % PAGE != 0  # the last page has room: the next write is short, then fails
        flow.data("app->peer", os.urandom(3 * PAGE))
        assert path.stat().st_size == size and log.dropped == 1
        flow.data("app->peer", b"small")  # fits in the page's rest: gap + data
        flow.close()
        filler.unlink()
    recs = records(validator, path)
    assert [r["kind"] for r in recs] == ["open", "gap", "data", "close"]
    assert recs[2]["seq"] == 2 and recs[3]["bytes_out"] == 3 * PAGE + 5


def test_rotation_without_free_inodes_keeps_writing(
    tmp_path: Path, validator: jsonschema.Draft202012Validator, caplog: pytest.LogCaptureFixture
) -> None:
    """When the new file cannot be created the current one stays in use: nothing is lost."""
    with mounted(tmp_path / "mnt", "size=64k,nr_inodes=2") as mnt:  # the root dir + one file
        path = mnt / "traffic.jsonl"
        with TrafficLog(str(path), max_bytes=1000, keep=2) as log:
            flow = log.open_flow(direction="out", local="a:1", remote="b:2", whois=None)
            for _ in range(30):
                flow.data("app->peer", b"d" * 20)
            flow.close()
            assert log.rotations == 0 and log.healthy and log.dropped == 0
        assert sorted(p.name for p in mnt.iterdir()) == ["traffic.jsonl"]
        assert path.stat().st_size > 1000
        recs = records(validator, path)
    assert [r["seq"] for r in recs if r["kind"] == "data"] == list(range(1, 31))
    failures = [r for r in caplog.records if "rotation failed" in r.getMessage()]
    assert len(failures) == 1  # retried only after a pause, not on every record


def test_read_only(tmpfs: Path) -> None:
    path = tmpfs / "traffic.jsonl"
    with TrafficLog(str(path)) as log:
        log.open_flow(direction="out", local="a:1", remote="b:2", whois=None).close()
        # The kernel refuses to make a file system read-only under a file open for
        # writing, so a running log never sees EROFS from a remount (only from a file
        # system that fails, see the ext4 test below).
        res = run("mount", "-o", "remount,ro", str(tmpfs))
        assert res.returncode != 0 and "busy" in res.stderr
        log.reject(direction="out", remote="b:2", reason="dial_failed")
        assert log.healthy and log.dropped == 0
    res = run("mount", "-o", "remount,ro", str(tmpfs))
    assert res.returncode == 0, res.stderr
    try:
        for target in (path, tmpfs / "new.jsonl"):
            with pytest.raises(TrafficLogError, match="cannot open traffic log") as info:
                TrafficLog(str(target)).open()
            assert info.value.errno == errno.EROFS
    finally:
        assert run("mount", "-o", "remount,rw", str(tmpfs)).returncode == 0
    # start checkpoint, open, close, reject, close checkpoint
    assert len(path.read_bytes().splitlines()) == 5


EXT4_IOC_SHUTDOWN = 0x8004587D  # _IOR('X', 125, __u32)
EXT4_GOING_FLAGS_NOLOGFLUSH = 2


@pytest.fixture
def ext4(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB ext4 on a loop device, unmounted and detached after the test."""
    if shutil.which("mkfs.ext4") is None or shutil.which("losetup") is None:
        pytest.skip("needs mkfs.ext4 and losetup")
    image, mnt = tmp_path / "fs.img", tmp_path / "ext4"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(4 << 20)
    res = run("mkfs.ext4", "-q", "-F", str(image))
    assert res.returncode == 0, res.stderr
    res = run("losetup", "--find", "--show", str(image))
    if res.returncode != 0:
        pytest.skip(f"no loop device: {res.stderr.strip()}")
    dev = res.stdout.strip()
    try:
        res = run("mount", "-t", "ext4", dev, str(mnt))
        if res.returncode != 0:
            pytest.skip(f"cannot mount ext4: {res.stderr.strip()}")
        try:
            yield mnt
        finally:
            assert run("umount", str(mnt)).returncode == 0
    finally:
        run("losetup", "-d", dev)


@pytest.mark.parametrize("policy", ["fail-closed", "continue"])
def test_io_error_after_fs_shutdown(ext4: Path, policy: Any) -> None:
    path = ext4 / "traffic.jsonl"
    drops: list[tuple[str, str]] = []
    with TrafficLog(str(path), on_error=policy) as log:
        log.on_drop = lambda kind, reason: drops.append((kind, reason))
        flow = log.open_flow(direction="in", local="a:1", remote="b:2", whois=None)
        fd = os.open(ext4, os.O_RDONLY)
        try:
            fcntl.ioctl(fd, EXT4_IOC_SHUTDOWN, struct.pack("I", EXT4_GOING_FLAGS_NOLOGFLUSH))
        finally:
            os.close(fd)
        ctx = (
            pytest.raises(TrafficLogError) if policy == "fail-closed" else contextlib.nullcontext()
        )
        with ctx as info:
            flow.data("peer->app", b"lost")
        if info is not None:
            assert info.value.errno == errno.EIO
        assert not log.healthy and not log.probe()
        if policy == "fail-closed":
            with pytest.raises(TrafficLogError):
                log.check_writable()
        else:
            log.check_writable()
        with contextlib.suppress(TrafficLogError):
            flow.close()
    assert drops == [("data", "EIO"), ("close", "EIO"), ("checkpoint", "EIO")]
