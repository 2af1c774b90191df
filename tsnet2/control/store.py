"""The storage interface of the coordination server, and the records it stores.

A :class:`Store` holds users, auth keys, nodes, their IP allocation records and a netmap
version: one integer that increases by at least one with every change a peer could see. Two
implementations are planned: :class:`tsnet2.control.sqlite_store.SQLiteStore` (embedded,
here) and a Kubernetes custom-resource store. Every method is a coroutine; every method that
changes several things does them atomically (all or nothing), and every method that changes
netmap-visible state bumps the version in the same atomic step and returns the new version.

Online state is *not* stored: each server process keeps it in memory (see ``server.py``).
The caller owns the store's lifecycle (``open``/``close``); the server never closes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


class StoreError(Exception):
    """A store operation failed."""


class AuthKeyUsedError(StoreError):
    """A single-use auth key was already consumed."""


class PublicKeyInUseError(StoreError):
    """Another node already has this WireGuard public key."""


class AddressPoolExhaustedError(StoreError):
    """No tailnet address is free."""


@dataclass(frozen=True)
class UserRecord:
    """A user: the owner of the auth keys and of the nodes registered with them."""

    id: int
    login_name: str
    display_name: str
    created: float


@dataclass(frozen=True)
class AuthKeyRecord:
    """An auth key, known only by its hash."""

    id: int
    key_hash: str
    user: UserRecord
    reusable: bool
    ephemeral: bool
    tags: tuple[str, ...]
    created: float
    expires: float | None
    used_at: float | None
    used_by: int | None


@dataclass(frozen=True)
class NodeRecord:
    """A registered node with its allocated addresses."""

    id: int
    stable_id: str
    name: str
    public_key: str
    credential_hash: str
    user: UserRecord
    tags: tuple[str, ...]
    ephemeral: bool
    endpoints: tuple[str, ...]
    ipv4: str
    ipv6: str
    created: float
    last_seen: float | None
    auth_key_id: int | None
    traffic_log_key: str | None = None
    """The base64 Ed25519 public key that signs the node's traffic log checkpoints, as the
    node registered it (canonical, 32 bytes); None when it registered none (an older node,
    or a row/object stored before the field existed)."""


@dataclass(frozen=True)
class NewNode:
    """What :meth:`Store.create_node` needs; the store picks the final name and addresses."""

    hostname: str
    """Sanitized requested name; the store appends ``-1``, ``-2``, ... while it is taken."""
    public_key: str
    credential_hash: str
    stable_id: str
    user_id: int
    tags: tuple[str, ...]
    ephemeral: bool
    endpoints: tuple[str, ...]
    auth_key_id: int | None
    consume_auth_key: bool
    """Mark the (single-use) auth key used in the same transaction; fail if it already is."""
    traffic_log_key: str | None = None
    """The node's traffic-log public key (validated by the API layer), or None."""


@dataclass(frozen=True)
class IPAllocation:
    """One allocated address pair (see :mod:`tsnet2.control.ipam`)."""

    offset: int
    ipv4: str
    ipv6: str
    node_id: int


@dataclass(frozen=True)
class CARecord:
    """The tailnet CA as stored: its PEM key (secret: never logged, so not in ``repr``)
    and its PEM certificate (public)."""

    key_pem: str = field(repr=False)
    cert_pem: str


@runtime_checkable
class Store(Protocol):
    """Persistent tailnet state. All methods are coroutines and atomic."""

    async def open(self) -> None:
        """Connect and bring the schema up to date. Idempotent."""

    async def close(self) -> None:
        """Release resources. Idempotent."""

    async def version(self) -> int:
        """The current netmap version (0 for an empty store)."""

    async def bump_version(self) -> int:
        """Increase the netmap version by one and return it."""

    async def ensure_user(self, login_name: str, display_name: str) -> UserRecord:
        """Return the user with this login, creating it if needed."""

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
        """Store a new auth key (by hash)."""

    async def get_auth_key(self, key_hash: str) -> AuthKeyRecord | None:
        """The auth key with this hash, or None."""

    async def list_auth_keys(self) -> list[AuthKeyRecord]:
        """All auth keys, oldest first."""

    async def create_node(self, spec: NewNode) -> tuple[NodeRecord, int]:
        """Create a node and return it with the new version.

        In one atomic step: consume the auth key if ``spec.consume_auth_key`` (raise
        :class:`AuthKeyUsedError` if it was used), refuse a public key another node has
        (:class:`PublicKeyInUseError`), pick the first free name among ``hostname``,
        ``hostname-1``, ..., allocate the lowest free address offset
        (:class:`AddressPoolExhaustedError`), insert node and allocation, bump the version.
        """

    async def get_node(self, node_id: int) -> NodeRecord | None:
        """The node with this id, or None."""

    async def get_node_by_credential(self, credential_hash: str) -> NodeRecord | None:
        """The node whose credential hashes to ``credential_hash``, or None."""

    async def list_nodes(self) -> list[NodeRecord]:
        """All nodes ordered by id."""

    async def update_node(
        self,
        node_id: int,
        *,
        public_key: str | None = None,
        endpoints: tuple[str, ...] | None = None,
        last_seen: float | None = None,
        traffic_log_key: str | None = None,
    ) -> tuple[NodeRecord, int] | None:
        """Change the given fields; bump the version if any value changed.

        ``None`` leaves a field as it is; ``traffic_log_key=""`` removes the node's key.
        Returns the node and the (possibly unchanged) version, or None if there is no such
        node. Raises :class:`PublicKeyInUseError` if another node has ``public_key``.
        """

    async def delete_node(self, node_id: int) -> int | None:
        """Delete a node and free its addresses; return the new version, or None if absent."""

    async def list_allocations(self) -> list[IPAllocation]:
        """All address allocations ordered by offset."""

    async def get_ca(self) -> CARecord | None:
        """The tailnet CA, or None before one was stored."""

    async def put_ca_if_absent(self, key_pem: str, cert_pem: str) -> CARecord:
        """Store this CA unless one is stored already; return the stored one.

        Atomic: when several servers (replicas) race to create the CA, exactly one wins
        and every caller gets the winner, so all of them sign with the same CA.
        """
