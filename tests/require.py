"""Environment skips that CI can turn into failures.

A test that cannot run here for want of a part of the environment skips with
``needs(part, reason)``, a reason that starts with ``[needs PART]``. When the
comma-separated ``TSNET2_REQUIRE`` names that part, the skip becomes a failure
(tests/conftest.py): ``.ci/run`` sets ``TSNET2_REQUIRE=root,netns,k8s,image,cluster``, so a
CI machine that silently lost Go, root or podman goes red instead of green with 250 skips.

Parts:

* ``root``    -- runs as root (namespaces, mounts, nftables);
* ``netns``   -- the netns lab: root, ip, wireguard-go, /dev/net/tun;
* ``k8s``     -- the real kube-apiserver, etcd and helm of tests/k8s/build-tools.sh;
* ``image``   -- podman and the project image of tests/image/build.sh;
* ``cluster`` -- the local Kubernetes cluster of tests/e2e/cluster (kubelet, containerd).
"""

from __future__ import annotations

import os
import re

REQUIRE_ENV = "TSNET2_REQUIRE"
PARTS = ("root", "netns", "k8s", "image", "cluster")
_TAG = re.compile(r"^\[needs (\w+)\] ")


def needs(part: str, reason: str) -> str:
    """The skip reason for a test that needs ``part`` of the environment."""
    if part not in PARTS:
        raise ValueError(f"unknown environment part {part!r}; known: {', '.join(PARTS)}")
    return f"[needs {part}] {reason}"


def required(environ: dict[str, str] | None = None) -> set[str]:
    """The parts ``$TSNET2_REQUIRE`` names; an unknown name is an error (a typo must not
    quietly require nothing)."""
    env = os.environ if environ is None else environ
    names = {p.strip() for p in env.get(REQUIRE_ENV, "").split(",") if p.strip()}
    unknown = sorted(names - set(PARTS))
    if unknown:
        raise ValueError(f"{REQUIRE_ENV}: unknown part(s) {', '.join(unknown)}; "
                         f"known: {', '.join(PARTS)}")
    return names


def required_part(reason: str, environ: dict[str, str] | None = None) -> str | None:
    """The part a skip ``reason`` needs, if ``$TSNET2_REQUIRE`` requires it; else None."""
    m = _TAG.match(reason)
    if m and m.group(1) in required(environ):
        return m.group(1)
    return None
