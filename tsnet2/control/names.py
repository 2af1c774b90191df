"""Pure helpers for node names and ACL tags (DNS label rules, uniqueness candidates)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

MAX_LABEL = 63
"""Longest DNS label (RFC 1035), so the longest node name."""

_INVALID = re.compile(r"[^a-z0-9-]+")
_DASHES = re.compile(r"-{2,}")
# Used with fullmatch(): a pattern ending in "$" would also accept a trailing "\n".
_TAG = re.compile(r"tag:[A-Za-z0-9][A-Za-z0-9-]{0,62}")
_DOMAIN_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def sanitize_hostname(raw: str) -> str:
    """Turn a requested hostname into a DNS label: first label only, lowercase, [a-z0-9-].

    Characters outside the set become ``-``, runs of ``-`` collapse, leading and trailing
    ``-`` go, and the result is cut to 63 characters. Raises ``ValueError`` if nothing
    usable is left, or if ``raw`` holds a control character (``"web\\n"`` is refused, not
    read as ``web``).
    """
    if _CONTROL.search(raw):
        raise ValueError(f"hostname {raw[:80]!r} contains a control character")
    first = raw.strip().split(".", 1)[0].lower()
    name = _DASHES.sub("-", _INVALID.sub("-", first)).strip("-")
    name = name[:MAX_LABEL].rstrip("-")
    if not name:
        raise ValueError(f"hostname {raw[:80]!r} has no letters or digits")
    return name


def name_candidates(base: str) -> Iterator[str]:
    """Yield ``base``, ``base-1``, ``base-2``, ... each cut so that it fits in one DNS label."""
    yield base
    n = 1
    while True:
        suffix = f"-{n}"
        yield base[: MAX_LABEL - len(suffix)].rstrip("-") + suffix
        n += 1


def validate_tag(tag: str) -> str:
    """Return ``tag`` if it is ``tag:<name>`` (letters, digits, ``-``), else raise ValueError."""
    if not _TAG.fullmatch(tag):
        raise ValueError(
            f"invalid tag {tag[:80]!r}: tags look like 'tag:name' (letters, digits and '-')"
        )
    return tag


def parse_tags(values: Iterable[str]) -> tuple[str, ...]:
    """Validate tags, drop duplicates and sort them."""
    return tuple(sorted({validate_tag(t) for t in values}))


def validate_domain(domain: str) -> str:
    """Return the tailnet domain lowercased without a trailing dot; raise ValueError if bad."""
    d = domain.strip().lower().rstrip(".")
    labels = d.split(".")
    if not d or len(d) > 253 or not all(_DOMAIN_LABEL.fullmatch(label) for label in labels):
        raise ValueError(f"invalid tailnet domain {domain!r}")
    return d
