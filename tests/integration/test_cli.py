"""``tsnet2 status|whois|ping`` as a user runs them, against real tsnet2d processes.

The first part needs no tailnet: a daemon whose node is not started, a missing socket, a
dead daemon, a uid the socket or the daemon refuses. Every failure is one line
``tsnet2 <command>: <message>`` on stderr and exit status 1, never a traceback; usage
errors exit 2. The second part (``netns``) runs the commands against a node started the
way the injected sidecar starts it (``tsnet2d --up``) and checks that they leave it up.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import tsnet2
from tsnet2.lab.tailnet import DaemonProc, LocalTailnet
from tsnet2.proto.tailscale import TRAFFIC_LOG_KEY_CAP
from tsnet2.traffic.signing import SIGNING_KEY_FILE, load_or_create_signing_key

from .tailnet import running_tailnet, wait_for
from .test_daemon import Daemon

DOMAIN = "tail-scale.ts.net"

# Run the CLI as uid 65534. The interpreter lives under a directory only root can read, so
# the child imports everything it needs (and builds the parser once) before dropping root.
AS_NOBODY = """
import os, sys, tsnet2, tsnet2.cli
tsnet2.cli.build_parser().format_help()
os.setgroups([]); os.setgid(65534); os.setuid(65534)
sys.exit(tsnet2.cli.main(sys.argv[1:]))
"""


def cli(*argv: str, nobody: bool = False, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``tsnet2 ARGV`` in a fresh interpreter (no TSNET2_SOCKET from our environment)."""
    env = {k: v for k, v in os.environ.items() if k != "TSNET2_SOCKET"}
    cmd = [sys.executable, "-c", AS_NOBODY] if nobody else [sys.executable, "-m", "tsnet2.cli"]
    return subprocess.run([*cmd, *argv], capture_output=True, text=True, timeout=timeout,
                          env=env)


def assert_fails(out: subprocess.CompletedProcess[str], command: str, *needles: str) -> None:
    """Exit 1 with exactly one stderr line ``tsnet2 COMMAND: ...`` containing the needles."""
    assert out.returncode == 1, (out.returncode, out.stdout, out.stderr)
    assert "Traceback" not in out.stderr, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith(f"tsnet2 {command}: "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


QUERIES = [
    ("status",),
    ("status", "--json"),
    ("whois", "100.64.0.1"),
    ("whois", "--json", "some-peer.tail-scale.ts.net"),
    ("cert",),
    ("cert", "--ca"),
]


# ---- no tailnet ----------------------------------------------------------------------


@pytest.fixture
def idle_daemon(open_dir: Path) -> Iterator[Daemon]:
    """A tsnet2d (no --up, no app) whose socket every uid can reach; its own uid check
    still refuses other uids."""
    d = Daemon(open_dir)
    os.chmod(d.sock.parent, 0o755)
    try:
        yield d
    finally:
        assert d.stop() == 0, d.text()


@pytest.mark.parametrize("argv", QUERIES, ids=" ".join)
def test_query_against_a_node_that_is_not_started(idle_daemon: Daemon,
                                                   argv: tuple[str, ...]) -> None:
    out = cli(*argv, "--socket", str(idle_daemon.sock))
    assert_fails(out, argv[0], "the node is not started")
    assert out.stdout == ""


def test_ping_against_a_node_that_is_not_started_does_not_start_it(
        idle_daemon: Daemon) -> None:
    out = cli("ping", "--json", "-c", "2", "-i", "0", "--socket", str(idle_daemon.sock),
              "100.64.0.1:80")
    assert_fails(out, "ping", "the node is not started")  # one error, not a failed dial each
    assert out.stdout == ""
    assert_fails(cli("status", "--socket", str(idle_daemon.sock)), "status", "not started")


@pytest.mark.parametrize("argv", [*QUERIES, ("ping", "-c", "1", "100.64.0.1:80")], ids=" ".join)
def test_missing_socket(tmp_path: Path, argv: tuple[str, ...]) -> None:
    sock = tmp_path / "nowhere.sock"
    assert_fails(cli(*argv, "--socket", str(sock)), argv[0], f"no tsnet2d socket at {sock}")


@pytest.mark.parametrize("argv", [*QUERIES, ("ping", "-c", "1", "100.64.0.1:80")], ids=" ".join)
def test_dead_daemon_left_its_socket(open_dir: Path, argv: tuple[str, ...]) -> None:
    d = Daemon(open_dir)
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait(20)
    assert d.sock.exists()  # a stale socket: nothing accepts on it
    assert_fails(cli(*argv, "--socket", str(d.sock)), argv[0], "tsnet2d is not running")


@pytest.mark.parametrize("argv", [*QUERIES, ("ping", "-c", "1", "100.64.0.1:80")], ids=" ".join)
def test_socket_permission_denied(idle_daemon: Daemon, argv: tuple[str, ...]) -> None:
    os.chmod(idle_daemon.sock, 0o660)  # root's socket; uid 65534 is not in its group
    out = cli(*argv, "--socket", str(idle_daemon.sock), nobody=True)
    assert_fails(out, argv[0], "permission denied", str(idle_daemon.sock), "--socket-mode")


@pytest.mark.parametrize("argv", QUERIES, ids=" ".join)
def test_uid_the_daemon_refuses(idle_daemon: Daemon, argv: tuple[str, ...]) -> None:
    os.chmod(idle_daemon.sock, 0o666)  # the path lets anyone in; the daemon's check does not
    out = cli(*argv, "--socket", str(idle_daemon.sock), nobody=True)
    assert_fails(out, argv[0], "--allow-uid")


@pytest.mark.parametrize("argv, needle", [
    (("status",), "no daemon socket: pass --socket PATH or set TSNET2_SOCKET"),
    (("whois", "--socket", "/x", "a:b:c"), "too many colons"),
    (("whois", "--socket", "/x", "peer:http"), "bad port"),
    (("ping", "--socket", "/x", "peer"), "expected HOST:PORT"),
    (("ping", "--socket", "/x", "-c", "0", "peer:80"), "-c/--count"),
    (("ping", "--socket", "/x", "--timeout", "0", "peer:80"), "--timeout"),
    (("whois",), "TARGET"),
])
def test_usage_errors_exit_2(argv: tuple[str, ...], needle: str) -> None:
    out = cli(*argv)
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert needle in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def test_help_texts_name_the_forms_and_json() -> None:
    def help_text(*argv: str) -> str:
        return " ".join(cli(*argv, "--help").stdout.split())

    read_only = "never starts, stops or changes the node"
    whois = help_text("whois")
    assert "node name or FQDN" in whois and "--json" in whois and read_only in whois
    assert "--json" in help_text("ping") and "never starts or stops it" in help_text("ping")
    assert read_only in help_text("status")
    assert "Exit status: 0 ok, 1 error" in help_text()


# ---- against a running node (netns lab) ----------------------------------------------


class Net:
    """alpha: tsnet2d --up (like the injected sidecar); beta: a Server listening on :8080;
    gamma: a daemon that could join (control URL and auth key set) but nobody started."""

    def __init__(self, lnet: LocalTailnet) -> None:
        key = lnet.authkey(reusable=True)
        self.lnet = lnet
        self.alpha: DaemonProc = lnet.add_daemon(
            "alpha", auth_key=key, extra_args=("--up", "--hostname", "alpha"))
        self.dbeta: DaemonProc = lnet.add_daemon("beta", auth_key=key)
        self.gamma: DaemonProc = lnet.add_daemon("gamma", auth_key=key)
        self.sock = str(self.alpha.socket_path)
        self.beta = tsnet2.Server(socket_path=str(self.dbeta.socket_path), hostname="beta")
        self.beta.up(timeout=30)
        self.listener = self.beta.listen("tcp", ":8080")
        beta_ip = self.beta.tailscale_ips()[0]
        assert beta_ip is not None
        self.beta_ip = str(beta_ip)
        self.alpha_status = wait_for(lambda: self._alpha_sees_beta(), 30, "alpha to see beta")

    def _alpha_sees_beta(self) -> dict[str, object] | None:
        try:
            st = tsnet2.LocalClient(self.sock).status()
        except tsnet2.LocalAPIError:
            return None  # 503 until --up has started the node
        peers = (st.get("Peer") or {}).values()
        if st.get("BackendState") == "Running" and any(
                p.get("HostName") == "beta" for p in peers):
            return st
        return None

    def close(self) -> None:
        self.listener.close()
        self.beta.close()


@pytest.fixture(scope="module")
def net() -> Iterator[Net]:
    with running_tailnet() as lnet:
        n = Net(lnet)
        try:
            yield n
        finally:
            n.close()


def assert_alpha_still_up(net: Net) -> None:
    """alpha is Running with the addresses it had, and beta still has it as a peer."""
    st = tsnet2.LocalClient(net.sock).status()
    assert st["BackendState"] == "Running", st["BackendState"]
    assert st["TailscaleIPs"] == net.alpha_status["TailscaleIPs"]
    peers = tsnet2.LocalClient(str(net.dbeta.socket_path)).status()["Peer"].values()
    assert any(p["HostName"] == "alpha" for p in peers)


@pytest.mark.netns
def test_status_leaves_the_node_up(net: Net) -> None:
    out = cli("status", "--socket", net.sock)
    assert out.returncode == 0, out.stderr
    first, *rest = out.stdout.splitlines()
    assert f"alpha.{DOMAIN}." in first and "Running" in first
    assert any(f"beta.{DOMAIN}." in line and net.beta_ip in line for line in rest), rest
    assert_alpha_still_up(net)

    st = json.loads(cli("status", "--json", "--socket", net.sock).stdout)
    assert st["BackendState"] == "Running"
    assert st["Self"]["HostName"] == "alpha"
    assert_alpha_still_up(net)


@pytest.mark.netns
@pytest.mark.parametrize("target", ["beta", "BETA", f"beta.{DOMAIN}", f"beta.{DOMAIN}.",
                                    "beta:8080", "{ip}", "{ip}:8080"])
def test_whois_by_name_or_address(net: Net, target: str) -> None:
    target = target.format(ip=net.beta_ip)
    out = cli("whois", "--json", "--socket", net.sock, target)
    assert out.returncode == 0, out.stderr
    who = json.loads(out.stdout)
    assert who["Node"]["Name"] == f"beta.{DOMAIN}."
    assert f"{net.beta_ip}/32" in who["Node"]["Addresses"]
    assert who["UserProfile"]["LoginName"]
    assert_alpha_still_up(net)


@pytest.mark.netns
def test_whois_text_and_self(net: Net) -> None:
    out = cli("whois", "--socket", net.sock, "alpha")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"Machine: alpha.{DOMAIN}.  (")
    assert "Addresses: 100.64." in out.stdout and "User: " in out.stdout


@pytest.mark.netns
def test_whois_and_status_show_the_traffic_log_key(net: Net) -> None:
    """Each node registered the public half of ``<state-dir>/traffic-log.key``: alpha's WhoIs
    of beta shows beta's (Node.CapMap), alpha's status shows both, and so does the CLI."""
    keys = {}
    for name, daemon in (("alpha", net.alpha), ("beta", net.dbeta)):
        assert (daemon.state_dir / SIGNING_KEY_FILE).is_file(), f"{name} has no key file"
        keys[name] = load_or_create_signing_key(daemon.state_dir).public
    assert keys["alpha"] != keys["beta"]
    local = tsnet2.LocalClient(net.sock)
    who = local.whois(net.beta_ip)
    assert who["Node"]["Name"] == f"beta.{DOMAIN}."
    assert who["Node"]["CapMap"] == {TRAFFIC_LOG_KEY_CAP: [keys["beta"]]}
    st = local.status()
    assert st["Self"]["CapMap"] == {TRAFFIC_LOG_KEY_CAP: [keys["alpha"]]}
    (beta,) = [p for p in st["Peer"].values() if p["HostName"] == "beta"]
    assert beta["CapMap"] == {TRAFFIC_LOG_KEY_CAP: [keys["beta"]]}

    out = cli("whois", "--socket", net.sock, "beta")
    assert out.returncode == 0, out.stderr
    assert f"  traffic-log key: {keys['beta']}\n" in out.stdout
    out = cli("status", "--socket", net.sock)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[1] == f"  traffic-log key: {keys['alpha']}"
    who_json = json.loads(cli("whois", "--json", "--socket", net.sock, "beta").stdout)
    assert who_json["Node"]["CapMap"][TRAFFIC_LOG_KEY_CAP] == [keys["beta"]]


@pytest.mark.netns
@pytest.mark.parametrize("target, needle", [
    ("nosuch", "no tailnet node named 'nosuch'"),
    (f"nosuch.{DOMAIN}", "no tailnet node named"),
    ("100.64.99.99", "no tailnet node has address 100.64.99.99"),
    ("192.0.2.1:80", "no tailnet node has address 192.0.2.1:80"),
])
def test_whois_unknown_is_a_clear_error(net: Net, target: str, needle: str) -> None:
    assert_fails(cli("whois", "--socket", net.sock, target), "whois", needle)
    assert_fails(cli("whois", "--json", "--socket", net.sock, target), "whois", needle)


@pytest.mark.netns
def test_ping_json_one_object_per_dial_and_the_node_stays_up(net: Net) -> None:
    out = cli("ping", "--json", "-c", "3", "-i", "0", "--socket", net.sock, "beta:8080")
    assert out.returncode == 0, out.stderr
    attempts = [json.loads(line) for line in out.stdout.splitlines()]
    assert [a["seq"] for a in attempts] == [1, 2, 3]
    for a in attempts:
        assert a["ok"] is True and a["target"] == "beta:8080"
        assert a["remote"] == f"{net.beta_ip}:8080"
        assert a["ms"] >= 0
    assert_alpha_still_up(net)


@pytest.mark.netns
def test_ping_text_and_a_failing_target(net: Net) -> None:
    out = cli("ping", "-c", "2", "-i", "0", "--socket", net.sock, f"beta.{DOMAIN}:8080")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith(f"connected to beta.{DOMAIN}:8080 ({net.beta_ip}:8080) in ")
    assert lines[-1].startswith("2 dials, 2 connected, 0 failed; min/avg/max ")

    out = cli("ping", "--json", "-c", "1", "--socket", net.sock, "nosuch:8080")
    assert out.returncode == 1
    (attempt,) = [json.loads(line) for line in out.stdout.splitlines()]
    assert attempt["ok"] is False and "nosuch" in attempt["error"]
    assert_alpha_still_up(net)


@pytest.mark.netns
@pytest.mark.parametrize("argv", [*QUERIES, ("whois", "beta"),
                                  ("ping", "--json", "-c", "1", "beta:8080")], ids=" ".join)
def test_queries_never_start_a_node(net: Net, argv: tuple[str, ...]) -> None:
    # gamma's daemon has everything it needs to join; a query must not be what makes it join.
    sock = str(net.gamma.socket_path)
    out = cli(*argv, "--socket", sock)
    assert out.returncode == 1, (out.stdout, out.stderr)
    assert "Traceback" not in out.stderr, out.stderr
    with pytest.raises(tsnet2.LocalAPIError) as info:
        tsnet2.LocalClient(sock).status()
    assert info.value.status == 503  # still not started
