"""The daemon process stays lean: no aiohttp, coordination server, SQLite store, pyroute2 or
prometheus_client.

aiohttp alone costs tsnet2d about 10 MB of idle RSS (docs/benchmarks.md, "RSS"); it is
only for the separate `tsnet2 control serve` and operator processes. pyroute2 costs about
13 MB: the node has its own rtnetlink client (`tsnet2.node.rtnl`) and imports pyroute2 only
for the kernel WireGuard backend's generic netlink, when that backend is used. The daemon
reaches the coordination server through `tsnet2.controlclient`, a package of its own that
imports nothing of `tsnet2.control`. tests/unit/test_layers.py checks that statically
(tests/layers.toml); this test checks what a fresh interpreter actually loads.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

# Modules the daemon must never load (in any of its own modules or the client it uses).
# pyroute2 (about 13 MB, and it loads sqlite3 for its NDB): the node speaks rtnetlink itself
# (tsnet2.node.rtnl); only the kernel WireGuard backend imports pyroute2, when it is used.
# prometheus_client (about 3 MB) and wireguard_tools: tsnet2.daemon.prom and node.wgkey.
BANNED = ("aiohttp", "tsnet2.control", "tsnet2.control.server", "tsnet2.control.sqlite_store",
          "kopf", "kubernetes", "tsnet2_operator", "pyroute2", "sqlite3", "prometheus_client",
          "wireguard_tools")


def loaded_after(code: str) -> set[str]:
    """`sys.modules` of a fresh interpreter after running ``code``."""
    script = textwrap.dedent(code) + "\nimport sys, json\nprint(json.dumps(sorted(sys.modules)))\n"
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True,
                         text=True, timeout=60)
    return set(json.loads(out.stdout.splitlines()[-1]))


def test_daemon_entry_points_do_not_import_aiohttp() -> None:
    mods = loaded_after("import tsnet2.daemon.server, tsnet2.daemon.cli")
    assert "tsnet2.daemon.health" in mods and "tsnet2.controlclient.client" in mods
    for banned in BANNED:
        assert banned not in mods, f"the daemon imported {banned}"


def test_the_tls_and_udp_datapaths_are_loaded_only_when_used() -> None:
    """tsnet2.daemon.tls is imported when a listen_tls flow or a TLS dial comes, and
    tsnet2.daemon.udp with the first UDP dial or listener, not at start-up (a daemon
    without them does not pay for them)."""
    mods = loaded_after("import tsnet2.daemon.server, tsnet2.daemon.cli")
    assert "tsnet2.daemon.datapath" in mods
    assert "tsnet2.daemon.tls" not in mods
    assert "tsnet2.daemon.udp" not in mods


def test_every_daemon_module_and_the_control_client_stay_lean() -> None:
    mods = loaded_after("""
        import importlib, pkgutil
        import tsnet2.daemon, tsnet2.controlclient
        for pkg in (tsnet2.daemon, tsnet2.controlclient):
            for info in pkgutil.iter_modules(pkg.__path__, pkg.__name__ + "."):
                if not info.name.endswith("__main__"):
                    importlib.import_module(info.name)
    """)
    assert "tsnet2.daemon.localapi" in mods and "tsnet2.daemon.backend" in mods
    assert "tsnet2.controlclient.boundedjson" in mods
    for banned in BANNED:
        assert banned not in mods, f"a daemon module imported {banned}"


def test_daemon_does_not_import_pyroute2() -> None:
    mods = loaded_after("import tsnet2.daemon.server")
    assert "tsnet2.node.rtnl" in mods and "tsnet2.node.device" in mods
    assert not {m for m in mods if m.partition(".")[0] == "pyroute2"}


def test_the_guard_can_see_the_server() -> None:
    # The guards above must not pass just because nothing can load the server.
    mods = loaded_after("import tsnet2.control.server, tsnet2.control.sqlite_store")
    assert {"tsnet2.control", "tsnet2.control.server", "tsnet2.control.sqlite_store",
            "aiohttp"} <= mods
    assert "pyroute2" in loaded_after("from tsnet2.node.device import _pyroute2; _pyroute2()")
