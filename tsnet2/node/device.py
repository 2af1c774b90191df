"""The WireGuard device: one interface (``Device``), two backends.

* ``UserspaceDevice``: runs ``wireguard-go -f <ifname>`` as a supervised child process (TUN
  device, configured over the UAPI socket ``/var/run/wireguard/<ifname>.sock``). Which
  wireguard-go: the ``binary`` argument, else ``$TSNET2_WIREGUARD_GO``, else
  ``wireguard-go`` on PATH (``wireguard_go_binary``).
* ``KernelDevice``: the in-kernel WireGuard module, ``ip link add type wireguard``
  (``tsnet2.node.rtnl``) plus the ``wireguard`` generic-netlink family (pyroute2, imported
  only when a kernel device is started or used: the userspace backend and the backend probe
  never load it, which keeps about 13 MB out of tsnet2d).

Both create the device in the calling thread's network namespace. Peer changes are expressed
as ``PeerUpdate`` values so the caller (``Node``) can compute an incremental diff.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal, Protocol

from .endpoint import split_endpoint
from .errors import NodeError, UAPIError
from .rtnl import Rtnl, RtnlError
from .uapi import DeviceState, PeerState, UAPIClient, b64_to_hex
from .wgkey import WireguardKey

if TYPE_CHECKING:
    from pyroute2 import WireGuard

__all__ = [
    "SOCKET_DIR",
    "WIREGUARD_GO_ENV",
    "Backend",
    "Device",
    "KernelDevice",
    "PeerUpdate",
    "UserspaceDevice",
    "WireguardGo",
    "create_device",
    "detect_backend",
    "find_wireguard_go",
    "wireguard_go_binary",
]

Backend = Literal["kernel", "userspace"]
SOCKET_DIR = Path("/var/run/wireguard")
_SOCKET_WAIT = 5.0
_STOP_WAIT = 5.0
_MAX_LOG = 64 * 1024
WIREGUARD_GO_ENV = "TSNET2_WIREGUARD_GO"
"""Environment variable naming the wireguard-go binary (a path, or a name looked up on PATH)."""


def wireguard_go_binary(binary: str | None = None) -> str:
    """The wireguard-go to run: ``binary`` if given, else ``$TSNET2_WIREGUARD_GO``, else
    ``wireguard-go`` (looked up on PATH when started)."""
    return binary or os.environ.get(WIREGUARD_GO_ENV) or "wireguard-go"


@dataclass(frozen=True)
class WireguardGo:
    """A wireguard-go binary: its resolved ``path`` and ``version`` (the first line of its
    ``--version`` output, e.g. ``wireguard-go v0.0.20250522``)."""

    path: str
    version: str

    def __str__(self) -> str:
        return f"{self.version} ({self.path})"


def find_wireguard_go(binary: str | None = None) -> WireguardGo:
    """Resolve the wireguard-go that ``UserspaceDevice(binary=binary)`` would run and ask it
    its version. Raises ``NodeError`` if it is missing or does not answer ``--version``."""
    name = wireguard_go_binary(binary)
    path = shutil.which(name)
    if path is None:
        raise NodeError(_not_found(name))
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=5,
                             stdin=subprocess.DEVNULL, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NodeError(f"{path} --version failed: {exc}") from None
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines:
        raise NodeError(f"{path} --version failed (status {out.returncode}): "
                        f"{(out.stderr or out.stdout).strip()[:500]}")
    return WireguardGo(os.path.abspath(path), lines[0].strip())


def _not_found(name: str) -> str:
    return (f"{name} not found; install the wireguard-go package, or name a wireguard-go "
            f"binary in ${WIREGUARD_GO_ENV} (tsnet2d: --wireguard-go)")


@dataclass(frozen=True)
class PeerUpdate:
    """One incremental change to one peer (``public_key`` in base64).

    ``remove`` deletes the peer and ignores the rest. Otherwise the peer is created if absent,
    and each field that is not None is set: ``endpoint`` ("ip:port" / "[v6]:port"),
    ``allowed_ips`` (replaces this peer's list only), ``persistent_keepalive`` (0 = off).
    """

    public_key: str
    remove: bool = False
    endpoint: str | None = None
    allowed_ips: tuple[str, ...] | None = None
    persistent_keepalive: int | None = None

    def uapi_lines(self) -> list[str]:
        """This update as UAPI ``set`` lines (hex key)."""
        lines = [f"public_key={b64_to_hex(self.public_key)}"]
        if self.remove:
            return [*lines, "remove=true"]
        if self.endpoint is not None:
            lines.append(f"endpoint={self.endpoint}")
        if self.persistent_keepalive is not None:
            lines.append(f"persistent_keepalive_interval={self.persistent_keepalive}")
        if self.allowed_ips is not None:
            lines.append("replace_allowed_ips=true")
            lines.extend(f"allowed_ip={ip}" for ip in self.allowed_ips)
        return lines


class Device(Protocol):
    """A WireGuard network device in the current network namespace."""

    name: str
    backend: Backend

    def start(self, private_key: WireguardKey, listen_port: int) -> None:
        """Create the device and set its private key and UDP listen port."""

    def state(self) -> DeviceState:
        """Read the device's current configuration and counters."""

    def set_peers(self, updates: Sequence[PeerUpdate]) -> None:
        """Apply peer updates (not transactional: re-read ``state()`` after an error)."""

    def close(self) -> None:
        """Remove the device and everything started for it. Idempotent."""


def _link_exists(name: str) -> bool:
    with Rtnl() as rt:
        return rt.link_index(name) is not None


def _socket_alive(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(str(path))
        except OSError:
            return False
        return True


_PRCTL = ctypes.CDLL(None, use_errno=True).prctl  # resolved before any fork
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the thread that started us dies (a crashed daemon
    must not leave wireguard-go holding the device name its restart needs). Only a
    pre-resolved libc call runs between fork and exec."""
    _PRCTL(_PR_SET_PDEATHSIG, int(signal.SIGTERM))


class UserspaceDevice:
    """wireguard-go as a child process; configured over UAPI. No stray process survives close()."""

    backend: Backend = "userspace"

    def __init__(self, name: str, binary: str | None = None) -> None:
        """``binary``: the wireguard-go to run (default ``$TSNET2_WIREGUARD_GO``, else
        ``wireguard-go``), looked up on PATH at start()."""
        self.name = name
        self.binary = wireguard_go_binary(binary)
        self.path: str | None = None
        """The resolved binary, once started."""
        self.sock_path = SOCKET_DIR / f"{name}.sock"
        self.uapi = UAPIClient(self.sock_path)
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def pid(self) -> int | None:
        """The wireguard-go process id while it runs."""
        return self._proc.pid if self._proc is not None else None

    def _output(self) -> str:
        if self._log is None:
            return ""
        self._log.seek(0)
        text = self._log.read(_MAX_LOG).decode("utf-8", "replace").strip()
        return text[-4000:]

    def start(self, private_key: WireguardKey, listen_port: int) -> None:
        """Spawn ``wireguard-go -f``, wait for its socket (5 s bound), set key and port."""
        if self._proc is not None:
            raise NodeError(f"device {self.name} is already started")
        binary = shutil.which(self.binary)
        if binary is None:
            raise NodeError(_not_found(self.binary))
        self.path = os.path.abspath(binary)
        if not os.path.exists("/dev/net/tun"):
            raise NodeError(
                "/dev/net/tun missing; the userspace backend needs a TUN device "
                "(load the tun module, or mount /dev/net/tun into the container)"
            )
        if _link_exists(self.name):
            raise NodeError(f"device {self.name} already exists; pick another name or delete it")
        if self.sock_path.exists():
            if _socket_alive(self.sock_path):
                raise NodeError(
                    f"another wireguard-go already serves {self.sock_path} (maybe in another "
                    "network namespace); device names must be unique per host"
                )
            with contextlib.suppress(FileNotFoundError):
                self.sock_path.unlink()  # stale: left by a killed wireguard-go
        self._log = tempfile.TemporaryFile(prefix="wireguard-go-")  # noqa: SIM115 (closed in close())
        self._proc = subprocess.Popen(
            [binary, "-f", self.name],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "LOG_LEVEL": "error"},
            preexec_fn=_die_with_parent,
        )
        try:
            self._wait_for_socket(self._proc)
            self.uapi.set([f"private_key={private_key.hex}", f"listen_port={listen_port}"])
        except BaseException:
            self.close()
            raise

    def _wait_for_socket(self, proc: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + _SOCKET_WAIT
        while True:
            code = proc.poll()
            if code is not None:
                raise NodeError(
                    f"wireguard-go for {self.name} exited with status {code} before its UAPI "
                    f"socket appeared; its output:\n{self._output()}"
                )
            if self.sock_path.exists() and _socket_alive(self.sock_path):
                return
            if time.monotonic() > deadline:
                raise NodeError(
                    f"wireguard-go for {self.name} did not create {self.sock_path} within "
                    f"{_SOCKET_WAIT:.0f} s; its output:\n{self._output()}"
                )
            time.sleep(0.005)

    def exited(self) -> str | None:
        """Why wireguard-go is no longer running (its exit status and output), else None."""
        proc = self._proc
        if proc is None:
            return None
        code = proc.poll()
        if code is None:
            return None
        how = (f"was killed by {signal.Signals(-code).name}" if code < 0
               else f"exited with status {code}")
        return f"wireguard-go for {self.name} {how}"

    def state(self) -> DeviceState:
        """Read state over UAPI."""
        return self.uapi.get()

    def set_peers(self, updates: Sequence[PeerUpdate]) -> None:
        """Send all updates in one UAPI ``set`` request."""
        lines: list[str] = []
        for update in updates:
            lines.extend(update.uapi_lines())
        if lines:
            self.uapi.set(lines)

    def close(self) -> None:
        """SIGTERM wireguard-go (SIGKILL after 5 s), reap it, remove a stale socket. Idempotent."""
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(_STOP_WAIT)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            # after a SIGKILL the socket file stays behind; nobody listens on it any more
            if self.sock_path.exists() and not _socket_alive(self.sock_path):
                with contextlib.suppress(FileNotFoundError):
                    self.sock_path.unlink()
        if self._log is not None:
            self._log.close()
            self._log = None


def _nl_attr(msg: Any, name: str) -> Any:
    return msg.get_attr(name)


def _nl_key(value: Any) -> str:
    return value.decode("ascii") if isinstance(value, bytes) else str(value)


def _pyroute2() -> tuple[type[WireGuard], type[Exception]]:
    """pyroute2's genetlink ``WireGuard`` and its ``NetlinkError``, imported on first use:
    importing pyroute2 costs about 13 MB, and only the kernel backend needs it."""
    try:
        from pyroute2 import WireGuard
        from pyroute2.netlink.exceptions import NetlinkError
    except ImportError as exc:
        raise NodeError(
            f"the kernel WireGuard backend needs pyroute2 ({exc}): pip install "
            "'tsnet2[daemon]', or use the userspace backend (wireguard-go)"
        ) from None
    return WireGuard, NetlinkError


class KernelDevice:
    """In-kernel WireGuard via rtnetlink (link) and the ``wireguard`` genetlink family."""

    backend: Backend = "kernel"

    def __init__(self, name: str) -> None:
        """The link is created at start()."""
        self.name = name
        self._created = False

    def start(self, private_key: WireguardKey, listen_port: int) -> None:
        """``ip link add <name> type wireguard``, then set key and port over genetlink."""
        if self._created:
            raise NodeError(f"device {self.name} is already started")
        wireguard, netlink_error = _pyroute2()
        try:
            with Rtnl() as rt:
                rt.link_add(self.name, "wireguard")
        except RtnlError as exc:
            if exc.errno == errno.EEXIST:
                raise NodeError(
                    f"device {self.name} already exists; pick another name or delete it"
                ) from None
            raise NodeError(
                f"cannot create kernel WireGuard device {self.name}: {exc}; "
                "use the userspace backend (wireguard-go) if the module is not available"
            ) from None
        self._created = True
        try:
            with wireguard() as wg:
                wg.set(self.name, private_key=str(private_key), listen_port=listen_port)
        except (netlink_error, OSError) as exc:
            self.close()
            raise NodeError(
                f"cannot configure kernel WireGuard device {self.name}: {exc}"
            ) from None

    def state(self) -> DeviceState:
        """Dump the device over genetlink."""
        state = DeviceState()
        wireguard, netlink_error = _pyroute2()
        try:
            with wireguard() as wg:
                messages = list(wg.info(self.name))
        except (netlink_error, OSError) as exc:
            raise NodeError(f"cannot read kernel WireGuard device {self.name}: {exc}") from None
        for msg in messages:  # large devices are split over several messages
            port = _nl_attr(msg, "WGDEVICE_A_LISTEN_PORT")
            if port is not None:
                state.listen_port = int(port)
            pub = _nl_attr(msg, "WGDEVICE_A_PUBLIC_KEY")
            if pub is not None:
                state.public_key = _nl_key(pub)
            for peer_msg in _nl_attr(msg, "WGDEVICE_A_PEERS") or []:
                key = _nl_key(_nl_attr(peer_msg, "WGPEER_A_PUBLIC_KEY"))
                peer = state.peers.setdefault(key, PeerState())
                endpoint = _nl_attr(peer_msg, "WGPEER_A_ENDPOINT")
                if endpoint is not None and endpoint.get("port"):
                    addr = endpoint["addr"]
                    peer.endpoint = (
                        f"[{addr}]:{endpoint['port']}"
                        if ":" in addr
                        else f"{addr}:{endpoint['port']}"
                    )
                hs = _nl_attr(peer_msg, "WGPEER_A_LAST_HANDSHAKE_TIME")
                if hs is not None and hs.get("tv_sec"):
                    peer.last_handshake = hs["tv_sec"] + hs.get("tv_nsec", 0) / 1e9
                peer.rx_bytes = int(_nl_attr(peer_msg, "WGPEER_A_RX_BYTES") or 0)
                peer.tx_bytes = int(_nl_attr(peer_msg, "WGPEER_A_TX_BYTES") or 0)
                keepalive = _nl_attr(peer_msg, "WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL")
                peer.persistent_keepalive = int(keepalive) if keepalive else None
                for aip in _nl_attr(peer_msg, "WGPEER_A_ALLOWEDIPS") or []:
                    if aip.get("addr"):
                        peer.allowed_ips.append(aip["addr"])
        return state

    def set_peers(self, updates: Sequence[PeerUpdate]) -> None:
        """One genetlink set per peer (pyroute2 takes one peer per call)."""
        wireguard, netlink_error = _pyroute2()
        try:
            with wireguard() as wg:
                for update in updates:
                    peer: dict[str, Any] = {"public_key": update.public_key}
                    if update.remove:
                        peer["remove"] = True
                    else:
                        if update.endpoint is not None:
                            ep = split_endpoint(update.endpoint)
                            peer["endpoint_addr"] = str(ep.ip)
                            peer["endpoint_port"] = ep.port
                        if update.persistent_keepalive is not None:
                            peer["persistent_keepalive"] = update.persistent_keepalive
                        if update.allowed_ips is not None:
                            peer["replace_allowed_ips"] = True
                            peer["allowed_ips"] = list(update.allowed_ips)
                    wg.set(self.name, peer=peer)
        except netlink_error as exc:
            raise UAPIError(
                f"kernel WireGuard rejected a peer update on {self.name}: {exc}",
                errno=getattr(exc, "code", None),
            ) from None

    def close(self) -> None:
        """Delete the link if this object created it. Idempotent."""
        if not self._created:
            return
        self._created = False
        with Rtnl() as rt, contextlib.suppress(RtnlError):
            idx = rt.link_index(self.name)
            if idx is not None:
                rt.link_del(idx)


def detect_backend() -> Backend:
    """ "kernel" if a wireguard link can be created in this netns, else "userspace".

    Creates and deletes a throwaway link with a random name, over rtnetlink (``Rtnl``): the
    probe does not import pyroute2.
    """
    probe = f"t2wgprobe{secrets.token_hex(3)}"
    try:
        with Rtnl() as rt:
            rt.link_add(probe, "wireguard")
            idx = rt.link_index(probe)
            if idx is not None:
                rt.link_del(idx)
    except OSError:  # RtnlError included
        return "userspace"
    return "kernel"


def create_device(name: str, backend: Backend, wireguard_go: str | None = None) -> Device:
    """Construct (but do not start) a device for ``backend``; ``wireguard_go`` is the binary
    of the userspace backend (see ``wireguard_go_binary``)."""
    if backend == "kernel":
        return KernelDevice(name)
    if backend == "userspace":
        return UserspaceDevice(name, binary=wireguard_go)
    raise NodeError(f"unknown WireGuard backend {backend!r}; use kernel, userspace or auto")
