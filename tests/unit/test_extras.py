"""`pip install tsnet2` (no extra) is enough for an app; the commands name a missing extra.

Each case runs in a fresh interpreter whose imports of the extras' modules fail as they do
when the packages are not installed (a meta-path finder refusing them).
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

from tsnet2._entry import EXTRA_MODULES

REPO = Path(__file__).resolve().parents[2]

BLOCK = """
import importlib.abc, sys
BLOCKED = {blocked!r}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None
sys.meta_path.insert(0, Block())
"""


def run(code: str, *blocked: str) -> subprocess.CompletedProcess[str]:
    script = BLOCK.format(blocked=set(blocked)) + textwrap.dedent(code)
    return subprocess.run(
        [sys.executable, "-W", "error", "-c", script], capture_output=True, text=True,
        timeout=60, cwd=REPO, env={"PYTHONPATH": f"{REPO}:{REPO / 'operator'}"}, check=False)


ALL = sorted(EXTRA_MODULES["daemon"] | EXTRA_MODULES["operator"])


def test_the_client_library_needs_no_extra() -> None:
    out = run("""
        import importlib, pkgutil, sys, tsnet2, tsnet2.client, tsnet2.proto
        for pkg in (tsnet2.client, tsnet2.proto):
            for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
                importlib.import_module(m.name)
        with tsnet2.Server(socket_path="/nonexistent/tsnet2.sock", hostname="web") as srv:
            pass
        tsnet2.AsyncServer(socket_path="/nonexistent/tsnet2.sock")
        print("ok")
    """, *ALL)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_tsnet2d_names_the_daemon_extra() -> None:
    # cryptography: tsnet2d imports it at start-up (log signing, node keys). (Not pyroute2:
    # only the kernel WireGuard backend imports that, when it is used; see the next test.)
    out = run("import sys, tsnet2._entry as e; sys.exit(e.tsnet2d())", "cryptography")
    assert out.returncode == 1, out.stderr
    assert out.stderr.strip() == ("tsnet2d: needs the 'daemon' extra (module 'cryptography' "
                                  "is not installed): pip install 'tsnet2[daemon]'")


def test_kernel_backend_names_pyroute2_when_it_is_missing() -> None:
    out = run("""
        import sys
        from tsnet2.node import NodeError
        from tsnet2.node.wgkey import WireguardKey
        from tsnet2.node.device import KernelDevice
        try:
            KernelDevice("t2nopyroute2").start(WireguardKey.generate(), 41641)
        except NodeError as exc:
            print(exc)
        print("pyroute2" in sys.modules)
    """, "pyroute2")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "the kernel WireGuard backend needs pyroute2 (No module named 'pyroute2'): pip install "
        "'tsnet2[daemon]', or use the userspace backend (wireguard-go)",
        "False",
    ]


def test_operator_names_the_operator_extra() -> None:
    out = run("import sys, tsnet2._entry as e; sys.exit(e.tsnet2_operator())", "kopf")
    assert out.returncode == 1, out.stderr
    assert "tsnet2-operator: needs the 'operator' extra (module 'kopf'" in out.stderr


def test_tsnet2_cli_works_without_extras_but_control_and_demo_say_what_is_missing() -> None:
    out = run("""
        import sys
        from tsnet2.cli import main
        codes = [main(["control", "serve", "--listen", "127.0.0.1:0"]), main(["demo"])]
        try:
            main(["status", "--help"])
        except SystemExit as exc:
            codes.append(exc.code)
        print(codes)
    """, "aiohttp")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[1, 1, 0]"
    assert "tsnet2 control: needs the 'daemon' extra (module 'aiohttp'" in out.stderr
    assert "tsnet2 demo: needs the 'daemon' extra" in out.stderr


def test_an_unrelated_missing_module_is_still_an_error() -> None:
    out = run("""
        import tsnet2._entry as e
        try:
            e.missing_extra(ModuleNotFoundError("no", name="not_an_extra"), "x")
        except ModuleNotFoundError:
            print("raised")
    """)
    assert out.stdout.strip() == "raised", out.stderr


# What `tsnet2[daemon]` adds to `tsnet2[sidecar]`: the coordination server's dependencies,
# which the tsnet2d process never loads (tests/unit/test_daemon_imports.py). The sidecar
# image installs `tsnet2[sidecar]` alone (docs/image.md).
SERVER_ONLY = {"aiohttp"}


def _requirement_name(req: str) -> str:
    return re.split(r"[\s<>=!~;\[]", req, maxsplit=1)[0].lower()


def test_the_sidecar_extra_is_the_daemon_extra_without_the_coordination_server() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    extras = project["optional-dependencies"]
    assert "tsnet2[sidecar]" in extras["daemon"] and "tsnet2[daemon]" in extras["operator"]
    added = {_requirement_name(r) for r in extras["daemon"] if r != "tsnet2[sidecar]"}
    assert added == SERVER_ONLY, (
        f"`daemon` adds {sorted(added - SERVER_ONLY)} to `sidecar`: a dependency of tsnet2d "
        "belongs in the `sidecar` extra, or the sidecar image goes without it")
    assert not {_requirement_name(r) for r in extras["sidecar"]} & SERVER_ONLY


def test_the_http_integrations_name_their_extra() -> None:
    # tsnet2.integrations needs the HTTP library of each module; `import tsnet2` none of them.
    out = run("""
        import importlib, sys, tsnet2
        assert not {"httpx", "httpcore", "requests", "urllib3", "aiohttp"} & set(sys.modules)
        for module in ("httpx", "requests", "aiohttp"):
            try:
                importlib.import_module(f"tsnet2.integrations.{module}")
            except ImportError as exc:
                print(exc)
        try:
            tsnet2.Server(socket_path="/nonexistent/tsnet2.sock").http_client()
        except ImportError as exc:
            print(exc)
        import tsnet2.integrations.http_client  # the standard library's: no extra
    """, "httpx", "httpcore", "requests", "urllib3", "aiohttp")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("tsnet2.integrations.httpx needs the 'httpx' extra (")
    assert lines[0].endswith("): pip install 'tsnet2[httpx]'")
    assert lines[1].startswith("tsnet2.integrations.requests needs the 'requests' extra (")
    assert lines[2].startswith("tsnet2.integrations.aiohttp needs the 'aiohttp' extra (")
    assert lines[3].startswith("Server.http_client() needs the 'httpx' extra (")
    assert lines[3].endswith("pip install 'tsnet2[httpx]'")
