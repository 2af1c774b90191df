"""A real tsnet2d writing its traffic log to stdout (a pipe, as in a container) and to a file,
with a reader of stdout that stops reading: under ``fail-closed`` flows pause and new flows
are refused with a ``reject`` record, under ``continue`` nothing waits and a ``gap`` record
counts what stdout missed. Either way other clients are served at once, and the chain is
whole where nothing was lost."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
from typing import Any

import pytest

import tsnet2
from tests.chained import unchain

from .tailnet import two_nodes, wait_for

pytestmark = pytest.mark.netns

F_SETPIPE_SZ = 1031
BUFFER = 1 << 20
PAYLOAD = 16 << 20  # far more than the pipe (4 KiB) and the daemon's queue (1 MiB) hold


class StdoutPipe:
    """The daemon's stdout: a small pipe that is read only once told to."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe()
        fcntl.fcntl(self.w, F_SETPIPE_SZ, 4096)
        self.data = bytearray()
        self.thread = threading.Thread(target=self._read)

    def _read(self) -> None:
        while chunk := os.read(self.r, 1 << 16):
            self.data += chunk

    def lines(self) -> list[bytes]:
        self.thread.join(60)
        assert not self.thread.is_alive(), "the daemon's stdout never reached EOF"
        return bytes(self.data).splitlines()

    def close(self) -> None:
        for fd in (self.r, self.w):
            with contextlib.suppress(OSError):
                os.close(fd)


def _echo(ln: Any, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            c = ln.accept(timeout=1)
        except Exception:
            continue

        def serve(c: socket.socket = c) -> None:
            with c:
                while data := c.recv(1 << 16):
                    c.sendall(data)

        threading.Thread(target=serve, daemon=True).start()


def _transfer(net: Any, result: dict[str, Any]) -> None:
    """Send PAYLOAD through an echo flow and read it back (in a thread)."""
    try:
        with net.a.dial("tcp", "sb:7300", timeout=30) as c:
            c.settimeout(120)
            got = 0

            def send() -> None:
                try:
                    c.sendall(b"p" * PAYLOAD)
                    c.shutdown(socket.SHUT_WR)
                except OSError as exc:
                    result["send_error"] = exc

            t = threading.Thread(target=send)
            t.start()
            while got < PAYLOAD:
                chunk = c.recv(1 << 16)
                if not chunk:
                    break
                got += len(chunk)
            t.join(120)
            result["got"] = got
    except Exception as exc:  # reported by the test
        result["error"] = exc


@pytest.mark.parametrize("policy", ["fail-closed", "continue"])
def test_a_stalled_stdout_reader(policy: str) -> None:
    out = StdoutPipe()
    try:
        with two_nodes(("sa", "sb"), stdout_a=out.w, extra_a=(
                "--traffic-log", "-", "--traffic-log-buffer", str(BUFFER),
                "--traffic-log-on-error", policy)) as net:
            os.close(out.w)  # only the daemon holds the write end now
            out.w = -1
            stop = threading.Event()
            with net.b.listen("tcp", ":7300") as ln:
                server = threading.Thread(target=_echo, args=(ln, stop), daemon=True)
                server.start()
                result: dict[str, Any] = {}
                mover = threading.Thread(target=_transfer, args=(net, result))
                mover.start()
                lc = net.a.local_client()
                if policy == "fail-closed":
                    # The flow fills the queue and pauses; then new flows are refused.
                    def refused() -> str | None:
                        try:
                            net.a.dial("tcp", "sb:7300", timeout=10).close()
                        except tsnet2.Error as exc:
                            return str(exc)
                        return None

                    why = wait_for(refused, 60, "a dial refused while stdout is stalled")
                    assert "traffic log" in why, why
                    assert "got" not in result  # the big flow is paused, not done
                    # Other clients of the daemon are served meanwhile.
                    assert lc.status()["BackendState"] == "Running"
                    out.thread.start()  # the collector catches up
                    mover.join(120)
                    assert result.get("got") == PAYLOAD, result
                    # Accepted again once stdout's queue has drained to a quarter.
                    def accepted() -> bool:
                        try:
                            net.a.dial("tcp", "sb:7300", timeout=10).close()
                        except tsnet2.Error:
                            return False
                        return True

                    wait_for(accepted, 60, "a dial accepted after stdout caught up")
                else:
                    mover.join(120)  # never waits for stdout
                    assert result.get("got") == PAYLOAD, result
                    assert lc.status()["BackendState"] == "Running"
                    out.thread.start()
                stop.set()
            net.lnet.stop_daemon("sa")
            file_lines = net.da.traffic_log.read_bytes().splitlines()
        stdout_lines = out.lines()
    finally:
        out.close()
    # The file sink never stalled: its chain is whole, from the start checkpoint to close.
    file_recs = unchain(file_lines, checkpoints=True)
    assert file_recs[0]["reason"] == "start" and file_recs[-1]["reason"] == "close"
    recs = [json.loads(line) for line in stdout_lines]
    if policy == "fail-closed":
        # Nothing was lost on stdout either: the same chain, record for record.
        assert stdout_lines == file_lines
        rejects = [r for r in recs if r["kind"] == "reject"]
        assert rejects and all(r["reason"] == "log_unavailable" for r in rejects)
        assert not [r for r in recs if r["kind"] == "gap"]
    else:
        gaps = [r for r in recs if r["kind"] == "gap"]
        assert gaps and sum(g["dropped"] for g in gaps) > 0
        assert all(g["sink"] == "stdout" for g in gaps)
        seqs = {r["log_seq"] for r in recs if "log_seq" in r}
        missing = set(range(1, max(seqs) + 1)) - seqs
        assert len(missing) == sum(g["dropped"] for g in gaps)
        # stdout's lines are the file's, less what the gap records report
        assert [line for line in stdout_lines if b'"kind":"gap"' not in line] == [
            line for line in file_lines if json.loads(line)["log_seq"] in seqs]
