"""Creating auth keys (used by ``tsnet2 control authkey create`` and by tests/embedders)."""

from __future__ import annotations

import time
from collections.abc import Iterable

from tsnet2.control.names import parse_tags, validate_domain
from tsnet2.control.store import AuthKeyRecord, Store
from tsnet2.control.tokens import hash_secret, new_auth_key

DEFAULT_DOMAIN = "tsnet2.internal"
"""The tailnet domain when none is given."""


def default_user(domain: str = DEFAULT_DOMAIN) -> str:
    """The login that owns keys created without ``--user``: ``admin@<domain>``."""
    return f"admin@{validate_domain(domain)}"


async def create_auth_key(
    store: Store,
    *,
    reusable: bool = False,
    ephemeral: bool = False,
    tags: Iterable[str] = (),
    expiry: float | None = None,
    user: str | None = None,
    domain: str = DEFAULT_DOMAIN,
) -> tuple[str, AuthKeyRecord]:
    """Create an auth key and return ``(key, record)``; only the hash is stored.

    ``expiry`` is a lifetime in seconds (None: never expires). ``user`` is the owner's login
    name (default ``admin@<domain>``), created if it does not exist. Raises ValueError for a
    bad tag, expiry or user.
    """
    tag_tuple = parse_tags(tags)
    if expiry is not None and not expiry > 0:
        raise ValueError(f"expiry must be a positive number of seconds, got {expiry}")
    login = user if user is not None else default_user(domain)
    if not login or len(login) > 256 or any(ch.isspace() for ch in login):
        raise ValueError(f"invalid user login {login[:80]!r}")
    owner = await store.ensure_user(login, login.split("@", 1)[0])
    key = new_auth_key()
    record = await store.add_auth_key(
        hash_secret(key),
        user_id=owner.id,
        reusable=reusable,
        ephemeral=ephemeral,
        tags=tag_tuple,
        expires=time.time() + expiry if expiry is not None else None,
    )
    return key, record
