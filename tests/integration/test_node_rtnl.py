"""The rtnetlink client (``tsnet2.node.rtnl``) against the kernel, checked with ``ip -j``.

Each test works in a lab namespace on a veth pair (``rt0``/``rt1``; this kernel has no dummy
module). The sockets are opened inside ``lab.in_netns(...)`` and then used outside it, as
``Node`` does from executor threads: a netlink socket keeps its namespace. One test repeats the
node's set-up with pyroute2 in a twin namespace and compares what the kernel ended up with; one
runs the node's whole userspace path in a fresh interpreter and checks pyroute2 never loaded.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
from ipaddress import IPv4Address, IPv6Address, ip_address, ip_network
from pathlib import Path
from typing import Any

import pytest

from tsnet2.lab import Lab
from tsnet2.node import MTU, TAILNET_V4, TAILNET_V6
from tsnet2.node.device import detect_backend
from tsnet2.node.rtnl import IFA_F_NODAD, IFF_LOOPBACK, IFF_UP, Rtnl, RtnlError

pytestmark = pytest.mark.netns

REPO = Path(__file__).resolve().parents[2]
V4, V6 = IPv4Address("100.64.0.1"), IPv6Address("fd7a:115c:a1e0::1")
SCOPES = {0: "global", 253: "link", 254: "host"}


def ip_j(lab: Lab, ns: str, *args: str) -> Any:
    return json.loads(lab.run(ns, ["ip", "-j", *args]).stdout or "[]")


def veth_ns(lab: Lab, name: str = "a") -> str:
    """A lab namespace with a veth pair rt0/rt1, rt1 up (so rt0 gets a carrier when up)."""
    ns = lab.add_node(name).netns
    lab.run(ns, ["ip", "link", "add", "rt0", "type", "veth", "peer", "name", "rt1"])
    lab.run(ns, ["ip", "link", "set", "rt1", "up"])
    return ns


def open_in(lab: Lab, ns: str) -> Rtnl:
    with lab.in_netns(ns):
        return Rtnl()


def link_of(lab: Lab, ns: str, name: str) -> dict[str, Any]:
    (link,) = ip_j(lab, ns, "link", "show", "dev", name)
    assert isinstance(link, dict)
    return link


def test_link_index_and_links_match_ip(lab: Lab) -> None:
    ns = veth_ns(lab)
    with open_in(lab, ns) as rt:  # used outside the namespace from here on
        assert rt.link_index("rt0") == link_of(lab, ns, "rt0")["ifindex"]
        assert rt.link_index("nope0") is None
        mine = {(link.index, link.name, link.mtu, bool(link.flags & IFF_UP),
                 bool(link.flags & IFF_LOOPBACK)) for link in rt.links()}
    theirs = {(link["ifindex"], link["ifname"], link["mtu"], "UP" in link["flags"],
               "LOOPBACK" in link["flags"]) for link in ip_j(lab, ns, "link")}
    assert mine == theirs
    assert {name for _, name, *_ in mine} == {"lo", "eth0", "rt0", "rt1"}
    with Rtnl() as host:  # a socket opened out here talks to this thread's namespace
        assert "rt0" not in {x.name for x in host.links()}


def test_link_set_mtu_up_down(lab: Lab) -> None:
    ns = veth_ns(lab)
    with open_in(lab, ns) as rt:
        idx = rt.link_index("rt0")
        assert idx is not None
        rt.link_set(idx, mtu=MTU, up=True)
        link = link_of(lab, ns, "rt0")
        assert link["mtu"] == MTU and "UP" in link["flags"]
        rt.link_set(idx, up=False)
        link = link_of(lab, ns, "rt0")
        assert link["mtu"] == MTU and "UP" not in link["flags"]
        rt.link_set(idx, mtu=1400)  # up/down left alone
        link = link_of(lab, ns, "rt0")
        assert link["mtu"] == 1400 and "UP" not in link["flags"]
        with pytest.raises(RtnlError, match=r"RTM_NEWLINK index 999999 up mtu 1280") as info:
            rt.link_set(999999, mtu=MTU, up=True)
        assert info.value.errno == errno.ENODEV
        with pytest.raises(RtnlError) as info:
            rt.link_set(idx, mtu=10)  # below the minimum
        assert info.value.errno == errno.EINVAL


def test_route_replace_and_dump_match_ip(lab: Lab) -> None:
    ns = veth_ns(lab)
    with open_in(lab, ns) as rt:
        idx, other = rt.link_index("rt0"), rt.link_index("rt1")
        assert idx is not None and other is not None
        rt.link_set(idx, up=True)
        for _ in range(2):  # replace: the second time changes nothing, adds nothing
            rt.route_replace(TAILNET_V4, idx)
            rt.route_replace(TAILNET_V6, idx)
        v4 = [r for r in ip_j(lab, ns, "route", "show", "table", "main")
              if r["dst"] == str(TAILNET_V4)]
        v6 = [r for r in ip_j(lab, ns, "-6", "route", "show", "table", "main")
              if r["dst"] == str(TAILNET_V6)]
        assert [(r["dev"], r["protocol"], r.get("scope")) for r in v4] == [("rt0", "static", None)]
        assert [(r["dev"], r["protocol"]) for r in v6] == [("rt0", "static")]
        rt.route_replace(TAILNET_V4, other)
        assert [r["dev"] for r in ip_j(lab, ns, "route", "show", "table", "main")
                if r["dst"] == str(TAILNET_V4)] == ["rt1"]
        names = {link.index: link.name for link in rt.links()}
        for family, flag in ((socket.AF_INET, "-4"), (socket.AF_INET6, "-6")):
            mine = {("default" if r.dst_len == 0 else f"{r.dst}/{r.dst_len}",
                     names.get(r.oif or 0), str(r.gateway) if r.gateway else None,
                     str(r.prefsrc) if r.prefsrc else None) for r in rt.routes(family)}
            theirs = {(r["dst"] if "/" in r["dst"] or r["dst"] == "default"
                       else f"{r['dst']}/{32 if family == socket.AF_INET else 128}",
                       r.get("dev"), r.get("gateway"), r.get("prefsrc"))
                      for r in ip_j(lab, ns, flag, "route", "show", "table", "main")}
            assert mine == theirs
        default = [r for r in rt.routes(socket.AF_INET) if r.dst_len == 0]
        assert [(names[r.oif or 0], str(r.gateway)) for r in default] == [
            ("eth0", str(lab.hub_ip))]
        with pytest.raises(RtnlError, match=r"RTM_NEWROUTE 100\.64\.0\.0/10 oif 999999") as info:
            rt.route_replace(ip_network("100.64.0.0/10"), 999999)
        assert info.value.errno == errno.ENODEV


def test_addresses_add_dump_del_match_ip(lab: Lab) -> None:
    ns = veth_ns(lab)
    with open_in(lab, ns) as rt:
        idx = rt.link_index("rt0")
        assert idx is not None
        rt.link_set(idx, up=True)
        rt.addr_add(idx, V4, 32)
        rt.addr_add(idx, V6, 128, IFA_F_NODAD)
        info = next(x for x in ip_j(lab, ns, "addr", "show", "dev", "rt0"))
        theirs = {(a["local"], a["prefixlen"], a["scope"], bool(a.get("nodad")))
                  for a in info["addr_info"]}
        assert (str(V4), 32, "global", False) in theirs
        assert (str(V6), 128, "global", True) in theirs
        mine = {(str(a.ip), a.prefixlen, SCOPES[a.scope], bool(a.flags & IFA_F_NODAD))
                for a in rt.addresses(idx)}
        assert mine == theirs
        everything = {(a.index, str(a.ip), a.prefixlen) for a in rt.addresses()}
        assert everything == {(link["ifindex"], a["local"], a["prefixlen"])
                              for link in ip_j(lab, ns, "addr") for a in link["addr_info"]}
        with pytest.raises(RtnlError, match=r"RTM_NEWADDR 100\.64\.0\.1/32") as exc:
            rt.addr_add(idx, V4, 32)
        assert exc.value.errno == errno.EEXIST
        rt.addr_del(idx, V4, 32)
        rt.addr_del(idx, V6, 128)
        left = next(x for x in ip_j(lab, ns, "addr", "show", "dev", "rt0"))["addr_info"]
        assert {a["local"] for a in left} & {str(V4), str(V6)} == set()
        with pytest.raises(RtnlError) as exc:
            rt.addr_del(idx, V4, 32)
        assert exc.value.errno == errno.EADDRNOTAVAIL


def test_link_add_and_del(lab: Lab) -> None:
    ns = veth_ns(lab)
    with open_in(lab, ns) as rt:
        rt.link_add("rtbr0", "bridge")
        assert link_of(lab, ns, "rtbr0")["ifname"] == "rtbr0"
        with pytest.raises(RtnlError) as exc:
            rt.link_add("rtbr0", "bridge")
        assert exc.value.errno == errno.EEXIST
        idx = rt.link_index("rtbr0")
        assert idx is not None
        rt.link_del(idx)
        assert rt.link_index("rtbr0") is None
        assert "rtbr0" not in {x["ifname"] for x in ip_j(lab, ns, "link")}
        try:
            rt.link_add("rtwg0", "wireguard")
        except RtnlError as err:  # no kernel WireGuard here: the kernel says so
            assert err.errno == errno.EOPNOTSUPP
            assert err.kernel_message == "Unknown device type"
            kernel_wg = False
        else:
            kernel_wg = True
            wg = rt.link_index("rtwg0")
            assert wg is not None
            rt.link_del(wg)
    with lab.in_netns(ns):
        assert detect_backend() == ("kernel" if kernel_wg else "userspace")
    assert {x["ifname"] for x in ip_j(lab, ns, "link")} == {"lo", "eth0", "rt0", "rt1"}


def test_socket_keeps_its_namespace_in_other_threads(lab: Lab) -> None:
    ns = veth_ns(lab)
    node_ip = lab.nodes["a"].ip
    rt = open_in(lab, ns)
    seen: dict[str, Any] = {}

    def worker() -> None:  # a thread started outside the namespace, like an executor's
        seen["from_ns"] = {str(a.ip) for a in rt.addresses()}
        with Rtnl() as own:
            seen["own"] = {str(a.ip) for a in own.addresses()}

    with rt:
        t = threading.Thread(target=worker)
        t.start()
        t.join(10)
    assert str(node_ip) in seen["from_ns"]
    assert str(node_ip) not in seen["own"]


def test_node_setup_is_what_pyroute2_did(lab: Lab) -> None:
    """The node's set-up (link up + MTU, both routes, both addresses with IPv6 nodad) done
    by pyroute2 in one namespace and by Rtnl in a twin leaves the kernel in the same state."""
    pyroute2 = pytest.importorskip("pyroute2")  # a dependency still (the kernel backend)
    a, b = veth_ns(lab, "a"), veth_ns(lab, "b")
    with lab.in_netns(a), pyroute2.IPRoute() as ipr:
        idx = ipr.link_lookup(ifname="rt0")[0]
        ipr.link("set", index=idx, mtu=MTU, state="up")
        ipr.route("replace", dst=str(TAILNET_V4), oif=idx)
        ipr.route("replace", dst=str(TAILNET_V6), oif=idx, family=socket.AF_INET6)
        ipr.addr("add", index=idx, address=str(V4), prefixlen=32)
        ipr.addr("add", index=idx, address=str(V6), prefixlen=128, flags=IFA_F_NODAD)
    with open_in(lab, b) as rt:
        idx2 = rt.link_index("rt0")
        assert idx2 is not None
        rt.link_set(idx2, mtu=MTU, up=True)
        rt.route_replace(TAILNET_V4, idx2)
        rt.route_replace(TAILNET_V6, idx2)
        rt.addr_add(idx2, V4, 32)
        rt.addr_add(idx2, V6, 128, IFA_F_NODAD)

    def state(ns: str) -> Any:
        (link,) = ip_j(lab, ns, "-d", "addr", "show", "dev", "rt0")
        for key in ("address", "broadcast", "ifindex", "link_index", "operstate"):
            link.pop(key, None)
        link["addr_info"] = [x for x in link["addr_info"]
                             if not ip_address(x["local"]).is_link_local]
        routes = [r for flag in ("-4", "-6")
                  for r in ip_j(lab, ns, "-d", flag, "route", "show", "table", "all")
                  if r.get("dev") == "rt0"
                  and not ip_address(r["dst"].split("/")[0]).is_link_local]
        return link, sorted(routes, key=json.dumps)

    assert state(a) == state(b)


def test_node_path_never_imports_pyroute2(lab: Lab) -> None:
    """tsnet2d's node path with ``--backend auto`` (probe, wireguard-go, link, routes,
    addresses, endpoint detection, health check) in a fresh interpreter: pyroute2 stays out."""
    node = lab.add_node("a")
    code = textwrap.dedent(f"""
        import sys
        from ipaddress import IPv4Address, IPv6Address
        from tsnet2.node.wgkey import WireguardKey
        from tsnet2.node import Node, detect_endpoints
        from tsnet2.node.device import detect_backend

        def pyroute2_loaded():
            return any(m.partition(".")[0] == "pyroute2" for m in sys.modules)

        probe = detect_backend()
        print("probe loaded pyroute2:", pyroute2_loaded())
        # where the kernel has WireGuard, auto picks it (and pyroute2): pin userspace there
        with Node(ifname={node.ifname!r},
                  backend="auto" if probe == "userspace" else "userspace") as n:
            n.start(WireguardKey.generate())
            n.set_addresses(IPv4Address("100.64.0.5"), IPv6Address("fd7a:115c:a1e0::5"))
            n.set_addresses(IPv4Address("100.64.0.6"), None)
            print(n.backend, sorted(map(str, n.addresses())))
            n.check()
            print(detect_endpoints(41641, exclude_ifnames=[{node.ifname!r}]))
        print("pyroute2 loaded:", pyroute2_loaded())
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    out = lab.run(node.netns, [sys.executable, "-c", code], env=env, cwd=REPO, timeout=60)
    assert out.stdout.splitlines() == [
        "probe loaded pyroute2: False",
        "userspace ['100.64.0.6']",
        f"['{node.ip}:41641']",
        "pyroute2 loaded: False",
    ], out.stderr


def test_kernel_backend_still_loads_pyroute2_lazily() -> None:
    """The other side of the coin: the genetlink part imports pyroute2 when first used."""
    out = subprocess.run([sys.executable, "-c",
                          "import sys; from tsnet2.node.device import _pyroute2; "
                          "print('pyroute2' in sys.modules); _pyroute2(); "
                          "print('pyroute2' in sys.modules)"],
                         capture_output=True, text=True, check=True, timeout=60, cwd=REPO)
    assert out.stdout.split() == ["False", "True"]
