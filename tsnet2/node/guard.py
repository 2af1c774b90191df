"""The nftables audit guard: the daemon is the only way between the pod and the tailnet.

The app shares the pod's network namespace with tsnet2d, so it could open sockets to tailnet
addresses itself (bypassing the traffic log) or listen on a port that peers could reach. The
guard is one nftables table (family ``inet``, so IPv4 and IPv6) per WireGuard device:

- **output**, packets leaving through the device: accepted if their socket carries the daemon's
  mark (``SO_MARK``, which an unprivileged process cannot set), or if they are the kernel's
  own answers about a flow already accepted (ICMP errors and resets, ``ct state related``;
  a reset to an accepted connection attempt nobody listens for). Everything else is rejected
  with a TCP reset or ICMP admin-prohibited, so a local app gets an immediate error, not a hang.
- **input**, packets arriving on the device: replies of flows already accepted
  (``ct state established,related``), and new TCP to an (address, port) pair in the named set
  ``listen4`` (``ipv4_addr . inet_service``) or ``listen6`` (``ipv6_addr . inet_service``):
  the daemon's registered listeners, each bound to exactly that pair; new UDP to a pair in
  ``ulisten4``/``ulisten6``, the daemon's UDP listeners. Before all of that, a UDP datagram
  is accepted only for a socket that carries the daemon's mark (``socket mark``): a UDP
  conntrack entry outlives the daemon's socket, so without the check an app that binds the
  port of a closed daemon flow would receive that flow's datagrams as "established"
  (UDP has no TIME_WAIT, so the socket lookup cannot miss a live daemon socket the way it
  can for TCP). Everything else is rejected.
- **refusal log** (optional, ``log_group``): before that reject, a new inbound TCP SYN (flags
  SYN without ACK/RST/FIN) is also copied to NFLOG group ``log_group`` (prefix
  ``LOG_PREFIX``, the first ``LOG_SNAPLEN`` bytes: IP and TCP headers), rate-limited to
  ``LOG_RATE`` with a burst of ``LOG_BURST`` so a SYN flood cannot flood the daemon (SYNs
  above the limit are still refused, just not logged). The peer's SYN is answered by a reset
  either way, so its dial fails with ECONNREFUSED; the daemon reads the copies with
  ``tsnet2.node.nflog.NflogReader`` and logs each refused flow.

The commands run ``nft`` in a subprocess. ``install()`` records the network namespace of the
calling thread; later calls (``set_listeners``, ``read_listeners``, ``remove``) run ``nft``
in that namespace from whatever thread calls them (the daemon uses ``asyncio.to_thread``).
Every change is one ``nft -f -`` transaction: it applies completely or not at all.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import threading
from collections.abc import Iterable, Iterator
from ipaddress import IPv4Address, IPv6Address, ip_address
from types import TracebackType
from typing import Any

from .errors import NodeError
from .netns import current_netns_fd, enter_netns

__all__ = [
    "DEFAULT_MARK",
    "LOG_BURST",
    "LOG_PREFIX",
    "LOG_RATE",
    "LOG_SNAPLEN",
    "SET4",
    "SET6",
    "USET4",
    "USET6",
    "Guard",
    "GuardError",
    "Listener",
    "list_tables",
    "original_dst",
    "ruleset",
    "set_listeners_script",
    "table_name",
]

Listener = tuple[IPv4Address | IPv6Address, int]
"""A registered listener: the exact (tailnet address, TCP port) the daemon has bound."""

DEFAULT_MARK = 0x7473
"""The daemon's socket mark (``tsnet2.daemon.io.DAEMON_MARK``, "ts" in ASCII)."""
SET4 = "listen4"
"""The named set (``ipv4_addr . inet_service``) of registered IPv4 listeners in the table."""
SET6 = "listen6"
"""The named set (``ipv6_addr . inet_service``) of registered IPv6 listeners in the table."""
USET4 = "ulisten4"
"""The named set (``ipv4_addr . inet_service``) of registered IPv4 UDP listeners."""
USET6 = "ulisten6"
"""The named set (``ipv6_addr . inet_service``) of registered IPv6 UDP listeners."""
LOG_PREFIX = "tsnet2-refused"
"""The NFLOG prefix of the refused-SYN rule (``RefusedSyn.prefix``)."""
LOG_RATE = "100/second"
"""At most this many refused SYNs per second are logged (all of them are still refused)."""
LOG_BURST = 200
"""How many refused SYNs above ``LOG_RATE`` may be logged in a burst."""
LOG_SNAPLEN = 128
"""Bytes of each refused SYN copied to NFLOG: IPv4 (<= 60) or IPv6 headers, then TCP's."""
SO_ORIGINAL_DST = 80
"""``SO_ORIGINAL_DST`` (level ``SOL_IP``) and ``IP6T_SO_ORIGINAL_DST`` (level ``SOL_IPV6``)."""

_NFT_TIMEOUT = 10.0
_MAX_OUTPUT = 1 << 20
_IFNAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,15}\Z")
_TABLE_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}\Z")


class GuardError(NodeError):
    """An nft command failed or the guard was given bad input.

    ``stderr`` holds what ``nft`` printed (empty when nft did not run), ``returncode`` its
    exit status (None when it did not run or timed out).
    """

    def __init__(self, message: str, stderr: str = "", returncode: int | None = None) -> None:
        super().__init__(message)
        self.stderr = stderr
        self.returncode = returncode


# -- pure parts ----------------------------------------------------------------------------


def _check_ifname(ifname: str) -> None:
    if not _IFNAME_RE.match(ifname) or ifname in (".", ".."):
        raise GuardError(
            f"bad device name {ifname!r} for the guard: 1-15 characters of letters, digits, "
            "'_', '.', '-'"
        )


def table_name(ifname: str) -> str:
    """The default table name for a device: ``tsnet2_<ifname>`` with '.' and '-' as '_'."""
    _check_ifname(ifname)
    return "tsnet2_" + re.sub(r"[^A-Za-z0-9_]", "_", ifname)


def _check_port(port: object, what: str) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise GuardError(f"{what} {port!r} is not a TCP port (an int in 1-65535)")
    return port


def _check_listener(item: object) -> Listener:
    if not isinstance(item, tuple) or len(item) != 2:
        raise GuardError(f"listener {item!r} is not an (IPv4Address | IPv6Address, port) pair")
    addr, port = item
    if not isinstance(addr, IPv4Address | IPv6Address):
        raise GuardError(
            f"listener address {addr!r} is not an ipaddress.IPv4Address or IPv6Address "
            "(convert it with ipaddress.ip_address)"
        )
    if addr.is_unspecified:
        raise GuardError(
            f"listener address {addr} is the wildcard; register the exact tailnet address "
            "the listener is bound to (one pair per address)"
        )
    if isinstance(addr, IPv6Address):
        if addr.scope_id is not None:
            raise GuardError(f"listener address {addr} has a scope; tailnet addresses have none")
        if addr.ipv4_mapped is not None:
            raise GuardError(
                f"listener address {addr} is IPv4-mapped; register the IPv4Address "
                f"{addr.ipv4_mapped} instead (IPv4 packets carry the IPv4 address)"
            )
    return addr, _check_port(port, f"listener {addr} port")


_Pairs4 = list[tuple[IPv4Address, int]]
_Pairs6 = list[tuple[IPv6Address, int]]


def _check_listeners(listeners: Iterable[Listener]) -> tuple[_Pairs4, _Pairs6]:
    """Validate all pairs; (IPv4 pairs, IPv6 pairs), each sorted and without duplicates."""
    if isinstance(listeners, str | bytes) or not isinstance(listeners, Iterable):
        raise GuardError(f"listeners {listeners!r} is not an iterable of (address, port) pairs")
    v4: set[tuple[IPv4Address, int]] = set()
    v6: set[tuple[IPv6Address, int]] = set()
    for item in listeners:
        addr, port = _check_listener(item)
        if isinstance(addr, IPv4Address):
            v4.add((addr, port))
        else:
            v6.add((addr, port))
    return sorted(v4), sorted(v6)


def _check_settings(ifname: str, mark: int, log_group: int | None, table: str) -> None:
    _check_ifname(ifname)
    if isinstance(mark, bool) or not isinstance(mark, int) or not 0 < mark <= 0xFFFFFFFF:
        raise GuardError(
            f"mark {mark!r} must be a non-zero 32-bit int (0 is what every unmarked socket has)"
        )
    bad_group = isinstance(log_group, bool) or not isinstance(log_group, int | None)
    if bad_group or (log_group is not None and not 0 <= log_group <= 0xFFFF):
        raise GuardError(f"NFLOG group {log_group!r} must be an int in 0-65535")
    if not _TABLE_RE.match(table):
        raise GuardError(
            f"bad nftables table name {table!r}: a letter, then up to 63 letters, digits or '_'"
        )


def _elements(pairs: _Pairs4 | _Pairs6) -> str:
    return "{ " + ", ".join(f"{addr} . {port}" for addr, port in pairs) + " }"


def ruleset(
    ifname: str,
    *,
    mark: int = DEFAULT_MARK,
    log_group: int | None = None,
    table: str | None = None,
    listeners: Iterable[Listener] = (),
    udp_listeners: Iterable[Listener] = (),
) -> str:
    """The ``nft -f`` script that (re)installs the guard for device ``ifname`` atomically.

    It creates the table if missing, deletes it (dropping leftovers of an earlier daemon), and
    defines it again with ``listeners`` as the elements of ``listen4`` and ``listen6`` (TCP)
    and ``udp_listeners`` as those of ``ulisten4`` and ``ulisten6``, all in one transaction.
    Raises ``GuardError`` on bad input.
    """
    table = table if table is not None else table_name(ifname)
    _check_settings(ifname, mark, log_group, table)
    v4, v6 = _check_listeners(listeners)
    u4, u6 = _check_listeners(udp_listeners)
    dev = f'"{ifname}"'
    lines = [
        f"# tsnet2 audit guard for WireGuard device {ifname}",
        f"table inet {table}",
        f"delete table inet {table}",
        f"table inet {table} {{",
    ]
    sets: tuple[tuple[str, str, _Pairs4 | _Pairs6], ...] = (
        (SET4, "ipv4_addr", v4),
        (SET6, "ipv6_addr", v6),
        (USET4, "ipv4_addr", u4),
        (USET6, "ipv6_addr", u6),
    )
    for name, addr_type, pairs in sets:
        lines += [f"\tset {name} {{", f"\t\ttype {addr_type} . inet_service"]
        if pairs:
            lines.append(f"\t\telements = {_elements(pairs)}")
        lines += ["\t}", ""]
    lines += [
        "\tchain output {",
        "\t\ttype filter hook output priority filter; policy accept;",
        f"\t\toifname {dev} jump tailnet_out",
        "\t}",
        "",
        "\tchain tailnet_out {",
        f'\t\tmeta mark {mark:#x} accept comment "a socket of the daemon"',
        '\t\tct state related accept comment "ICMP errors and resets about an accepted flow"',
        '\t\tct state established tcp flags rst accept comment "no socket for an accepted SYN"',
        "\t\tmeta l4proto tcp reject with tcp reset",
        "\t\treject with icmpx admin-prohibited",
        "\t}",
        "",
        "\tchain input {",
        "\t\ttype filter hook input priority filter; policy accept;",
        f"\t\tiifname {dev} jump tailnet_in",
        "\t}",
        "",
        "\tchain tailnet_in {",
        f"\t\tmeta l4proto udp socket mark != {mark:#x} reject with icmpx admin-prohibited "
        'comment "UDP only to the daemon\'s own sockets (conntrack outlives them)"',
        "\t\tct state established,related accept",
        # No `socket mark` check here. For a SYN whose 4-tuple matches a TIME_WAIT (or request)
        # socket, nft's socket lookup finds no full socket and the expression breaks, so a
        # peer reusing a source port would be refused. The sets are address-precise instead:
        # the daemon binds exactly these (address, port) pairs, without SO_REUSEPORT, before
        # it adds them, so no other process can listen there (an app's wildcard bind of the
        # port fails with EADDRINUSE, and the kernel delivers to the most specific listener
        # anyway). The old port-only set needed the mark, since an app could listen on the
        # other family or address of a registered port.
        f"\t\tip daddr . tcp dport @{SET4} accept "
        'comment "a registered IPv4 listener (address . port)"',
        f"\t\tip6 daddr . tcp dport @{SET6} accept "
        'comment "a registered IPv6 listener (address . port)"',
        f"\t\tip daddr . udp dport @{USET4} accept "
        'comment "a registered IPv4 UDP listener (address . port)"',
        f"\t\tip6 daddr . udp dport @{USET6} accept "
        'comment "a registered IPv6 UDP listener (address . port)"',
    ]
    if log_group is not None:
        lines.append(
            "\t\ttcp flags & (fin | syn | rst | ack) == syn "
            f"limit rate {LOG_RATE} burst {LOG_BURST} packets "
            f'log prefix "{LOG_PREFIX}" group {log_group} snaplen {LOG_SNAPLEN} '
            'comment "a refused SYN, copied to the daemon (NFLOG), rate-limited"'
        )
    lines += [
        "\t\tmeta l4proto tcp reject with tcp reset",
        "\t\treject with icmpx admin-prohibited",
        "\t}",
    ]
    lines += ["}", ""]
    return "\n".join(lines)


def set_listeners_script(table: str, listeners: Iterable[Listener],
                         udp_listeners: Iterable[Listener] | None = None) -> str:
    """The ``nft -f`` script that makes ``listen4`` and ``listen6`` exactly ``listeners``
    (and, unless ``udp_listeners`` is None, ``ulisten4``/``ulisten6`` exactly those).

    The sets are flushed and refilled in one transaction. Raises ``GuardError`` on bad input.
    """
    if not _TABLE_RE.match(table):
        raise GuardError(f"bad nftables table name {table!r}")
    groups = [(SET4, SET6, listeners)]
    if udp_listeners is not None:
        groups.append((USET4, USET6, udp_listeners))
    checked = [(n4, n6, *_check_listeners(pairs)) for n4, n6, pairs in groups]
    lines: list[str] = []
    for n4, n6, _v4, _v6 in checked:
        lines += [f"flush set inet {table} {n4}", f"flush set inet {table} {n6}"]
    for n4, n6, v4, v6 in checked:
        if v4:
            lines.append(f"add element inet {table} {n4} {_elements(v4)}")
        if v6:
            lines.append(f"add element inet {table} {n6} {_elements(v6)}")
    return "\n".join(lines) + "\n"


def original_dst(sock: socket.socket) -> tuple[IPv4Address | IPv6Address, int]:
    """The destination a conntracked (e.g. DNAT-ed) TCP connection was originally sent to.

    Works on an accepted socket: ``getsockopt(SO_ORIGINAL_DST)`` for IPv4 (also for IPv4
    connections on an AF_INET6 socket, as ``::ffff:a.b.c.d``) and ``IP6T_SO_ORIGINAL_DST``
    for IPv6. Raises ``GuardError`` if the kernel has no conntrack entry for the socket.
    """
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        raise GuardError(f"original_dst needs an IPv4/IPv6 TCP socket, not {sock.family!r}")
    try:
        v4 = sock.family == socket.AF_INET
        if not v4:  # an IPv4 connection on an AF_INET6 socket is tracked as IPv4
            peer = IPv6Address(sock.getpeername()[0].split("%", 1)[0])
            v4 = peer.ipv4_mapped is not None
        if v4:
            raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
            port, addr = struct.unpack_from("!2xH4s", raw)
            return IPv4Address(addr), int(port)
        raw = sock.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)
        port, addr = struct.unpack_from("!2xH4x16s", raw)
        return IPv6Address(addr), int(port)
    except OSError as exc:
        raise GuardError(
            f"no original destination for this socket ({exc.strerror}); is it a TCP "
            "connection tracked by netfilter (nf_conntrack loaded, guard installed)?"
        ) from exc


# -- running nft ---------------------------------------------------------------------------


def _nft_path() -> str:
    path = shutil.which("nft")
    if path is None:
        raise GuardError(
            "the `nft` command was not found on PATH; install nftables "
            "(Debian/Ubuntu: apt-get install nftables) — the audit guard needs it"
        )
    return path


def _run_nft(args: list[str], script: str | None = None) -> str:
    """Run nft in the calling thread's network namespace; return stdout or raise GuardError."""
    argv = [_nft_path(), *args]
    try:
        proc = subprocess.run(
            argv,
            input=script,
            capture_output=True,
            text=True,
            timeout=_NFT_TIMEOUT,
            stdin=None if script is not None else subprocess.DEVNULL,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise GuardError(f"`{' '.join(argv)}` timed out after {_NFT_TIMEOUT} s") from None
    except OSError as exc:
        raise GuardError(f"cannot run `{' '.join(argv)}`: {exc}") from exc
    if proc.returncode != 0:
        stderr = proc.stderr.strip()[-4000:]
        hint = ""
        if "Operation not permitted" in stderr:
            hint = " (nft needs CAP_NET_ADMIN: run tsnet2d as root or with NET_ADMIN)"
        raise GuardError(
            f"`nft {' '.join(args)}` failed (exit {proc.returncode}){hint}: {stderr}",
            stderr=stderr,
            returncode=proc.returncode,
        )
    if len(proc.stdout) > _MAX_OUTPUT:
        raise GuardError(f"`nft {' '.join(args)}` printed more than {_MAX_OUTPUT} bytes")
    return proc.stdout


def _json_items(text: str) -> list[dict[str, Any]]:
    try:
        doc = json.loads(text or "{}")
    except ValueError as exc:
        raise GuardError(f"nft printed JSON that does not parse: {exc}") from None
    items = doc.get("nftables", []) if isinstance(doc, dict) else []
    return [i for i in items if isinstance(i, dict)]


def _set_elements(text: str, name: str) -> set[Listener]:
    """The (address, port) elements of set ``name`` in ``nft -j list table`` output."""
    found: set[Listener] = set()
    seen = False
    for item in _json_items(text):
        the_set = item.get("set")
        if not isinstance(the_set, dict) or the_set.get("name") != name:
            continue
        seen = True
        elems = the_set.get("elem", [])
        for elem in elems if isinstance(elems, list) else [elems]:
            concat = elem.get("concat") if isinstance(elem, dict) else None
            try:
                if not isinstance(concat, list) or len(concat) != 2:
                    raise ValueError("not an address . port pair")
                addr, port = ip_address(concat[0]), int(concat[1])
                found.add(_check_listener((addr, port)))
            except (ValueError, TypeError, GuardError) as exc:
                raise GuardError(
                    f"nft listed an element of set {name} not understood: {elem!r} ({exc})"
                ) from None
    if not seen:
        raise GuardError(
            f"the guard's table has no set {name} (made by another tsnet2 version?); "
            "install() replaces it"
        )
    return found


def list_tables() -> list[tuple[str, str]]:
    """(family, name) of every nftables table in the calling thread's network namespace."""
    out: list[tuple[str, str]] = []
    for item in _json_items(_run_nft(["-j", "list", "tables"])):
        tab = item.get("table")
        if isinstance(tab, dict):
            out.append((str(tab.get("family")), str(tab.get("name"))))
    return out


# -- the guard -----------------------------------------------------------------------------


class Guard:
    """The nftables audit guard for one WireGuard device (see the module docstring).

    ``ifname``: the device name; ``mark``: the daemon's socket mark; ``log_group``: the NFLOG
    group refused inbound SYNs are copied to (None: refused without a copy); ``table``: the table
    name (default ``tsnet2_<ifname>``, unique per device so several nodes share a host).
    Synchronous and thread-safe; a context manager (``install()`` on entry, ``remove()`` on
    exit).
    """

    def __init__(
        self,
        ifname: str,
        *,
        mark: int = DEFAULT_MARK,
        log_group: int | None = None,
        table: str | None = None,
    ) -> None:
        """Validate the settings (``GuardError``); nothing is changed until ``install()``."""
        self.ifname = ifname
        self.mark = mark
        self.log_group = log_group
        self.table = table if table is not None else table_name(ifname)
        _check_settings(ifname, mark, log_group, self.table)
        self._listeners: frozenset[Listener] = frozenset()
        self._udp_listeners: frozenset[Listener] = frozenset()
        self._netns_fd: int | None = None
        self._installed = False
        self._lock = threading.RLock()

    @property
    def installed(self) -> bool:
        """True between a successful ``install()`` and ``remove()``."""
        return self._installed

    @property
    def listeners(self) -> frozenset[Listener]:
        """The (address, port) pairs this guard last put in the sets (``install()`` re-applies
        them)."""
        return self._listeners

    @property
    def udp_listeners(self) -> frozenset[Listener]:
        """The UDP (address, port) pairs this guard last put in ``ulisten4``/``ulisten6``."""
        return self._udp_listeners

    @contextlib.contextmanager
    def _in_netns(self) -> Iterator[None]:
        if self._netns_fd is None:
            yield
            return
        with enter_netns(self._netns_fd):
            yield

    def install(self) -> None:
        """Create the table in the calling thread's namespace, replacing any old one atomically.

        Idempotent: a second call (or a leftover table of a crashed daemon) is replaced in the
        same transaction. The sets start with the pairs last given to ``set_listeners`` on
        this object (none for a new one). The first install records the namespace; later calls
        (including another ``install()``) run there until ``remove()``.
        """
        with self._lock:
            script = ruleset(
                self.ifname,
                mark=self.mark,
                log_group=self.log_group,
                table=self.table,
                listeners=self._listeners,
                udp_listeners=self._udp_listeners,
            )
            if self._netns_fd is not None:
                with self._in_netns():
                    _run_nft(["-f", "-"], script)
            else:
                fd = current_netns_fd()
                try:
                    _run_nft(["-f", "-"], script)
                except BaseException:
                    os.close(fd)
                    raise
                self._netns_fd = fd
            self._installed = True

    def set_listeners(self, listeners: Iterable[Listener],
                      udp: Iterable[Listener] = ()) -> None:
        """Make the registered listeners exactly ``listeners`` (TCP) and ``udp``:
        (IPv4Address | IPv6Address, port) pairs, each the exact address and port the daemon
        has bound.

        One atomic transaction flushes the four sets and adds the new pairs. Validates first
        (``GuardError``, nothing changed); needs ``install()`` first.
        """
        v4, v6 = _check_listeners(listeners)
        u4, u6 = _check_listeners(udp)
        pairs = frozenset[Listener]([*v4, *v6])
        upairs = frozenset[Listener]([*u4, *u6])
        with self._lock:
            if not self._installed:
                raise GuardError(f"guard {self.table} is not installed; call install() first")
            with self._in_netns():
                _run_nft(["-f", "-"], set_listeners_script(self.table, pairs, upairs))
            self._listeners = pairs
            self._udp_listeners = upairs

    def read_listeners(self) -> set[Listener]:
        """The pairs in ``listen4`` and ``listen6`` as nftables has them now (``nft -j``)."""
        with self._lock, self._in_netns():
            out = _run_nft(["-j", "list", "table", "inet", self.table])  # one consistent read
        return _set_elements(out, SET4) | _set_elements(out, SET6)

    def read_udp_listeners(self) -> set[Listener]:
        """The pairs in ``ulisten4`` and ``ulisten6`` as nftables has them now."""
        with self._lock, self._in_netns():
            out = _run_nft(["-j", "list", "table", "inet", self.table])
        return _set_elements(out, USET4) | _set_elements(out, USET6)

    def exists(self) -> bool:
        """True if the table is present in the guard's namespace (read back from nftables)."""
        with self._lock, self._in_netns():
            return ("inet", self.table) in list_tables()

    def remove(self) -> None:
        """Delete the table (in the namespace of ``install()``, else the current one).

        Idempotent: removing a table that is not there is not an error.
        """
        with self._lock:
            with self._in_netns():
                _run_nft(["-f", "-"], f"table inet {self.table}\ndelete table inet {self.table}\n")
            self._installed = False
            if self._netns_fd is not None:
                os.close(self._netns_fd)
                self._netns_fd = None

    def __enter__(self) -> Guard:
        """Install the guard (in the calling thread's namespace) and return it."""
        self.install()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Remove the guard."""
        self.remove()
