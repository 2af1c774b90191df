"""The daemon process stays lean: no aiohttp, no coordination server or SQLite store.

aiohttp alone costs tsnet2d about 10 MB of idle RSS (docs/benchmarks.md, "RSS"); it is
only for the separate `tsnet2 control serve` and operator processes.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

# Modules the daemon must never load (in any of its own modules or the client it uses).
BANNED = ("aiohttp", "tsnet2.control.server", "tsnet2.control.sqlite_store", "kopf",
          "kubernetes")


def loaded_after(code: str) -> set[str]:
    """`sys.modules` of a fresh interpreter after running ``code``."""
    script = textwrap.dedent(code) + "\nimport sys, json\nprint(json.dumps(sorted(sys.modules)))\n"
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True,
                         text=True, timeout=60)
    return set(json.loads(out.stdout.splitlines()[-1]))


def test_daemon_entry_points_do_not_import_aiohttp() -> None:
    mods = loaded_after("import tsnet2.daemon.server, tsnet2.daemon.cli")
    assert "tsnet2.daemon.health" in mods and "tsnet2.control.client" in mods
    for banned in BANNED:
        assert banned not in mods, f"the daemon imported {banned}"


def test_every_daemon_module_and_the_lazy_control_names_stay_lean() -> None:
    mods = loaded_after("""
        import importlib, pkgutil
        import tsnet2.daemon
        for info in pkgutil.iter_modules(tsnet2.daemon.__path__, "tsnet2.daemon."):
            if not info.name.endswith("__main__"):
                importlib.import_module(info.name)
        import tsnet2.control
        # What the daemon uses through the package's lazy names.
        tsnet2.control.ControlClient, tsnet2.control.ControlError, tsnet2.control.AuthError
        tsnet2.control.ControlUnavailable, tsnet2.control.RegisterResult
    """)
    assert "tsnet2.daemon.localapi" in mods and "tsnet2.daemon.backend" in mods
    for banned in BANNED:
        assert banned not in mods, f"a daemon module imported {banned}"


def test_the_lazy_control_package_still_loads_the_server_on_demand() -> None:
    # The guard above must not pass just because nothing can load the server.
    mods = loaded_after("import tsnet2.control\ntsnet2.control.ControlServer")
    assert "tsnet2.control.server" in mods and "aiohttp" in mods
