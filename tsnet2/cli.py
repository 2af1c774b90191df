"""`tsnet2`: the command line (control server, demo, and queries against a daemon socket)."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import errno
import hashlib
import ipaddress
import json
import os
import ssl
import sys
import time
from collections.abc import Iterator
from typing import Any

import tsnet2
from tsnet2 import proto
from tsnet2._entry import check_extra, extra_for, missing_extra
from tsnet2._version import __version__
from tsnet2.proto import tailscale

CONNECT_TIMEOUT = 1.0
"""Seconds a query keeps retrying to connect to a socket that is missing or refusing (a
daemon that is starting); after that the command fails instead of hanging."""


class CommandError(Exception):
    """A failure to report as ``tsnet2 <command>: <message>`` with exit status 1."""


def _socket_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--socket", default=os.environ.get("TSNET2_SOCKET"), metavar="PATH",
                   help="tsnet2d socket (default $TSNET2_SOCKET)")


def _json_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--json", action="store_true", help=what)


def _socket_path(args: argparse.Namespace) -> str:
    if not args.socket:
        args.parser.error("no daemon socket: pass --socket PATH or set TSNET2_SOCKET")
    return str(args.socket)


def _local_client(args: argparse.Namespace) -> tsnet2.LocalClient:
    """A LocalAPI client: it only reads (no control channel, no ``start``, no ``close``)."""
    return tsnet2.LocalClient(_socket_path(args), connect_timeout=CONNECT_TIMEOUT)


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2))


def _status(args: argparse.Namespace) -> int:
    st = _local_client(args).status()
    if args.json:
        _print_json(st)
        return 0
    self_ = st.get("Self") or {}
    print(f"{', '.join(st.get('TailscaleIPs') or []):<40} {self_.get('DNSName', '')}  "
          f"{st.get('BackendState', '')}")
    log_key = tailscale.traffic_log_key(self_.get("CapMap"))
    if log_key:
        print(f"  traffic-log key: {log_key}")
    for peer in (st.get("Peer") or {}).values():
        state = "online" if peer.get("Online") else "offline"
        print(f"{', '.join(peer.get('TailscaleIPs') or []):<40} {peer.get('DNSName', '')}  "
              f"{state}")
    return 0


def _split_whois_target(target: str) -> tuple[str, int | None]:
    """An IP (IPv6 bare or bracketed), ``IP:PORT``, a name or ``NAME:PORT`` -> (host, port).

    Raises ValueError (an AddressError) for a malformed ``host:port``.
    """
    if _is_ip(target.strip("[]")) or ":" not in target:
        return target.strip("[]"), None
    return proto.split_host_port(target)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def resolve_name(status: dict[str, Any], name: str) -> str:
    """The tailnet IP (IPv4 first) of the node called ``name`` in a LocalAPI ``status``.

    ``name`` matches a node's ``HostName`` (its short tailnet name) or its ``DNSName`` (the
    FQDN, with or without the trailing dot), case-insensitively, among ``Self`` and
    ``Peer`` -- the names ``Server.dial`` accepts. Raises CommandError when no node, or
    more than one, has that name.
    """
    want = name.rstrip(".").lower()
    nodes = [status.get("Self") or {}, *(status.get("Peer") or {}).values()]
    found = [node for node in nodes if want and node.get("TailscaleIPs") and want in {
        str(node.get("HostName") or "").lower(),
        str(node.get("DNSName") or "").rstrip(".").lower(),
    }]
    if not found:
        raise CommandError(f"no tailnet node named {name!r} (tsnet2 status lists them)")
    if len(found) > 1:
        fqdns = ", ".join(sorted(str(n.get("DNSName", "")) for n in found))
        raise CommandError(f"{name!r} names {len(found)} nodes ({fqdns}); use an address")
    return str(found[0]["TailscaleIPs"][0])


def _whois(args: argparse.Namespace) -> int:
    try:
        host, port = _split_whois_target(args.target)
    except ValueError as exc:
        args.parser.error(str(exc))
    if not host:
        args.parser.error(f"expected a tailnet name or address, got {args.target!r}")
    client = _local_client(args)
    if _is_ip(host):
        addr = args.target
    else:
        ip = resolve_name(client.status(), host)
        addr = proto.format_addr(ip, port) if port is not None else ip
    try:
        who = client.whois(addr)
    except tsnet2.LocalAPIError as exc:
        if exc.status == 404:
            raise CommandError(f"no tailnet node has address {addr}") from None
        raise
    if args.json:
        _print_json(who)
        return 0
    node, user = who.get("Node") or {}, who.get("UserProfile") or {}
    print(f"Machine: {node.get('Name', '')}  ({node.get('StableID', '')})")
    print(f"  Addresses: {', '.join(node.get('Addresses') or [])}")
    if node.get("Tags"):
        print(f"  Tags: {', '.join(node['Tags'])}")
    log_key = tailscale.traffic_log_key(node.get("CapMap"))
    if log_key:
        print(f"  traffic-log key: {log_key}")
    print(f"User: {user.get('LoginName', '')}  ({user.get('DisplayName', '')})")
    return 0


def _ping(args: argparse.Namespace) -> int:
    try:
        proto.split_host_port(args.target)
    except ValueError as exc:
        args.parser.error(f"expected HOST:PORT, got {args.target!r}: {exc}")
    # A node that is not started is one error, not a failed dial per attempt.
    _local_client(args).get("status?peers=false")
    failures = 0
    times: list[float] = []
    # join=False: attach to the node the daemon already runs; never send `start` or `close`.
    with tsnet2.Server(socket_path=_socket_path(args), join=False,
                       connect_timeout=CONNECT_TIMEOUT, reconnect_timeout=0) as srv:
        for seq in range(1, args.count + 1):
            result: dict[str, Any] = {"seq": seq, "target": args.target}
            t0 = time.perf_counter()
            try:
                conn = srv.dial("tcp", args.target, timeout=args.timeout)
            except (tsnet2.DialError, tsnet2.DeadlineExceededError) as exc:
                failures += 1
                result.update(ok=False, error=_message(exc))
            else:
                ms = (time.perf_counter() - t0) * 1000
                times.append(ms)
                remote = conn.tailnet_remote
                conn.close()
                result.update(ok=True, ms=round(ms, 3),
                              remote=proto.format_addr(*remote) if remote else None)
            if args.json:
                print(json.dumps(result), flush=True)
            elif result["ok"]:
                via = f" ({result['remote']})" if result["remote"] else ""
                print(f"connected to {args.target}{via} in {result['ms']:.2f} ms", flush=True)
            else:
                print(f"dial {args.target}: {result['error']}", flush=True)
            if seq < args.count:
                time.sleep(args.interval)
    if not args.json:
        line = f"{args.count} dials, {len(times)} connected, {failures} failed"
        if times:
            line += (f"; min/avg/max {min(times):.2f}/{sum(times) / len(times):.2f}/"
                     f"{max(times):.2f} ms")
        print(line)
    return 1 if failures else 0


def describe_cert(pem: bytes, now: float | None = None) -> dict[str, Any]:
    """What the first certificate of ``pem`` says: names, subject, issuer, serial (hex),
    not_before/not_after (RFC 3339), seconds_left, sha256_fingerprint. Uses cryptography when
    installed (``tsnet2[sidecar]``), else the standard library's certificate decoder."""
    text = pem.decode("ascii", "replace")
    begin, end = "-----BEGIN CERTIFICATE-----", "-----END CERTIFICATE-----"
    if begin not in text or end not in text:
        raise CommandError("the daemon sent no PEM certificate")
    first = text[text.index(begin):text.index(end) + len(end)] + "\n"
    der = ssl.PEM_cert_to_DER_cert(first)
    digest = hashlib.sha256(der).hexdigest().upper()
    info: dict[str, Any]
    try:
        from cryptography import x509
    except ImportError:
        info = _describe_with_ssl(first)
    else:
        cert = x509.load_der_x509_certificate(der)
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            names = list(san.get_values_for_type(x509.DNSName))
        except x509.ExtensionNotFound:
            names = []
        info = {"names": names, "subject": cert.subject.rfc4514_string(),
                "issuer": cert.issuer.rfc4514_string(),
                "serial": format(cert.serial_number, "x"),
                "not_before": cert.not_valid_before_utc.timestamp(),
                "not_after": cert.not_valid_after_utc.timestamp()}
    left = info["not_after"] - (time.time() if now is None else now)
    for field in ("not_before", "not_after"):
        info[field] = datetime.datetime.fromtimestamp(info[field], datetime.UTC).isoformat(
            timespec="seconds").replace("+00:00", "Z")
    info["seconds_left"] = round(left)
    info["sha256_fingerprint"] = ":".join(digest[i:i + 2] for i in range(0, len(digest), 2))
    return info


def _describe_with_ssl(pem: str) -> dict[str, Any]:
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".pem") as f:
        f.write(pem)
        f.flush()
        decoded = ssl._ssl._test_decode_cert(f.name)  # type: ignore[attr-defined]

    def name(rdns: Any) -> str:
        short = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU",
                 "countryName": "C", "localityName": "L", "stateOrProvinceName": "ST"}
        return ",".join(f"{short.get(k, k)}={v}" for rdn in reversed(rdns) for k, v in rdn)

    return {"names": [v for k, v in decoded.get("subjectAltName", ()) if k == "DNS"],
            "subject": name(decoded.get("subject", ())), "issuer": name(decoded.get("issuer", ())),
            "serial": str(decoded.get("serialNumber", "")).lstrip("0").lower() or "0",
            "not_before": ssl.cert_time_to_seconds(decoded["notBefore"]),
            "not_after": ssl.cert_time_to_seconds(decoded["notAfter"])}


def _duration(seconds: float) -> str:
    if seconds <= 0:
        return "expired"
    days, rest = divmod(int(seconds), 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m {secs}s" if minutes else f"{secs}s"


def _cert(args: argparse.Namespace) -> int:
    client = _local_client(args)
    if args.ca:
        sys.stdout.write(_cert_call(client.tailnet_ca_pem).decode())
        return 0
    domains = client.status().get("CertDomains") or []
    if not domains:
        raise CommandError("the node has no cert domains (is it running? tsnet2 status)")
    chain = _cert_call(lambda: client.cert_pem(str(domains[0])))
    if args.pem:
        sys.stdout.write(chain.decode())
        return 0
    info = describe_cert(chain)
    if args.json:
        _print_json({"domain": domains[0], **info})
        return 0
    print(f"Names:       {', '.join(info['names'])}")
    print(f"Subject:     {info['subject']}")
    print(f"Issuer:      {info['issuer']}")
    print(f"Serial:      {info['serial']}")
    print(f"Not before:  {info['not_before']}")
    print(f"Not after:   {info['not_after']}")
    print(f"Time left:   {_duration(info['seconds_left'])}")
    print(f"SHA-256:     {info['sha256_fingerprint']}")
    return 0


def _cert_call(call: Any) -> bytes:
    """Run a LocalAPI certificate call; a 503 (no certificate yet) says why."""
    try:
        return bytes(call())
    except tsnet2.LocalAPIError as exc:
        if exc.status in (404, 503):
            try:
                detail = json.loads(exc.body).get("error") or exc.body
            except (ValueError, AttributeError):
                detail = exc.body
            if detail:
                raise CommandError(str(detail)) from None
        raise


def _log_key(value: str) -> str:
    from tsnet2.traffic.chain import decode_key

    try:
        decode_key(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def _log_verify(args: argparse.Namespace) -> int:
    from tsnet2.traffic.verify import Lines, ordered, verify

    paths = ordered(args.files) if args.files else ["-"]
    src = Lines(paths, sys.stdin.buffer)
    try:
        rep = verify(src, keys=args.key or ())
    except OSError as exc:
        print(f"tsnet2 log verify: {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 1
    opts = {"allow_open": args.allow_open, "allow_unsigned_tail": args.allow_unsigned_tail,
            "require_start": args.from_start}
    failing = {id(p) for p in rep.failures(**opts)}
    ok = rep.ok(args.allow_open, allow_unsigned_tail=args.allow_unsigned_tail,
                require_start=args.from_start)
    if args.json:
        doc = rep.as_json()
        for p, out in zip(rep.problems, doc["problems"], strict=True):
            out["fails"] = id(p) in failing
            out["at"] = src.where(p.line)
        for p, out in zip(rep.notes, doc["notes"], strict=True):
            out["at"] = src.where(p.line)
        _print_json({"ok": ok, "files": paths, "options": opts, **doc})
        return 0 if ok else 1

    def ranges(rs: list[list[int]]) -> str:
        text = ", ".join(f"{a}..{b}" if a != b else f"{a}" for a, b in rs[:8])
        return text + (f", ... ({len(rs) - 8} more)" if len(rs) > 8 else "")

    def summary() -> Iterator[str]:
        yield (f"{rep.records} records ({rep.foreign_lines} other lines skipped) in "
               f"{', '.join(paths)}")
        if rep.unchained_records and not rep.chained_records:
            yield "no hash chain in these records (an older tsnet2 wrote them): flows only"
        for node in rep.nodes:
            pinned = "pinned" if node["pinned"] else "not pinned" if node["keys"] else "none"
            names = f" ({', '.join(node['names'])})" if node["names"] else ""
            crashes = sum(1 for r in node["restarts"] if not r["clean"])
            yield (f"node {node['node']}{names}: key {', '.join(node['keys']) or '?'} "
                   f"[{pinned}]; log_seq {node['first_seq']}..{node['last_seq']}, "
                   f"{node['records']} records, {node['checkpoints']} valid checkpoints, "
                   f"{len(node['restarts'])} restart(s) ({crashes} after a crash)")
            yield f"  verified (signed): {ranges(node['verified']) or 'nothing'}"
            for what, rs in (("unverified (chain broken)", node["unverified"]),
                             ("crash tails (unsigned)", node["crash_tails"]),
                             ("missing", node["missing"])):
                if rs:
                    yield f"  {what}: {ranges(rs)}"
            if node["unsigned_tail"]:
                yield f"  unsigned tail: {ranges([node['unsigned_tail']])}"
            yield "  ends with a close checkpoint" if node["closed"] else \
                "  no close checkpoint at the end (a live or cut log)"
        yield (f"flows: {rep.flows} opened, {rep.closed} closed ({rep.restart_closes} by a "
               f"daemon restart), {len(rep.open_flows)} open; {rep.rejects} refused")
        if rep.gap_records_lost:
            yield (f"the daemon reported {rep.gap_records_lost} records it could not write "
                   "(gap)")
        if rep.close_without_open or rep.without_open:
            yield (f"{len(rep.close_without_open) + len(rep.without_open)} flows whose open "
                   "is not in these files (an older rotated file?)")
        for cid in rep.open_flows[:20]:
            yield f"open: flow {cid} has no close" + (" (allowed)" if args.allow_open else "")
        if len(rep.open_flows) > 20:
            yield f"... and {len(rep.open_flows) - 20} more open flows"
        several = len(rep.nodes) > 1
        for what, found, limit in (("problem", rep.problems, 50), ("note", rep.notes, 10)):
            for p in found[:limit]:
                who = f"node {p.node} " if several and p.node is not None else ""
                at = src.where(p.line)
                allowed = "" if what == "note" or id(p) in failing else " (allowed)"
                yield f"{what}: {who}{p}{allowed}" + (f" [{at}]" if at else "")
            more = len(found) - limit + (rep.problems_omitted if what == "problem" else 0)
            if more > 0:
                yield f"... and {more} more {what}s (--json lists them)"

    for text in summary():
        print(text)
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


def _demo(args: argparse.Namespace) -> int:
    missing = check_extra("daemon", "tsnet2 demo")  # it runs tsnet2d and the control server
    if missing is not None:
        return missing
    from tsnet2.lab.demo import run_demo

    return run_demo(verbose=args.verbose)


def _add_control(sub: Any) -> None:
    """``tsnet2 control ...``; with the daemon extra missing, a stub that says so."""
    try:
        from tsnet2.control.cli import add_subcommands
    except ModuleNotFoundError as exc:
        if extra_for(exc) is None:
            raise
        error = exc
        c = sub.add_parser("control", help="coordination server (needs tsnet2[daemon])",
                           add_help=False)
        c.add_argument("rest", nargs=argparse.REMAINDER)
        c.set_defaults(func=lambda _args: missing_extra(error, "tsnet2 control"))
    else:
        add_subcommands(sub)


def _count(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {value!r}")
    return n


def _seconds(value: str, *, allow_zero: bool = False) -> float:
    try:
        x = float(value)
    except ValueError:
        x = -1.0
    if not (x > 0 or (allow_zero and x == 0)) or x == float("inf"):
        kind = "a number of seconds, 0 or more" if allow_zero else "a positive number of seconds"
        raise argparse.ArgumentTypeError(f"expected {kind}, got {value!r}")
    return x


def _interval(value: str) -> float:
    return _seconds(value, allow_zero=True)


def build_parser() -> argparse.ArgumentParser:
    """The `tsnet2` argument parser."""
    p = argparse.ArgumentParser(
        prog="tsnet2", description="tsnet2 command line: the coordination server, a local "
        "demo, and read-only queries against a running tsnet2d.",
        epilog="Exit status: 0 ok, 1 error (printed as 'tsnet2 COMMAND: message'), 2 usage.")
    p.add_argument("--version", action="version", version=f"tsnet2 {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _add_control(sub)

    d = sub.add_parser("demo", help="run a local tailnet in network namespaces (needs root)",
                       description="Start a control server and two tsnet2d daemons in network "
                       "namespaces, echo through the library, print WhoIs, traffic log "
                       "lines and a summary, then remove everything.")
    d.add_argument("-v", "--verbose", action="store_true", help="show the daemons' logs")
    d.set_defaults(func=_demo)

    lg = sub.add_parser("log", help="check traffic logs",
                        description="Offline checks of tsnet2 traffic logs (no daemon needed).")
    lsub = lg.add_subparsers(dest="log_command", required=True, metavar="SUBCOMMAND")
    v = lsub.add_parser(
        "verify", help="check a traffic log's hash chain, signatures and flows",
        description="Read traffic-log records from FILEs (a rotated set is read oldest first: "
        "traffic.jsonl.2, traffic.jsonl.1, traffic.jsonl) or standard input (-, or no FILE). "
        "Text around the records is allowed (a collector's prefixes), and container log "
        "formats are undone: kubelet/CRI lines (stderr ignored, partial P lines joined) and "
        "JSON lines whose log or message field holds the record (Docker json-file, Fluent "
        "Bit, Vector). Checks, per node: the hash chain record by record (log_seq and "
        "log_hash; a reordered, re-serialized or rotated log is fine), the Ed25519 "
        "signature of every checkpoint, and which log_seq ranges a valid checkpoint signs "
        "(verified); it reports missing log_seq numbers (and the gap record that declares "
        "them), altered records (a hash that does not link, a checkpoint whose signed head "
        "does not match, a bad signature), duplicates, reordered records, the unsigned tail "
        "after the last checkpoint, the crash tail of a run that died, and a log that does "
        "not end with a close checkpoint. And every flow: one open and one close, data "
        "records numbered without holes, nothing after the close, close totals not above "
        "the logged bytes. Problems are listed by log_seq. Exit status 0 when the log "
        "passes, 1 when a problem was found (or a flow is still open, or the log has no "
        "close checkpoint or an unsigned tail, unless --allow-open).")
    v.add_argument("files", nargs="*", metavar="FILE", help="traffic-log files; - for stdin")
    v.add_argument("--key", action="append", type=_log_key, metavar="BASE64",
                   help="the node's checkpoint public key (base64, ed25519: prefix allowed; "
                   "repeatable, e.g. old and new key): checkpoints signed by another key do "
                   "not count. Without it the keys seen are reported as not pinned")
    v.add_argument("--allow-open", action="store_true",
                   help="a live log: flows without a close, an unsigned tail and no close "
                   "checkpoint at the end are not a failure")
    v.add_argument("--allow-unsigned-tail", action="store_true",
                   help="records after the last checkpoint are not a failure")
    v.add_argument("--from-start", action="store_true",
                   help="the input must begin at log_seq 1 (not after rotated-away files)")
    _json_arg(v, "print the whole report as one JSON object")
    v.set_defaults(func=_log_verify)

    queries = ("Read-only: it talks to the daemon's LocalAPI and never starts, stops or "
               "changes the node.")
    s = sub.add_parser("status", help="show the node and its peers",
                       description="Show this node's tailnet addresses, name and state, and "
                       f"each peer's. {queries}")
    _socket_arg(s)
    _json_arg(s, "print the LocalAPI status JSON (Tailscale's ipnstate.Status)")
    s.set_defaults(func=_status, parser=s)

    w = sub.add_parser("whois", help="show the node and user behind a tailnet address or name",
                       description="Show the node and user behind a tailnet address, or behind "
                       "a node name: the short name or FQDN is looked up in the LocalAPI "
                       "status (this node and its peers), then its address (IPv4 first) is "
                       f"asked. {queries}")
    _socket_arg(w)
    w.add_argument("target", metavar="TARGET",
                   help="tailnet IP, IP:PORT, [IPV6]:PORT, node name or FQDN (NAME:PORT too)")
    _json_arg(w, "print the LocalAPI WhoIs JSON (Tailscale's apitype.WhoIsResponse)")
    w.set_defaults(func=_whois, parser=w)

    g = sub.add_parser("ping", help="time TCP connects to a peer through the daemon",
                       description="Dial HOST:PORT through tsnet2d COUNT times and print how "
                       "long each connect took (the flows appear in the traffic log). It "
                       "attaches to the node the daemon already runs and never starts or "
                       "stops it. Exit status 1 if any dial failed.")
    _socket_arg(g)
    g.add_argument("target", metavar="HOST:PORT", help="peer name, FQDN or tailnet IP, and port")
    g.add_argument("-c", "--count", type=_count, default=4, help="dials to make (default 4)")
    g.add_argument("-i", "--interval", type=_interval, default=0.5, metavar="SECONDS",
                   help="pause between dials (default 0.5)")
    g.add_argument("--timeout", type=_seconds, default=5.0, metavar="SECONDS",
                   help="limit per dial (default 5)")
    _json_arg(g, "print one JSON object per dial: seq, target, ok, then ms and remote, "
              "or error")
    g.set_defaults(func=_ping, parser=g)

    c = sub.add_parser("cert", help="show the node's TLS certificate",
                       description="Show the node's TLS certificate (for its FQDN, issued by "
                       "the tailnet CA and renewed by tsnet2d): subject names, issuer, "
                       "serial, validity, time left and SHA-256 fingerprint. The private key "
                       f"never leaves tsnet2d. {queries}")
    _socket_arg(c)
    what = c.add_mutually_exclusive_group()
    what.add_argument("--pem", action="store_true",
                      help="print the certificate chain (PEM: the node's, then the CA's)")
    what.add_argument("--ca", action="store_true",
                      help="print the tailnet CA certificate (PEM), what verifiers trust; "
                      "tsnet2d also writes it as tailnet-ca.pem next to its socket")
    what.add_argument("--json", action="store_true",
                      help="print one JSON object: domain, names, subject, issuer, serial, "
                      "not_before, not_after, seconds_left, sha256_fingerprint")
    c.set_defaults(func=_cert, parser=c)
    return p


def _message(exc: BaseException, socket_path: str | None = None) -> str:
    """A one-line description of ``exc`` for the user, without the library's op prefix."""
    if isinstance(exc, CommandError):
        return str(exc)
    cause = exc.__cause__
    if isinstance(exc, tsnet2.DaemonUnavailableError) and isinstance(cause, OSError):
        return _os_message(cause, socket_path) or _strip_op(str(exc))
    if isinstance(exc, tsnet2.ProtocolError) and "closed" in str(exc):
        return (f"{_strip_op(str(exc))} (tsnet2d closes connections from uids it does not "
                "allow: see its --allow-uid)")
    if isinstance(exc, tsnet2.LocalAPIError):
        if exc.status == 503:
            return ("the node is not started (tsnet2d waits for an app to start it, or runs "
                    "with --up)")
        try:
            detail = json.loads(exc.body).get("error") or exc.body
        except (ValueError, AttributeError):
            detail = exc.body
        return f"{detail} (LocalAPI status {exc.status})"
    if isinstance(exc, tsnet2.Error):  # before OSError: DialError is a ConnectionError
        return _strip_op(str(exc))
    if isinstance(exc, OSError):
        return _os_message(exc, exc.filename or socket_path) or str(exc)
    return f"internal error: {type(exc).__name__}: {exc}"


def _os_message(exc: OSError, path: str | None) -> str | None:
    at = f" at {path}" if path else ""
    if exc.errno == errno.ENOENT:
        return f"no tsnet2d socket{at} (is the daemon running? see --socket / TSNET2_SOCKET)"
    if exc.errno == errno.ECONNREFUSED:
        return f"tsnet2d is not running (the socket{at} refuses connections)"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return (f"permission denied on the tsnet2d socket{at} (tsnet2d's --socket-mode, "
                "--socket-group and --allow-uid decide who may connect)")
    if exc.errno is not None:
        return f"cannot connect to tsnet2d{at}: {os.strerror(exc.errno)}"
    return None


def _strip_op(text: str) -> str:
    """Drop a leading ``tsnet2.Op.name: `` from a library message."""
    head, sep, rest = text.partition(": ")
    if sep and head.startswith("tsnet2.") and " " not in head:
        return rest
    return text


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `tsnet2` command: 0 ok, 1 error, 2 usage (argparse)."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # stdout was closed early (`tsnet2 status | head -1`): not an error worth a message.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as exc:
        message = _message(exc, getattr(args, "socket", None))
        print(f"tsnet2 {args.command}: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
