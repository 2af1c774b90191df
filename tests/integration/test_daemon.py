"""tsnet2d as a real process, without a tailnet: CLI (S2), wire format (S7), bad input.

These need no network namespace: a daemon whose node is not started still serves its socket.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tsnet2 import proto

from .plain_daemon import DAEMON, Daemon, _readline, assert_serving, closed_by_daemon, rpc
from .tailnet import wait_for

# ---- S2: CLI --------------------------------------------------------------------------


@pytest.mark.parametrize("missing", ["--socket", "--state-dir"])
def test_missing_required_flag_exits_2(tmp_path: Path, missing: str) -> None:
    args = {"--socket": str(tmp_path / "s.sock"), "--state-dir": str(tmp_path / "st")}
    del args[missing]
    argv = [x for kv in args.items() for x in kv]
    out = subprocess.run([*DAEMON, *argv], capture_output=True, timeout=30)
    assert out.returncode == 2
    assert f"tsnet2d: {missing} is required" in out.stderr.decode()


def test_ready_line_socket_and_log_modes(daemon: Daemon) -> None:
    assert f"tsnet2d: pid={daemon.proc.pid} listening on {daemon.sock}" in daemon.text()
    assert stat.S_IMODE(daemon.sock.stat().st_mode) == 0o660
    assert stat.S_ISSOCK(daemon.sock.stat().st_mode)
    assert stat.S_IMODE(daemon.sock.parent.stat().st_mode) == 0o750
    assert stat.S_IMODE(daemon.state.stat().st_mode) == 0o700
    log = daemon.state / "traffic.jsonl"
    assert log.exists() and stat.S_IMODE(log.stat().st_mode) == 0o600


def test_graceful_stop_removes_socket(tmp_path: Path) -> None:
    d = Daemon(tmp_path)
    assert d.stop() == 0
    assert not d.sock.exists()


def test_second_daemon_on_same_state_dir_refused(daemon: Daemon, tmp_path: Path) -> None:
    out = subprocess.run(
        [*DAEMON, "--socket", str(tmp_path / "other.sock"), "--state-dir", str(daemon.state)],
        capture_output=True, timeout=30,
    )
    assert out.returncode == 1
    assert b"another tsnet2d is running" in out.stderr
    assert_serving(daemon)


def test_stale_socket_is_replaced_but_a_file_is_not(tmp_path: Path) -> None:
    stale = tmp_path / "run" / "tsnet2.sock"
    stale.parent.mkdir(mode=0o750)
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale))
    s.close()  # a socket file nobody listens on: left by a crashed daemon
    d = Daemon(tmp_path)
    assert_serving(d)
    assert d.stop() == 0
    stale.write_text("not a socket")
    out = subprocess.run([*DAEMON, "--socket", str(stale), "--state-dir", str(tmp_path / "s2")],
                         capture_output=True, timeout=30)
    assert out.returncode == 1 and b"is not a socket" in out.stderr
    assert stale.read_text() == "not a socket"


# ---- S7: wire format ------------------------------------------------------------------


def test_control_frames_use_base64(daemon: Daemon) -> None:
    with daemon.connect(proto.ChannelKind.CONTROL) as s:
        reply = rpc(s, b'{"id":1,"method":"cert_domains"}\n')[0]
        frame = json.loads(reply)
        assert frame["id"] == 1
        assert json.loads(base64.b64decode(frame["result"])) == {"domains": None}
        # Nested JSON params are accepted too (the prototype's documented, unused form).
        nested = b'{"id":2,"method":"unregister_listener","params":{"listener_id":"x"}}\n'
        assert rpc(s, nested)[0] == b'{"id":2,"result":"e30="}\n'
        b64 = base64.b64encode(b'{"listener_id":"x"}').decode()
        line = f'{{"id":3,"method":"unregister_listener","params":"{b64}"}}\n'.encode()
        assert rpc(s, line)[0] == b'{"id":3,"result":"e30="}\n'


def test_localapi_before_start_is_503(daemon: Daemon) -> None:
    with daemon.connect(proto.ChannelKind.LOCALAPI) as s:
        s.sendall(b"GET /localapi/v0/status HTTP/1.1\r\nHost: local-tailscaled.sock\r\n\r\n")
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    assert data.startswith(b"HTTP/1.1 503 ")
    assert b"Connection: close" in data or b"connection: close" in data.lower()


def test_dial_before_start_answers_ok_false(daemon: Daemon) -> None:
    with daemon.connect(proto.ChannelKind.DIAL) as s:
        s.sendall(proto.encode_dial_request("tcp", "100.64.0.1:80"))
        line = _readline(s)
    # The prototype's text, plus our additive code.
    assert line == (b'{"ok":false,"err":"daemon: backend not started; call Start first",'
                    b'"code":"not_started"}\n')


# ---- bad input: each answered or closed cleanly, logged, and the daemon keeps serving ---


def test_unknown_channel_byte(daemon: Daemon) -> None:
    with daemon.connect() as s:
        s.sendall(b"\x09hello")
        assert closed_by_daemon(s)
    wait_for(lambda: "unknown channel byte 0x09" in daemon.text(), 5, "log line")
    assert_serving(daemon)


def test_control_line_over_cap(daemon: Daemon) -> None:
    with daemon.connect(proto.ChannelKind.CONTROL) as s:
        chunk = b"x" * 65536
        try:
            for _ in range(proto.MAX_CONTROL_LINE // len(chunk) + 2):
                s.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed by the daemon mid-send: that is the expected outcome
        assert closed_by_daemon(s)
    wait_for(lambda: "line" in daemon.text() and "closing connection" in daemon.text(), 5,
             "log line about the long line")
    assert_serving(daemon)


def test_malformed_json_and_unknown_method(daemon: Daemon) -> None:
    with daemon.connect(proto.ChannelKind.CONTROL) as s:
        s.sendall(b"{this is not json}\n")
        reply = rpc(s, b'{"id":5,"method":"frobnicate"}\n')[0]
        assert json.loads(reply) == {"id": 5, "error": 'daemon: unknown method "frobnicate"',
                                     "code": "bad_request"}
        # The same connection still works after both.
        assert rpc(s, b'{"id":6,"method":"tailscale_ips"}\n')[0] == b'{"id":6,"result":"e30="}\n'
    wait_for(lambda: "invalid JSON" in daemon.text(), 5, "log line about bad JSON")
    assert_serving(daemon)


# A frame whose id can be read but whose body cannot be used gets an error reply with that
# id: a client never waits forever for an answer to a malformed request.
BAD_FRAMES = {
    "method not a string": b'{"id":7,"method":42}',
    "params bad base64": b'{"id":7,"method":"start","params":"!!!notbase64"}',
    "params unpadded base64": b'{"id":7,"method":"start","params":"e30"}',
    "params url-safe base64": b'{"id":7,"method":"start","params":"eyJhIjoiPz8_In0="}',
    "params an array": b'{"id":7,"method":"start","params":[1,2]}',
    "params not utf-8": b'{"id":7,"method":"start","params":"/w=="}',
    "params a number": b'{"id":7,"method":"register_listener","params":12}',
    "whole frame not utf-8": b'{"id":7,"method":"st\xffart"}',
    "a reply sent as a request": b'{"id":7,"result":"e30="}',
}


@pytest.mark.parametrize("frame", BAD_FRAMES.values(), ids=BAD_FRAMES.keys())
def test_malformed_frame_with_an_id_gets_an_error_reply(daemon: Daemon, frame: bytes) -> None:
    with daemon.connect(proto.ChannelKind.CONTROL) as s:
        reply = json.loads(rpc(s, frame + b"\n")[0])
        assert reply["id"] == 7 and reply["code"] == "bad_request", reply
        assert reply["error"].startswith("daemon: bad request: "), reply
        assert rpc(s, b'{"id":8,"method":"tailscale_ips"}\n')[0] == b'{"id":8,"result":"e30="}\n'


# Well-formed frames whose params do not fit the method (tsnet2.proto.methods decodes them):
# the daemon's answers, byte for byte. A method that takes no params ignores any it is sent.
BAD_PARAMS = {
    "listener network not a string": (
        b'{"id":9,"method":"register_listener","params":{"network":5,"addr":":80"}}',
        b'{"id":9,"error":"daemon: parameter \'network\' must be a string",'
        b'"code":"bad_request"}',
    ),
    "listener addr not a string": (
        b'{"id":9,"method":"register_listener","params":{"network":"tcp","addr":80}}',
        b'{"id":9,"error":"daemon: parameter \'addr\' must be a string","code":"bad_request"}',
    ),
    "listener id not a string": (
        b'{"id":10,"method":"unregister_listener","params":{"listener_id":[]}}',
        b'{"id":10,"error":"daemon: parameter \'listener_id\' must be a string",'
        b'"code":"bad_request"}',
    ),
    "hostname not a string": (
        b'{"id":11,"method":"start","params":{"hostname":1}}',
        b'{"id":11,"error":"daemon: parameter \'hostname\' must be a string",'
        b'"code":"bad_request"}',
    ),
    "tags a string": (
        b'{"id":12,"method":"start","params":{"advertise_tags":"tag:a"}}',
        b'{"id":12,"error":"daemon: advertise_tags must be a list of strings",'
        b'"code":"bad_request"}',
    ),
    "tags checked before control_url": (
        b'{"id":13,"method":"start","params":{"control_url":7,"advertise_tags":[1]}}',
        b'{"id":13,"error":"daemon: advertise_tags must be a list of strings",'
        b'"code":"bad_request"}',
    ),
    "auth key not a string": (
        b'{"id":14,"method":"start","params":{"auth_key":{}}}',
        b'{"id":14,"error":"daemon: parameter \'auth_key\' must be a string",'
        b'"code":"bad_request"}',
    ),
    "a prototype name the daemon does not answer": (
        b'{"id":15,"method":"register_fallback_tcp","params":{"network":"tcp"}}',
        b'{"id":15,"error":"daemon: unknown method \\"register_fallback_tcp\\"",'
        b'"code":"bad_request"}',
    ),
    # Refused since start's params are decoded by the method table (Go's json refuses them
    # too); before, any JSON value counted by its truthiness.
    "ephemeral not a boolean": (
        b'{"id":17,"method":"start","params":{"ephemeral":"false"}}',
        b'{"id":17,"error":"daemon: parameter \'ephemeral\' must be a boolean",'
        b'"code":"bad_request"}',
    ),
    "params of a method that takes none are ignored": (
        b'{"id":16,"method":"tailscale_ips","params":{"v4":1}}',
        b'{"id":16,"result":"e30="}',
    ),
}


@pytest.mark.parametrize(("frame", "reply"), BAD_PARAMS.values(), ids=BAD_PARAMS.keys())
def test_bad_params_get_the_daemons_answer(daemon: Daemon, frame: bytes, reply: bytes) -> None:
    with daemon.connect(proto.ChannelKind.CONTROL) as s:
        assert rpc(s, frame + b"\n")[0] == reply + b"\n"
        assert rpc(s, b'{"id":8,"method":"tailscale_ips"}\n')[0] == b'{"id":8,"result":"e30="}\n'


def test_dial_header_over_cap_and_garbage(daemon: Daemon) -> None:
    with daemon.connect(proto.ChannelKind.DIAL) as s:
        s.sendall(b"{" + b"a" * (proto.MAX_HEADER_LINE + 10))
        assert closed_by_daemon(s)
    with daemon.connect(proto.ChannelKind.DIAL) as s:
        s.sendall(b'{"op":"explode"}\n')
        assert closed_by_daemon(s)
    wait_for(lambda: "explode" in daemon.text(), 5, "log line about the bad op")
    assert_serving(daemon)


def test_dial_header_that_never_ends(daemon: Daemon) -> None:
    t0 = time.monotonic()
    with daemon.connect(proto.ChannelKind.DIAL) as s:
        s.sendall(b'{"op":"dial"')  # and then nothing, ever
        assert closed_by_daemon(s)  # the daemon gives up after its header timeout
    assert time.monotonic() - t0 < 14
    wait_for(lambda: "header not received in time" in daemon.text(), 5, "log line")
    assert_serving(daemon)


def test_connection_from_other_uid_refused(open_daemon: Daemon) -> None:
    daemon = open_daemon
    # Open the path for everyone so only the daemon's own check stands in the way.
    os.chmod(daemon.sock.parent, 0o755)
    os.chmod(daemon.sock, 0o666)
    code = (
        "import os, socket, sys\n"
        "os.setgid(65534); os.setuid(65534)\n"
        "s = socket.socket(socket.AF_UNIX); s.settimeout(10); s.connect(sys.argv[1])\n"
        "s.sendall(b'\\x01{\"id\":1,\"method\":\"tailscale_ips\"}\\n')\n"
        "data = b''\n"
        "while chunk := s.recv(4096):\n    data += chunk\n"
        "print(data.decode())\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(daemon.sock)], capture_output=True,
                         timeout=30)
    assert out.returncode == 0, out.stderr.decode()
    # The daemon says why before it hangs up: an id-0 error frame (the prototype's shim
    # ignores id 0 and sees the close, as before).
    frame = json.loads(out.stdout)
    assert frame["code"] == "permission_denied" and "id" not in frame, frame
    assert "uid 65534 may not use this socket" in frame["error"]
    assert "--allow-uid 65534" in frame["error"]
    wait_for(lambda: "refused CONTROL connection from uid 65534" in daemon.text(), 5,
             "log line")
    assert_serving(daemon)


def test_allow_uid_flag_admits_that_uid(open_dir: Path) -> None:
    d = Daemon(open_dir, "--allow-uid", "65534")
    try:
        os.chmod(d.sock.parent, 0o755)
        os.chmod(d.sock, 0o666)
        code = (
            "import os, socket, sys\n"
            "os.setgid(65534); os.setuid(65534)\n"
            "s = socket.socket(socket.AF_UNIX); s.settimeout(10); s.connect(sys.argv[1])\n"
            "s.sendall(b'\\x01{\"id\":1,\"method\":\"tailscale_ips\"}\\n')\n"
            "print(s.recv(100).decode().strip())\n"
        )
        out = subprocess.run([sys.executable, "-c", code, str(d.sock)], capture_output=True,
                             timeout=30)
        assert out.stdout.decode().strip() == '{"id":1,"result":"e30="}', out.stderr.decode()
    finally:
        assert d.stop() == 0


def test_allow_any_uid_makes_the_socket_world_connectable(open_dir: Path) -> None:
    d = Daemon(open_dir, "--allow-any-uid")
    try:
        assert stat.S_IMODE(d.sock.stat().st_mode) == 0o666
        assert_serving(d)
    finally:
        assert d.stop() == 0
