"""`tsnet2 demo`: a whole tailnet on this machine, then gone again.

Control server in a hub namespace, tsnet2d "tsnet2-a" and "tsnet2-b" in their own namespaces
over real WireGuard (wireguard-go), and an echo service through the client library: A listens,
B dials, WhoIs names the peer, and A's traffic log shows the flow.
"""

from __future__ import annotations

import base64
import json
import signal
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

import tsnet2
from tsnet2.lab import Lab, check_prerequisites
from tsnet2.lab.tailnet import LocalTailnet
from tsnet2.node.device import find_wireguard_go

MESSAGE = b"hello tsnet2"


def _echo_once(listener: Any, done: list[bytes]) -> None:
    conn = listener.accept(timeout=30)
    with conn:
        data = conn.recv(1024)
        conn.sendall(data)
        done.append(data)


def _short(line: dict[str, Any]) -> str:
    out = dict(line)
    if "payload_b64" in out:
        raw = base64.b64decode(out["payload_b64"])
        out["payload_b64"] = out["payload_b64"][:24] + ("..." if len(raw) > 18 else "")
        out["payload"] = raw[:40].decode("utf-8", "replace")
    return json.dumps(out)


def _wait_for(pred: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return pred()


def run_demo(verbose: bool = False, out: Any = None) -> int:
    """Run the demo; returns an exit code. Everything created is removed, also on Ctrl-C."""
    out = out or sys.stdout
    problems = check_prerequisites()
    if problems:
        print("tsnet2 demo needs:", file=sys.stderr)
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
        return 1
    wireguard_go = find_wireguard_go()  # the nodes run this one (checked just above)

    def on_term(_sig: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, on_term)
    lab = Lab()
    try:
        with lab, LocalTailnet(lab) as net:
            print(f"lab {lab.prefix}: hub {lab.hub_ip}; {wireguard_go}", file=out)
            net.start_control()
            key = net.authkey(reusable=True, ephemeral=True)
            print(f"control server {net.control_url}; auth key created", file=out)
            a = net.add_daemon("tsnet2-a", auth_key=key)
            b = net.add_daemon("tsnet2-b", auth_key=key)
            with tsnet2.Server(socket_path=str(a.socket_path), hostname="tsnet2-a",
                               ephemeral=True) as srv_a, \
                 tsnet2.Server(socket_path=str(b.socket_path), hostname="tsnet2-b",
                               ephemeral=True) as srv_b:
                st_a, st_b = srv_a.up(timeout=30), srv_b.up(timeout=30)
                print(f"A tsnet2-a: {', '.join(map(str, st_a.tailscale_ips))}", file=out)
                print(f"B tsnet2-b: {', '.join(map(str, st_b.tailscale_ips))}", file=out)
                a_ip = st_a.tailscale_ips[0]
                done: list[bytes] = []
                with srv_a.listen("tcp", ":8080") as ln:
                    t = threading.Thread(target=_echo_once, args=(ln, done), daemon=True)
                    t.start()
                    t0 = time.perf_counter()
                    with srv_b.dial("tcp", f"{a_ip}:8080", timeout=30) as conn:
                        conn.sendall(MESSAGE)
                        got = b""
                        while len(got) < len(MESSAGE):
                            chunk = conn.recv(1024)
                            if not chunk:
                                break
                            got += chunk
                    rtt = (time.perf_counter() - t0) * 1000
                    t.join(30)
                print(f"B -> A {a_ip}:8080: sent {MESSAGE!r}, got back {got!r} "
                      f"({rtt:.1f} ms incl. connect)", file=out)
                who = srv_b.local_client().whois(f"{a_ip}:8080")
                node, user = who.get("Node", {}), who.get("UserProfile", {})
                print(f"WhoIs {a_ip} (asked by B): node {node.get('Name')} "
                      f"user {user.get('LoginName')}", file=out)

                def closed() -> bool:
                    text = a.traffic_log.read_text() if a.traffic_log.exists() else ""
                    return '"kind":"close"' in text

                _wait_for(closed, 5)
                lines = [json.loads(x) for x in a.traffic_log.read_text().splitlines() if x]
                print(f"A's traffic log ({a.traffic_log}):", file=out)
                for rec in lines:
                    print(f"  {_short(rec)}", file=out)
                ok = got == MESSAGE and "tsnet2-a" in str(node.get("Name"))
                kinds = [r["kind"] for r in lines]
                print(f"summary: echo {'ok' if got == MESSAGE else 'FAILED'}, "
                      f"whois {'ok' if 'tsnet2-a' in str(node.get('Name')) else 'FAILED'}, "
                      f"log {kinds.count('open')} open / {kinds.count('data')} data / "
                      f"{kinds.count('close')} close", file=out)
            if verbose:
                for d in (a, b):
                    print(f"--- tsnet2d {d.name} log\n{d.log_text()}", file=out)
        print("lab removed", file=out)
        return 0 if ok else 1
    except KeyboardInterrupt:
        print("interrupted; lab removed", file=sys.stderr)
        return 130
    finally:
        lab.close()
        signal.signal(signal.SIGTERM, old)
