"""Sans-IO core of the tsnet2 wire protocol (seed-spec §2): no sockets, no asyncio.

The client library, the daemon and the tests all build on these pure functions and
small state machines. Submodules:

- :mod:`.channels`: the channel byte that opens each connection, and line limits;
- :mod:`.lines`: a bounded incremental line reader;
- :mod:`.control`: control frames (base64-of-JSON params/results) and RPC state machines;
- :mod:`.methods`: control methods: names, typed params/results and the table
  (:data:`~.methods.METHODS`) both ends encode and decode them with;
- :mod:`.datapath`: dial and accept header lines;
- :mod:`.addr`: ``host:port`` parsing/formatting; :mod:`.ids`: listener/conn ids;
- :mod:`.gojson`: Go-compatible JSON and time formatting;
- :mod:`.tailscale`: Tailscale LocalAPI JSON (WhoIs, Status, Notify) from our netmap.

See docs/protocol.md for the byte-exact wire format.
"""

from tsnet2.proto.addr import (
    LISTEN_NETWORKS,
    IPAddress,
    ListenAddr,
    format_addr,
    parse_listen_addr,
    split_host_port,
)
from tsnet2.proto.channels import (
    MAX_CONTROL_LINE,
    MAX_HEADER_LINE,
    ChannelKind,
    parse_channel_byte,
)
from tsnet2.proto.codes import ErrorCode, parse_code
from tsnet2.proto.control import (
    ControlClientCore,
    ControlRequest,
    ControlServerCore,
    Response,
    decode_frame,
    encode_request,
    encode_response,
)
from tsnet2.proto.datapath import (
    DIAL_OP,
    AcceptHeader,
    DialReply,
    DialRequest,
    decode_accept_header,
    decode_accept_request,
    decode_dial_reply,
    decode_dial_request,
    encode_accept_header,
    encode_accept_refusal,
    encode_accept_request,
    encode_dial_reply,
    encode_dial_request,
)
from tsnet2.proto.errors import (
    ChannelRefused,
    FrameError,
    LineTooLong,
    LocalProtocolError,
    RemoteProtocolError,
    WireAddressError,
    WireError,
)
from tsnet2.proto.gojson import GO_ZERO_TIME, go_json, go_time, go_time_ns
from tsnet2.proto.ids import ID_RE, new_id
from tsnet2.proto.lines import LineReader
from tsnet2.proto.methods import (
    METHODS,
    CertDomainsResult,
    Empty,
    Method,
    MethodSpec,
    RegisterListenerParams,
    RegisterListenerResult,
    StartParams,
    TailscaleIPsResult,
    UnknownMethodError,
    UnregisterListenerParams,
    UpResult,
    WireDocument,
    decode_params,
    decode_result,
    encode_params,
    encode_result,
    method_spec,
)
from tsnet2.proto.tls import TLSDialOptions, TLSInfo

__all__ = [
    "DIAL_OP",
    "GO_ZERO_TIME",
    "ID_RE",
    "LISTEN_NETWORKS",
    "MAX_CONTROL_LINE",
    "MAX_HEADER_LINE",
    "METHODS",
    "AcceptHeader",
    "CertDomainsResult",
    "ChannelKind",
    "ChannelRefused",
    "ControlClientCore",
    "ControlRequest",
    "ControlServerCore",
    "DialReply",
    "DialRequest",
    "Empty",
    "ErrorCode",
    "FrameError",
    "IPAddress",
    "LineReader",
    "LineTooLong",
    "ListenAddr",
    "LocalProtocolError",
    "Method",
    "MethodSpec",
    "RegisterListenerParams",
    "RegisterListenerResult",
    "RemoteProtocolError",
    "Response",
    "StartParams",
    "TLSDialOptions",
    "TLSInfo",
    "TailscaleIPsResult",
    "UnknownMethodError",
    "UnregisterListenerParams",
    "UpResult",
    "WireAddressError",
    "WireDocument",
    "WireError",
    "decode_accept_header",
    "decode_accept_request",
    "decode_dial_reply",
    "decode_dial_request",
    "decode_frame",
    "decode_params",
    "decode_result",
    "encode_accept_header",
    "encode_accept_refusal",
    "encode_accept_request",
    "encode_dial_reply",
    "encode_dial_request",
    "encode_params",
    "encode_request",
    "encode_response",
    "encode_result",
    "format_addr",
    "go_json",
    "go_time",
    "go_time_ns",
    "method_spec",
    "new_id",
    "parse_channel_byte",
    "parse_code",
    "parse_listen_addr",
    "split_host_port",
]
