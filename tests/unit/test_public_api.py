"""S1: the public surface of ``import tsnet2`` (fields, signatures, zero-Server behaviour)."""

from __future__ import annotations

import errno
import inspect
import json
import pydoc
import subprocess
import sys
import time
from pathlib import Path

import pytest

import tsnet2

FIELDS = {
    # name: (default on a zero Server, type)
    "dir": ("", str),
    "hostname": ("", str),
    "control_url": ("", str),
    "auth_key": ("", str),
    "ephemeral": (False, bool),
    "socket_path": ("", str),
    "traffic_log_path": ("", str),
    "advertise_tags": (None, type(None)),
    "port": (0, int),
    "store": (None, type(None)),
    "logf": (None, type(None)),
    "user_logf": (None, type(None)),
    "tun": (None, type(None)),
    "connect_timeout": (10.0, float),
    "accept_slots": (2, int),
    "reconnect_timeout": (10.0, float),
    "join": (True, bool),
}

METHODS = {
    "start": [],
    "up": ["timeout"],
    "close": [],
    "listen": ["network", "addr"],
    "listen_tls": ["network", "addr", "alpn"],
    "dial": ["network", "addr", "timeout"],
    "dial_tls": ["network", "addr", "server_name", "alpn", "timeout"],
    "local_client": [],
    "tailscale_ips": [],
    "cert_domains": [],
    "get_root_path": [],
    "register_fallback_tcp_handler": ["cb"],
}
SYNC_ONLY_IN_ASYNC = {"get_root_path", "register_fallback_tcp_handler"}


@pytest.fixture
def no_env_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TSNET2_SOCKET", raising=False)


def test_all_is_sorted_and_resolves() -> None:
    assert tsnet2.__all__ == sorted(tsnet2.__all__)
    for name in tsnet2.__all__:
        obj = getattr(tsnet2, name)
        if name != "__version__":
            assert inspect.getdoc(obj), f"tsnet2.{name} has no docstring"
    for name in ("Server", "AsyncServer", "Listener", "AsyncListener", "TailnetSocket",
                 "AsyncConn", "LocalClient", "AsyncLocalClient", "Status", "Error",
                 "NotSupportedError", "ClosedError", "DaemonUnavailableError", "DialError",
                 "DaemonError", "LocalAPIError", "ProtocolError"):  # fmt: skip
        assert name in tsnet2.__all__


def test_package_docstring_covers_usage_and_auth() -> None:
    doc = tsnet2.__doc__ or ""
    assert "Usage::" in doc and "tsnet2.Server(" in doc
    for env in ("TS_AUTHKEY", "TS_AUTH_KEY", "TSNET2_SOCKET"):
        assert env in doc
    assert doc.index("TS_AUTHKEY") < doc.index("TS_AUTH_KEY")


@pytest.mark.parametrize("cls", [tsnet2.Server, tsnet2.AsyncServer])
def test_fields_and_defaults(cls: type, no_env_socket: None) -> None:
    params = inspect.signature(cls).parameters
    assert set(params) == set(FIELDS)
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params.values())
    srv = cls()
    for name, (default, typ) in FIELDS.items():
        value = getattr(srv, name)
        assert value == default and type(value) is typ, name


def test_socket_path_defaults_to_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TSNET2_SOCKET", "/run/tsnet2/tsnet2.sock")
    assert tsnet2.Server().socket_path == "/run/tsnet2/tsnet2.sock"
    assert tsnet2.Server(socket_path="/x.sock").socket_path == "/x.sock"


@pytest.mark.parametrize("cls", [tsnet2.Server, tsnet2.AsyncServer])
def test_method_signatures(cls: type) -> None:
    for name, args in METHODS.items():
        fn = getattr(cls, name)
        params = list(inspect.signature(fn).parameters)[1:]
        assert params == args, name
        if cls is tsnet2.AsyncServer and name not in SYNC_ONLY_IN_ASYNC:
            assert inspect.iscoroutinefunction(fn), name
        else:
            assert not inspect.iscoroutinefunction(fn), name
        assert inspect.getdoc(fn), f"{cls.__name__}.{name} has no docstring"
    for name in ("up", "dial", "dial_tls"):
        assert inspect.signature(getattr(cls, name)).parameters["timeout"].default is None


def test_zero_server(no_env_socket: None) -> None:
    srv = tsnet2.Server()
    for call in (srv.start, srv.local_client, lambda: srv.listen("tcp", ":0"),
                 lambda: srv.dial("tcp", "100.64.0.1:1")):  # fmt: skip
        with pytest.raises(NotImplementedError) as ei:
            call()
        assert isinstance(ei.value, tsnet2.NotSupportedError)
        assert "not implemented" in str(ei.value)
    with pytest.raises(NotImplementedError):
        srv.up()
    with pytest.raises(NotImplementedError):
        srv.listen_tls("tcp", ":443")
    assert srv.get_root_path() == ""
    assert srv.tailscale_ips() == (None, None)
    assert srv.cert_domains() is None
    deregister = srv.register_fallback_tcp_handler(lambda src, dst: (None, False))
    assert callable(deregister)
    assert deregister() is None
    srv.close()  # close before start is fine
    with pytest.raises(tsnet2.ClosedError):
        srv.close()


def test_get_root_path_is_dir_field() -> None:
    assert tsnet2.Server(dir="/var/lib/app").get_root_path() == "/var/lib/app"


def test_tun_is_rejected(tmp_path: Path) -> None:
    srv = tsnet2.Server(socket_path=str(tmp_path / "x.sock"), tun=object())
    with pytest.raises(tsnet2.NotSupportedError, match="Tun is not supported"):
        srv.start()


def test_validation_never_touches_the_socket(tmp_path: Path) -> None:
    # Nothing listens: reaching the socket would take connect_timeout (60 s; 10 s is a
    # bound no slow machine gets near for validation alone).
    srv = tsnet2.Server(socket_path=str(tmp_path / "nothing.sock"), connect_timeout=60)
    t0 = time.monotonic()
    with pytest.raises(tsnet2.AddressError, match="bad port"):
        srv.listen("udp", ":53x")
    with pytest.raises(tsnet2.AddressError, match="unsupported network"):
        srv.listen_packet("tcp", ":53")
    with pytest.raises(tsnet2.AddressError, match="bad port"):
        srv.listen("tcp", ":http")
    with pytest.raises(ValueError):
        srv.listen("tcp", "example.com:80")  # listen hosts must be IP literals
    with pytest.raises(tsnet2.AddressError, match="missing port"):
        srv.dial("tcp", "100.64.0.1")
    assert time.monotonic() - t0 < 10


def test_error_tree() -> None:
    e = tsnet2
    assert issubclass(e.NotSupportedError, e.Error) and issubclass(
        e.NotSupportedError, NotImplementedError
    )
    assert issubclass(e.DaemonUnavailableError, ConnectionError)
    assert issubclass(e.DialError, ConnectionError)
    assert issubclass(e.DeadlineExceededError, TimeoutError)
    assert issubclass(e.AddressError, ValueError)
    for name in ("ClosedError", "DaemonError", "LocalAPIError", "ProtocolError"):
        assert issubclass(getattr(e, name), e.Error)
    # A caller can tell the four families apart.
    fam = [e.NotSupportedError, e.ClosedError, e.DaemonUnavailableError, e.DialError]
    for a in fam:
        for b in fam:
            assert (a is b) == issubclass(a, b)
    err = e.LocalAPIError("x", status=404, body="nope")
    assert (err.status, err.body) == (404, "nope")
    derr = e.DaemonError("tsnet2.listen: dup", method="register_listener", daemon_message="dup")
    assert derr.method == "register_listener"


def test_typed_errors_are_what_a_caller_catches() -> None:
    e = tsnet2
    assert issubclass(e.PermissionDeniedError, e.DaemonUnavailableError)
    assert issubclass(e.PermissionDeniedError, PermissionError)
    assert issubclass(e.NodeDownError, e.DaemonUnavailableError)
    assert issubclass(e.NoSuchPeerError, e.DialError)
    assert issubclass(e.PeerOfflineError, e.DialError)
    for name in ("AuthKeyError", "HostnameConflictError", "LimitError", "AddressInUseError"):
        assert issubclass(getattr(e, name), e.DaemonError)
    err = e.AddressInUseError("tsnet2.listen: port 9500 is in use", method="register_listener",
                              daemon_message="port 9500 is in use")
    assert isinstance(err, OSError) and err.errno == errno.EADDRINUSE
    assert err.method == "register_listener" and "9500" in str(err)


def test_help_documents_every_method() -> None:
    text = pydoc.render_doc(tsnet2.Server, renderer=pydoc.plaintext)  # type: ignore[attr-defined]
    for name in METHODS:
        doc = inspect.getdoc(getattr(tsnet2.Server, name)) or ""
        assert name in text
        assert doc.splitlines()[0] in text
    for field in FIELDS:
        assert field in (tsnet2.Server.__doc__ or "")


def test_import_is_lean() -> None:
    code = "import sys, json, tsnet2\nprint(json.dumps(sorted(sys.modules)))\n"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    mods = set(json.loads(out.stdout))
    for banned in ("tsnet2.daemon", "tsnet2.control", "tsnet2.controlclient", "tsnet2.node",
                   "tsnet2.traffic", "tsnet2.lab", "aiohttp", "pyroute2", "prometheus_client",
                   "kopf", "kubernetes", "tsnet2.integrations", "httpx", "httpcore",
                   "requests", "urllib3"):  # fmt: skip
        assert banned not in mods, f"import tsnet2 pulled in {banned}"
    assert "tsnet2.client" in mods and "tsnet2.proto" in mods
