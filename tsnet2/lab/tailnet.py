"""A running tailnet in a `Lab`: a control server in the hub and tsnet2d daemons in nodes.

Every process is a real one (`python -m tsnet2.control serve`, `python -m tsnet2.daemon`),
started inside its namespace; apps talk to the daemons from anywhere on the host through the
daemons' Unix sockets (a socket path is not tied to a network namespace).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

from tsnet2.lab import Lab, LabNode

READY_TIMEOUT = 20.0
STOP_TIMEOUT = 15.0
CONTROL_PORT = 8440
WG_PORT = 41641


class TailnetError(Exception):
    """A lab process did not start; the message carries the tail of its log."""


@dataclasses.dataclass
class DaemonProc:
    """A tsnet2d running in a lab node."""

    name: str
    node: LabNode
    socket_path: Path
    state_dir: Path
    traffic_log: Path
    log_path: Path
    argv: list[str]
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    stdout: int | None = None
    """A descriptor for the daemon's stdout (``--traffic-log -`` writes there); None: null."""

    def log_text(self) -> str:
        """The daemon's stderr so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


def _stop(proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM) -> int | None:
    if proc is None or proc.poll() is not None:
        return None if proc is None else proc.returncode
    proc.send_signal(sig)
    try:
        return proc.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


class LocalTailnet:
    """Control server + daemons in a lab; `close()` stops everything it started."""

    def __init__(self, lab: Lab, *, domain: str = "tail-scale.ts.net",
                 ephemeral_timeout: float = 30.0, control_args: tuple[str, ...] = ()) -> None:
        """``control_args``: more ``tsnet2 control serve`` flags (e.g. ``--cert-lifetime``)."""
        self.lab = lab
        self.control_args = control_args
        self.domain = domain
        self.ephemeral_timeout = ephemeral_timeout
        self.dir = lab.dir / "tailnet"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.db = self.dir / "control.db"
        self.control_url = f"http://{lab.hub_ip}:{CONTROL_PORT}"
        self.control_proc: subprocess.Popen[bytes] | None = None
        self.control_log = self.dir / "control.log"
        self.daemons: dict[str, DaemonProc] = {}

    def __enter__(self) -> LocalTailnet:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # ---- control ---------------------------------------------------------------------

    def start_control(self) -> str:
        """Start (or restart) the control server in the hub; return its URL."""
        argv = [sys.executable, "-m", "tsnet2.control", "serve",
                "--listen", f"{self.lab.hub_ip}:{CONTROL_PORT}", "--db", str(self.db),
                "--domain", self.domain, "--ephemeral-timeout", str(self.ephemeral_timeout),
                *self.control_args]
        with open(self.control_log, "ab") as logf:
            size = self.control_log.stat().st_size
            proc = self.lab.popen(self.lab.hub, argv, stdout=logf, stderr=logf)
        self.control_proc = proc
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            text = self.control_log.read_bytes()[size:].decode(errors="replace")
            if "listening on" in text:
                return self.control_url
            if proc.poll() is not None:
                raise TailnetError(f"control server exited with {proc.returncode}:\n{text}")
            time.sleep(0.02)
        raise TailnetError("control server not ready in time")

    def stop_control(self) -> None:
        """Stop the control server (its database stays)."""
        _stop(self.control_proc)
        self.control_proc = None

    def authkey(self, *, reusable: bool = True, ephemeral: bool = False,
                tags: tuple[str, ...] = ()) -> str:
        """Create an auth key with the real CLI and return it."""
        argv = [sys.executable, "-m", "tsnet2.control", "authkey", "create",
                "--db", str(self.db)]
        if reusable:
            argv.append("--reusable")
        if ephemeral:
            argv.append("--ephemeral")
        if tags:
            argv += ["--tags", ",".join(tags)]
        out = subprocess.run(argv, check=True, capture_output=True, timeout=30)
        return out.stdout.decode().strip()

    # ---- daemons ---------------------------------------------------------------------

    def add_daemon(self, name: str, *, auth_key: str | None = None,
                   extra_args: tuple[str, ...] = (), start: bool = True,
                   stdout: int | None = None) -> DaemonProc:
        """Create a node namespace and run tsnet2d in it (waits for the readiness line).

        ``stdout``: a descriptor the daemon's stdout goes to (a pipe for ``--traffic-log -``).
        """
        node = self.lab.add_node(name)
        d = node.dir
        env = {"TS_CONTROL_URL": self.control_url}
        if auth_key:
            env["TS_AUTHKEY"] = auth_key
        dp = DaemonProc(
            name=name, node=node, socket_path=d / "tsnet2.sock", state_dir=d / "state",
            traffic_log=d / "traffic.jsonl", log_path=d / "tsnet2d.log",
            argv=[sys.executable, "-m", "tsnet2.daemon", "--socket", str(d / "tsnet2.sock"),
                  "--state-dir", str(d / "state"), "--traffic-log", str(d / "traffic.jsonl"),
                  "--tun", node.ifname, "--port", str(WG_PORT), "-v", *extra_args],
            env=env, stdout=stdout,
        )
        self.daemons[name] = dp
        if start:
            self.start_daemon(name)
        return dp

    def start_daemon(self, name: str) -> DaemonProc:
        """(Re)start a node's daemon with the same state dir."""
        dp = self.daemons[name]
        env = {**os.environ, **dp.env}
        with open(dp.log_path, "ab") as logf:
            logf.write(b"--- start\n")
            logf.flush()
            out = subprocess.DEVNULL if dp.stdout is None else dp.stdout
            dp.proc = self.lab.popen(dp.node.netns, dp.argv, stdout=out, stderr=logf, env=env)
        marker_from = dp.log_text().rfind("--- start")
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            text = dp.log_text()[marker_from:]
            if "listening on" in text:
                return dp
            if dp.proc.poll() is not None:
                raise TailnetError(f"tsnet2d {name} exited with {dp.proc.returncode}:\n"
                                   f"{text[-3000:]}")
            time.sleep(0.02)
        raise TailnetError(f"tsnet2d {name} not ready:\n{dp.log_text()[-3000:]}")

    def stop_daemon(self, name: str, sig: int = signal.SIGTERM) -> int | None:
        """Stop a node's daemon (SIGTERM: graceful); return its exit code."""
        dp = self.daemons[name]
        code = _stop(dp.proc, sig)
        dp.proc = None
        return code

    def remove_daemon(self, name: str) -> None:
        """Stop a daemon and delete its node namespace."""
        self.stop_daemon(name)
        self.lab.remove_node(name)
        del self.daemons[name]

    def close(self) -> None:
        """Stop every daemon, then the control server."""
        for name in list(self.daemons):
            self.stop_daemon(name)
        self.stop_control()
