"""Process plumbing for the benchmark: load-generator processes in lab namespaces, and
readings from /proc (RSS, fd limits and counts, CPU time)."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from tsnet2.lab import Lab

ROOT = Path(__file__).resolve().parents[2]
CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchRunError(Exception):
    """A benchmark step failed; the message carries the load generator's stderr tail."""


class Gen:
    """One load-generator process (``tests.bench.loadgen``, or ``program``) inside ``netns``.

    It speaks line by line on stdout (READY / HELD / RESULT); ``send`` writes a line to its
    stdin. The process is tracked by the lab, so ``Lab.close`` stops it in any case.
    """

    def __init__(self, lab: Lab, netns: str, role_argv: list[str], log_path: Path,
                 max_seconds: int, mark: bool = False, program: list[str] | None = None) -> None:
        self.name = role_argv[0]
        self.log_path = log_path
        argv = [sys.executable, "-m", "tests.bench.loadgen", "--max-seconds", str(max_seconds)]
        if mark:
            argv.append("--mark")
        if program is not None:  # another program speaking the same protocol (gotsnet)
            argv = [*program, "-max-seconds", str(max_seconds)]
        with open(log_path, "ab") as logf:
            self.proc: subprocess.Popen[str] = lab.popen(
                netns, [*argv, *role_argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=logf, cwd=str(ROOT), text=True, start_new_session=True,
            )
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        out = self.proc.stdout
        assert out is not None
        with contextlib.suppress(ValueError, OSError):
            for line in out:
                self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def stderr_tail(self, n: int = 1500) -> str:
        """The end of the process's stderr log."""
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except FileNotFoundError:
            return ""

    def expect(self, tag: str, timeout: float) -> Any:
        """Wait for the next line starting with ``tag``; return its JSON payload (or None)."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BenchRunError(f"loadgen {self.name}: no {tag} within {timeout:.0f}s; "
                                    f"stderr: {self.stderr_tail()}")
            try:
                line = self._lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                code = self.proc.wait(5)
                raise BenchRunError(f"loadgen {self.name} exited ({code}) before {tag}; "
                                    f"stderr: {self.stderr_tail()}")
            if line == tag or line.startswith(tag + " "):
                rest = line[len(tag):].strip()
                return json.loads(rest) if rest else None

    def send(self, line: str = "go") -> None:
        """Write one line to the process's stdin (a GO or release signal)."""
        stdin = self.proc.stdin
        assert stdin is not None
        stdin.write(line + "\n")
        stdin.flush()

    def result(self, timeout: float) -> Any:
        """Wait for RESULT and for the process to exit cleanly; return the payload."""
        payload = self.expect("RESULT", timeout)
        try:
            code = self.proc.wait(10)
        except subprocess.TimeoutExpired:
            raise BenchRunError(f"loadgen {self.name} did not exit after RESULT") from None
        if code != 0:
            raise BenchRunError(f"loadgen {self.name} exited {code}: {self.stderr_tail()}")
        self._close_pipes()
        return payload

    def stop(self) -> None:
        """SIGTERM (then SIGKILL after 5 s) and reap; idempotent."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._close_pipes()

    def _close_pipes(self) -> None:
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError, ValueError):
                    pipe.close()


def stop_all(gens: list[Gen]) -> None:
    """Stop every generator (used in ``finally`` blocks)."""
    for g in gens:
        with contextlib.suppress(Exception):
            g.stop()


# ---- /proc ------------------------------------------------------------------------------


def rss_bytes(pid: int) -> int:
    """VmRSS of ``pid`` in bytes (from /proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise BenchRunError(f"no VmRSS for pid {pid}")


def nofile_limits(pid: int) -> tuple[int, int]:
    """(soft, hard) "Max open files" of ``pid`` from /proc/<pid>/limits."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            parts = line.split()
            return int(parts[3]), int(parts[4])
    raise BenchRunError(f"no open-files limit for pid {pid}")


def fd_count(pid: int) -> int:
    """How many descriptors ``pid`` has open."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds ``pid`` has used."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def find_pid(argv_tail: list[str]) -> int | None:
    """The pid of a process whose argv ends with ``argv_tail``; the first element is matched
    against the program's base name (``["wireguard-go", "-f", IF]``)."""
    want = [a.encode() for a in argv_tail]
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            argv = d.joinpath("cmdline").read_bytes().rstrip(b"\0").split(b"\0")
        except OSError:
            continue
        if len(argv) < len(want):
            continue
        tail = argv[-len(want):]
        if tail[1:] == want[1:] and os.path.basename(tail[0]) == want[0]:
            return int(d.name)
    return None


def host_cpu() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    fields = [float(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def snmp(pid: int) -> dict[str, int]:
    """Counters of the network namespace ``pid`` lives in: Udp RcvbufErrors, Tcp
    RetransSegs and OutSegs (from /proc/<pid>/net/snmp)."""
    lines = Path(f"/proc/{pid}/net/snmp").read_text().splitlines()
    table: dict[str, dict[str, int]] = {}
    for head, vals in zip(lines[::2], lines[1::2], strict=False):
        proto, _, names = head.partition(":")
        table[proto] = dict(zip(names.split(), map(int, vals.split(":")[1].split()),
                                strict=False))
    return {"udp_rcvbuf_errors": table["Udp"]["RcvbufErrors"],
            "udp_in": table["Udp"]["InDatagrams"],
            "tcp_retrans": table["Tcp"]["RetransSegs"], "tcp_out": table["Tcp"]["OutSegs"]}


class CpuWatch:
    """CPU use of named processes over an interval, as % of one core, plus ``host``: the
    whole machine's busy share in % of all its CPUs."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self._t0 = time.monotonic()
        self._c0 = {n: self._cpu(p) for n, p in pids.items()}
        self._h0 = host_cpu()

    @staticmethod
    def _cpu(pid: int) -> float:
        try:
            return cpu_seconds(pid)
        except OSError:
            return float("nan")

    def stop(self) -> dict[str, float]:
        """Percent of one core each process used since construction; ``host`` busy %."""
        dt = max(1e-6, time.monotonic() - self._t0)
        out = {n: round(100.0 * (self._cpu(p) - self._c0[n]) / dt, 1)
               for n, p in self.pids.items()}
        busy, total = host_cpu()
        out["host"] = round(100.0 * (busy - self._h0[0]) / max(1.0, total - self._h0[1]), 1)
        return out
