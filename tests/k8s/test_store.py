"""The Store behaviour tests, run against SQLiteStore and KubernetesStore (real API server).

The same bodies run on both backends, so KubernetesStore is held to SQLiteStore's semantics:
atomic create_node (rolled back on a public-key conflict), unique names, lowest free
address, single-use keys consumed exactly once, versions bumped once per change, and two
store instances (two operator replicas) sharing one state.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import pytest
from kubernetes import client as k8s
from tsnet2_operator.store import CA_SECRET, CLAIMS, KubernetesStore

from tests.k8s.test_store_fixtures import api_client, apiserver, new_namespace
from tests.unit.test_control_store import _pub, _spec
from tsnet2.control.authkeys import create_auth_key
from tsnet2.control.ca import load_ca, new_ca
from tsnet2.control.server import ControlServer
from tsnet2.control.sqlite_store import SQLiteStore
from tsnet2.control.store import (
    AuthKeyUsedError,
    PublicKeyInUseError,
    Store,
    StoreError,
)
from tsnet2.control.tokens import hash_secret
from tsnet2.controlclient import ControlClient

__all__ = ["api_client", "apiserver"]

StoreFactory = Callable[[], contextlib.AbstractAsyncContextManager[Store]]


@pytest.fixture(params=["sqlite", "kubernetes"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> StoreFactory:
    """A factory of open stores that all share one state (one file / one namespace)."""
    if request.param == "sqlite":

        @contextlib.asynccontextmanager
        async def sqlite() -> AsyncIterator[Store]:
            async with SQLiteStore(tmp_path / "c.db") as store:
                yield store

        return sqlite
    api: k8s.ApiClient = request.getfixturevalue("api_client")
    namespace = new_namespace(api)

    @contextlib.asynccontextmanager
    async def kube() -> AsyncIterator[Store]:
        async with KubernetesStore(api, namespace) as store:
            yield store

    return kube


def run(make_store: StoreFactory, body: Callable[[Store], Awaitable[None]]) -> None:
    async def main() -> None:
        async with make_store() as store:
            assert isinstance(store, Store)
            await body(store)

    asyncio.run(main())


def test_create_node_is_atomic(make_store: StoreFactory) -> None:
    async def body(store: Store) -> None:
        assert await store.version() == 0
        _, key = await create_auth_key(store)
        user_id = key.user.id
        pub = _pub()
        first, v1 = await store.create_node(_spec(user_id, None, public_key=pub))
        assert v1 == 1 and first.name == "n" and first.ipv4 == "100.64.0.1"
        assert first.ipv6 == "fd7a:115c:a1e0::1" and first.user == key.user
        # The public key conflict happens after the key was marked used: all rolled back.
        with pytest.raises(PublicKeyInUseError):
            await store.create_node(_spec(user_id, key.id, consume=True, public_key=pub))
        again = await store.get_auth_key(key.key_hash)
        assert again is not None and again.used_at is None
        assert await store.version() == 1
        assert len(await store.list_nodes()) == 1
        assert len(await store.list_allocations()) == 1
        node, v2 = await store.create_node(_spec(user_id, key.id, consume=True))
        assert v2 == 2 and node.name == "n-1" and node.ipv4 == "100.64.0.2"
        used = await store.get_auth_key(key.key_hash)
        assert used is not None and used.used_at is not None and used.used_by == node.id
        with pytest.raises(AuthKeyUsedError):
            await store.create_node(_spec(user_id, key.id, consume=True))
        assert [a.ipv4 for a in await store.list_allocations()] == ["100.64.0.1", "100.64.0.2"]
        assert [a.node_id for a in await store.list_allocations()] == [first.id, node.id]
        assert await store.version() == 2

    run(make_store, body)


def test_update_and_delete(make_store: StoreFactory) -> None:
    async def body(store: Store) -> None:
        user = await store.ensure_user("u@x", "u")
        assert (await store.ensure_user("u@x", "other")).id == user.id
        a, _ = await store.create_node(_spec(user.id, None, hostname="a"))
        b, v = await store.create_node(_spec(user.id, None, hostname="b"))
        same = await store.update_node(a.id, endpoints=a.endpoints, public_key=a.public_key)
        assert same is not None and same[1] == v  # no change, no bump
        changed = await store.update_node(a.id, endpoints=("1.1.1.1:2",), last_seen=5.0)
        assert changed is not None
        assert changed[1] == v + 1 and changed[0].endpoints == ("1.1.1.1:2",)
        assert changed[0].last_seen == 5.0
        with pytest.raises(PublicKeyInUseError):
            await store.update_node(a.id, public_key=b.public_key)
        assert await store.version() == v + 1
        assert await store.update_node(999, endpoints=()) is None
        new_pub = _pub()
        rekeyed = await store.update_node(a.id, public_key=new_pub)
        assert rekeyed is not None and rekeyed[0].public_key == new_pub and rekeyed[1] == v + 2
        # The old key is free again, the new one is taken.
        with pytest.raises(PublicKeyInUseError):
            await store.create_node(_spec(user.id, None, public_key=new_pub))
        old_key_node, _ = await store.create_node(_spec(user.id, None, public_key=a.public_key))
        assert await store.delete_node(old_key_node.id) == v + 4
        assert await store.delete_node(a.id) == v + 5
        assert await store.delete_node(a.id) is None
        assert await store.get_node(a.id) is None
        c, _ = await store.create_node(_spec(user.id, None, hostname="a"))
        assert c.ipv4 == a.ipv4 and c.ipv6 == a.ipv6 and c.name == "a"
        assert c.id > b.id  # ids are never reused
        found = await store.get_node_by_credential(c.credential_hash)
        assert found is not None and found.id == c.id
        assert await store.get_node_by_credential(hash_secret("nope")) is None
        assert [n.id for n in await store.list_nodes()] == [b.id, c.id]

    run(make_store, body)


def test_traffic_log_key_is_stored_replaced_and_removed(make_store: StoreFactory) -> None:
    """The node's traffic-log key (KubernetesStore: an annotation, so a node object written
    before it, or under an older CRD, simply has none)."""

    async def body(store: Store) -> None:
        user = await store.ensure_user("u@x", "u")
        key, key2 = _pub(), _pub()
        a, _ = await store.create_node(replace(_spec(user.id, None, hostname="a"),
                                               traffic_log_key=key))
        b, v = await store.create_node(_spec(user.id, None, hostname="b"))
        assert a.traffic_log_key == key and b.traffic_log_key is None
        got = await store.get_node(a.id)
        assert got is not None and got.traffic_log_key == key
        same = await store.update_node(a.id, traffic_log_key=key, last_seen=None)
        assert same is not None and same[1] == v  # no change, no bump
        kept = await store.update_node(a.id, endpoints=("1.1.1.1:2",))
        assert kept is not None and kept[0].traffic_log_key == key and kept[1] == v + 1
        changed = await store.update_node(a.id, traffic_log_key=key2)
        assert changed is not None and changed[0].traffic_log_key == key2 and changed[1] == v + 2
        by_credential = await store.get_node_by_credential(a.credential_hash)
        assert by_credential is not None and by_credential.traffic_log_key == key2
        removed = await store.update_node(a.id, traffic_log_key="")
        assert removed is not None and removed[0].traffic_log_key is None and removed[1] == v + 3
        added = await store.update_node(b.id, traffic_log_key=key)
        assert added is not None and added[0].traffic_log_key == key
        assert [n.traffic_log_key for n in await store.list_nodes()] == [None, key]

    run(make_store, body)


def test_two_instances_share_state(make_store: StoreFactory) -> None:
    async def main() -> None:
        async with make_store() as one, make_store() as two:
            key, _ = await create_auth_key(one, reusable=True, tags=("tag:x",))
            rec = await two.get_auth_key(hash_secret(key))
            assert rec is not None and rec.reusable and rec.tags == ("tag:x",)
            assert rec.user.login_name == "admin@tsnet2.internal"
            assert [k.id for k in await two.list_auth_keys()] == [rec.id]
            versions = await asyncio.gather(*(s.bump_version() for s in (one, two) * 5))
            assert sorted(versions) == list(range(1, 11))

    asyncio.run(main())


def test_concurrent_registrations_never_collide(make_store: StoreFactory) -> None:
    """Two instances register 8 nodes each at once, all wanting the same name, and race for
    one single-use key: names and addresses stay unique and the key is used once."""

    async def main() -> None:
        async with make_store() as one, make_store() as two:
            user = await one.ensure_user("u@x", "u")
            _, key = await create_auth_key(one)
            results = await asyncio.gather(
                *(s.create_node(_spec(user.id, None, hostname="web")) for s in (one, two) * 4)
            )
            names = sorted(node.name for node, _ in results)
            assert names == sorted(["web"] + [f"web-{i}" for i in range(1, 8)])
            ips = {node.ipv4 for node, _ in results}
            assert ips == {f"100.64.0.{i}" for i in range(1, 9)}
            assert len({v for _, v in results}) == 8
            races = await asyncio.gather(
                *(s.create_node(_spec(user.id, key.id, consume=True)) for s in (one, two) * 2),
                return_exceptions=True,
            )
            winners = [r for r in races if not isinstance(r, BaseException)]
            losers = [r for r in races if isinstance(r, BaseException)]
            assert len(winners) == 1, races
            assert all(isinstance(e, AuthKeyUsedError) for e in losers), losers
            assert len(await two.list_nodes()) == 9
            assert len(await two.list_allocations()) == 9

    asyncio.run(main())


def test_auth_key_validation(make_store: StoreFactory) -> None:
    async def body(store: Store) -> None:
        with pytest.raises(ValueError, match="invalid tag"):
            await create_auth_key(store, tags=("bad",))
        with pytest.raises(ValueError, match="expiry"):
            await create_auth_key(store, expiry=0)
        with pytest.raises(ValueError, match="invalid user"):
            await create_auth_key(store, user="a b")
        assert await store.list_auth_keys() == []
        assert await store.get_auth_key("not-a-hash") is None

    run(make_store, body)


def test_control_server_over_kubernetes_store(api_client: k8s.ApiClient) -> None:
    """The coordination server works unchanged on KubernetesStore, and a second server
    (another replica) on the same namespace sees the node the first one registered."""
    namespace = new_namespace(api_client)

    async def main() -> None:
        async with (
            KubernetesStore(api_client, namespace) as store_a,
            KubernetesStore(api_client, namespace) as store_b,
        ):
            server_a = ControlServer(store_a, ephemeral_timeout=30)
            server_b = ControlServer(store_b, ephemeral_timeout=30)
            url_a, url_b = await server_a.start(), await server_b.start()
            try:
                key = await server_a.create_auth_key(reusable=True)
                async with ControlClient(url_a) as ca, ControlClient(url_b) as cb:
                    one = await ca.register(_pub(), "one", ["10.0.0.1:1"], auth_key=key)
                    two = await cb.register(_pub(), "two", ["10.0.0.2:1"], auth_key=key)
                    netmap = await cb.netmap(one.node_credential, since=0, timeout=0)
                    assert netmap["self"]["name"] == "one"
                    assert [p["name"] for p in netmap["peers"]] == ["two"]
                    assert netmap["self"]["addresses"][0] == "100.64.0.1"
                    await ca.deregister(two.node_credential)
                    netmap = await cb.netmap(one.node_credential, since=0, timeout=0)
                    assert netmap["peers"] == []
            finally:
                await server_a.close()
                await server_b.close()

    asyncio.run(main())


def test_tailnet_ca_is_stored_once_and_racing_instances_agree(
        make_store: StoreFactory) -> None:
    """put_ca_if_absent: the first CA stored wins; every racer (operator replicas creating
    the CA at once) gets the winner's, and later calls never replace it."""
    async def body(store: Store) -> None:
        assert await store.get_ca() is None
        candidates = [new_ca("tsnet2.internal") for _ in range(6)]
        async with make_store() as two:
            results = await asyncio.gather(*(
                s.put_ca_if_absent(k.decode(), c.decode())
                for s, (k, c) in zip((store, two) * 3, candidates, strict=True)))
            winner = results[0]
            assert all(r == winner for r in results)
            assert (winner.key_pem.encode(), winner.cert_pem.encode()) in candidates
            assert await two.get_ca() == winner == await store.get_ca()
            load_ca(winner.key_pem, winner.cert_pem)  # key and certificate belong together
            assert await store.put_ca_if_absent(*[x.decode() for x in new_ca("x.y")]) == winner
            assert "BEGIN PRIVATE KEY" not in repr(winner)

    run(make_store, body)


def test_tailnet_ca_secret_and_two_servers(api_client: k8s.ApiClient) -> None:
    """The Kubernetes store keeps the CA in Secret tsnet2-tailnet-ca (type kubernetes.io/tls);
    two control servers (replicas) creating it at once sign with the same CA."""
    namespace = new_namespace(api_client)

    async def main() -> None:
        async with (
            KubernetesStore(api_client, namespace) as store_a,
            KubernetesStore(api_client, namespace) as store_b,
        ):
            servers = [ControlServer(store_a), ControlServer(store_b)]
            cas = await asyncio.gather(*(s.tailnet_ca() for s in servers))
            assert cas[0].cert_pem == cas[1].cert_pem
            secret = k8s.CoreV1Api(api_client).read_namespaced_secret(CA_SECRET, namespace)
            assert secret.type == "kubernetes.io/tls"
            assert base64.b64decode(secret.data["tls.crt"]) == cas[0].cert_pem
            assert secret.metadata.labels["app.kubernetes.io/managed-by"] == "tsnet2"

    asyncio.run(main())


def test_closed_store_and_orphan_claims(api_client: k8s.ApiClient) -> None:
    namespace = new_namespace(api_client)

    async def main() -> None:
        store = KubernetesStore(api_client, namespace)
        with pytest.raises(StoreError, match="not open"):
            await store.version()
        async with store:
            user = await store.ensure_user("u@x", "u")
            node, _ = await store.create_node(_spec(user.id, None, hostname="keep"))
        # A replica that died inside create_node leaves a claim with no node.
        objects = k8s.CustomObjectsApi(api_client)
        objects.create_namespaced_custom_object(
            "tsnet2.io",
            "v1alpha1",
            namespace,
            CLAIMS,
            {
                "apiVersion": "tsnet2.io/v1alpha1",
                "kind": "TailnetClaim",
                "metadata": {"name": "name-ghost"},
                "spec": {"kind": "name", "value": "ghost", "nodeId": 999, "created": 1.0},
            },
        )
        async with store:
            assert await store.collect_orphan_claims(min_age=60) == ["name-ghost"]
            assert await store.collect_orphan_claims(min_age=60) == []
            ghost, _ = await store.create_node(_spec(user.id, None, hostname="ghost"))
            assert ghost.name == "ghost"  # the name is free again
            assert (await store.get_node(node.id)) == node

    asyncio.run(main())


def test_open_without_crds_is_a_clear_error(api_client: k8s.ApiClient) -> None:
    """A store on a namespace the client may not read (bad credentials) says what to check."""
    config = k8s.Configuration()
    config.host = api_client.configuration.host
    config.ssl_ca_cert = api_client.configuration.ssl_ca_cert

    async def main() -> None:
        with k8s.ApiClient(config) as anonymous:
            store = KubernetesStore(anonymous, "default")
            with pytest.raises(StoreError, match="CRDs installed"):
                await store.open()

    asyncio.run(main())
