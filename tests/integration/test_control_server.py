"""The coordination server over real HTTP on 127.0.0.1 with a real SQLite file."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ipaddress
import logging
import os
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest

from tsnet2.control import ipam
from tsnet2.control.server import ControlServer
from tsnet2.control.sqlite_store import SQLiteStore
from tsnet2.controlclient import (
    AuthError,
    ControlClient,
    ControlError,
    ControlUnavailable,
    RegisterResult,
)


def pub() -> str:
    """A random WireGuard-shaped public key."""
    return base64.b64encode(os.urandom(32)).decode()


@contextlib.asynccontextmanager
async def control(db: Path, **kwargs: Any) -> AsyncIterator[tuple[ControlServer, ControlClient]]:
    """A started server on 127.0.0.1:0 and a client for it."""
    async with SQLiteStore(db) as store:
        server = ControlServer(store, **kwargs)
        await server.start()
        try:
            async with ControlClient(server.url) as client:
                yield server, client
        finally:
            await server.close()


def run(fn: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(fn())


T = TypeVar("T")
WAIT = 20.0
"""Seconds a test waits for an event before failing (generous: only a broken server is slow
by this much; nothing here bounds how fast it is)."""


class FakeClock:
    """The server's monotonic clock, advanced by the test: online grace and ephemeral idleness
    then depend on what the test did, not on how loaded the machine is."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


async def within(awaitable: Awaitable[T], what: str, seconds: float = WAIT) -> T:
    """Await ``awaitable``; fail the test naming ``what`` if it takes over ``seconds``."""
    try:
        return await asyncio.wait_for(awaitable, seconds)
    except TimeoutError:
        raise AssertionError(f"timed out after {seconds:g} s waiting for {what}") from None


async def until(check: Callable[[], bool], what: str, seconds: float = WAIT) -> None:
    """Poll ``check`` (it reads server state) until true; fail naming ``what`` after
    ``seconds``."""
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds:g} s waiting for {what}")
        await asyncio.sleep(0.01)


async def in_flight(server: ControlServer, node: RegisterResult, polls: int = 1) -> None:
    """Wait until the server holds ``polls`` long-polls of ``node`` open."""
    node_id = node.node["id"]
    await until(lambda: server.polls_in_flight(node_id) == polls,
                f"{polls} long-poll(s) of {node.node['name']} in flight at the server")


async def swept(server: ControlServer) -> None:
    """Wait for a sweep that began after this call (it sees the clock as it is now)."""
    await within(server.next_sweep(), "the sweeper")


async def register(
    client: ControlClient, key: str, hostname: str = "node", **kwargs: Any
) -> RegisterResult:
    return await client.register(pub(), hostname, ["127.0.0.1:41641"], auth_key=key, **kwargs)


def test_register_good_wrong_and_reused_key(tmp_path: Path) -> None:
    async def main() -> None:
        async with control(tmp_path / "c.db") as (server, client):
            key = await server.create_auth_key()
            res = await register(client, key, "alpha")
            node = res.node
            assert res.domain == "tsnet2.internal"
            assert res.node_credential.startswith("tsnet2-node-")
            assert node["name"] == "alpha" and node["fqdn"] == "alpha.tsnet2.internal."
            assert node["addresses"] == ["100.64.0.1", "fd7a:115c:a1e0::1"]
            assert node["endpoints"] == ["127.0.0.1:41641"]
            assert node["user"]["login_name"] == "admin@tsnet2.internal"
            assert node["ephemeral"] is False and node["tags"] == []
            assert node["online"] is False and node["last_seen"] is None
            assert node["created"].endswith("Z") and node["stable_id"].startswith("n")
            assert set(node) >= {"id", "public_key", "user", "created"}
            with pytest.raises(AuthError, match="invalid auth key") as wrong:
                await register(client, "tskey-auth-" + "0" * 48)
            assert wrong.value.status == 401
            with pytest.raises(AuthError, match="auth key already used") as used:
                await register(client, key)
            assert used.value.status == 401
            with pytest.raises(AuthError, match="auth key or a node credential"):
                await client.register(pub(), "x")

    run(main)


def test_single_use_key_is_consumed_once_under_concurrency(tmp_path: Path) -> None:
    async def main() -> None:
        async with control(tmp_path / "c.db") as (server, client):
            key = await server.create_auth_key()
            results = await asyncio.gather(
                *(register(client, key, f"n{i}") for i in range(8)), return_exceptions=True
            )
            ok = [r for r in results if isinstance(r, RegisterResult)]
            refused = [r for r in results if isinstance(r, AuthError)]
            assert len(ok) == 1 and len(refused) == 7
            assert all("already used" in str(e) for e in refused)

    run(main)


def test_reusable_ephemeral_tagged_and_expiring_keys(tmp_path: Path) -> None:
    async def main() -> None:
        async with control(tmp_path / "c.db", domain="corp.example") as (server, client):
            key = await server.create_auth_key(
                reusable=True, tags=("tag:a", "tag:b"), user="alice@corp.example"
            )
            nodes = [(await register(client, key, "r")).node for _ in range(3)]
            assert [n["name"] for n in nodes] == ["r", "r-1", "r-2"]
            assert all(n["tags"] == ["tag:a", "tag:b"] for n in nodes)  # key's tags by default
            assert nodes[0]["user"]["login_name"] == "alice@corp.example"
            assert nodes[0]["user"]["display_name"] == "alice"
            assert nodes[0]["fqdn"] == "r.corp.example."
            sub = await register(client, key, "s", tags=["tag:a"])
            assert sub.node["tags"] == ["tag:a"]
            with pytest.raises(AuthError, match="tag:c") as forbidden:
                await register(client, key, "t", tags=["tag:a", "tag:c"])
            assert forbidden.value.status == 403
            eph_key = await server.create_auth_key(ephemeral=True)
            eph = await register(client, eph_key, "e", ephemeral=False)
            assert eph.node["ephemeral"] is True
            # A key within its lifetime works (an hour: no race with a slow registration);
            # one past it is refused (waiting longer than its 0.2 s can only be safer).
            hour = await server.create_auth_key(reusable=True, expiry=3600)
            await register(client, hour, "early")
            short = await server.create_auth_key(reusable=True, expiry=0.2)
            await asyncio.sleep(0.3)
            with pytest.raises(AuthError, match="auth key expired"):
                await register(client, short, "late")

    run(main)


def test_reregistration_keeps_identity(tmp_path: Path) -> None:
    async def main() -> None:
        async with control(tmp_path / "c.db") as (server, client):
            key = await server.create_auth_key()
            first = await register(client, key, "keeper", tags=[])
            other_key = await server.create_auth_key()
            other = await register(client, other_key, "keeper")
            assert other.node["name"] == "keeper-1"
            new_pub = pub()
            again = await client.register(
                new_pub, "renamed", ["10.1.2.3:9"], node_credential=first.node_credential
            )
            assert again.node_credential == first.node_credential
            for field in ("id", "stable_id", "name", "addresses", "created"):
                assert again.node[field] == first.node[field]
            assert again.node["public_key"] == new_pub
            assert again.node["endpoints"] == ["10.1.2.3:9"]
            # Another node's public key cannot be taken over.
            with pytest.raises(ControlError, match="already registered") as conflict:
                await client.register(
                    other.node["public_key"], "x", node_credential=first.node_credential
                )
            assert conflict.value.status == 409
            with pytest.raises(ControlError) as dup:
                await client.register(other.node["public_key"], "x", auth_key=key)
            assert dup.value.status in (401, 409)
            with pytest.raises(AuthError, match="invalid node credential"):
                await client.register(pub(), "x", node_credential="tsnet2-node-bogus")
            # An unknown credential with an auth key falls back to a new registration.
            fresh_key = await server.create_auth_key()
            fresh = await client.register(
                pub(), "fresh", node_credential="tsnet2-node-gone", auth_key=fresh_key
            )
            assert fresh.node_credential != "tsnet2-node-gone"

    run(main)


def test_hostname_collisions_and_sanitizing(tmp_path: Path) -> None:
    async def main() -> None:
        async with control(tmp_path / "c.db") as (server, client):
            key = await server.create_auth_key(reusable=True)
            names = [
                (await register(client, key, h)).node["name"]
                for h in ["web", "WEB", "web.example.com", "Web Server!", "web-1", "x" * 70]
            ]
            assert names == ["web", "web-1", "web-2", "web-server", "web-1-1", "x" * 63]
            long2 = (await register(client, key, "x" * 70)).node["name"]
            assert long2 == "x" * 61 + "-1"

    run(main)


def test_ip_uniqueness_over_200_registrations(tmp_path: Path) -> None:
    async def main() -> None:
        async with control(tmp_path / "c.db") as (server, client):
            key = await server.create_auth_key(reusable=True)
            nodes: list[dict[str, Any]] = []
            for batch in range(10):
                results = await asyncio.gather(
                    *(register(client, key, f"h{batch}-{i}") for i in range(20))
                )
                nodes.extend(r.node for r in results)
            v4 = [ipaddress.IPv4Address(n["addresses"][0]) for n in nodes]
            v6 = [ipaddress.IPv6Address(n["addresses"][1]) for n in nodes]
            assert len(set(v4)) == len(set(v6)) == len({n["id"] for n in nodes}) == 200
            assert len({n["name"] for n in nodes}) == 200
            for a4, a6 in zip(v4, v6, strict=True):
                assert a4 in ipam.V4_POOL and a6 in ipam.V6_POOL
                assert str(a4).rsplit(".", 1)[1] not in ("0", "255")
                assert int(a6) - int(ipam.V6_POOL.network_address) == ipam.offset_of(a4)
            # The lowest offsets are used (100.64.0.1 .. skipping .0/.255).
            assert sorted(ipam.offset_of(a) for a in v4) == list(range(1, 201))

    run(main)


def test_long_poll_wakes_on_change(tmp_path: Path) -> None:
    """A long-poll returns because of a change, not its timeout: it reports a newer version
    well before its 30 s are up (a timed-out poll would report the same version)."""

    async def main() -> None:
        async with control(tmp_path / "c.db") as (server, client):
            key = await server.create_auth_key(reusable=True)
            watcher = await register(client, key, "watcher")
            cred = watcher.node_credential
            first = await client.netmap(cred, 0, 5)
            assert first["self"]["name"] == "watcher" and first["peers"] == []
            assert first["domain"] == "tsnet2.internal"
            # Our own poll made us online, which is a change too; settle on the latest.
            nm = await client.netmap(cred, first["version"], 0.2)
            version = nm["version"]
            assert nm["self"]["online"] is True

            async def after(change: Callable[[], Awaitable[Any]]) -> dict[str, Any]:
                nonlocal version
                poll = asyncio.create_task(client.netmap(cred, version, 30))
                await in_flight(server, watcher)
                assert not poll.done()
                await change()
                result = await within(poll, "the change to wake the watcher's 30 s long-poll")
                assert result["version"] > version
                version = result["version"]
                return result

            peer: RegisterResult | None = None

            async def add_peer() -> None:
                nonlocal peer
                peer = await register(client, key, "peer")

            nm = await after(add_peer)
            assert peer is not None
            assert [p["name"] for p in nm["peers"]] == ["peer"]
            peer_cred = peer.node_credential
            nm = await after(lambda: client.update_endpoints(peer_cred, ["192.0.2.1:7"]))
            assert nm["peers"][0]["endpoints"] == ["192.0.2.1:7"]
            nm = await after(lambda: client.deregister(peer_cred))
            assert nm["peers"] == []
            # A poll with nothing new waits for its timeout and returns the same version.
            t0 = time.monotonic()
            same = await client.netmap(cred, version, 0.3)
            assert same["version"] == version and time.monotonic() - t0 >= 0.25
            # A client ahead of the server (e.g. restored database) is answered at once,
            # not after its 60 s.
            ahead = await within(client.netmap(cred, version + 100, 60), "the reply to a poll "
                                 "from a client ahead of the server")
            assert ahead["version"] == version

    run(main)


def test_online_offline_transitions_bump_version(tmp_path: Path) -> None:
    async def main() -> None:
        clock = FakeClock()
        async with control(tmp_path / "c.db", online_grace=0.3, clock=clock) as (server, client):
            key = await server.create_auth_key(reusable=True)
            a = await register(client, key, "a")
            b = await register(client, key, "b")
            nm_a = await client.netmap(a.node_credential, 0, 0)
            nm_b = await client.netmap(b.node_credential, 0, 0)
            assert [p["online"] for p in nm_b["peers"]] == [True]
            assert nm_b["peers"][0]["last_seen"] is not None
            del nm_a
            # b keeps a long-poll open; a stops: a goes offline after the grace, b is woken.
            version = nm_b["version"]
            poll = asyncio.create_task(client.netmap(b.node_credential, version, 30))
            await in_flight(server, b)
            clock.advance(1.0)
            nm_b = await within(poll, "a's going offline to wake b's long-poll")
            assert nm_b["version"] > version
            assert nm_b["peers"][0]["online"] is False
            assert nm_b["self"]["online"] is True

    run(main)


def test_ephemeral_nodes_removed_and_addresses_reused(tmp_path: Path) -> None:
    async def main() -> None:
        clock = FakeClock()
        async with control(tmp_path / "c.db", ephemeral_timeout=0.6, clock=clock) as (
            server,
            client,
        ):
            key = await server.create_auth_key(reusable=True)
            stay = await register(client, key, "stay")  # not ephemeral, never polls
            poller = await register(client, key, "poller", ephemeral=True)
            gone = await register(client, key, "gone", ephemeral=True)
            gone_addrs = gone.node["addresses"]
            # The poller comes online, then holds a long-poll open while the timeout passes.
            nm = await client.netmap(poller.node_credential, 0, 0)
            polling = asyncio.create_task(client.netmap(poller.node_credential, nm["version"], 30))
            await in_flight(server, poller)
            clock.advance(1.0)
            await swept(server)
            nm = await within(polling, "gone's removal to wake the poller's long-poll")
            assert [p["name"] for p in nm["peers"]] == ["stay"]
            nm = await client.netmap(stay.node_credential, 0, 0)
            names = sorted([nm["self"]["name"]] + [p["name"] for p in nm["peers"]])
            assert names == ["poller", "stay"]
            with pytest.raises(AuthError, match="invalid node credential"):
                await client.netmap(gone.node_credential, 0, 0)
            again = await register(client, key, "gone", ephemeral=True)
            assert again.node["addresses"] == gone_addrs and again.node["name"] == "gone"
            # Deregister removes an ephemeral node at once, and its address is free again.
            await client.deregister(again.node_credential)
            third = await register(client, key, "third")
            assert third.node["addresses"] == gone_addrs
            # Once polls stop, the poller is removed too (offline and idle for 1 s > 0.6 s).
            allocs = await server.store.list_allocations()
            assert poller.node["addresses"][0] in [a.ipv4 for a in allocs]
            clock.advance(1.0)
            await swept(server)
            allocs = await server.store.list_allocations()
            assert poller.node["addresses"][0] not in [a.ipv4 for a in allocs]

    run(main)


def test_restart_keeps_nodes_addresses_and_keys(tmp_path: Path) -> None:
    db = tmp_path / "c.db"
    state: dict[str, Any] = {}

    async def before() -> None:
        async with control(db) as (server, client):
            state["reusable"] = await server.create_auth_key(reusable=True)
            state["single"] = await server.create_auth_key()
            state["a"] = await register(client, state["single"], "a")
            state["b"] = await register(client, state["reusable"], "b")
            state["version"] = (await client.netmap(state["a"].node_credential, 0, 0))["version"]

    async def after() -> None:
        async with control(db) as (_, client):
            a: RegisterResult = state["a"]
            nm = await client.netmap(a.node_credential, 0, 0)
            assert nm["version"] >= state["version"]
            assert nm["self"]["addresses"] == a.node["addresses"]
            assert nm["peers"][0]["name"] == "b"
            again = await client.register(pub(), "a", node_credential=a.node_credential)
            assert again.node["id"] == a.node["id"]
            assert again.node["addresses"] == a.node["addresses"]
            c = await register(client, state["reusable"], "c")
            assert c.node["addresses"][0] == "100.64.0.3"
            with pytest.raises(AuthError, match="already used"):
                await register(client, state["single"], "d")

    run(before)
    run(after)


def test_bad_input_is_400_with_a_message(tmp_path: Path) -> None:
    async def main() -> None:
        async with control(tmp_path / "c.db") as (server, client):
            key = await server.create_auth_key(reusable=True)
            good = await register(client, key, "good")
            auth = {"Authorization": f"Bearer {good.node_credential}"}
            url = server.url
            async with aiohttp.ClientSession() as http:

                async def call(
                    method: str, path: str, data: bytes | None = None, **kw: Any
                ) -> tuple[int, Any]:
                    async with http.request(method, url + path, data=data, **kw) as r:
                        return r.status, await r.json(content_type=None)

                cases: list[tuple[str, str, bytes | None, dict[str, Any], int, str]] = [
                    ("POST", "/v1/register", b"{not json", {}, 400, "not valid JSON"),
                    ("POST", "/v1/register", b"[]", {}, 400, "JSON object"),
                    ("POST", "/v1/register", b'{"hostname":"a"}', {}, 400, "public_key"),
                    (
                        "POST",
                        "/v1/register",
                        b'{"public_key":"AAAA","hostname":"a","auth_key":"k"}',
                        {},
                        400,
                        "32 bytes",
                    ),
                    ("POST", "/v1/register", b"x" * (70 * 1024), {}, 400, "too large"),
                    (
                        "POST",
                        "/v1/endpoints",
                        b'{"endpoints":["nope"]}',
                        {"headers": auth},
                        400,
                        "ip:port",
                    ),
                    ("POST", "/v1/endpoints", b'{"endpoints":5}', {"headers": auth}, 400, "list"),
                    ("POST", "/v1/endpoints", b"{}", {"headers": auth}, 400, "required"),
                    ("GET", "/v1/netmap?since=abc", None, {"headers": auth}, 400, "since"),
                    ("GET", "/v1/netmap?timeout=-1", None, {"headers": auth}, 400, "timeout"),
                    ("GET", "/v1/netmap", None, {}, 401, "Bearer"),
                    (
                        "POST",
                        "/v1/deregister",
                        None,
                        {"headers": {"Authorization": "Bearer x"}},
                        401,
                        "invalid node credential",
                    ),
                    ("GET", "/v1/nothing", None, {}, 404, "Not Found"),
                    ("GET", "/v1/register", None, {}, 405, "Method Not Allowed"),
                ]
                for method, path, data, kw, status, message in cases:
                    got_status, body = await call(method, path, data, **kw)
                    assert (got_status, path) == (status, path), body
                    assert message in body["error"], (path, body)
                async with http.get(url + "/healthz") as r:
                    assert r.status == 200 and (await r.text()) == "ok"
            # Nothing half-done: the good node is intact and only it exists.
            nm = await client.netmap(good.node_credential, 0, 0)
            assert nm["peers"] == [] and nm["self"]["endpoints"] == ["127.0.0.1:41641"]

    run(main)


def test_secrets_stay_out_of_logs_and_errors(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)

    async def main() -> None:
        async with control(tmp_path / "c.db") as (server, client):
            key = await server.create_auth_key()
            res = await register(client, key, "s")
            await client.netmap(res.node_credential, 0, 0)
            with pytest.raises(AuthError) as err:
                await register(client, key, "again")
            assert key not in str(err.value)
            wrong = "tskey-auth-" + "f" * 48
            with pytest.raises(AuthError) as err2:
                await register(client, wrong, "w")
            assert wrong not in str(err2.value)
            await client.deregister(res.node_credential)
            stored = (tmp_path / "c.db").read_bytes() + (tmp_path / "c.db-wal").read_bytes()
            assert key.encode() not in stored and res.node_credential.encode() not in stored
            return_value = (key, res.node_credential)
            secrets.extend(return_value)

    secrets: list[str] = []
    run(main)
    assert "registered node" in caplog.text
    for secret in secrets:
        assert secret not in caplog.text


def test_client_errors_when_unreachable() -> None:
    async def main() -> None:
        async with ControlClient("http://127.0.0.1:9", timeout=2) as client:
            with pytest.raises(ControlUnavailable, match="unreachable"):
                await client.netmap("x", 0, 0)
            with pytest.raises(ControlUnavailable):
                await client.health()
        with pytest.raises(ValueError, match="http"):
            ControlClient("ftp://x")

    run(main)


def test_close_returns_promptly_with_a_poll_in_flight(tmp_path: Path) -> None:
    async def main() -> None:
        async with SQLiteStore(tmp_path / "c.db") as store:
            server = ControlServer(store)
            await server.start()
            async with ControlClient(server.url) as client:
                key = await server.create_auth_key()
                res = await register(client, key)
                nm = await client.netmap(res.node_credential, 0, 0)
                poll = asyncio.create_task(client.netmap(res.node_credential, nm["version"], 50))
                await in_flight(server, res)
                t0 = time.monotonic()
                await server.close()
                assert time.monotonic() - t0 < 3
                with contextlib.suppress(ControlError):
                    await asyncio.wait_for(poll, 3)
                await server.close()  # idempotent

    run(main)


def test_tls(tmp_path: Path) -> None:
    cert, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key_file),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )

    async def main() -> None:
        async with SQLiteStore(tmp_path / "c.db") as store:
            server = ControlServer(store)
            url = await server.start(tls_cert=str(cert), tls_key=str(key_file))
            try:
                assert url.startswith("https://127.0.0.1:")
                ctx = ssl.create_default_context(cafile=str(cert))
                async with ControlClient(url, ssl_context=ctx) as client:
                    key = await server.create_auth_key()
                    res = await register(client, key, "tls")
                    assert res.node["name"] == "tls"
                    await client.health()
                async with ControlClient(url) as untrusting:
                    with pytest.raises(ControlUnavailable):
                        await untrusting.health()
            finally:
                await server.close()

    run(main)


def test_abandoned_long_poll_goes_offline(tmp_path: Path) -> None:
    """A node is online while its long-poll is in flight, however long past the grace; when
    its client goes away mid-poll the server ends the poll, and after the grace the node is
    offline (which wakes the other node's poll)."""

    async def main() -> None:
        clock = FakeClock()
        async with control(tmp_path / "c.db", online_grace=0.3, clock=clock) as (server, client):
            key = await server.create_auth_key(reusable=True)
            a = await register(client, key, "a")
            b = await register(client, key, "b")
            await client.netmap(a.node_credential, 0, 0)
            version = (await client.netmap(b.node_credential, 0, 0))["version"]
            # Both hold a 30 s long-poll; a's through a client that goes away mid-poll.
            b_poll = asyncio.create_task(client.netmap(b.node_credential, version, 30))
            await in_flight(server, b)
            async with ControlClient(server.url) as other:
                hanging = asyncio.create_task(other.netmap(a.node_credential, version, 30))
                await in_flight(server, a)
                clock.advance(5.0)  # far past the grace: online only because in flight
                await swept(server)
                assert not hanging.done() and not b_poll.done(), "no transition, no new version"
                nm = await client.netmap(b.node_credential, version, 0)
                assert nm["version"] == version and nm["peers"][0]["online"] is True
                hanging.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await hanging
            await in_flight(server, a, 0)  # the server noticed and ended a's poll
            assert not b_poll.done()
            clock.advance(1.0)
            nm = await within(b_poll, "a's going offline to wake b's long-poll")
            assert nm["version"] > version
            assert nm["peers"][0]["online"] is False and nm["self"]["online"] is True

    run(main)


def test_healthz_waits_for_what_the_embedder_says(tmp_path: Path) -> None:
    """/healthz (the operator's readiness probe) is 503 with the reason until ``ready`` says
    so: the operator gates it on its admission webhook listening."""

    async def main() -> None:
        waiting = ["the admission webhook server is not listening yet"]
        async with control(tmp_path / "c.db") as (server, _):
            server.ready = lambda: waiting[0] if waiting else None
            async with aiohttp.ClientSession() as http:
                async with http.get(server.url + "/healthz") as r:
                    assert r.status == 503
                    assert (await r.text()) == f"not ready: {waiting[0]}"
                waiting.clear()
                async with http.get(server.url + "/healthz") as r:
                    assert r.status == 200 and (await r.text()) == "ok"

    run(main)
