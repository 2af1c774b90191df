"""Shapes of the Tailscale LocalAPI JSON built by tsnet2.proto.tailscale.

Expected field names and orders are copied from the Go structs (tailcfg.Node,
tailcfg.UserProfile, apitype.WhoIsResponse, ipnstate.Status/PeerStatus/TailnetStatus,
ipn.Notify, netmap.NetworkMap) read in github.com/tailscale/tailscale.
"""

from __future__ import annotations

import base64
import json
import os
from typing import Any

import pytest

from tsnet2.proto import go_json
from tsnet2.proto import tailscale as ts

DOMAIN = "tail-scale.ts.net"

# Go struct field order (json names), all fields that can appear in our output.
GO_NODE_ORDER = [
    "ID", "StableID", "Name", "User", "Sharer", "Key", "KeyExpiry", "KeySignature", "Machine",
    "DiscoKey", "Addresses", "AllowedIPs", "Endpoints", "DERP", "Hostinfo", "Created", "Cap",
    "Tags", "PrimaryRoutes", "LastSeen", "Online", "MachineAuthorized", "Capabilities",
    "CapMap", "UnsignedPeerAPIOnly", "ComputedName", "ComputedNameWithHost",
]  # fmt: skip
GO_NODE_REQUIRED = [  # no omitempty in tailcfg.Node
    "ID", "StableID", "Name", "User", "Key", "KeyExpiry", "Machine", "DiscoKey", "Addresses",
    "AllowedIPs", "Hostinfo", "Created",
]  # fmt: skip
GO_STATUS_ORDER = [
    "Version", "TUN", "BackendState", "HaveNodeKey", "AuthURL", "TailscaleIPs", "Self",
    "ExitNodeStatus", "Health", "MagicDNSSuffix", "CurrentTailnet", "CertDomains", "Peer",
    "User", "ClientVersion",
]  # fmt: skip
GO_PEER_STATUS_ORDER = [
    "ID", "PublicKey", "HostName", "DNSName", "OS", "UserID", "AltSharerUserID",
    "TailscaleIPs", "AllowedIPs", "Tags", "PrimaryRoutes", "Addrs", "CurAddr", "Relay",
    "RxBytes", "TxBytes", "Created", "LastWrite", "LastSeen", "LastHandshake", "Online",
    "ExitNode", "ExitNodeOption", "Active", "PeerAPIURL", "Capabilities", "CapMap",
    "sshHostKeys", "ShareeNode", "InNetworkMap", "InMagicSock", "InEngine", "Expired",
    "KeyExpiry", "Location",
]  # fmt: skip
GO_PEER_STATUS_REQUIRED = [
    "ID", "PublicKey", "HostName", "DNSName", "OS", "UserID", "TailscaleIPs", "Addrs",
    "CurAddr", "Relay", "RxBytes", "TxBytes", "Created", "LastWrite", "LastSeen",
    "LastHandshake", "Online", "ExitNode", "ExitNodeOption", "Active", "PeerAPIURL",
    "InNetworkMap", "InMagicSock", "InEngine",
]  # fmt: skip
ZERO = "0001-01-01T00:00:00Z"


def make_key() -> tuple[str, str]:
    raw = os.urandom(32)
    return base64.b64encode(raw).decode(), "nodekey:" + raw.hex()


def make_node(
    node_id: int, name: str, v4: str, v6: str, user_id: int, **extra: Any
) -> dict[str, Any]:
    key, _ = make_key()
    node = {
        "id": node_id,
        "stable_id": f"n{node_id}CNTRL",
        "name": name,
        "fqdn": f"{name}.{DOMAIN}.",
        "public_key": key,
        "addresses": [v6, v4],  # deliberately IPv6 first: output must put IPv4 first
        "endpoints": ["10.0.0.2:41641"],
        "user": {
            "id": user_id,
            "login_name": f"user{user_id}@example.com",
            "display_name": f"User {user_id}",
        },
        "tags": [],
        "ephemeral": True,
        "online": True,
        "created": "2026-05-19T16:06:10.5+00:00",
        "last_seen": None,
    }
    node.update(extra)
    return node


def assert_go_order(keys: list[str], go_order: list[str]) -> None:
    unknown = [k for k in keys if k not in go_order]
    assert not unknown, f"fields not in the Go struct: {unknown}"
    assert keys == sorted(keys, key=go_order.index), "fields out of Go struct order"


def test_whois_response_shape() -> None:
    node = make_node(2, "tsnet2-a", "100.64.0.1", "fd7a:115c:a1e0::1", 7, tags=["tag:web"])
    want_key = "nodekey:" + base64.b64decode(node["public_key"]).hex()
    w = ts.whois_response(node, DOMAIN)
    assert list(w) == ["Node", "UserProfile", "CapMap"]
    n = w["Node"]
    assert_go_order(list(n), GO_NODE_ORDER)
    assert set(GO_NODE_REQUIRED) <= set(n)
    assert n["ID"] == 2 and n["StableID"] == "n2CNTRL"
    assert n["Name"] == "tsnet2-a.tail-scale.ts.net."
    assert n["User"] == 7
    assert n["Key"] == want_key and len(n["Key"]) == len("nodekey:") + 64
    assert n["Machine"] == "mkey:" + "0" * 64
    assert n["KeyExpiry"] == ZERO
    assert n["Addresses"] == ["100.64.0.1/32", "fd7a:115c:a1e0::1/128"]
    assert n["AllowedIPs"] == n["Addresses"]
    assert n["Endpoints"] == ["10.0.0.2:41641"]
    assert n["Hostinfo"] == {"OS": "linux", "Hostname": "tsnet2-a"}
    assert n["Created"] == "2026-05-19T16:06:10.5Z"
    assert n["Tags"] == ["tag:web"]
    assert "LastSeen" not in n  # *time.Time omitempty, null in our Node
    assert n["Online"] is True and n["MachineAuthorized"] is True
    assert n["ComputedName"] == "tsnet2-a" and n["ComputedNameWithHost"] == "tsnet2-a"
    assert w["UserProfile"] == {
        "ID": 7,
        "LoginName": "user7@example.com",
        "DisplayName": "User 7",
        "ProfilePicURL": "",
        "Roles": [],
    }
    assert w["CapMap"] == {}
    assert json.loads(go_json(w)) == w


def test_whois_omitempty_and_name_without_fqdn() -> None:
    node = make_node(
        3,
        "b",
        "100.64.0.3",
        "fd7a:115c:a1e0::3",
        1,
        endpoints=[],
        fqdn="",
        last_seen="2026-01-02T03:04:05Z",
    )
    n = ts.whois_response(node, DOMAIN)["Node"]
    assert "Endpoints" not in n and "Tags" not in n
    assert n["Name"] == "b.tail-scale.ts.net."
    assert n["LastSeen"] == "2026-01-02T03:04:05Z"


def test_bad_public_key_is_reported() -> None:
    node = make_node(3, "b", "100.64.0.3", "fd7a:115c:a1e0::3", 1, public_key="not-a-key")
    with pytest.raises(ValueError, match="public_key"):
        ts.whois_response(node, DOMAIN)


def test_status_running() -> None:
    me = make_node(1, "tsnet2-b", "100.64.0.2", "fd7a:115c:a1e0::2", 5)
    p1 = make_node(
        4,
        "tsnet2-c",
        "100.64.0.4",
        "fd7a:115c:a1e0::4",
        6,
        online=False,
        last_seen="2026-05-19T10:00:00Z",
    )
    p2 = make_node(2, "tsnet2-a", "100.64.0.1", "fd7a:115c:a1e0::1", 5)
    stats = {
        p2["public_key"]: {
            "rx_bytes": 10,
            "tx_bytes": 20,
            "last_handshake": "2026-05-19T16:07:00Z",
            "cur_addr": "10.0.0.3:41641",
            "active": True,
        }
    }
    s = ts.status(
        me, [p1, p2], "Running", DOMAIN, "0.1.0", stats, cert_domains=["tsnet2-b.tail-scale.ts.net"]
    )
    assert_go_order(list(s), GO_STATUS_ORDER)
    assert s["Version"] == "0.1.0" and s["TUN"] is True and s["BackendState"] == "Running"
    assert s["TailscaleIPs"] == ["100.64.0.2", "fd7a:115c:a1e0::2"]
    assert s["Health"] == []
    assert s["MagicDNSSuffix"] == DOMAIN
    assert s["CurrentTailnet"] == {
        "Name": DOMAIN,
        "MagicDNSSuffix": DOMAIN,
        "MagicDNSEnabled": True,
    }
    assert s["CertDomains"] == ["tsnet2-b.tail-scale.ts.net"]

    self_ps = s["Self"]
    assert_go_order(list(self_ps), GO_PEER_STATUS_ORDER)
    assert set(GO_PEER_STATUS_REQUIRED) <= set(self_ps)
    assert self_ps["DNSName"] == "tsnet2-b.tail-scale.ts.net." and self_ps["Online"] is True

    a_key = "nodekey:" + base64.b64decode(p2["public_key"]).hex()
    c_key = "nodekey:" + base64.b64decode(p1["public_key"]).hex()
    assert list(s["Peer"]) == [a_key, c_key]  # sorted by node ID
    a = s["Peer"][a_key]
    assert_go_order(list(a), GO_PEER_STATUS_ORDER)
    assert set(GO_PEER_STATUS_REQUIRED) <= set(a)
    assert a["ID"] == "n2CNTRL" and a["PublicKey"] == a_key
    assert a["HostName"] == "tsnet2-a" and a["DNSName"] == "tsnet2-a.tail-scale.ts.net."
    assert a["UserID"] == 5 and a["OS"] == "linux"
    assert a["TailscaleIPs"] == ["100.64.0.1", "fd7a:115c:a1e0::1"]
    assert a["AllowedIPs"] == ["100.64.0.1/32", "fd7a:115c:a1e0::1/128"]
    assert (a["RxBytes"], a["TxBytes"], a["CurAddr"], a["Active"]) == (
        10,
        20,
        "10.0.0.3:41641",
        True,
    )
    assert a["LastHandshake"] == "2026-05-19T16:07:00Z" and a["LastWrite"] == ZERO
    assert a["InNetworkMap"] and a["InEngine"] and a["Online"]
    c = s["Peer"][c_key]
    assert c["Online"] is False and c["LastSeen"] == "2026-05-19T10:00:00Z"
    assert c["InEngine"] is False and c["RxBytes"] == 0 and c["LastHandshake"] == ZERO
    assert set(s["User"]) == {"5", "6"}
    assert s["User"]["6"]["LoginName"] == "user6@example.com"
    assert json.loads(go_json(s)) == s


def test_status_before_login() -> None:
    s = ts.status(None, [], "NeedsLogin", "", "0.1.0")
    assert "HaveNodeKey" not in s
    assert s["TailscaleIPs"] is None and s["CurrentTailnet"] is None and s["CertDomains"] is None
    assert s["Self"]["PublicKey"] == "nodekey:" + "0" * 64 and s["Self"]["Created"] == ZERO
    assert set(GO_PEER_STATUS_REQUIRED) <= set(s["Self"])
    assert s["Peer"] == {} and s["User"] == {}
    with pytest.raises(ValueError, match="unknown backend state"):
        ts.status(None, [], "running", "", "0.1.0")


def test_ipn_state_values() -> None:
    assert {s.name: s.value for s in ts.IPNState} == {
        "NoState": 0,
        "InUseOtherUser": 1,
        "NeedsLogin": 2,
        "NeedsMachineAuth": 3,
        "Stopped": 4,
        "Starting": 5,
        "Running": 6,
    }


def test_notify_state_and_netmap() -> None:
    assert ts.notify("0.1.0", state=ts.IPNState.Running) == {"Version": "0.1.0", "State": 6}
    assert ts.notify("v", err_message="boom", state=2) == {
        "Version": "v",
        "ErrMessage": "boom",
        "State": 2,
    }
    me = make_node(1, "me", "100.64.0.2", "fd7a:115c:a1e0::2", 5)
    peers = [
        make_node(9, "z", "100.64.0.9", "fd7a:115c:a1e0::9", 6),
        make_node(3, "y", "100.64.0.3", "fd7a:115c:a1e0::3", 5),
    ]
    n = ts.notify("v", self_node=me, peers=peers, domain=DOMAIN)
    assert list(n) == ["Version", "NetMap"]
    nm = n["NetMap"]
    assert list(nm) == ["SelfNode", "NodeKey", "Peers", "Domain", "UserProfiles"]
    assert nm["SelfNode"]["Name"] == "me.tail-scale.ts.net."
    assert nm["NodeKey"] == nm["SelfNode"]["Key"]
    assert [p["ID"] for p in nm["Peers"]] == [3, 9]
    assert nm["Domain"] == DOMAIN and set(nm["UserProfiles"]) == {"5", "6"}
    with pytest.raises(ValueError):
        ts.notify("v", state=42)


# ipn.Notify field order (json names) up to the fields we emit: Version, then SessionID
# (`json:",omitzero"`), ErrMessage, LoginFinished, State, ... (ipn/backend.go).
GO_NOTIFY_ORDER = ["Version", "SessionID", "ErrMessage", "LoginFinished", "State", "Prefs",
                   "SelfChange", "InitialStatus", "NetMap", "BrowseToURL"]


def test_notify_session_id_bytes() -> None:
    """The first Notify of a NotifyInitialState watch, byte for byte as tailscaled writes it
    (Go's encoder, struct-field order): SessionID right after Version; "" is omitted."""
    first = ts.notify("1.2.3", session_id="0123456789abcdef", state=ts.IPNState.Running)
    assert go_json(first) == b'{"Version":"1.2.3","SessionID":"0123456789abcdef","State":6}'
    assert go_json(ts.notify("1.2.3", session_id="", state=6)) == b'{"Version":"1.2.3","State":6}'
    full = ts.notify("v", session_id="00ff00ff00ff00ff", err_message="e", state=2,
                     browse_to_url="", self_node=make_node(1, "me", "100.64.0.2",
                                                          "fd7a:115c:a1e0::2", 5))
    assert list(full) == [k for k in GO_NOTIFY_ORDER if k in full]
    assert list(full) == ["Version", "SessionID", "ErrMessage", "State", "NetMap", "BrowseToURL"]


def test_new_session_id_is_rands_hexstring_16() -> None:
    """tailscaled's rands.HexString(16): 16 lowercase hex characters, new for every watch."""
    ids = {ts.new_session_id() for _ in range(64)}
    assert len(ids) == 64
    for sid in ids:
        assert len(sid) == 16 and sid == sid.lower()
        int(sid, 16)
