"""`make bench`: tsnet2 measured against the bare WireGuard tunnel and raw veth, in one lab.

One lab, one run: a control server and two tsnet2d ("bench-a", "bench-b") in network
namespaces over wireguard-go. Load generators (``tests.bench.loadgen``) run inside the node
namespaces: receivers and echo servers in A, senders and clients in B. Three paths:

- tsnet2:  B app -> B daemon -> WireGuard -> A daemon -> A app (the library on both ends)
- tunnel:  a plain TCP socket from B's namespace to A's tailnet IP (SO_MARK 0x7473)
- veth:    a plain TCP socket between the same namespaces over the lab's 10.250.x.y addresses

and, when Go is here, a Go tsnet row (``tests/bench/gotsnet``): two tailscale.com/tsnet nodes,
testcontrol and DERP in one Go process in a namespace of its own (loopback and one veth with
192.0.2.1/32, no route out); its apps are goroutines in that process.

The daemons run with ``--traffic-log-mode metadata`` for every row but the ``payload`` and
``off`` bulk rows. Prints a table (each tsnet2 row against the tunnel and against Go tsnet, with
PASS/MISS per target; docs/benchmarks.md, "Rows") and writes JSON (``bench-results.json`` at the
repo root by default) with every raw run. Everything it creates is removed at the end, also on
Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import platform
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import tsnet2
from tsnet2.lab import Lab, LabError, check_prerequisites, find_leftovers
from tsnet2.lab.tailnet import DaemonProc, LocalTailnet
from tsnet2.node.device import WireguardGo, find_wireguard_go

from .procs import (
    ROOT,
    BenchRunError,
    CpuWatch,
    Gen,
    fd_count,
    find_pid,
    nofile_limits,
    rss_bytes,
    snmp,
    stop_all,
)
from .profile import finish as profile_finish
from .profile import start_record
from .report import Row, Target, fmt, markdown, median, percentile, summary, table

MB = 1024 * 1024
PATHS = ("tunnel", "tsnet2", "veth")
MAIN_MODE = "metadata"
"""The daemons' --traffic-log-mode for every row but the payload and off bulk rows."""
PHASES = ("latency", "bulk", "flows", "hold", "payload", "off")
GOTSNET_BUILD = ROOT / "tests" / "bench" / "gotsnet" / "build.sh"
GO_NETNS_ADDR = "192.0.2.1/32"  # TEST-NET-1: tsnet wants a non-loopback IPv4 to go online


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options (defaults are the documented benchmark)."""
    p = argparse.ArgumentParser(prog="python -m tests.bench.run",
                                description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(ROOT / "bench-results.json"), help="results JSON path")
    p.add_argument("--duration", type=float, default=5.0, help="seconds per throughput run")
    p.add_argument("--rounds", type=int, default=2,
                   help="interleaved tunnel/tsnet2 rounds per throughput and flow-rate row")
    p.add_argument("--iters", type=int, default=1000, help="latency iterations per path")
    p.add_argument("--workers", type=int, default=16,
                   help="concurrent clients of the second new-flows row (the first has one)")
    p.add_argument("--worker-threads", type=int, default=1,
                   help="threads per client process in that row: --workers / this processes "
                        "(default 1: a process per worker, so no client shares a GIL)")
    p.add_argument("--flows", type=int, default=8000, help="concurrent open flows to hold")
    p.add_argument("--budget", type=float, default=570.0,
                   help="seconds; phases that would not fit are skipped")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 1 s runs, 1 round, 200 iterations, 500 flows")
    p.add_argument("--profile", default="", metavar="DIR",
                   help="sample both daemons with py-spy during tsnet2 runs into DIR")
    p.add_argument("--only", default="",
                   help=f"comma-separated phases to run ({','.join(PHASES)}; logmode = "
                        "payload,off)")
    p.add_argument("--no-go", action="store_true",
                   help="skip the Go tsnet row (tests/bench/gotsnet) even when Go is here")
    args = p.parse_args(argv)
    if args.workers < 1 or args.worker_threads < 1 or args.workers % args.worker_threads:
        p.error("--workers must be a positive multiple of --worker-threads")
    only = {x for x in args.only.split(",") if x}
    if "logmode" in only:
        only = (only - {"logmode"}) | {"payload", "off"}
    if only - set(PHASES):
        p.error(f"--only: unknown phase(s) {sorted(only - set(PHASES))}")
    args.only = ",".join(sorted(only))
    if args.quick:
        args.duration, args.rounds, args.iters, args.flows = 1.0, 1, 200, 500
    return args


class Bench:
    """Runs the phases in one lab and collects rows and raw details."""

    def __init__(self, args: argparse.Namespace, wireguard_go: WireguardGo,
                 gotsnet: tuple[str, str] = ("", "not requested")) -> None:
        self.args = args
        self.go_bin, self.go_skip = gotsnet
        """The gotsnet binary, or "" and why the Go tsnet row is skipped."""
        self.go: Gen | None = None
        self.wireguard_go = wireguard_go
        """The wireguard-go both nodes run ($TSNET2_WIREGUARD_GO, else wireguard-go on PATH)."""
        self.wg_name = os.path.basename(wireguard_go.path)
        self.t0 = time.monotonic()
        self.rows: list[Row] = []
        self.details: dict[str, Any] = {}
        self.errors: list[str] = []
        self.skipped: list[str] = []
        self.lab: Lab | None = None
        self.net: LocalTailnet | None = None
        self.keepers: list[tsnet2.Server] = []
        self._port = 20000
        self._gen_no = 0
        self.mode = MAIN_MODE
        self.idle: dict[str, Any] = {}
        self.loadavg_start = Path("/proc/loadavg").read_text().split()[:3]
        self.a_ip = self.b_ip = ""
        self.lab_prefix = ""

    # ---- plumbing ----------------------------------------------------------------------

    def elapsed(self) -> float:
        """Seconds since the run started."""
        return time.monotonic() - self.t0

    def say(self, msg: str) -> None:
        """Progress line on stderr."""
        print(f"[{self.elapsed():6.1f}s] {msg}", file=sys.stderr, flush=True)

    def port(self) -> int:
        """A fresh port: no run reuses another's, so TIME_WAIT never collides."""
        self._port += 1
        return self._port

    def gen(self, node: str, role_argv: list[str], max_seconds: int = 120) -> Gen:
        """Start a load generator in node ``a`` or ``b``."""
        assert self.lab is not None
        self._gen_no += 1
        netns = self.da.node.netns if node == "a" else self.db.node.netns
        log = self.lab.dir / f"gen{self._gen_no}-{role_argv[0]}.log"
        return Gen(self.lab, netns, role_argv, log, max_seconds, mark=True)

    @property
    def da(self) -> DaemonProc:
        """Daemon A (the accepting side)."""
        assert self.net is not None
        return self.net.daemons["bench-a"]

    @property
    def db(self) -> DaemonProc:
        """Daemon B (the dialing side)."""
        assert self.net is not None
        return self.net.daemons["bench-b"]

    @staticmethod
    def daemon_pid(dp: DaemonProc) -> int:
        """The daemon's pid, from its own readiness line."""
        pids = re.findall(r"pid=(\d+) listening on", dp.log_text())
        if pids:
            return int(pids[-1])
        assert dp.proc is not None
        return dp.proc.pid

    def event_loop(self) -> str:
        """The daemons' event loop, from their readiness lines ("?" when they do not say)."""
        loops = {m[-1] if (m := re.findall(r"listening on .*\((\S+) event loop\)",
                                           dp.log_text())) else "?"
                 for dp in (self.da, self.db)}
        return "/".join(sorted(loops))

    def cpu_pids(self) -> dict[str, int]:
        """Daemons and wireguard-go processes to watch for CPU."""
        pids = {"daemon_a": self.daemon_pid(self.da), "daemon_b": self.daemon_pid(self.db)}
        for key, dp in (("wg_a", self.da), ("wg_b", self.db)):
            pid = find_pid([self.wg_name, "-f", dp.node.ifname])
            if pid is not None:
                pids[key] = pid
        return pids

    def profile_start(self, tag: str, seconds: float) -> list[subprocess.Popen[bytes] | None]:
        """With ``--profile``: py-spy both daemons for ``seconds`` (raw collapsed stacks)."""
        if not self.args.profile:
            return []
        d = Path(self.args.profile)
        d.mkdir(parents=True, exist_ok=True)
        return [start_record(self.daemon_pid(dp), d / f"{tag}-{self._gen_no}-{k}.txt", seconds)
                for k, dp in (("a", self.da), ("b", self.db))]

    def net_counters(self) -> dict[str, int]:
        """UDP receive-buffer drops in A and B, TCP retransmits / segments sent from B."""
        a, b = snmp(self.daemon_pid(self.da)), snmp(self.daemon_pid(self.db))
        return {"udp_drops_a": a["udp_rcvbuf_errors"], "udp_drops_b": b["udp_rcvbuf_errors"],
                "udp_in_a": a["udp_in"], "tcp_retrans_b": b["tcp_retrans"],
                "tcp_out_b": b["tcp_out"]}

    def endpoints(self, path: str, port: int) -> tuple[str, str]:
        """(listen spec in A, dial spec from B) for a path."""
        if path == "tsnet2":
            return (f"ts:{self.da.socket_path}@:{port}",
                    f"ts:{self.db.socket_path}@{self.a_ip}:{port}")
        ip = self.a_ip if path == "tunnel" else str(self.da.node.ip)
        return f"tcp:{ip}:{port}", f"tcp:{ip}:{port}"

    def fits(self, phase: str, seconds: float) -> bool:
        """Whether ``phase`` is selected and fits in the remaining budget."""
        only = [x for x in self.args.only.split(",") if x]
        if only and phase not in only:
            return False
        return self.in_budget(phase, seconds)

    def in_budget(self, what: str, seconds: float) -> bool:
        """Whether ``what`` (about ``seconds`` long) fits in the remaining budget; if not,
        it is listed as skipped."""
        if self.elapsed() + seconds > self.args.budget:
            self.skipped.append(f"{what} (needs ~{seconds:.0f}s, "
                                f"{self.args.budget - self.elapsed():.0f}s left)")
            self.say(f"skipping {what}: not enough time left in the budget")
            return False
        return True

    def phase(self, name: str, est: float, fn: Callable[[], None]) -> None:
        """Run a phase; a failure is recorded and the run goes on."""
        if not self.fits(name, est):
            return
        self.say(f"phase {name} (~{est:.0f}s)")
        t = time.monotonic()
        try:
            fn()
        except (BenchRunError, tsnet2.Error, OSError, subprocess.SubprocessError) as exc:
            self.errors.append(f"{name}: {exc}")
            self.say(f"phase {name} FAILED: {exc}")
        self.details.setdefault("phase_seconds", {})[name] = round(time.monotonic() - t, 1)

    # ---- setup -------------------------------------------------------------------------

    def setup(self, lab: Lab, net: LocalTailnet) -> None:
        """Control server, both daemons (traffic log ``MAIN_MODE``), keepers up, idle
        readings."""
        self.lab, self.net = lab, net
        net.start_control()
        key = net.authkey(reusable=True)
        for name in ("bench-a", "bench-b"):
            # --no-guard: the direct-tunnel baseline is a plain socket, which the guard would
            # refuse (the daemon owns the guard's listener set and rewrites it whenever a
            # listener comes or goes). The guard's per-packet cost (a conntrack lookup and a
            # few rules on the tailnet device) is left out of the tsnet2 rows.
            net.add_daemon(name, auth_key=key,
                           extra_args=("--traffic-log-mode", MAIN_MODE, "--no-guard"))
        self.bring_up()
        self.idle = self.readings()
        self.details["idle"] = self.idle
        self.details["daemon_event_loop"] = self.event_loop()
        self.say(f"up: A {self.a_ip}, B {self.b_ip}; idle RSS A "
                 f"{self.idle['rss_a'] / MB:.1f} MB, B {self.idle['rss_b'] / MB:.1f} MB; "
                 f"event loop {self.details['daemon_event_loop']}")
        self.warm_up()
        self.start_go()

    # ---- the Go tsnet row --------------------------------------------------------------

    def start_go(self) -> None:
        """Start gotsnet in a namespace of its own (loopback and a veth pair with a TEST-NET
        address and no route: tsnet stays offline without a non-loopback IPv4)."""
        if not self.go_bin:
            self.skipped.append(f"Go tsnet row: {self.go_skip}")
            self.say(f"Go tsnet row skipped: {self.go_skip}")
            return
        assert self.lab is not None
        lab = self.lab
        ns = f"{lab.prefix}-gots"
        try:
            lab._add_netns(ns)  # the lab removes it with the others; find_leftovers checks
            for cmd in (["ip", "link", "add", "gots0", "type", "veth", "peer", "name", "gots1"],
                        ["ip", "addr", "add", GO_NETNS_ADDR, "dev", "gots0"],
                        ["ip", "link", "set", "gots0", "up"],
                        ["ip", "link", "set", "gots1", "up"]):
                lab.run(ns, cmd)
        except (LabError, OSError, subprocess.SubprocessError) as exc:
            self.go_skip = f"its namespace could not be set up: {exc}"
            self.skipped.append(f"Go tsnet row: {self.go_skip}")
            return
        go = Gen(lab, ns, ["gotsnet"], lab.dir / "gotsnet.log", int(self.args.budget) + 120,
                 program=[self.go_bin])
        try:
            ready = go.expect("READY", 90)
        except BenchRunError as exc:
            go.stop()
            self.go_skip = f"gotsnet did not come up: {exc}"
            self.skipped.append(f"Go tsnet row: {self.go_skip}")
            self.say(self.go_skip)
            return
        self.go = go
        rss = rss_bytes(go.proc.pid)
        self.details["gotsnet"] = {"binary": self.go_bin, "ready": ready, "rss_idle": rss}
        self.say(f"Go tsnet up: A {ready['a_ip']}, path {ready['path']}, process RSS "
                 f"{rss / MB:.1f} MB")

    def go_cmd(self, line: str, timeout: float) -> dict[str, Any]:
        """One gotsnet command; its RESULT payload."""
        assert self.go is not None
        self.go.send(line)
        res: dict[str, Any] = self.go.expect("RESULT", timeout)
        if "error" in res:
            raise BenchRunError(f"gotsnet {line!r}: {res['error']}")
        return res

    def stop_go(self) -> None:
        """Ask gotsnet to quit (it exits within 5 s), else stop it."""
        if self.go is not None:
            with contextlib.suppress(OSError, ValueError):
                self.go.send("quit")
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.go.proc.wait(10)
            self.go.stop()
            self.go = None

    def bulk_go(self, streams: int) -> dict[str, Any]:
        """One Go tsnet throughput run (sender and sink are goroutines in gotsnet)."""
        d = self.args.duration
        assert self.go is not None
        net0 = snmp(self.go.proc.pid)
        res = self.go_cmd(f"bulk {streams} {d}", d + 60)
        net1 = snmp(self.go.proc.pid)
        failed: list[str] = []
        if res["errors"]:
            # tsnet resets a flow its app has not accepted within 1 s (listener.handle in
            # tsnet.go); on a saturated machine that can hit a stream. One retry, recorded.
            failed = res["errors"][:3]
            self.say(f"  gotsnet x{streams}: {failed}; retrying once")
            res = self.go_cmd(f"bulk {streams} {d}", d + 60)
            if res["errors"]:
                raise BenchRunError(f"gotsnet x{streams}: {res['errors'][:3]}")
        span = res["seconds"]
        mbps = res["bytes"] * 8 / span / 1e6 if span > 0 else float("nan")
        out = {"path": "gotsnet", "streams": streams, "mode": self.mode,
               "mbit_s": round(mbps, 1), "bytes": res["bytes"], "seconds": round(span, 3),
               "cpu_s": round(res["cpu_s"], 3),
               "cpu_s_per_gb": round(res["cpu_s"] / (res["bytes"] / 1e9), 3)
               if res["bytes"] else None, "per_stream_bytes": res["per_stream"],
               "failed_first_try": failed,
               "net": {k: net1[k] - net0[k] for k in net0}}  # its namespace: loopback UDP
        self.say(f"  {'gotsnet':6} x{streams}: {mbps:8.1f} Mbit/s  cpu {out['cpu_s']} s "
                 f"(whole process) net {out['net']}")
        return out

    def bring_up(self) -> None:
        """Keeper Servers hold both nodes up for the whole run (they are never closed
        early: ``Server.close`` takes a node down for every app)."""
        self.close_keepers()
        ka = tsnet2.Server(socket_path=str(self.da.socket_path), hostname="bench-a")
        kb = tsnet2.Server(socket_path=str(self.db.socket_path), hostname="bench-b")
        self.keepers = [ka, kb]
        st_a, st_b = ka.up(timeout=30), kb.up(timeout=30)
        self.a_ip, self.b_ip = str(st_a.tailscale_ips[0]), str(st_b.tailscale_ips[0])

    def close_keepers(self) -> None:
        """Drop the keeper Servers (their control connections)."""
        for k in self.keepers:
            if not k.closed:
                with contextlib.suppress(tsnet2.Error, OSError):
                    k.close()
        self.keepers = []

    def warm_up(self, timeout: float = 20.0) -> None:
        """One echo B -> A through tsnet2 (WireGuard handshake), retried until it works."""
        ka, kb = self.keepers
        port = self.port()
        stop = threading.Event()
        with ka.listen("tcp", f":{port}") as ln:
            def serve() -> None:
                while not stop.is_set():
                    try:
                        conn = ln.accept(timeout=0.5)
                    except tsnet2.Error:
                        continue
                    with conn, contextlib.suppress(OSError):
                        conn.sendall(conn.recv(16))
            t = threading.Thread(target=serve, daemon=True)
            t.start()
            deadline = time.monotonic() + timeout
            try:
                while True:
                    try:
                        with kb.dial("tcp", f"{self.a_ip}:{port}", timeout=5) as c:
                            c.settimeout(5)
                            c.sendall(b"w")
                            if c.recv(16) == b"w":
                                return
                    except (tsnet2.Error, OSError) as exc:
                        if time.monotonic() > deadline:
                            raise BenchRunError(f"warm-up echo never worked: {exc}") from exc
                    time.sleep(0.2)
            finally:
                stop.set()
                t.join(5)

    def readings(self) -> dict[str, Any]:
        """RSS and descriptors of both daemons and wireguard-go processes now."""
        pa, pb = self.daemon_pid(self.da), self.daemon_pid(self.db)
        out: dict[str, Any] = {
            "rss_a": rss_bytes(pa), "rss_b": rss_bytes(pb),
            "fds_a": fd_count(pa), "fds_b": fd_count(pb),
            "nofile_a": nofile_limits(pa), "nofile_b": nofile_limits(pb),
        }
        for key, dp in (("a", self.da), ("b", self.db)):
            wg = find_pid([self.wg_name, "-f", dp.node.ifname])
            out[f"wg_rss_{key}"] = rss_bytes(wg) if wg else None
        return out

    def restart_daemons(self, mode: str) -> None:
        """Restart both daemons with ``--traffic-log-mode mode`` and bring them up again."""
        assert self.net is not None
        self.close_keepers()
        for dp in (self.da, self.db):
            self.net.stop_daemon(dp.name)
        for dp in (self.da, self.db):
            i = dp.argv.index("--traffic-log-mode")
            dp.argv[i + 1] = mode
            self.net.start_daemon(dp.name)
        self.mode = mode
        self.bring_up()
        self.warm_up()

    # ---- phase 1: bulk -----------------------------------------------------------------

    def bulk_once(self, path: str, streams: int) -> dict[str, Any]:
        """One throughput run: a sink in A, a source in B, ``--duration`` seconds."""
        d = self.args.duration
        port = self.port()
        listen, target = self.endpoints(path, port)
        gens: list[Gen] = []
        try:
            sink = self.gen("a", ["sink", listen, "--conns", str(streams)], int(d) + 90)
            gens.append(sink)
            sink.expect("READY", 30)
            src = self.gen("b", ["source", target, "--conns", str(streams),
                                 "--duration", str(d)], int(d) + 90)
            gens.append(src)
            src.expect("READY", 30)
            cpu = CpuWatch(self.cpu_pids())
            t_cpu = time.monotonic()
            net0 = self.net_counters()
            prof = self.profile_start(f"bulk{streams}-{self.mode}", d - 0.5) \
                if path == "tsnet2" else []
            sent = src.result(d + 60)
            profile_finish(prof)
            got = sink.result(30)
            cpu_pct = cpu.stop()
            cpu_dt = time.monotonic() - t_cpu
            net1 = self.net_counters()
        finally:
            stop_all(gens)
        if sent["errors"]:
            raise BenchRunError(f"{path} x{streams}: {sent['errors'][:3]}")
        span = got["last"] - got["first"]
        mbps = got["bytes"] * 8 / span / 1e6 if span > 0 else float("nan")
        out = {"path": path, "streams": streams, "mode": self.mode, "mbit_s": round(mbps, 1),
               "bytes": got["bytes"], "seconds": round(span, 3), "cpu_pct": cpu_pct,
               "per_stream_bytes": got["per_stream"],
               "net": {k: net1[k] - net0[k] for k in net0}}
        # CPU-seconds per GB of the stack: wireguard-go (and for tsnet2 both daemons); the
        # load generators are not counted (gotsnet's figure is its whole process).
        keys = ("wg_a", "wg_b") + (("daemon_a", "daemon_b") if path == "tsnet2" else ())
        stack_s = sum(cpu_pct.get(k, 0.0) for k in keys) / 100 * cpu_dt
        out["cpu_s_per_gb"] = round(stack_s / (got["bytes"] / 1e9), 3) if got["bytes"] else None
        self.say(f"  {path:6} x{streams} [{self.mode}]: {mbps:8.1f} Mbit/s  cpu {cpu_pct} "
                 f"net {out['net']}")
        return out

    def go_or_none(self, x: float) -> float | None:
        """A Go tsnet figure for a row: None when the Go row did not run."""
        return None if self.go is None or math.isnan(x) else x

    def phase_bulk(self) -> None:
        """1 and 8 streams with the daemons in ``MAIN_MODE``; tunnel, tsnet2 and Go tsnet
        interleaved over ``--rounds``, veth once."""
        runs: list[dict[str, Any]] = []
        self.details["bulk"] = runs
        for streams in (1, 8):
            for r in range(self.args.rounds):
                order = ["tunnel", "tsnet2"] + (["gotsnet"] if self.go else [])
                if r % 2:
                    order.reverse()
                for path in order:
                    runs.append(self.bulk_go(streams) if path == "gotsnet"
                                else self.bulk_logged(path, streams))
            runs.append(self.bulk_once("veth", streams))
            sel = [x for x in runs if x["streams"] == streams]
            by = {p: median([x["mbit_s"] for x in sel if x["path"] == p])
                  for p in (*PATHS, "gotsnet")}
            cpu = {p: median([x["cpu_s_per_gb"] for x in sel
                              if x["path"] == p and x.get("cpu_s_per_gb") is not None])
                   for p in ("tunnel", "tsnet2", "gotsnet")}
            s = f"{streams} stream{'s' if streams > 1 else ''}"
            self.rows.append(Row(f"bulk_{streams}", f"bulk {s}, log {MAIN_MODE}", "Mbit/s",
                                 by["tsnet2"], by["tunnel"], self.go_or_none(by["gotsnet"]),
                                 (Target("ratio>=", 0.9), Target("ratio>=", 1.0, "go"))))
            # tsnet2: both daemons + both wireguard-go; tunnel: both wireguard-go; Go: its
            # whole process (apps included). Load generators are not counted.
            self.rows.append(Row(f"bulk_{streams}_cpu", f"CPU per GB, {s}, {MAIN_MODE}",
                                 "CPU-s", cpu["tsnet2"], cpu["tunnel"],
                                 self.go_or_none(cpu["gotsnet"]),
                                 (Target("ratio<=", 1.5),) if streams == 1 else (),
                                 note="tsnet2: daemons + wireguard-go; tunnel: wireguard-go; "
                                      "Go: its whole process" if streams == 1 else ""))
            self.rows.append(Row(f"bulk_{streams}_veth", f"  raw veth, {s}", "Mbit/s",
                                 by["veth"]))

    # ---- phase 2: latency --------------------------------------------------------------

    def phase_latency(self) -> None:
        """Row 2: connect + 1-byte echo, and 1-byte echo on an open flow, per path."""
        ports = {p: self.port() for p in PATHS}
        listens = [self.endpoints(p, ports[p])[0] for p in PATHS]
        gens: list[Gen] = []
        res = self._latency_run(ports, listens, gens)
        if self.go:  # right after the Python paths, same iterations and warm-up
            go = self.go_cmd(f"latency {self.args.iters} 20", 2 * self.args.iters * 0.05 + 60)
            for mode in ("connect", "pingpong"):
                res[mode]["gotsnet"] = go[mode]
                self.say(f"  Go tsnet {mode}: p50 {percentile(go[mode], 50):.3f} "
                         f"p99 {percentile(go[mode], 99):.3f}")
        self._latency_rows(res)

    def _latency_run(self, ports: dict[str, int], listens: list[str],
                     gens: list[Gen]) -> Any:
        try:
            echo = self.gen("a", ["echo", *listens], 300)
            gens.append(echo)
            echo.expect("READY", 30)
            targets = [f"{p}={self.endpoints(p, ports[p])[1]}" for p in PATHS]
            # Half of the tsnet2 path: B's daemon dials A's plain kernel listener, so the
            # difference to "tsnet2" is the accepting side (A's daemon and the library).
            targets.append(f"dialonly=ts:{self.db.socket_path}@{self.a_ip}:{ports['tunnel']}")
            lat = self.gen("b", ["latency", *targets, "--iters", str(self.args.iters)], 280)
            gens.append(lat)
            lat.expect("READY", 30)
            prof = self.profile_start("latency", 3 * self.args.iters * 0.003)
            res = lat.result(270)
            profile_finish(prof)
        finally:
            stop_all(gens)
        return res

    def _latency_rows(self, res: Any) -> None:
        summary: dict[str, Any] = {}
        for mode in ("connect", "pingpong"):
            for p in (*PATHS, "dialonly", "gotsnet"):
                if p not in res[mode]:
                    continue
                xs = res[mode][p]
                summary[f"{mode}_{p}"] = {"p50": round(percentile(xs, 50), 4),
                                          "p99": round(percentile(xs, 99), 4),
                                          "max": round(max(xs), 3), "n": len(xs)}
        self.details["latency"] = summary
        for mode, label, limit in (("connect", "connect+1B echo", 0.25),
                                   ("pingpong", "open-flow ping-pong", 0.05)):
            s = {p: summary[f"{mode}_{p}"] for p in PATHS}
            g = summary.get(f"{mode}_gotsnet", {})
            self.rows.append(Row(f"{mode}_p50", f"{label} p50", "ms", s["tsnet2"]["p50"],
                                 s["tunnel"]["p50"], g.get("p50"), (Target("delta<=", limit),)))
            self.rows.append(Row(f"{mode}_p99", f"{label} p99", "ms", s["tsnet2"]["p99"],
                                 s["tunnel"]["p99"], g.get("p99")))
            short = label.split()[-1] if mode == "pingpong" else "connect+1B"
            self.rows.append(Row(f"{mode}_dialonly", f"  {short} p50, dial side only", "ms",
                                 summary[f"{mode}_dialonly"]["p50"], s["tunnel"]["p50"],
                                 note="tsnet2 on B only: B app -> B daemon -> A's plain "
                                      "kernel listener" if mode == "connect" else ""))
            self.rows.append(Row(f"{mode}_veth", f"  {short} p50, raw veth", "ms",
                                 s["veth"]["p50"], note=f"p99 {s['veth']['p99']:.3f} ms"))
            self.say(f"  {label}: " + ", ".join(
                f"{p} p50 {s[p]['p50']:.3f} p99 {s[p]['p99']:.3f}" for p in PATHS))

    # ---- phase 3: flow rate ------------------------------------------------------------

    def flows_once(self, path: str, target: str, workers: int, echo_pid: int) -> dict[str, Any]:
        """``workers`` clients doing connect / 1-byte echo / close for ``--duration``: one
        process, or ``workers / --worker-threads`` processes of ``--worker-threads`` threads."""
        d = self.args.duration
        threads = min(workers, self.args.worker_threads)
        gens: list[Gen] = []
        try:
            for _ in range(workers // threads):
                gens.append(self.gen("b", ["flows", target, "--duration", str(d),
                                           "--threads", str(threads)], int(d) + 90))
            for g in gens:
                g.expect("READY", 60)
            cpu = CpuWatch(self.cpu_pids() | {"echo": echo_pid})
            prof = self.profile_start(f"flows-x{workers}", d - 0.5) if path == "tsnet2" else []
            for g in gens:
                g.send("go")
            results = [g.result(d + 40) for g in gens]
            profile_finish(prof)
            cpu_pct = cpu.stop()
        finally:
            stop_all(gens)
        # the clients have exited: their own CPU time over the timed loop, % of one core
        cpu_pct["clients"] = round(100 * sum(r["cpu_s"] for r in results) / d, 1)
        flows = sum(r["flows"] for r in results)
        lat = sorted(x for r in results for x in r["lat_ms"])
        out = {"path": path, "workers": workers, "processes": len(gens), "threads": threads,
               "flows": flows, "flows_s": round(flows / d, 1),
               "errors": sum(r["errors"] for r in results),
               "first_error": next((r["first_error"] for r in results if r["first_error"]), ""),
               "lat_p50_ms": round(percentile(lat, 50), 3),
               "lat_p99_ms": round(percentile(lat, 99), 3), "cpu_pct": cpu_pct}
        if flows:  # CPU per flow of each daemon, ms (CPU share x duration / flows)
            out["daemon_cpu_ms_per_flow"] = {
                k: round(cpu_pct[k] / 100 * d / flows * 1000, 3)
                for k in ("daemon_a", "daemon_b") if k in cpu_pct}
        self.say(f"  {path:6} x{workers}: {out['flows_s']:8.1f} flows/s, p50 "
                 f"{out['lat_p50_ms']} ms, errors {out['errors']}, cpu {cpu_pct}")
        return out

    def phase_flows(self) -> None:
        """New flows per second: one client (sequential), then ``--workers`` clients; tunnel,
        tsnet2 and Go tsnet interleaved over ``--rounds``."""
        ports = {p: self.port() for p in ("tunnel", "tsnet2")}
        runs: list[dict[str, Any]] = []
        self.details["flows"] = runs
        gens: list[Gen] = []
        w = self.args.workers
        try:
            # One threaded echo server in A for both paths; its tsnet2 listener keeps
            # enough accept slots parked for every worker.
            echo = self.gen("a", ["echo", "--slots", str(max(8, w)),
                                  *[self.endpoints(p, ports[p])[0] for p in ports]], 600)
            gens.append(echo)
            echo.expect("READY", 30)
            for workers in (1, w):
                for r in range(self.args.rounds):
                    order = ["tunnel", "tsnet2"] + (["gotsnet"] if self.go else [])
                    if r % 2:
                        order.reverse()
                    for path in order:
                        runs.append(self.flows_go(workers) if path == "gotsnet" else
                                    self.flows_once(path, self.endpoints(path, ports[path])[1],
                                                    workers, echo.proc.pid))
        finally:
            stop_all(gens)
        for workers, key, label, targets in (
                (1, "flows_sequential", "new flows, sequential", ()),
                (w, f"flows_{w}", f"new flows, {w} workers", (Target("ratio>=", 0.8),))):
            sel = [x for x in runs if x["workers"] == workers]
            by = {p: median([x["flows_s"] for x in sel if x["path"] == p])
                  for p in ("tunnel", "tsnet2", "gotsnet")}
            errors = sum(x["errors"] for x in sel if x["path"] == "tsnet2")
            self.rows.append(Row(key, label, "flows/s", by["tsnet2"], by["tunnel"],
                                 self.go_or_none(by["gotsnet"]), targets,
                                 note=f"tsnet2: {errors} errors" if errors else ""))

    def flows_go(self, workers: int) -> dict[str, Any]:
        """``workers`` goroutines doing connect / 1-byte echo / close in gotsnet."""
        d = self.args.duration
        res = self.go_cmd(f"flows {workers} {d}", d + 60)
        lat = res["lat_ms"] or []
        out = {"path": "gotsnet", "workers": workers, "flows": res["flows"],
               "flows_s": round(res["flows"] / d, 1),
               "errors": res["errors"], "first_error": res["first_error"],
               "lat_p50_ms": round(percentile(lat, 50), 3),
               "lat_p99_ms": round(percentile(lat, 99), 3), "cpu_s": round(res["cpu_s"], 3)}
        self.say(f"  {'gotsnet':6} x{workers}: {out['flows_s']:8.1f} flows/s, p50 "
                 f"{out['lat_p50_ms']} ms, errors {out['errors']}, cpu {out['cpu_s']} s "
                 "(whole process)")
        return out

    # ---- phase 4: many open flows ------------------------------------------------------

    def phase_hold(self) -> None:
        """Row 4: ``--flows`` concurrent flows; daemon RSS and descriptors with them open."""
        n = self.args.flows
        port = self.port()
        listen, target = self.endpoints("tsnet2", port)
        before = self.readings()
        gens: list[Gen] = []
        result: dict[str, Any] = {"flows": n, "before": before}
        self.details["hold"] = result
        try:
            acc = self.gen("a", ["hold-accept", listen, "--count", str(n), "--slots", "32"], 300)
            gens.append(acc)
            result["accept_nofile"] = acc.expect("READY", 30)["nofile"]
            dia = self.gen("b", ["hold-dial", target, "--count", str(n), "--threads", "8"], 300)
            gens.append(dia)
            result["dial_nofile"] = dia.expect("READY", 30)["nofile"]
            t = time.monotonic()
            dialed = dia.expect("HELD", 200)
            result["dialed"] = dialed
            if dialed["flows"] == n:
                result["accepted"] = acc.expect("HELD", 60)
            result["open_seconds"] = round(time.monotonic() - t, 2)
            result["loaded"] = loaded = self.readings()
            result["app_rss"] = {"accept": rss_bytes(acc.proc.pid),
                                 "dial": rss_bytes(dia.proc.pid)}
            self.say(f"  {dialed['flows']}/{n} flows open in {result['open_seconds']} s "
                     f"(dial errors {dialed['error_count']}): RSS A "
                     f"{loaded['rss_a'] / MB:.1f} MB, B {loaded['rss_b'] / MB:.1f} MB, fds "
                     f"A {loaded['fds_a']} B {loaded['fds_b']}")
            dia.send("release")
            dia.result(60)
            if "accepted" in result:
                acc.send("release")
                acc.result(60)
        finally:
            stop_all(gens)
        result["drain_seconds"] = self._wait_drained(before, 30)
        result["after"] = after = self.readings()
        ok = result.get("accepted", {}).get("flows") == n
        short = "" if ok else f"only {dialed['flows']} of {n} flows opened; "
        for k in ("a", "b"):
            self.rows.append(Row(f"hold_rss_{k}", f"daemon {k.upper()} RSS, {n} flows open",
                                 "MB", loaded[f"rss_{k}"] / MB,
                                 targets=(Target("value<=", 100),),
                                 note=f"{short}idle {self.idle[f'rss_{k}'] / MB:.1f} MB, "
                                      f"{loaded[f'fds_{k}']} fds"))
        self.rows.append(Row("hold_open_rate", f"  {n} flows opened at", "flows/s",
                             dialed["flows"] / result["open_seconds"]))
        for k in ("a", "b"):
            self.rows.append(Row(f"hold_after_rss_{k}", f"  daemon {k.upper()} RSS after they "
                                 "closed", "MB", after[f"rss_{k}"] / MB,
                                 note=f"drained in {result['drain_seconds']} s"))

    def _wait_drained(self, before: dict[str, Any], timeout: float) -> float | None:
        t = time.monotonic()
        pa, pb = self.daemon_pid(self.da), self.daemon_pid(self.db)
        while time.monotonic() - t < timeout:
            if (fd_count(pa) <= before["fds_a"] + 8 and fd_count(pb) <= before["fds_b"] + 8):
                return round(time.monotonic() - t, 2)
            time.sleep(0.2)
        return None

    # ---- phase 5: bulk in the other traffic-log modes ------------------------------------

    def log_sizes(self) -> list[int]:
        """Bytes in each daemon's traffic log now."""
        return [dp.traffic_log.stat().st_size if dp.traffic_log.exists() else 0
                for dp in (self.da, self.db)]

    def truncate_logs(self) -> None:
        """Empty both traffic logs, to bound disk use (the daemons' O_APPEND writes go on)."""
        for dp in (self.da, self.db):
            if dp.traffic_log.exists():
                os.truncate(dp.traffic_log, 0)

    def bulk_logged(self, path: str, streams: int) -> dict[str, Any]:
        """``bulk_once``, plus the traffic-log bytes it wrote (the logs are emptied after)."""
        before = self.log_sizes()
        out = self.bulk_once(path, streams)
        if path == "tsnet2":
            out["log_bytes"] = [x - y for x, y in zip(self.log_sizes(), before, strict=True)]
            self.truncate_logs()
        return out

    def bulk_mode_rows(self, runs: list[dict[str, Any]], streams: int,
                       targets: tuple[Target, ...]) -> None:
        """A row for ``self.mode`` and ``streams`` from ``runs``; Go tsnet's value is from
        the bulk phase (it has no traffic log)."""
        sel = [x for x in runs if x["streams"] == streams and x["mode"] == self.mode]
        by = {p: median([x["mbit_s"] for x in sel if x["path"] == p])
              for p in ("tunnel", "tsnet2")}
        cpu = {p: median([x["cpu_s_per_gb"] for x in sel if x["path"] == p and
                          x.get("cpu_s_per_gb") is not None]) for p in ("tunnel", "tsnet2")}
        logged = [sum(x["log_bytes"]) for x in sel if "log_bytes" in x]
        go = [x["mbit_s"] for x in self.details.get("bulk", [])
              if x["path"] == "gotsnet" and x["streams"] == streams]
        s = f"{streams} stream{'s' if streams > 1 else ''}"
        note = f"CPU {fmt(cpu['tsnet2'])} s/GB (tunnel {fmt(cpu['tunnel'])})"
        if logged and max(logged):
            note += f", log {median(logged) / MB:.0f} MB per run"
        if go:
            note += "; Go from the bulk phase"
        self.rows.append(Row(f"bulk_{streams}_{self.mode}", f"bulk {s}, log {self.mode}",
                             "Mbit/s", by["tsnet2"], by["tunnel"],
                             self.go_or_none(median(go)), targets, note=note))

    def phase_payload(self) -> None:
        """Bulk with the daemons restarted in ``payload`` mode (the default): 1 stream, then
        8 streams when that fits in the budget; tunnel and tsnet2 interleaved."""
        runs: list[dict[str, Any]] = self.details.setdefault("logmode", [])
        self.restart_daemons("payload")
        d, r = self.args.duration, self.args.rounds
        for streams in (1, 8):
            if streams > 1 and not self.in_budget("payload 8 streams", 2 * r * (d + 4)):
                break
            for i in range(r):
                for path in ("tunnel", "tsnet2") if i % 2 == 0 else ("tsnet2", "tunnel"):
                    runs.append(self.bulk_logged(path, streams))
            self.bulk_mode_rows(runs, streams, (Target("ratio>=", 0.6),))

    def phase_off(self) -> None:
        """One tunnel/tsnet2 pair of 1-stream bulk with the daemons in ``off`` mode (info)."""
        runs: list[dict[str, Any]] = self.details.setdefault("logmode", [])
        self.restart_daemons("off")
        runs.extend(self.bulk_logged(p, 1) for p in ("tunnel", "tsnet2"))
        self.bulk_mode_rows(runs, 1, ())

    # ---- run ---------------------------------------------------------------------------

    def run(self, lab: Lab, net: LocalTailnet) -> None:
        """Every phase, in an order that keeps the daemons' idle reading clean. Each phase's
        estimate (seconds) is checked against what is left of ``--budget``."""
        d, r = self.args.duration, self.args.rounds
        self.setup(lab, net)
        for k in ("a", "b"):
            self.rows.append(Row(f"idle_rss_{k}", f"daemon {k.upper()} RSS idle (after up)",
                                 "MB", self.idle[f"rss_{k}"] / MB,
                                 targets=(Target("value<=", 40),)))
        for k in ("a", "b"):
            soft, hard = self.idle[f"nofile_{k}"]
            self.rows.append(Row(f"nofile_{k}", f"daemon {k.upper()} open-files limit, soft",
                                 "fds", soft, note=f"hard {hard}"))
        if "gotsnet" in self.details:
            self.rows.append(Row("gotsnet_rss", "  Go tsnet process RSS idle", "MB",
                                 self.details["gotsnet"]["rss_idle"] / MB,
                                 note="one process: both nodes, control, DERP and the apps"))
        n = 3 if self.go else 2  # paths per round: tunnel, tsnet2 (, Go tsnet)
        self.phase("latency", 3 * self.args.iters * 0.006 + 10 +
                   (2 * self.args.iters * 0.002 + 3 if self.go else 0), self.phase_latency)
        self.phase("bulk", 2 * (r * n + 1) * (d + 4), self.phase_bulk)
        self.phase("flows", r * n * (d + 2) + r * n * (d + 5) + 3, self.phase_flows)
        self.phase("hold", 15 + self.args.flows / 250, self.phase_hold)
        self.phase("payload", 10 + 2 * r * (d + 4), self.phase_payload)
        self.phase("off", 10 + 2 * (d + 4), self.phase_off)


def build_gotsnet() -> tuple[str, str]:
    """(path of the gotsnet binary, "") built or cached by tests/bench/gotsnet/build.sh, or
    ("", why not): no Go toolchain and nothing cached, or the build failed."""
    env = os.environ.copy()
    go = shutil.which("go") or next((g for g in ("/usr/local/go/bin/go",)
                                     if os.access(g, os.X_OK)), None)
    if go:
        env["PATH"] = f"{env.get('PATH', '')}:{os.path.dirname(go)}"
    cached = subprocess.run([str(GOTSNET_BUILD), "--print-path"], capture_output=True,
                            text=True, check=False).stdout.strip()
    if not go and not os.access(cached, os.X_OK):
        return "", "no Go toolchain (and no cached build of tests/bench/gotsnet)"
    print("building tests/bench/gotsnet (cached by version; about 3 min cold)",
          file=sys.stderr, flush=True)
    try:
        proc = subprocess.run([str(GOTSNET_BUILD)], capture_output=True, text=True, env=env,
                              timeout=900, check=False)
    except subprocess.TimeoutExpired:
        return "", "building tests/bench/gotsnet took over 900 s"
    sys.stderr.write(proc.stderr)
    path = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    if proc.returncode != 0 or not os.access(path, os.X_OK):
        return "", f"building tests/bench/gotsnet failed: {proc.stderr.strip()[-300:]}"
    return path, ""


def new_lab() -> Lab:
    """A lab under a prefix nothing on this host uses, so this run and another bench or test
    run going on at the same time never touch each other's namespaces, devices, sockets or
    processes (``Lab.close`` removes only what it made; ``find_leftovers`` looks for the
    prefix). "tb" + 6 random hex digits; a prefix still in use is never taken, and if two
    runs drew the same one at the same moment, the second's ``ip netns add`` would fail."""
    for _ in range(20):
        prefix = "tb" + secrets.token_hex(3)
        if not find_leftovers(prefix):
            return Lab(prefix)
    raise LabError("no unused lab prefix found in 20 tries")


def nproc() -> int:
    """CPUs this process may run on."""
    return len(os.sched_getaffinity(0))


def write_results(bench: Bench, path: str, interrupted: bool, leftovers: list[str]) -> None:
    """The JSON document: environment, options, rows, raw details."""
    doc = {
        "timestamp": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "nproc": nproc(),
        "loadavg_start": bench.loadavg_start,
        "loadavg_end": Path("/proc/loadavg").read_text().split()[:3],
        "machine": {"hostname": socket.gethostname(), "kernel": platform.release(),
                    "python": platform.python_version(),
                    "wireguard_go": bench.wireguard_go.version,
                    "wireguard_go_path": bench.wireguard_go.path},
        "options": {k: v for k, v in vars(bench.args).items() if k != "out"},
        "main_traffic_log_mode": MAIN_MODE,
        "lab_prefix": bench.lab_prefix,
        "seconds": round(bench.elapsed(), 1),
        "interrupted": interrupted,
        "rows": [r.as_json() for r in bench.rows],
        "errors": bench.errors,
        "skipped": bench.skipped,
        "leftovers": leftovers,
        "details": bench.details,
    }
    Path(path).write_text(json.dumps(doc, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; 0 when every phase ran (targets may be missed), 1 otherwise."""
    args = parse_args(argv)
    problems = check_prerequisites()
    if problems:
        print("make bench needs:\n  - " + "\n  - ".join(problems), file=sys.stderr)
        return 1

    def on_term(_sig: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    gotsnet = ("", "--no-go") if args.no_go else build_gotsnet()
    bench = Bench(args, find_wireguard_go(), gotsnet)
    bench.say(f"wireguard-go: {bench.wireguard_go}")
    bench.say(f"Go tsnet row: {gotsnet[0] or 'skipped: ' + gotsnet[1]}")
    interrupted = False
    lab: Lab | None = None
    net: LocalTailnet | None = None
    try:
        lab = new_lab()
        bench.lab_prefix = lab.prefix
        bench.say(f"lab {lab.prefix} (namespaces {lab.prefix}-*, in {lab.dir})")
        net = LocalTailnet(lab)
        bench.run(lab, net)
    except KeyboardInterrupt:
        interrupted = True
        bench.say("interrupted: cleaning up")
    except (BenchRunError, LabError, tsnet2.Error, OSError) as exc:
        bench.errors.append(f"setup: {exc}")
        bench.say(f"setup failed: {exc}")
    finally:
        # Cleanup must finish: a second Ctrl-C would otherwise leave namespaces behind.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        bench.close_keepers()
        bench.stop_go()
        if net is not None:
            net.close()
        if lab is not None:
            lab.close()
    leftovers = find_leftovers(lab.prefix) if lab is not None else []
    print()
    print(f"tsnet2 benchmark, {nproc()} CPUs (load average {' '.join(bench.loadavg_start)} at "
          f"start), {bench.elapsed():.0f} s, lab {bench.lab_prefix}; {bench.wireguard_go}")
    print(f"daemons: --traffic-log-mode {MAIN_MODE} unless a row says otherwise, "
          f"{bench.details.get('daemon_event_loop', '?')} event loop; tunnel and Go tsnet "
          "measured in the same run, interleaved")
    print(table(bench.rows))
    print(summary(bench.rows))
    for e in bench.errors:
        print(f"ERROR {e}")
    for s in bench.skipped:
        print(f"SKIPPED {s}")
    if leftovers:
        print(f"LEFTOVERS {leftovers}")
    write_results(bench, args.out, interrupted, leftovers)
    print(f"results: {args.out}")
    if os.environ.get("BENCH_MARKDOWN"):
        print(markdown(bench.rows))
    if interrupted:
        return 130
    return 1 if bench.errors or leftovers else 0


if __name__ == "__main__":
    sys.exit(main())
