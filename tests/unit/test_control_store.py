"""Tests of SQLiteStore on real SQLite files."""

from __future__ import annotations

import asyncio
import base64
import os
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from tsnet2.control.authkeys import create_auth_key
from tsnet2.control.sqlite_store import MIGRATIONS, SQLiteStore
from tsnet2.control.store import (
    AuthKeyUsedError,
    NewNode,
    PublicKeyInUseError,
    Store,
    StoreError,
)
from tsnet2.control.tokens import hash_secret, new_stable_id


def _pub() -> str:
    return base64.b64encode(os.urandom(32)).decode()


def _spec(
    user_id: int,
    key_id: int | None,
    *,
    hostname: str = "n",
    consume: bool = False,
    public_key: str | None = None,
) -> NewNode:
    return NewNode(
        hostname=hostname,
        public_key=public_key or _pub(),
        credential_hash=hash_secret(os.urandom(8).hex()),
        stable_id=new_stable_id(),
        user_id=user_id,
        tags=(),
        ephemeral=False,
        endpoints=("10.0.0.1:1",),
        auth_key_id=key_id,
        consume_auth_key=consume,
    )


def run_with_store(path: Path, body: Callable[[SQLiteStore], Awaitable[None]]) -> None:
    async def main() -> None:
        async with SQLiteStore(path) as store:
            await body(store)

    asyncio.run(main())


def test_schema_wal_and_user_version(tmp_path: Path) -> None:
    db = tmp_path / "c.db"

    async def body(store: SQLiteStore) -> None:
        assert isinstance(store, Store)
        assert await store.version() == 0
        await store.open()  # idempotent

    run_with_store(db, body)
    run_with_store(db, body)  # reopen: no migration re-run
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "c.db"
    conn = sqlite3.connect(db)
    conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    conn.close()

    async def main() -> None:
        store = SQLiteStore(db)
        with pytest.raises(StoreError, match="newer than this tsnet2"):
            await store.open()
        await store.close()

    asyncio.run(main())


def test_closed_store_raises(tmp_path: Path) -> None:
    async def main() -> None:
        store = SQLiteStore(tmp_path / "c.db")
        with pytest.raises(StoreError, match="not open"):
            await store.version()

    asyncio.run(main())


def test_create_node_is_atomic(tmp_path: Path) -> None:
    async def body(store: SQLiteStore) -> None:
        _, key = await create_auth_key(store)
        user_id = key.user.id
        pub = _pub()
        first, v1 = await store.create_node(_spec(user_id, None, public_key=pub))
        assert v1 == 1 and first.name == "n" and first.ipv4 == "100.64.0.1"
        # The public key conflict happens after the key was marked used: all rolled back.
        with pytest.raises(PublicKeyInUseError):
            await store.create_node(_spec(user_id, key.id, consume=True, public_key=pub))
        again = await store.get_auth_key(key.key_hash)
        assert again is not None and again.used_at is None
        assert await store.version() == 1
        assert len(await store.list_nodes()) == 1
        node, v2 = await store.create_node(_spec(user_id, key.id, consume=True))
        assert v2 == 2 and node.name == "n-1" and node.ipv4 == "100.64.0.2"
        used = await store.get_auth_key(key.key_hash)
        assert used is not None and used.used_at is not None and used.used_by == node.id
        with pytest.raises(AuthKeyUsedError):
            await store.create_node(_spec(user_id, key.id, consume=True))
        assert [a.ipv4 for a in await store.list_allocations()] == ["100.64.0.1", "100.64.0.2"]

    run_with_store(tmp_path / "c.db", body)


def test_update_and_delete(tmp_path: Path) -> None:
    async def body(store: SQLiteStore) -> None:
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
        assert await store.update_node(999, endpoints=()) is None
        assert await store.delete_node(a.id) == v + 2
        assert await store.delete_node(a.id) is None
        assert await store.get_node(a.id) is None
        c, _ = await store.create_node(_spec(user.id, None, hostname="a"))
        assert c.ipv4 == a.ipv4 and c.ipv6 == a.ipv6 and c.name == "a"
        assert c.id > b.id  # ids are never reused
        found = await store.get_node_by_credential(c.credential_hash)
        assert found is not None and found.id == c.id

    run_with_store(tmp_path / "c.db", body)


def test_two_processes_share_the_file(tmp_path: Path) -> None:
    db = tmp_path / "c.db"

    async def main() -> None:
        async with SQLiteStore(db) as one, SQLiteStore(db) as two:
            key, _ = await create_auth_key(one, reusable=True, tags=("tag:x",))
            rec = await two.get_auth_key(hash_secret(key))
            assert rec is not None and rec.reusable and rec.tags == ("tag:x",)
            assert rec.user.login_name == "admin@tsnet2.internal"
            assert [k.id for k in await two.list_auth_keys()] == [rec.id]
            versions = await asyncio.gather(*(s.bump_version() for s in (one, two) * 5))
            assert sorted(versions) == list(range(1, 11))

    asyncio.run(main())


def test_auth_key_validation(tmp_path: Path) -> None:
    async def body(store: SQLiteStore) -> None:
        with pytest.raises(ValueError, match="invalid tag"):
            await create_auth_key(store, tags=("bad",))
        with pytest.raises(ValueError, match="expiry"):
            await create_auth_key(store, expiry=0)
        with pytest.raises(ValueError, match="invalid user"):
            await create_auth_key(store, user="a b")
        assert await store.list_auth_keys() == []

    run_with_store(tmp_path / "c.db", body)
