"""The node's traffic-log public key: registered with control, stored, shown to peers.

A node sends ``traffic_log_key`` (base64 Ed25519 public key) in ``POST /v1/register``; the
server validates it, stores it with the node (SQLite: a migrated column; old rows have
none), puts it in every netmap ``Node``, and the daemon's LocalAPI shows it as the node
capability ``https://tsnet2.io/cap/traffic-log-key`` in ``CapMap``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.unit.test_tailscale_json import (
    DOMAIN,
    GO_NODE_ORDER,
    GO_PEER_STATUS_ORDER,
    assert_go_order,
    make_node,
)
from tsnet2.control import api
from tsnet2.control.server import ControlServer
from tsnet2.control.sqlite_store import MIGRATIONS, SQLiteStore
from tsnet2.control.store import NodeRecord, UserRecord
from tsnet2.controlclient import ControlClient, ControlError
from tsnet2.proto import go_json
from tsnet2.proto import tailscale as ts
from tsnet2.traffic.signing import SigningKey, load_or_create_signing_key

CAP = "https://tsnet2.io/cap/traffic-log-key"


def _pub() -> str:
    return base64.b64encode(os.urandom(32)).decode()


def _log_key() -> str:
    return SigningKey.generate().public


# ---- request validation and reply shape -------------------------------------------------


def test_a_canonical_key_is_accepted_and_none_means_no_key() -> None:
    key = _log_key()
    assert len(key) == 44
    body = {"public_key": _pub(), "hostname": "web", "traffic_log_key": key}
    assert api.parse_register(body).traffic_log_key == key
    for absent in ({}, {"traffic_log_key": None}, {"traffic_log_key": ""}):
        req = api.parse_register({"public_key": _pub(), "hostname": "web", **absent})
        assert req.traffic_log_key is None


@pytest.mark.parametrize(("value", "needle"), [
    (12, "must be a string"),
    (["k"], "must be a string"),
    ("A" * 65, "has 65 characters; a base64 Ed25519 public key has 44"),
    ("not base64!", "not a base64 Ed25519 public key"),
    (base64.b64encode(b"x" * 31).decode(), "has 31"),
    (base64.b64encode(b"x" * 33).decode(), "has 33"),
])  # fmt: skip
def test_a_bad_key_is_a_typed_400(value: object, needle: str) -> None:
    with pytest.raises(api.InvalidTrafficLogKey, match="traffic_log_key") as info:
        api.parse_register({"public_key": _pub(), "hostname": "web", "traffic_log_key": value})
    assert isinstance(info.value, api.BadRequest)  # the server answers 400 with the message
    assert needle in str(info.value)


def test_other_spellings_of_a_key_are_refused_with_the_canonical_one() -> None:
    raw = os.urandom(32)
    canonical = base64.b64encode(raw).decode()
    # The last character carries 4 unused bits: set one to get another spelling.
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    last = alphabet.index(canonical[-2])
    other_bits = canonical[:-2] + alphabet[last ^ 1] + "="
    assert base64.b64decode(other_bits) == raw
    for spelling in ("ed25519:" + canonical, " " + canonical, canonical + "\n", other_bits):
        with pytest.raises(api.InvalidTrafficLogKey, match="not in canonical base64") as info:
            api.validate_traffic_log_key(spelling)
        assert repr(canonical) in str(info.value)


def _record(traffic_log_key: str | None = None) -> NodeRecord:
    return NodeRecord(
        id=1, stable_id="nabc", name="web", public_key=_pub(), credential_hash="0" * 64,
        user=UserRecord(1, "u@x", "u", 0.0), tags=(), ephemeral=False, endpoints=(),
        ipv4="100.64.0.1", ipv6="fd7a:115c:a1e0::1", created=0.0, last_seen=None,
        auth_key_id=None, traffic_log_key=traffic_log_key,
    )  # fmt: skip


def test_the_api_node_carries_the_key_or_null() -> None:
    key = _log_key()
    assert api.node_json(_record(key), domain="d", online=True)["traffic_log_key"] == key
    assert api.node_json(_record(), domain="d", online=True)["traffic_log_key"] is None


# ---- SQLite store: migration and updates ---------------------------------------------------


def test_sqlite_migrates_old_rows_to_no_key(tmp_path: Path) -> None:
    db = tmp_path / "c.db"
    conn = sqlite3.connect(db, isolation_level=None)
    for statement in MIGRATIONS[0]:  # a database written before the key existed
        conn.execute(statement)
    conn.execute("PRAGMA user_version = 1")
    conn.execute("INSERT INTO users VALUES (1, 'u@x', 'u', 0)")
    conn.execute(
        "INSERT INTO nodes (id, stable_id, name, public_key, credential_hash, user_id, tags,"
        " ephemeral, endpoints, created, last_seen, auth_key_id)"
        " VALUES (1, 'nold', 'old', ?, ?, 1, '[]', 0, '[]', 0, NULL, NULL)",
        (_pub(), "1" * 64),
    )
    conn.execute("INSERT INTO ip_allocations VALUES (1, '100.64.0.1', 'fd7a:115c:a1e0::1', 1)")
    conn.close()

    async def main() -> None:
        async with SQLiteStore(db) as store:
            (old,) = await store.list_nodes()
            assert old.name == "old" and old.traffic_log_key is None
            version = await store.version()
            key = _log_key()
            result = await store.update_node(old.id, traffic_log_key=key)
            assert result is not None and result[0].traffic_log_key == key
            assert result[1] == version + 1
            same = await store.update_node(old.id, traffic_log_key=key, endpoints=())
            assert same is not None and same[1] == version + 1  # unchanged: no bump
            kept = await store.update_node(old.id, last_seen=5.0)  # None: left as it is
            assert kept is not None and kept[0].traffic_log_key == key
            cleared = await store.update_node(old.id, traffic_log_key="")
            assert cleared is not None and cleared[0].traffic_log_key is None

    asyncio.run(main())
    with sqlite3.connect(db) as check:
        assert check.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS) == 3
    check.close()


# ---- the coordination server --------------------------------------------------------------


@contextlib.asynccontextmanager
async def control(db: Path) -> AsyncIterator[tuple[ControlServer, ControlClient]]:
    async with SQLiteStore(db) as store:
        server = ControlServer(store)
        await server.start()
        try:
            async with ControlClient(server.url) as client:
                yield server, client
        finally:
            await server.close()


def test_the_server_stores_publishes_and_replaces_the_key(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        async with control(tmp_path / "c.db") as (server, client):
            auth = await server.create_auth_key(reusable=True)
            key_a = _log_key()
            a = await client.register(_pub(), "a", auth_key=auth, traffic_log_key=key_a)
            assert a.node["traffic_log_key"] == key_a
            b = await client.register(_pub(), "b", auth_key=auth)  # an older tsnet2d
            assert b.node["traffic_log_key"] is None
            netmap = await client.netmap(b.node_credential)
            (peer,) = netmap["peers"]
            assert peer["name"] == "a" and peer["traffic_log_key"] == key_a
            assert netmap["self"]["traffic_log_key"] is None

            # A refused key changes nothing, on a new node or a re-registration.
            with pytest.raises(ControlError, match="traffic_log_key") as bad:
                await client.register(_pub(), "c", auth_key=auth, traffic_log_key="x" * 44)
            assert bad.value.status == 400
            with pytest.raises(ControlError, match="traffic_log_key"):
                await client.register(a.node["public_key"], "a", traffic_log_key="nope",
                                      node_credential=a.node_credential)
            assert len((await client.netmap(b.node_credential))["peers"]) == 1

            # A re-registration with another key (the key file was replaced) replaces it,
            # bumps the netmap and says so in the log; one without a key removes it.
            version = netmap["version"]
            key_a2 = _log_key()
            caplog.set_level(logging.INFO, logger="tsnet2.control")
            again = await client.register(a.node["public_key"], "a", traffic_log_key=key_a2,
                                          node_credential=a.node_credential)
            assert again.node["id"] == a.node["id"] and again.node["traffic_log_key"] == key_a2
            changed = await client.netmap(b.node_credential, since=version)
            assert changed["version"] > version
            assert changed["peers"][0]["traffic_log_key"] == key_a2
            warned = [r for r in caplog.records if "traffic-log key" in r.getMessage()]
            assert warned and warned[-1].levelno == logging.WARNING
            assert key_a in warned[-1].getMessage() and key_a2 in warned[-1].getMessage()
            dropped = await client.register(a.node["public_key"], "a",
                                            node_credential=a.node_credential)
            assert dropped.node["traffic_log_key"] is None
            # b upgrades: its first key is news, not a warning.
            key_b = _log_key()
            upgraded = await client.register(b.node["public_key"], "b", traffic_log_key=key_b,
                                             node_credential=b.node_credential)
            assert upgraded.node["traffic_log_key"] == key_b
            first = [r for r in caplog.records if key_b in r.getMessage()]
            assert first and first[-1].levelno == logging.INFO

    asyncio.run(main())


# ---- LocalAPI JSON (Tailscale's CapMap) -----------------------------------------------------


def test_cap_map_in_whois_status_and_netmap() -> None:
    key = _log_key()
    me = make_node(1, "me", "100.64.0.2", "fd7a:115c:a1e0::2", 5, traffic_log_key=key)
    peer_key = _log_key()
    peer = make_node(2, "p", "100.64.0.3", "fd7a:115c:a1e0::3", 5, traffic_log_key=peer_key)

    who = ts.whois_response(peer, DOMAIN)
    assert who["Node"]["CapMap"] == {CAP: [peer_key]}
    assert_go_order(list(who["Node"]), GO_NODE_ORDER)
    assert who["CapMap"] == {}  # WhoIsResponse.CapMap is the PeerCapMap (grants): none
    assert ts.traffic_log_key(who["Node"]["CapMap"]) == peer_key

    st = ts.status(me, [peer], "Running", DOMAIN, "v")
    assert st["Self"]["CapMap"] == {CAP: [key]}
    assert_go_order(list(st["Self"]), GO_PEER_STATUS_ORDER)
    (ps,) = st["Peer"].values()
    assert ps["CapMap"] == {CAP: [peer_key]}
    assert_go_order(list(ps), GO_PEER_STATUS_ORDER)

    nm = ts.notify("v", self_node=me, peers=[peer], domain=DOMAIN)["NetMap"]
    assert nm["SelfNode"]["CapMap"] == {CAP: [key]} and nm["Peers"][0]["CapMap"][CAP] == [peer_key]
    # NodeCapMap values are []RawMessage: each one a JSON value (here a string).
    assert json.loads(go_json(who))["Node"]["CapMap"] == {CAP: [peer_key]}


@pytest.mark.parametrize("value", [None, "", "garbage", "A" * 44, 7])
def test_no_or_a_broken_key_means_no_cap_map_field(value: object) -> None:
    node = make_node(2, "p", "100.64.0.3", "fd7a:115c:a1e0::3", 5, traffic_log_key=value)
    assert "CapMap" not in ts.whois_response(node, DOMAIN)["Node"]
    assert "CapMap" not in ts.peer_status(node, DOMAIN)
    plain = make_node(2, "p", "100.64.0.3", "fd7a:115c:a1e0::3", 5)  # as before the key
    assert "CapMap" not in ts.tailcfg_node(plain, DOMAIN)
    assert ts.traffic_log_key(None) is None and ts.traffic_log_key({CAP: []}) is None
    assert ts.traffic_log_key({CAP: ["short"]}) is None


def test_the_key_the_node_registers_is_its_state_dir_key(tmp_path: Path) -> None:
    key = load_or_create_signing_key(tmp_path)
    assert api.validate_traffic_log_key(key.public) == key.public
    assert load_or_create_signing_key(tmp_path).public == key.public  # idempotent


def test_a_daemon_with_an_unusable_key_file_says_so_and_does_not_register(
    tmp_path: Path,
) -> None:
    from tsnet2.daemon.backend import Backend, BackendError, DeviceConfig, NodeState
    from tsnet2.proto import StartParams

    load_or_create_signing_key(tmp_path)
    (tmp_path / "traffic-log.key").chmod(0o644)
    backend = Backend(tmp_path, DeviceConfig(guard=False))
    params = StartParams(hostname="n", control_url="http://127.0.0.1:9", auth_key="k",
                         ephemeral=False, advertise_tags=())
    with pytest.raises(BackendError, match=r"traffic-log signing key: .*chmod 600"):
        asyncio.run(backend.start(params))
    assert backend.state == NodeState.STOPPED and not (tmp_path / "node.json").exists()
