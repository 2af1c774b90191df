"""Error codes on the wire (additive), replies to malformed frames, refusal lines: sans-IO."""

from __future__ import annotations

import json

import pytest

from tsnet2 import proto


def test_error_reply_carries_its_code_and_old_readers_keep_the_text() -> None:
    core = proto.ControlServerCore()
    line = core.reply_error(3, "daemon: port 80 is in use", proto.ErrorCode.ADDRESS_IN_USE)
    assert json.loads(line) == {"id": 3, "error": "daemon: port 80 is in use",
                                "code": "address_in_use"}
    resp = proto.decode_frame(line)
    assert isinstance(resp, proto.Response)
    assert resp.code is proto.ErrorCode.ADDRESS_IN_USE and resp.error
    # Without a code the frame is byte-for-byte the prototype's.
    assert core.reply_error(3, "x") == b'{"id":3,"error":"x"}\n'


def test_unknown_code_reads_as_other_and_absent_as_none() -> None:
    resp = proto.decode_frame(b'{"id":1,"error":"x","code":"from_the_future"}')
    assert isinstance(resp, proto.Response) and resp.code is proto.ErrorCode.OTHER
    resp = proto.decode_frame(b'{"id":1,"error":"x"}')
    assert isinstance(resp, proto.Response) and resp.code is None
    assert proto.parse_code(7) is proto.ErrorCode.OTHER


@pytest.mark.parametrize("line, want_id", [
    (b'{"id":7,"method":42}', 7),
    (b'{"id":7,"method":"start","params":"e30"}', 7),  # unpadded base64
    (b'{"id":7,"method":"start","params":[1]}', 7),
    (b'{"id":9,"method":"st\xffart"}', 9),  # not UTF-8: the id is read from the raw bytes
    (b'{"id": 12 , "method":', 12),  # not even JSON
    (b'{"id":7,"result":"e30="}', 7),  # a reply where a request belongs
    (b'{"method":42}', 0),  # no id: nothing to answer
    (b'{"id":-1,"method":42}', 0),
    (b'[1,2,3]', 0),
])
def test_server_core_salvages_the_id_of_a_malformed_frame(line: bytes, want_id: int) -> None:
    core = proto.ControlServerCore()
    items = core.receive_data(line + b"\n" + b'{"id":20,"method":"up"}\n')
    bad, good = items
    assert isinstance(bad, proto.FrameError) and bad.id == want_id
    assert isinstance(good, proto.ControlRequest) and good.id == 20  # parsing goes on


def test_client_core_raises_the_daemons_reason_on_an_id0_error_frame() -> None:
    client = proto.ControlClientCore()
    rid, _ = client.request("tailscale_ips")
    server = proto.ControlServerCore()
    data = server.refuse("daemon: uid 65534 may not use this socket",
                         proto.ErrorCode.PERMISSION_DENIED)
    assert b'"id"' not in data  # id 0 is omitted, as the prototype's shim expects
    with pytest.raises(proto.ChannelRefused) as info:
        client.receive_data(data)
    assert info.value.code == "permission_denied" and "65534" in str(info.value)
    assert rid in client.pending  # the caller fails it
    # id-0 frames that are not errors stay ignored (notifications).
    assert proto.ControlClientCore().receive_data(b'{"result":"e30="}\n') == []


def test_accept_refusal_line_and_dial_reply_code() -> None:
    line = proto.encode_accept_refusal("daemon: the node went away", proto.ErrorCode.NODE_DOWN)
    with pytest.raises(proto.ChannelRefused) as info:
        proto.decode_accept_header(line)
    assert info.value.code == "node_down"
    reply = proto.decode_dial_reply(proto.encode_dial_reply(
        False, err="peer 'db' is offline", code=proto.ErrorCode.PEER_OFFLINE))
    assert not reply.ok and reply.code is proto.ErrorCode.PEER_OFFLINE
    assert proto.encode_dial_reply(True) == b'{"ok":true}\n'  # never a code on success
