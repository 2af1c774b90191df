"""SQLite implementation of :class:`tsnet2.control.store.Store`.

One connection, used from one worker thread (so calls are serialized); WAL journal, a busy
timeout so that another process (``tsnet2 control authkey create``) can write at the same
time, foreign keys on. Every change runs in one ``BEGIN IMMEDIATE`` transaction. The schema
is migrated forward with ``PRAGMA user_version`` (one transaction per migration).
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from tsnet2.control import ipam
from tsnet2.control.names import name_candidates
from tsnet2.control.store import (
    AddressPoolExhaustedError,
    AuthKeyRecord,
    AuthKeyUsedError,
    CARecord,
    IPAllocation,
    NewNode,
    NodeRecord,
    PublicKeyInUseError,
    StoreError,
    UserRecord,
)

T = TypeVar("T")

MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE users (
            id INTEGER PRIMARY KEY,
            login_name TEXT NOT NULL UNIQUE,
            display_name TEXT NOT NULL,
            created REAL NOT NULL)""",
        """CREATE TABLE auth_keys (
            id INTEGER PRIMARY KEY,
            key_hash TEXT NOT NULL UNIQUE,
            user_id INTEGER NOT NULL REFERENCES users(id),
            reusable INTEGER NOT NULL,
            ephemeral INTEGER NOT NULL,
            tags TEXT NOT NULL,
            created REAL NOT NULL,
            expires REAL,
            used_at REAL,
            used_by INTEGER)""",
        """CREATE TABLE nodes (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            stable_id TEXT NOT NULL UNIQUE,
            name TEXT NOT NULL UNIQUE,
            public_key TEXT NOT NULL UNIQUE,
            credential_hash TEXT NOT NULL UNIQUE,
            user_id INTEGER NOT NULL REFERENCES users(id),
            tags TEXT NOT NULL,
            ephemeral INTEGER NOT NULL,
            endpoints TEXT NOT NULL,
            created REAL NOT NULL,
            last_seen REAL,
            auth_key_id INTEGER)""",
        """CREATE TABLE ip_allocations (
            ip_offset INTEGER PRIMARY KEY,
            ipv4 TEXT NOT NULL UNIQUE,
            ipv6 TEXT NOT NULL UNIQUE,
            node_id INTEGER NOT NULL UNIQUE REFERENCES nodes(id) ON DELETE CASCADE)""",
        """CREATE TABLE netmap_version (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            version INTEGER NOT NULL)""",
        "INSERT INTO netmap_version (id, version) VALUES (1, 0)",
    ),
    # 2: the node's traffic-log public key; NULL (no key) for nodes registered before.
    ("ALTER TABLE nodes ADD COLUMN traffic_log_key TEXT",),
    # 3: the tailnet CA (one row; its key is as secret as the database file).
    (
        """CREATE TABLE tailnet_ca (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            key_pem TEXT NOT NULL,
            cert_pem TEXT NOT NULL,
            created REAL NOT NULL)""",
    ),
)
"""Schema migrations; after applying ``MIGRATIONS[i]`` the user_version is ``i + 1``."""

_NODE_SELECT = """
SELECT n.*, a.ipv4, a.ipv6, u.login_name, u.display_name, u.created AS user_created
FROM nodes n JOIN users u ON u.id = n.user_id JOIN ip_allocations a ON a.node_id = n.id
"""
_KEY_SELECT = """
SELECT k.*, u.login_name, u.display_name, u.created AS user_created
FROM auth_keys k JOIN users u ON u.id = k.user_id
"""


def _user(row: sqlite3.Row) -> UserRecord:
    return UserRecord(
        id=row["user_id"],
        login_name=row["login_name"],
        display_name=row["display_name"],
        created=row["user_created"],
    )


def _node(row: sqlite3.Row) -> NodeRecord:
    return NodeRecord(
        id=row["id"],
        stable_id=row["stable_id"],
        name=row["name"],
        public_key=row["public_key"],
        credential_hash=row["credential_hash"],
        user=_user(row),
        tags=tuple(json.loads(row["tags"])),
        ephemeral=bool(row["ephemeral"]),
        endpoints=tuple(json.loads(row["endpoints"])),
        ipv4=row["ipv4"],
        ipv6=row["ipv6"],
        created=row["created"],
        last_seen=row["last_seen"],
        auth_key_id=row["auth_key_id"],
        traffic_log_key=row["traffic_log_key"],
    )


def _key(row: sqlite3.Row) -> AuthKeyRecord:
    return AuthKeyRecord(
        id=row["id"],
        key_hash=row["key_hash"],
        user=_user(row),
        reusable=bool(row["reusable"]),
        ephemeral=bool(row["ephemeral"]),
        tags=tuple(json.loads(row["tags"])),
        created=row["created"],
        expires=row["expires"],
        used_at=row["used_at"],
        used_by=row["used_by"],
    )


def _bump(conn: sqlite3.Connection) -> int:
    conn.execute("UPDATE netmap_version SET version = version + 1 WHERE id = 1")
    return int(conn.execute("SELECT version FROM netmap_version WHERE id = 1").fetchone()[0])


def _version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT version FROM netmap_version WHERE id = 1").fetchone()[0])


def _node_by(conn: sqlite3.Connection, where: str, arg: object) -> NodeRecord | None:
    row = conn.execute(f"{_NODE_SELECT} WHERE {where}", (arg,)).fetchone()
    return _node(row) if row is not None else None


class SQLiteStore:
    """A :class:`~tsnet2.control.store.Store` in one SQLite file (created if missing)."""

    def __init__(self, path: str | Path, *, busy_timeout: float = 5.0) -> None:
        """Remember the path; nothing is opened until :meth:`open`."""
        self.path = Path(path)
        self._busy_timeout = busy_timeout
        self._conn: sqlite3.Connection | None = None
        self._executor: ThreadPoolExecutor | None = None

    async def __aenter__(self) -> SQLiteStore:
        """Open the store."""
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        """Close the store."""
        await self.close()

    # -- plumbing ---------------------------------------------------------------------

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._executor is None or self._conn is None:
            raise StoreError(f"store {self.path} is not open")
        conn = self._conn
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, conn))

    async def _tx(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def run(conn: sqlite3.Connection) -> T:
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = fn(conn)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            return result

        try:
            return await self._run(run)
        except sqlite3.Error as e:
            raise StoreError(f"sqlite store {self.path}: {e}") from e

    def _connect(self) -> sqlite3.Connection:
        # The database holds the tailnet CA's private key: owner-only (SQLite gives its
        # -wal and -shm files the database file's mode).
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise StoreError(f"cannot open sqlite store {self.path}: {e.strerror}") from e
        try:
            if os.fstat(fd).st_mode & 0o077:
                os.fchmod(fd, 0o600)
        except OSError:
            pass  # not ours to change (read by another account on purpose): leave it
        finally:
            os.close(fd)
        conn = sqlite3.connect(
            self.path, timeout=self._busy_timeout, isolation_level=None, check_same_thread=False
        )
        try:
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("PRAGMA synchronous=NORMAL")
            self._migrate(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    @staticmethod
    def _migrate(conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            current = int(conn.execute("PRAGMA user_version").fetchone()[0])
            if current > len(MIGRATIONS):
                raise StoreError(
                    f"database schema version {current} is newer than this tsnet2 "
                    f"(knows {len(MIGRATIONS)}); upgrade tsnet2"
                )
            for index in range(current, len(MIGRATIONS)):
                for statement in MIGRATIONS[index]:
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {index + 1}")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    async def open(self) -> None:
        """Open (creating if needed) and migrate the database. Idempotent."""
        if self._conn is not None:
            return
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tsnet2-sqlite")
        loop = asyncio.get_running_loop()
        try:
            self._conn = await loop.run_in_executor(executor, self._connect)
        except BaseException as e:
            executor.shutdown(wait=True)
            if isinstance(e, sqlite3.Error):
                raise StoreError(f"cannot open sqlite store {self.path}: {e}") from e
            raise
        self._executor = executor

    async def close(self) -> None:
        """Close the connection and stop the worker thread. Idempotent."""
        conn, executor = self._conn, self._executor
        self._conn = self._executor = None
        if conn is not None and executor is not None:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(executor, conn.close)
        if executor is not None:
            executor.shutdown(wait=True)

    # -- version and users ------------------------------------------------------------

    async def version(self) -> int:
        """The current netmap version."""
        return await self._tx(_version)

    async def bump_version(self) -> int:
        """Increase the netmap version and return it."""
        return await self._tx(_bump)

    async def ensure_user(self, login_name: str, display_name: str) -> UserRecord:
        """Return the user ``login_name``, creating it if needed."""

        def run(conn: sqlite3.Connection) -> UserRecord:
            conn.execute(
                "INSERT OR IGNORE INTO users (login_name, display_name, created) VALUES (?, ?, ?)",
                (login_name, display_name, time.time()),
            )
            row = conn.execute(
                "SELECT id AS user_id, login_name, display_name, created AS user_created "
                "FROM users WHERE login_name = ?",
                (login_name,),
            ).fetchone()
            return _user(row)

        return await self._tx(run)

    # -- auth keys --------------------------------------------------------------------

    async def add_auth_key(
        self,
        key_hash: str,
        *,
        user_id: int,
        reusable: bool,
        ephemeral: bool,
        tags: tuple[str, ...],
        expires: float | None,
    ) -> AuthKeyRecord:
        """Store a new auth key by its hash."""

        def run(conn: sqlite3.Connection) -> AuthKeyRecord:
            cur = conn.execute(
                "INSERT INTO auth_keys (key_hash, user_id, reusable, ephemeral, tags, created,"
                " expires) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    key_hash,
                    user_id,
                    reusable,
                    ephemeral,
                    json.dumps(list(tags)),
                    time.time(),
                    expires,
                ),
            )
            row = conn.execute(f"{_KEY_SELECT} WHERE k.id = ?", (cur.lastrowid,)).fetchone()
            return _key(row)

        return await self._tx(run)

    async def get_auth_key(self, key_hash: str) -> AuthKeyRecord | None:
        """The auth key with this hash, or None."""

        def run(conn: sqlite3.Connection) -> AuthKeyRecord | None:
            row = conn.execute(f"{_KEY_SELECT} WHERE k.key_hash = ?", (key_hash,)).fetchone()
            return _key(row) if row is not None else None

        return await self._tx(run)

    async def list_auth_keys(self) -> list[AuthKeyRecord]:
        """All auth keys, oldest first."""
        return await self._tx(
            lambda c: [_key(r) for r in c.execute(f"{_KEY_SELECT} ORDER BY k.id").fetchall()]
        )

    # -- nodes ------------------------------------------------------------------------

    async def create_node(self, spec: NewNode) -> tuple[NodeRecord, int]:
        """Create a node atomically (see :meth:`Store.create_node`)."""

        def run(conn: sqlite3.Connection) -> tuple[NodeRecord, int]:
            now = time.time()
            if spec.consume_auth_key:
                cur = conn.execute(
                    "UPDATE auth_keys SET used_at = ? WHERE id = ? AND used_at IS NULL",
                    (now, spec.auth_key_id),
                )
                if cur.rowcount != 1:
                    raise AuthKeyUsedError("auth key already used")
            if conn.execute(
                "SELECT 1 FROM nodes WHERE public_key = ?", (spec.public_key,)
            ).fetchone():
                raise PublicKeyInUseError("public key is already registered to another node")
            name = next(
                n
                for n in name_candidates(spec.hostname)
                if not conn.execute("SELECT 1 FROM nodes WHERE name = ?", (n,)).fetchone()
            )
            used = (r[0] for r in conn.execute("SELECT ip_offset FROM ip_allocations"))
            try:
                offset = ipam.first_free(used)
            except ipam.AddressPoolExhausted as e:
                raise AddressPoolExhaustedError(str(e)) from e
            v4, v6 = ipam.addresses(offset)
            cur = conn.execute(
                "INSERT INTO nodes (stable_id, name, public_key, credential_hash, user_id, tags,"
                " ephemeral, endpoints, created, last_seen, auth_key_id, traffic_log_key)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, ?, ?)",
                (
                    spec.stable_id,
                    name,
                    spec.public_key,
                    spec.credential_hash,
                    spec.user_id,
                    json.dumps(list(spec.tags)),
                    spec.ephemeral,
                    json.dumps(list(spec.endpoints)),
                    now,
                    spec.auth_key_id,
                    spec.traffic_log_key or None,
                ),
            )
            node_id = cur.lastrowid
            conn.execute(
                "INSERT INTO ip_allocations (ip_offset, ipv4, ipv6, node_id) VALUES (?, ?, ?, ?)",
                (offset, str(v4), str(v6), node_id),
            )
            if spec.auth_key_id is not None and spec.consume_auth_key:
                conn.execute(
                    "UPDATE auth_keys SET used_by = ? WHERE id = ?", (node_id, spec.auth_key_id)
                )
            node = _node_by(conn, "n.id = ?", node_id)
            if node is None:  # e.g. its user row is missing: the database is inconsistent
                raise StoreError(f"sqlite store {self.path}: node {node_id} cannot be read back "
                                 "after its creation")
            return node, _bump(conn)

        return await self._tx(run)

    async def get_node(self, node_id: int) -> NodeRecord | None:
        """The node with this id, or None."""
        return await self._tx(lambda c: _node_by(c, "n.id = ?", node_id))

    async def get_node_by_credential(self, credential_hash: str) -> NodeRecord | None:
        """The node with this credential hash, or None."""
        return await self._tx(lambda c: _node_by(c, "n.credential_hash = ?", credential_hash))

    async def list_nodes(self) -> list[NodeRecord]:
        """All nodes ordered by id."""
        return await self._tx(
            lambda c: [_node(r) for r in c.execute(f"{_NODE_SELECT} ORDER BY n.id").fetchall()]
        )

    async def update_node(
        self,
        node_id: int,
        *,
        public_key: str | None = None,
        endpoints: tuple[str, ...] | None = None,
        last_seen: float | None = None,
        traffic_log_key: str | None = None,
    ) -> tuple[NodeRecord, int] | None:
        """Change the given fields, bumping the version if a value changed (``""`` removes
        the traffic-log key)."""

        def run(conn: sqlite3.Connection) -> tuple[NodeRecord, int] | None:
            node = _node_by(conn, "n.id = ?", node_id)
            if node is None:
                return None
            changes: dict[str, object] = {}
            if public_key is not None and public_key != node.public_key:
                if conn.execute(
                    "SELECT 1 FROM nodes WHERE public_key = ? AND id != ?", (public_key, node_id)
                ).fetchone():
                    raise PublicKeyInUseError("public key is already registered to another node")
                changes["public_key"] = public_key
            if endpoints is not None and tuple(endpoints) != node.endpoints:
                changes["endpoints"] = json.dumps(list(endpoints))
            if last_seen is not None and last_seen != node.last_seen:
                changes["last_seen"] = last_seen
            if traffic_log_key is not None and (traffic_log_key or None) != node.traffic_log_key:
                changes["traffic_log_key"] = traffic_log_key or None
            if not changes:
                return node, _version(conn)
            assignments = ", ".join(f"{column} = ?" for column in changes)
            conn.execute(
                f"UPDATE nodes SET {assignments} WHERE id = ?", (*changes.values(), node_id)
            )
            updated = _node_by(conn, "n.id = ?", node_id)
            if updated is None:  # read a moment ago in this transaction
                raise StoreError(f"sqlite store {self.path}: node {node_id} cannot be read back "
                                 "after its update")
            return updated, _bump(conn)

        return await self._tx(run)

    async def delete_node(self, node_id: int) -> int | None:
        """Delete a node and its address allocation; return the new version or None."""

        def run(conn: sqlite3.Connection) -> int | None:
            conn.execute("DELETE FROM ip_allocations WHERE node_id = ?", (node_id,))
            if conn.execute("DELETE FROM nodes WHERE id = ?", (node_id,)).rowcount != 1:
                return None
            return _bump(conn)

        return await self._tx(run)

    async def list_allocations(self) -> list[IPAllocation]:
        """All address allocations ordered by offset."""

        def run(conn: sqlite3.Connection) -> list[IPAllocation]:
            rows = conn.execute(
                "SELECT ip_offset, ipv4, ipv6, node_id FROM ip_allocations ORDER BY ip_offset"
            ).fetchall()
            return [IPAllocation(r[0], r[1], r[2], r[3]) for r in rows]

        return await self._tx(run)

    # -- tailnet CA -------------------------------------------------------------------

    async def get_ca(self) -> CARecord | None:
        """The stored tailnet CA, or None."""

        def run(conn: sqlite3.Connection) -> CARecord | None:
            row = conn.execute("SELECT key_pem, cert_pem FROM tailnet_ca WHERE id = 1").fetchone()
            return CARecord(key_pem=row[0], cert_pem=row[1]) if row is not None else None

        return await self._tx(run)

    async def put_ca_if_absent(self, key_pem: str, cert_pem: str) -> CARecord:
        """Store the CA unless one is; return the stored one (atomic: the first wins)."""

        def run(conn: sqlite3.Connection) -> CARecord:
            conn.execute(
                "INSERT OR IGNORE INTO tailnet_ca (id, key_pem, cert_pem, created)"
                " VALUES (1, ?, ?, ?)",
                (key_pem, cert_pem, time.time()),
            )
            row = conn.execute("SELECT key_pem, cert_pem FROM tailnet_ca WHERE id = 1").fetchone()
            return CARecord(key_pem=row[0], cert_pem=row[1])

        return await self._tx(run)
