"""The grammar of tsnet2d's ``--serve`` rules, as the injector checks ``tsnet2.io/serve``.

Pure functions only. tsnet2d parses the same rules itself (and exits on a bad one); the
operator may not import the daemon (tests/layers.toml), so this is the injector's own copy of
the contract, checked at admission so that a typo is refused with a message instead of a
sidecar that crash-loops:

    RULE   = PORT "=" [MODE ":"] TARGET
    MODE   = "tcp" | "http" | "proxy" | "http+proxy"    (default tcp)
    TARGET = HOST ":" PORT | "unix:" ABSPATH
    HOST   = "127.0.0.1" (or another 127.x.y.z) | "[::1]" | "localhost"

``PORT`` is 1..65535 (no sign, no leading zeros). Examples: ``80=127.0.0.1:8080``,
``80=http:127.0.0.1:8080``, ``2222=proxy:unix:/var/run/tsnet2-serve/ssh.sock``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

# http+proxy: the PROXY header, then the requests with the identity headers (tsnet2d's
# --serve help names it besides the three of the contract).
Mode = Literal["tcp", "http", "proxy", "http+proxy"]
MODES: tuple[Mode, ...] = ("tcp", "http", "proxy", "http+proxy")
LOOPBACK_HOSTS = ("127.0.0.1", "[::1]", "localhost")
UNIX_PREFIX = "unix:"
MAX_UNIX_PATH = 107  # sun_path is 108 bytes with the terminating NUL

_PORT = re.compile(r"[1-9][0-9]{0,4}")
_SEPARATORS = re.compile(r"[,\s]+")

GRAMMAR = ("PORT=TARGET or PORT=MODE:TARGET, MODE tcp (default), http, proxy or "
           "http+proxy, TARGET "
           "HOST:PORT with HOST 127.0.0.1 (127.x.y.z), [::1] or localhost, or "
           "unix:/ABSOLUTE/PATH "
           "(e.g. 80=127.0.0.1:8080, 443=http:localhost:8080)")


class ServeRuleError(ValueError):
    """A rule that does not follow the grammar; ``str()`` says what is wrong with it."""


@dataclass(frozen=True)
class ServeRule:
    """One forward: tailnet ``port`` -> ``target`` in the pod, with ``mode``."""

    port: int
    mode: Mode
    target: str  # "HOST:PORT" or "unix:/PATH", as written

    @property
    def unix_path(self) -> str | None:
        """The socket path of a ``unix:`` target, else None."""
        return self.target[len(UNIX_PREFIX):] if self.target.startswith(UNIX_PREFIX) else None

    def __str__(self) -> str:
        """The canonical rule for ``--serve`` (the mode written only when it is not tcp)."""
        mode = "" if self.mode == "tcp" else f"{self.mode}:"
        return f"{self.port}={mode}{self.target}"


def _port(text: str) -> int | None:
    if not _PORT.fullmatch(text):
        return None
    port = int(text)
    return port if port <= 65535 else None


def _ipv4_loopback(host: str) -> bool:
    """An IPv4 literal in 127.0.0.0/8, written plainly (``127.0.0.2``, not ``127.1``)."""
    return re.fullmatch(r"127(\.(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])){3}",
                        host) is not None


def _check_unix_path(rule: str, path: str) -> None:
    if not path.startswith("/"):
        raise ServeRuleError(f"{rule!r}: the unix socket path {path!r} is not absolute")
    if "\0" in path or any(part in (".", "..") for part in path.split("/")):
        raise ServeRuleError(f"{rule!r}: the unix socket path {path!r} has '.', '..' or NUL")
    if path.endswith("/"):
        raise ServeRuleError(f"{rule!r}: the unix socket path {path!r} is a directory")
    if len(path.encode()) > MAX_UNIX_PATH:
        raise ServeRuleError(f"{rule!r}: the unix socket path is longer than "
                             f"{MAX_UNIX_PATH} bytes")


def parse_serve_rule(rule: str) -> ServeRule:
    """Parse one rule; raises :class:`ServeRuleError` naming the rule and the problem."""
    listen, eq, rest = rule.partition("=")
    if not eq:
        raise ServeRuleError(f"{rule!r}: no '='; a rule is {GRAMMAR}")
    port = _port(listen)
    if port is None:
        raise ServeRuleError(f"{rule!r}: the tailnet port {listen!r} is not a port "
                             f"number 1..65535")
    mode: Mode = "tcp"
    head, colon, tail = rest.partition(":")
    for m in MODES:
        if colon and head == m:
            mode, rest = m, tail
            break
    else:
        if colon and re.fullmatch(r"[A-Za-z][A-Za-z0-9]*", head) and head not in (
                "unix", "localhost") and ":" in tail:
            raise ServeRuleError(f"{rule!r}: unknown mode {head!r} (tcp, http, proxy or "
                                 f"http+proxy)")
    if rest.startswith(UNIX_PREFIX):
        _check_unix_path(rule, rest[len(UNIX_PREFIX):])
        return ServeRule(port, mode, rest)
    host, colon, target_port = rest.rpartition(":")
    if not colon or not host:
        raise ServeRuleError(f"{rule!r}: the target {rest!r} is neither HOST:PORT nor "
                             f"unix:/PATH; a rule is {GRAMMAR}")
    if host not in LOOPBACK_HOSTS and not _ipv4_loopback(host):
        hint = " (write IPv6 loopback in brackets: [::1])" if host.endswith("::1") else ""
        if host.split(":")[0] in (*MODES, "unix"):
            hint = " (one MODE at most, before the target: tcp, http, proxy or http+proxy)"
        raise ServeRuleError(f"{rule!r}: the target host {host!r} is not a loopback literal "
                             f"(127.0.0.1 or another 127.x.y.z, [::1], localhost){hint}; "
                             f"the sidecar forwards only into the pod")
    if _port(target_port) is None:
        raise ServeRuleError(f"{rule!r}: the target port {target_port!r} is not a port "
                             f"number 1..65535")
    return ServeRule(port, mode, rest)


def parse_serve_rules(value: str,
                      check: Callable[[ServeRule], str | None] | None = None,
                      ) -> tuple[ServeRule, ...]:
    """Rules separated by commas and/or whitespace; at least one, each tailnet port once.

    ``check`` may refuse a well-formed rule (it returns the problem, else None). Raises
    :class:`ServeRuleError` with every problem found, joined with ``; ``.
    """
    items = [item for item in _SEPARATORS.split(value) if item]
    if not items:
        raise ServeRuleError(f"no rule; a rule is {GRAMMAR}")
    rules: list[ServeRule] = []
    problems: list[str] = []
    seen: dict[int, str] = {}
    for item in items:
        try:
            rule = parse_serve_rule(item)
        except ServeRuleError as exc:
            problems.append(str(exc))
            continue
        if rule.port in seen:
            problems.append(f"{item!r}: tailnet port {rule.port} is already served by "
                            f"{seen[rule.port]!r}")
            continue
        seen[rule.port] = item
        problem = check(rule) if check is not None else None
        if problem:
            problems.append(f"{item!r}: {problem}")
            continue
        rules.append(rule)
    if problems:
        raise ServeRuleError("; ".join(problems))
    return tuple(rules)
