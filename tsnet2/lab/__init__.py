"""A local tailnet in network namespaces: one hub namespace with a bridge, one namespace per node.

Used by the integration tests and ``tsnet2 demo``. Everything a ``Lab`` creates (namespaces,
WireGuard device names, its temporary directory) carries its prefix, and ``close()`` removes it
all: tracked processes, any other process still inside its namespaces, the namespaces (veths go
with them), stale wireguard-go sockets of its device names, and the temporary directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, ip_network
from pathlib import Path
from types import TracebackType
from typing import Any

from tsnet2.node.device import SOCKET_DIR, find_wireguard_go
from tsnet2.node.errors import NodeError
from tsnet2.node.netns import enter_netns

__all__ = [
    "LAB_SUPERNET",
    "Lab",
    "LabError",
    "LabNode",
    "check_prerequisites",
    "find_leftovers",
]

LAB_SUPERNET = IPv4Network("10.250.0.0/16")
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}\Z")
_PREFIX_RE = re.compile(r"^[a-z][a-z0-9]{0,9}\Z")
_KILL_WAIT = 5.0
_MAX_NODES = 250


class LabError(Exception):
    """A lab operation failed; the message includes the failing command's stderr."""


@dataclass(frozen=True)
class LabNode:
    """One simulated host: its netns, its lab IP, a unique WireGuard device name, a scratch dir."""

    name: str
    netns: str
    ip: IPv4Address
    ifname: str
    dir: Path


def check_prerequisites() -> list[str]:
    """Return human-readable reasons the lab cannot run here (empty list = ready). The
    wireguard-go checked is the one the lab's nodes run: ``$TSNET2_WIREGUARD_GO``, else
    ``wireguard-go`` on PATH (``tsnet2.node.device.find_wireguard_go`` names it)."""
    problems: list[str] = []
    if os.geteuid() != 0:
        problems.append("not running as root (network namespaces need root; try sudo)")
    if shutil.which("ip") is None:
        problems.append("the `ip` command is missing (install iproute2)")
    try:
        find_wireguard_go()
    except NodeError as exc:
        problems.append(str(exc))
    if not os.path.exists("/dev/net/tun"):
        problems.append("/dev/net/tun is missing (load the tun module or run with --device)")
    return problems


def find_leftovers(prefix: str) -> list[str]:
    """Describe anything named with ``prefix`` still on the host: namespaces, links, wireguard-go
    sockets, processes with an argument starting with the prefix. Empty list = clean."""
    found: list[str] = []
    netns_dir = Path("/run/netns")
    if netns_dir.is_dir():
        found += [f"netns {p.name}" for p in netns_dir.iterdir() if p.name.startswith(prefix)]
    links = _ip("-o", "link", "show", check=False).stdout
    for line in links.splitlines():
        parts = line.split(":", 2)
        if len(parts) > 1 and parts[1].strip().split("@")[0].startswith(prefix):
            found.append(f"link {parts[1].strip()}")
    if SOCKET_DIR.is_dir():
        found += [f"socket {p}" for p in SOCKET_DIR.glob(f"{prefix}*.sock")]
    me = os.getpid()
    for proc_dir in Path("/proc").iterdir():
        if not proc_dir.name.isdigit() or int(proc_dir.name) == me:
            continue
        try:
            argv = (proc_dir / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(arg.decode(errors="replace").startswith(prefix) for arg in argv[1:]):
            found.append(f"process {proc_dir.name}: {b' '.join(argv).decode(errors='replace')}")
    return found


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        ["ip", *args], capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL
    )
    if check and proc.returncode != 0:
        raise LabError(f"`ip {' '.join(args)}` failed: {proc.stderr.strip()}")
    return proc


def _host_routed_networks() -> list[IPv4Network]:
    out = _ip("-j", "-4", "route", "show", "table", "all").stdout
    nets: list[IPv4Network] = []
    for route in json.loads(out or "[]"):
        dst = route.get("dst", "")
        if dst in ("default", ""):
            continue
        with contextlib.suppress(ValueError):
            net = ip_network(dst, strict=False)
            if isinstance(net, IPv4Network):
                nets.append(net)
    return nets


def _pick_subnet() -> IPv4Network:
    taken = _host_routed_networks()
    candidates = list(LAB_SUPERNET.subnets(new_prefix=24))
    secrets.SystemRandom().shuffle(candidates)
    for net in candidates:
        if not any(net.overlaps(t) for t in taken):
            return net
    raise LabError(f"no free /24 inside {LAB_SUPERNET} (all are routed on the host)")


def _stop(proc: subprocess.Popen[Any], wait: float = _KILL_WAIT) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()


class Lab:
    """Network-namespace lab; a context manager. ``close()`` is idempotent and thread-safe."""

    def __init__(self, prefix: str | None = None) -> None:
        """Create the hub namespace and bridge; raises ``LabError`` (after cleaning up) on failure.

        ``prefix``: 1-10 lowercase letters/digits starting with a letter; default "t2" + 4 hex.
        """
        self.prefix = prefix if prefix is not None else "t2" + secrets.token_hex(2)
        if not _PREFIX_RE.match(self.prefix):
            raise LabError(f"lab prefix {self.prefix!r}: use 1-10 lowercase letters/digits")
        self._lock = threading.RLock()
        self._closed = False
        self._namespaces: list[str] = []
        self._procs: list[tuple[str, subprocess.Popen[Any]]] = []
        self._nodes: dict[str, LabNode] = {}
        self._next_host = 2
        self.hub = f"{self.prefix}-hub"
        self.dir = Path(tempfile.mkdtemp(prefix=f"tsnet2-lab-{self.prefix}-"))
        try:
            self.subnet = _pick_subnet()
            self.hub_ip = self.subnet.network_address + 1
            self._add_netns(self.hub)
            _ip("-n", self.hub, "link", "add", "br0", "type", "bridge", "forward_delay", "0")
            # A fixed MAC: otherwise the bridge takes its lowest port's, which changes as
            # nodes join, and the others' ARP entry for the hub goes stale for seconds.
            _ip("-n", self.hub, "link", "set", "br0", "address", "02:74:73:00:00:01")
            _ip("-n", self.hub, "addr", "add", f"{self.hub_ip}/24", "dev", "br0")
            _ip("-n", self.hub, "link", "set", "br0", "up")
        except BaseException:
            self.close()
            raise

    # -- namespaces and nodes --------------------------------------------------------------

    def _add_netns(self, name: str) -> None:
        _ip("netns", "add", name)
        self._namespaces.append(name)
        _ip("-n", name, "link", "set", "lo", "up")

    @property
    def nodes(self) -> dict[str, LabNode]:
        """The current nodes by name."""
        return dict(self._nodes)

    @property
    def namespaces(self) -> list[str]:
        """Every namespace this lab currently owns (hub first)."""
        return list(self._namespaces)

    def _unique_ifname(self, name: str) -> str:
        used = {n.ifname for n in self._nodes.values()}
        base = f"{self.prefix}{name}".replace("-", "")[:15]
        candidate, i = base, 0
        while candidate in used or (SOCKET_DIR / f"{candidate}.sock").exists():
            i += 1
            candidate = base[: 15 - len(str(i))] + str(i)
        return candidate

    def add_node(self, name: str) -> LabNode:
        """Create namespace ``<prefix>-<name>`` joined to the hub bridge; return its ``LabNode``."""
        with self._lock:
            if self._closed:
                raise LabError("lab is closed")
            if not _NAME_RE.match(name):
                raise LabError(f"node name {name!r}: use lowercase letters, digits and '-'")
            if name in self._nodes:
                raise LabError(f"node {name!r} already exists in lab {self.prefix}")
            if self._next_host > _MAX_NODES:
                raise LabError(f"a lab holds at most {_MAX_NODES - 1} nodes")
            host = self._next_host
            self._next_host += 1
            netns = f"{self.prefix}-{name}"
            ip = self.subnet.network_address + host
            hub_port = f"p{host}"
            try:
                self._add_netns(netns)
                _ip(
                    "link", "add", "name", "eth0", "netns", netns, "type", "veth",
                    "peer", "name", hub_port, "netns", self.hub,
                )  # fmt: skip
                _ip("-n", self.hub, "link", "set", hub_port, "master", "br0", "up")
                _ip("-n", netns, "addr", "add", f"{ip}/24", "dev", "eth0")
                _ip("-n", netns, "link", "set", "eth0", "up")
                _ip("-n", netns, "route", "add", "default", "via", str(self.hub_ip))
                node_dir = self.dir / name
                node_dir.mkdir(mode=0o700)
            except BaseException:
                self._delete_netns(netns)
                raise
            node = LabNode(name, netns, ip, self._unique_ifname(name), node_dir)
            self._nodes[name] = node
            return node

    def remove_node(self, name: str) -> None:
        """Stop the node's processes and delete its namespace and scratch dir."""
        with self._lock:
            node = self._nodes.pop(name, None)
            if node is None:
                raise LabError(f"no node {name!r} in lab {self.prefix}")
            errors: list[str] = []
            for netns, proc in [p for p in self._procs if p[0] == node.netns]:
                _stop(proc)
                self._procs.remove((netns, proc))
            self._delete_netns(node.netns, errors)
            self._remove_stale_socket(node.ifname)
            shutil.rmtree(node.dir, ignore_errors=True)
            if errors:
                raise LabError("; ".join(errors))

    # -- processes -------------------------------------------------------------------------

    def popen(self, netns: str, argv: Sequence[str], **popen_kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` inside ``netns`` (``ip netns exec``); stopped (TERM, KILL) at close."""
        with self._lock:
            if self._closed:
                raise LabError("lab is closed")
            if netns not in self._namespaces:
                raise LabError(f"{netns!r} is not a namespace of lab {self.prefix}")
            proc: subprocess.Popen[Any] = subprocess.Popen(
                ["ip", "netns", "exec", netns, *argv], **popen_kwargs
            )
            self._procs.append((netns, proc))
            return proc

    def run(
        self,
        netns: str,
        argv: Sequence[str],
        *,
        check: bool = True,
        timeout: float = 30.0,
        **run_kwargs: Any,
    ) -> subprocess.CompletedProcess[str]:
        """Run a short command in ``netns``; text output captured. ``LabError`` if it fails."""
        if netns not in self._namespaces:
            raise LabError(f"{netns!r} is not a namespace of lab {self.prefix}")
        run_kwargs.setdefault("capture_output", True)
        run_kwargs.setdefault("stdin", subprocess.DEVNULL)
        try:
            proc: subprocess.CompletedProcess[str] = subprocess.run(
                ["ip", "netns", "exec", netns, *argv], text=True, timeout=timeout, **run_kwargs
            )
        except subprocess.TimeoutExpired:
            raise LabError(f"{list(argv)} in {netns} timed out after {timeout} s") from None
        if check and proc.returncode != 0:
            raise LabError(
                f"{list(argv)} in {netns} exited with {proc.returncode}: "
                f"{(proc.stderr or '').strip()[-2000:]}"
            )
        return proc

    @contextlib.contextmanager
    def in_netns(self, netns: str) -> Iterator[None]:
        """Move the CURRENT THREAD (only) into ``netns`` for the block.

        Sockets created inside stay in that namespace for their life and can be used from
        anywhere afterwards. Threads that already exist (executors, their per-thread
        sockets) are not moved; threads and processes started inside inherit the namespace.
        The mount namespace (and so /sys, /run) is not changed.
        """
        if netns not in self._namespaces:
            raise LabError(f"{netns!r} is not a namespace of lab {self.prefix}")
        with enter_netns(f"/run/netns/{netns}"):
            yield

    # -- teardown --------------------------------------------------------------------------

    @staticmethod
    def _netns_pids(netns: str) -> list[int]:
        proc = _ip("netns", "pids", netns, check=False)
        return [int(p) for p in proc.stdout.split() if p.isdigit() and int(p) != os.getpid()]

    def _kill_netns_pids(self, netns: str) -> None:
        """Stop leftover processes inside ``netns`` (started by us: it is our namespace)."""
        pids = self._netns_pids(netns)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + _KILL_WAIT
        while pids and time.monotonic() < deadline:
            time.sleep(0.05)
            pids = [p for p in pids if Path(f"/proc/{p}").exists() and p in self._netns_pids(netns)]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def _delete_netns(self, netns: str, errors: list[str] | None = None) -> None:
        if netns not in self._namespaces:
            return
        self._kill_netns_pids(netns)
        proc = _ip("netns", "del", netns, check=False)
        if proc.returncode != 0 and Path(f"/run/netns/{netns}").exists():
            if errors is not None:
                errors.append(f"cannot delete netns {netns}: {proc.stderr.strip()}")
            return
        self._namespaces.remove(netns)

    @staticmethod
    def _remove_stale_socket(ifname: str) -> None:
        path = SOCKET_DIR / f"{ifname}.sock"
        if not path.exists():
            return
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            try:
                sock.connect(str(path))
            except OSError:
                path.unlink(missing_ok=True)

    def close(self) -> None:
        """Stop processes, delete namespaces and the temp dir. Idempotent; raises LabError if
        something could not be removed (after trying everything)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            errors: list[str] = []
            procs, self._procs = self._procs, []
            for _netns, proc in procs:
                _stop(proc)
            for netns in reversed(list(self._namespaces)):
                self._delete_netns(netns, errors)
            for node in self._nodes.values():
                self._remove_stale_socket(node.ifname)
            self._nodes.clear()
            shutil.rmtree(self.dir, ignore_errors=True)
            if errors:
                raise LabError("; ".join(errors))

    def __enter__(self) -> Lab:
        """Return self."""
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the lab."""
        self.close()
