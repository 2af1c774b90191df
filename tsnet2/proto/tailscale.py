"""Tailscale LocalAPI JSON built from our netmap ``Node`` dicts (pure functions).

Field names, order and encodings follow these files of github.com/tailscale/tailscale
(read with the search tool; a Go client decodes our output with its own types):

- ``tailcfg/tailcfg.go`` (commit 0d154d65): ``Node`` (ID, StableID, Name with trailing
  dot, User, Key ``nodekey:<hex>``, KeyExpiry, Machine ``mkey:``, DiscoKey ``discokey:``,
  Addresses/AllowedIPs as prefixes, Endpoints, Hostinfo, Created, Tags, LastSeen, Online,
  MachineAuthorized, ComputedName, ComputedNameWithHost; ``omitempty`` fields left out when
  empty), ``UserProfile`` (ID, LoginName, DisplayName, ProfilePicURL, Roles = ``[]``),
  ``Hostinfo`` (all ``omitempty``; we set OS and Hostname).
- ``client/tailscale/apitype/apitype.go`` (commit 0736be25): ``WhoIsResponse``
  {Node, UserProfile, CapMap}.
- ``ipn/ipnstate/ipnstate.go`` (commit ff02a45b): ``Status`` (Version, TUN, BackendState,
  HaveNodeKey, AuthURL, TailscaleIPs, Self, Health, MagicDNSSuffix, CurrentTailnet,
  CertDomains, Peer keyed by node key, User keyed by user id, ClientVersion),
  ``PeerStatus``, ``TailnetStatus``.
- ``ipn/backend.go`` (commit c69ee128): ``State`` ints and names, ``Notify`` (its
  ``SessionID``, after ``Version``, is set by ``LocalBackend.WatchNotifications`` in
  ``ipn/ipnlocal/local.go``: ``rands.HexString(16)`` per watch, first Notify only, and only
  when the watch asked for ``NotifyInitialState``).
- ``types/netmap/netmap.go`` (commit bd29b189): ``NetworkMap`` (SelfNode, NodeKey,
  Peers sorted by ID, Domain, UserProfiles) for the ``NetMap`` field of a Notify.

Our ``Node`` dict (docs/architecture.md): ``{"id", "stable_id", "name", "fqdn",
"public_key" (base64 WireGuard key), "addresses", "endpoints", "user": {"id",
"login_name", "display_name"}, "tags", "ephemeral", "online", "created", "last_seen",
"traffic_log_key"}``; an optional ``"os"`` key (default ``"linux"``) fills
``Hostinfo.OS``/``PeerStatus.OS``.

Node capabilities (``tailcfg.NodeCapMap``, ``map[NodeCapability][]RawMessage``, in
``tailcfg.Node.CapMap`` and ``ipnstate.PeerStatus.CapMap``, both ``omitempty``): a node that
registered a traffic-log key has ``{TRAFFIC_LOG_KEY_CAP: ["<base64 Ed25519 key>"]}``; a node
without one has no ``CapMap`` field, as before. ``WhoIsResponse.CapMap`` is Tailscale's
``PeerCapMap`` (grants between the two nodes): it stays ``{}``.

Times: Go's ``time.Time`` JSON (UTC RFC 3339, fraction trimmed); the zero time is
``0001-01-01T00:00:00Z``. Go maps keyed by ``UserID`` marshal their keys as decimal
strings.
"""

from __future__ import annotations

import base64
import binascii
import datetime as _dt
import enum
import ipaddress
import secrets
from collections.abc import Iterable, Mapping
from typing import Any

from tsnet2.proto.gojson import GO_ZERO_TIME, go_time

__all__ = [
    "TRAFFIC_LOG_KEY_CAP",
    "IPNState",
    "cap_map",
    "new_session_id",
    "node_key",
    "notify",
    "peer_status",
    "status",
    "tailcfg_node",
    "traffic_log_key",
    "user_profile",
    "whois_response",
]

_ZERO_HEX = "0" * 64
DEFAULT_OS = "linux"
TRAFFIC_LOG_KEY_CAP = "https://tsnet2.io/cap/traffic-log-key"
"""The node capability whose one value is the node's traffic-log public key (base64)."""


class IPNState(enum.IntEnum):
    """``ipn.State``: ints in a Notify, names (``.name``) in ``Status.BackendState``."""

    NoState = 0
    InUseOtherUser = 1
    NeedsLogin = 2
    NeedsMachineAuth = 3
    Stopped = 4
    Starting = 5
    Running = 6


def node_key(public_key_b64: str) -> str:
    """``nodekey:<64 hex>`` from a base64 WireGuard public key (``key.NodePublic`` text)."""
    try:
        raw = base64.b64decode(public_key_b64, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32:
        raise ValueError(f"public_key {public_key_b64!r:.60} is not a base64 32-byte key")
    return "nodekey:" + raw.hex()


def _is_key(value: object) -> bool:
    if not isinstance(value, str) or len(value) != 44:
        return False
    try:
        return len(base64.b64decode(value, validate=True)) == 32
    except (binascii.Error, ValueError):
        return False


def cap_map(node: Mapping[str, Any]) -> dict[str, list[Any]]:
    """The node's ``tailcfg.NodeCapMap`` (empty when it has no capability to show).

    A ``traffic_log_key`` that is not a base64 32-byte key (a broken control server) is
    left out rather than shown.
    """
    caps: dict[str, list[Any]] = {}
    key = node.get("traffic_log_key")
    if _is_key(key):
        caps[TRAFFIC_LOG_KEY_CAP] = [key]
    return caps


def traffic_log_key(caps: object) -> str | None:
    """The traffic-log key in a decoded ``CapMap`` (of a WhoIs ``Node``, or a status
    ``Self``/``Peer`` entry), or None when there is none."""
    if not isinstance(caps, Mapping):
        return None
    values = caps.get(TRAFFIC_LOG_KEY_CAP)
    if isinstance(values, list) and values and _is_key(values[0]):
        return str(values[0])
    return None


def _time(value: object) -> str:
    if value is None or value == "":
        return GO_ZERO_TIME
    if isinstance(value, _dt.datetime):
        return go_time(value)
    if isinstance(value, str):
        dt = _dt.datetime.fromisoformat(value)
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=_dt.UTC)
        return go_time(dt)
    raise ValueError(f"bad time value {value!r:.60}")


def _ips(node: Mapping[str, Any]) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    ips = [ipaddress.ip_address(a) for a in node.get("addresses") or ()]
    return sorted(ips, key=lambda ip: ip.version)  # IPv4 first, order kept within a family


def _prefixes(node: Mapping[str, Any]) -> list[str]:
    return [f"{ip}/{ip.max_prefixlen}" for ip in _ips(node)]


def _fqdn(node: Mapping[str, Any], domain: str) -> str:
    fqdn = str(node.get("fqdn") or "")
    if not fqdn and node.get("name"):
        fqdn = f"{node['name']}.{domain}." if domain else f"{node['name']}."
    if fqdn and not fqdn.endswith("."):
        fqdn += "."
    return fqdn


def _computed_name(node: Mapping[str, Any], domain: str) -> str:
    fqdn = _fqdn(node, domain).rstrip(".")
    suffix = "." + domain.strip(".") if domain else ""
    if suffix and fqdn.lower().endswith(suffix.lower()):
        return fqdn[: -len(suffix)]
    return fqdn or str(node.get("name") or "")


def _user_id(node: Mapping[str, Any]) -> int:
    user = node.get("user") or {}
    return int(user.get("id") or 0)


def user_profile(user: Mapping[str, Any] | None) -> dict[str, Any]:
    """``tailcfg.UserProfile`` from our ``user`` dict (``{"id","login_name","display_name"}``)."""
    user = user or {}
    return {
        "ID": int(user.get("id") or 0),
        "LoginName": str(user.get("login_name") or ""),
        "DisplayName": str(user.get("display_name") or ""),
        "ProfilePicURL": str(user.get("profile_pic_url") or ""),
        "Roles": [],
    }


def tailcfg_node(node: Mapping[str, Any], domain: str) -> dict[str, Any]:
    """``tailcfg.Node`` JSON (fields in Go order, ``omitempty`` ones only when set)."""
    prefixes = _prefixes(node)
    out: dict[str, Any] = {
        "ID": int(node.get("id") or 0),
        "StableID": str(node.get("stable_id") or ""),
        "Name": _fqdn(node, domain),
        "User": _user_id(node),
        "Key": node_key(node["public_key"]),
        "KeyExpiry": GO_ZERO_TIME,
        "Machine": "mkey:" + _ZERO_HEX,
        "DiscoKey": "discokey:" + _ZERO_HEX,
        "Addresses": prefixes,
        "AllowedIPs": list(prefixes),
    }
    if node.get("endpoints"):
        out["Endpoints"] = list(node["endpoints"])
    out["Hostinfo"] = {
        "OS": str(node.get("os") or DEFAULT_OS),
        "Hostname": str(node.get("name") or ""),
    }
    out["Created"] = _time(node.get("created"))
    if node.get("tags"):
        out["Tags"] = list(node["tags"])
    if node.get("last_seen"):
        out["LastSeen"] = _time(node["last_seen"])
    if node.get("online") is not None:
        out["Online"] = bool(node["online"])
    out["MachineAuthorized"] = True
    caps = cap_map(node)
    if caps:
        out["CapMap"] = caps
    name = _computed_name(node, domain)
    if name:
        out["ComputedName"] = name
        out["ComputedNameWithHost"] = name
    return out


def whois_response(node: Mapping[str, Any], domain: str) -> dict[str, Any]:
    """``apitype.WhoIsResponse`` for a peer (or ourselves): Node, UserProfile, CapMap."""
    return {
        "Node": tailcfg_node(node, domain),
        "UserProfile": user_profile(node.get("user")),
        "CapMap": {},
    }


def _zero_peer_status() -> dict[str, Any]:
    return {
        "ID": "",
        "PublicKey": "nodekey:" + _ZERO_HEX,
        "HostName": "",
        "DNSName": "",
        "OS": DEFAULT_OS,
        "UserID": 0,
        "TailscaleIPs": None,
        "Addrs": None,
        "CurAddr": "",
        "Relay": "",
        "RxBytes": 0,
        "TxBytes": 0,
        "Created": GO_ZERO_TIME,
        "LastWrite": GO_ZERO_TIME,
        "LastSeen": GO_ZERO_TIME,
        "LastHandshake": GO_ZERO_TIME,
        "Online": False,
        "ExitNode": False,
        "ExitNodeOption": False,
        "Active": False,
        "PeerAPIURL": None,
        "InNetworkMap": False,
        "InMagicSock": False,
        "InEngine": False,
    }


def peer_status(
    node: Mapping[str, Any],
    domain: str,
    stats: Mapping[str, Any] | None = None,
    *,
    is_self: bool = False,
) -> dict[str, Any]:
    """``ipnstate.PeerStatus`` for one node.

    ``stats`` (from the WireGuard device, all keys optional): ``rx_bytes``, ``tx_bytes``
    (ints), ``last_handshake``, ``last_write`` (RFC 3339 str, datetime or None),
    ``cur_addr`` (the endpoint in use), ``active`` (bool). A peer with stats is
    ``InEngine``/``InMagicSock``. ``is_self`` marks our own node (always ``Online``).
    """
    stats = stats or {}
    ips = [str(ip) for ip in _ips(node)]
    prefixes = _prefixes(node)
    in_engine = bool(stats) and not is_self
    out: dict[str, Any] = {
        "ID": str(node.get("stable_id") or ""),
        "PublicKey": node_key(node["public_key"]),
        "HostName": str(node.get("name") or ""),
        "DNSName": _fqdn(node, domain),
        "OS": str(node.get("os") or DEFAULT_OS),
        "UserID": _user_id(node),
        "TailscaleIPs": ips or None,
    }
    if prefixes:
        out["AllowedIPs"] = prefixes
    if node.get("tags"):
        out["Tags"] = list(node["tags"])
    out.update(
        {
            "Addrs": list(node.get("endpoints") or ()) or None,
            "CurAddr": str(stats.get("cur_addr") or ""),
            "Relay": "",
            "RxBytes": int(stats.get("rx_bytes") or 0),
            "TxBytes": int(stats.get("tx_bytes") or 0),
            "Created": _time(node.get("created")),
            "LastWrite": _time(stats.get("last_write")),
            "LastSeen": _time(node.get("last_seen")),
            "LastHandshake": _time(stats.get("last_handshake")),
            "Online": True if is_self else bool(node.get("online")),
            "ExitNode": False,
            "ExitNodeOption": False,
            "Active": bool(stats.get("active")),
            "PeerAPIURL": None,
        }
    )
    caps = cap_map(node)
    if caps:
        out["CapMap"] = caps
    out.update({"InNetworkMap": True, "InMagicSock": in_engine, "InEngine": in_engine})
    return out


def _users(nodes: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    users: dict[str, Any] = {}
    for node in nodes:
        profile = user_profile(node.get("user"))
        if profile["ID"]:
            users.setdefault(str(profile["ID"]), profile)
    return users


def status(
    self_node: Mapping[str, Any] | None,
    peers: Iterable[Mapping[str, Any]],
    backend_state: str,
    domain: str,
    version: str,
    peer_stats: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    cert_domains: Iterable[str] | None = None,
    tun: bool = True,
    health: Iterable[str] = (),
) -> dict[str, Any]:
    """``ipnstate.Status`` (what ``/localapi/v0/status`` returns).

    ``backend_state`` is an :class:`IPNState` name (``"Running"``, ``"NeedsLogin"``...).
    ``peer_stats`` maps a peer's base64 ``public_key`` to its device stats (see
    :func:`peer_status`). ``Peer`` and ``User`` are always objects (``{}`` when empty; Go
    decodes both ``{}`` and ``null`` into an empty map). Before we have a node, ``Self``
    is a zero PeerStatus, as tailscaled reports it, and ``CurrentTailnet`` is null.
    """
    if backend_state not in IPNState.__members__:
        raise ValueError(
            f"unknown backend state {backend_state!r}; expected one of "
            + ", ".join(IPNState.__members__)
        )
    peer_list = sorted(peers, key=lambda n: int(n.get("id") or 0))
    stats = peer_stats or {}
    out: dict[str, Any] = {
        "Version": version,
        "TUN": tun,
        "BackendState": backend_state,
    }
    if self_node is not None:
        out["HaveNodeKey"] = True
    out["AuthURL"] = ""
    if self_node is not None:
        out["TailscaleIPs"] = [str(ip) for ip in _ips(self_node)] or None
        out["Self"] = peer_status(self_node, domain, is_self=True)
    else:
        out["TailscaleIPs"] = None
        out["Self"] = _zero_peer_status()
    suffix = domain.strip(".")
    out["Health"] = list(health)
    out["MagicDNSSuffix"] = suffix
    out["CurrentTailnet"] = (
        {"Name": suffix, "MagicDNSSuffix": suffix, "MagicDNSEnabled": True}
        if self_node is not None
        else None
    )
    out["CertDomains"] = list(cert_domains) if cert_domains is not None else None
    out["Peer"] = {
        node_key(p["public_key"]): peer_status(p, domain, stats.get(p["public_key"]))
        for p in peer_list
    }
    everyone = ([self_node] if self_node is not None else []) + peer_list
    out["User"] = _users(everyone)
    out["ClientVersion"] = None
    return out


def new_session_id() -> str:
    """A watch's ``Notify.SessionID``: 16 random lowercase hex characters, as tailscaled's
    ``rands.HexString(16)`` (8 bytes from the OS's CSPRNG)."""
    return secrets.token_hex(8)


def notify(
    version: str,
    *,
    state: IPNState | int | None = None,
    err_message: str | None = None,
    self_node: Mapping[str, Any] | None = None,
    peers: Iterable[Mapping[str, Any]] | None = None,
    domain: str = "",
    browse_to_url: str | None = None,
    session_id: str = "",
) -> dict[str, Any]:
    """One ``ipn.Notify`` (a line of ``/localapi/v0/watch-ipn-bus``).

    Only the fields we know are present (Go decodes a missing pointer field as nil, which
    means "unchanged"): ``Version`` always; ``SessionID`` when non-empty (Go's
    ``omitzero``: tailscaled sets it in a watch's first Notify only, see
    :func:`new_session_id`); ``ErrMessage``, ``State`` (an int), ``BrowseToURL`` when
    given; ``NetMap`` when ``self_node`` is given. A peer change is reported as tailscaled
    does: a Notify carrying the whole new ``NetMap`` with ``SelfNode``, ``NodeKey``,
    ``Peers`` (sorted by ID), ``Domain`` and ``UserProfiles``.
    """
    out: dict[str, Any] = {"Version": version}
    if session_id:
        out["SessionID"] = session_id
    if err_message is not None:
        out["ErrMessage"] = err_message
    if state is not None:
        out["State"] = int(IPNState(state))
    if self_node is not None:
        peer_list = sorted(peers or (), key=lambda n: int(n.get("id") or 0))
        out["NetMap"] = {
            "SelfNode": tailcfg_node(self_node, domain),
            "NodeKey": node_key(self_node["public_key"]),
            "Peers": [tailcfg_node(p, domain) for p in peer_list],
            "Domain": domain.strip("."),
            "UserProfiles": _users([self_node, *peer_list]),
        }
    if browse_to_url is not None:
        out["BrowseToURL"] = browse_to_url
    return out
