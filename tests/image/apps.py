"""The sample apps of the pod test and the end-to-end suite: plain Python with the tsnet2
library, run by ``python3 -c`` in the image. The servers print a ``RESULT {json}`` line the
test reads, then stay up (the test reads logs and metrics, then takes the pods down).

The server answers every connection (one at a time) and prints a ``RESULT`` per
connection; :data:`PING` is a one-shot client for ``exec`` into a running app container.

Neither retries a flow: a cut flow (docs/image.md, fixed known issue #2) fails the test. The
client retries only dials that fail before a connection exists (the server may not be in
its netmap yet) and reports how many tries it took.

:data:`SECURE_SERVER`, :data:`TLS_CLIENT` and :data:`UDP_CLIENT` are the end-to-end suite's
TLS (``listen_tls``; ``ssl`` over a plain ``dial``) and UDP (``listen_packet``; ``dial("udp")``)
apps.
"""

SERVER = r'''
import json, tsnet2
with tsnet2.Server() as srv:
    st = srv.up(timeout=60)
    with srv.listen("tcp", ":8080") as ln:
        print("LISTENING", flush=True)
        while True:  # one connection at a time: read a line, answer "pong: " + it, close
            conn = ln.accept()
            data, who, error = b"", None, None
            with conn:
                conn.settimeout(30)
                try:
                    while not data.endswith(b"\n") and len(data) < 4096:
                        chunk = conn.recv(4096)
                        if not chunk:
                            break
                        data += chunk
                    who = srv.local_client().whois(str(conn.tailnet_remote[0]))
                    conn.sendall(b"pong: " + data)
                except OSError as exc:
                    error = repr(exc)
            print("RESULT " + json.dumps({"got": data.decode(), "whois": who, "error": error,
                                          "remote": str(conn.tailnet_remote[0])}), flush=True)
'''

CLIENT = r'''
import json, os, sys, time, tsnet2
from tsnet2.client.errors import DialError
target = os.environ["SERVER_HOST"] + ":8080"
with tsnet2.Server() as srv:
    srv.up(timeout=60)
    deadline = time.monotonic() + 60
    tries = 0
    while True:  # only a failed dial is retried (the server may not be in our netmap yet)
        tries += 1
        try:
            conn = srv.dial("tcp", target, timeout=10)
            break
        except (DialError, OSError) as exc:
            print("RETRY", repr(exc), flush=True)
            if time.monotonic() > deadline:
                sys.exit(f"dial {target}: {exc}")
        time.sleep(0.5)
    reply, error = b"", None
    with conn:
        try:
            conn.sendall(b"ping from " + os.environ["POD_NAME"].encode() + b"\n")
            while not reply.endswith(b"\n"):
                chunk = conn.recv(4096)
                if not chunk:
                    break
                reply += chunk
        except OSError as exc:
            error = repr(exc)
    print("RESULT " + json.dumps({"reply": reply.decode(), "error": error, "tries": tries}),
          flush=True)
    time.sleep(600)  # stay in the tailnet while the test looks at the server
'''

PING = r'''
import json, sys, tsnet2
target, message = sys.argv[1], sys.argv[2].encode() + b"\n"
with tsnet2.Server(join=False) as srv:  # the node the sidecar runs: never starts or stops it
    with srv.dial("tcp", target, timeout=20) as conn:
        conn.settimeout(30)
        conn.sendall(message)
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = conn.recv(4096)
            if not chunk:
                break
            reply += chunk
print(json.dumps({"reply": reply.decode()}))
'''

# The TLS and UDP server of the end-to-end suite (issue 15): TLS on tailnet port 443 that the
# daemon terminates with the node's certificate (the app holds no key and does nothing to
# get one: the sidecar requested it from the control server when its node came up; until it
# has it, listen_tls says NoCertificateError and the app asks again), and a UDP echo on
# 5353. Prints RESULT {"kind": "tls"|"udp", ...} per connection / datagram.
SECURE_SERVER = r'''
import json, sys, threading, time, tsnet2
with tsnet2.Server() as srv:
    srv.up(timeout=60)
    deadline = time.monotonic() + 120
    while True:
        try:
            tls_ln = srv.listen_tls("tcp", ":443")
            break
        except tsnet2.NoCertificateError as exc:
            print("RETRY", repr(exc), flush=True)
            if time.monotonic() > deadline:
                sys.exit(f"listen_tls: {exc}")
            time.sleep(0.5)
    packets = srv.listen_packet("udp", ":5353")

    def echo():
        while True:
            data, addr = packets.recvfrom()
            packets.sendto(b"echo " + data, addr)
            print("RESULT " + json.dumps({"kind": "udp", "got": data.decode(),
                                          "from": str(addr)}), flush=True)

    threading.Thread(target=echo, daemon=True).start()
    print("LISTENING", flush=True)
    while True:  # one TLS connection at a time: a line in, "tls pong: " + it out
        conn = tls_ln.accept()
        data, who, error = b"", None, None
        with conn:
            conn.settimeout(30)
            try:
                while not data.endswith(b"\n") and len(data) < 4096:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                who = srv.local_client().whois(str(conn.tailnet_remote[0]))
                conn.sendall(b"tls pong: " + data)
            except OSError as exc:
                error = repr(exc)
        print("RESULT " + json.dumps({
            "kind": "tls", "got": data.decode(), "whois": who, "error": error,
            "tls": conn.tls.to_json() if conn.tls is not None else None}), flush=True)
'''

# A TLS client that does TLS itself over a plain dial (kubectl exec in a pod whose app only
# sleeps): Python's ssl trusting ONLY the tailnet CA ($TSNET2_CA_BUNDLE, which the injector
# sets), the server's FQDN as the name to verify. Then the same with a wrong name, which
# must fail verification.
TLS_CLIENT = r'''
import json, os, ssl, sys, tsnet2
host, port, message = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode() + b"\n"
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED, check_hostname
ctx.load_verify_locations(cafile=os.environ["TSNET2_CA_BUNDLE"])
out = {"ca_bundle": os.environ["TSNET2_CA_BUNDLE"], "trusted": ctx.cert_store_stats()}
with tsnet2.Server(join=False) as srv:
    raw = srv.dial("tcp", f"{host}:{port}", timeout=20)
    with ctx.wrap_socket(raw, server_hostname=host) as conn:
        conn.settimeout(30)
        conn.sendall(message)
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = conn.recv(4096)
            if not chunk:
                break
            reply += chunk
        cert = conn.getpeercert()
        out.update(reply=reply.decode(), version=conn.version(), cipher=conn.cipher()[0],
                   san=[v for k, v in cert.get("subjectAltName", ()) if k == "DNS"])
    raw = srv.dial("tcp", f"{host}:{port}", timeout=20)
    try:
        with ctx.wrap_socket(raw, server_hostname="not-" + host):
            out["wrong_name"] = "verified"
    except ssl.SSLCertVerificationError as exc:
        out["wrong_name"] = exc.verify_message
    finally:
        raw.close()
print(json.dumps(out))
'''

# A UDP client (kubectl exec): DNS-like request/response, one datagram each way at a time,
# then a burst; a datagram over the tunnel's limit is refused before it is sent. A lost
# datagram fails the run (SIGALRM) instead of hanging it. Last, the same app tries a plain
# UDP socket to the peer's tailnet address, around the daemon: the guard must stop it.
UDP_CLIENT = r'''
import json, signal, socket, sys, tsnet2
host, port, count, burst, tag = (sys.argv[1], int(sys.argv[2]), int(sys.argv[3]),
                                 int(sys.argv[4]), sys.argv[5])
signal.alarm(60)
out = {"sent": [], "replies": [], "burst_sent": [], "burst_replies": []}
with tsnet2.Server(join=False) as srv:
    with srv.dial("udp", f"{host}:{port}", timeout=20) as conn:
        for i in range(count):
            query = f"query {i} from {tag}".encode()
            conn.send(query)
            out["sent"].append(query.decode())
            out["replies"].append(conn.recv().decode())
        for i in range(burst):
            query = f"burst {i} from {tag}".encode()
            conn.send(query)
            out["burst_sent"].append(query.decode())
        for _ in range(burst):
            out["burst_replies"].append(conn.recv().decode())
        out["max_datagram"] = conn.max_datagram
        try:
            conn.send(b"x" * (conn.max_datagram + 1))
            out["too_large"] = "sent"
        except tsnet2.DatagramTooLargeError as exc:
            out["too_large"] = [exc.limit, str(exc)]
        peer = str(conn.remote_addr[0])
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as plain:
    plain.settimeout(2)
    try:
        plain.sendto(f"bypass from {tag}".encode(), (peer, port))
        out["bypass"] = ["answered", plain.recv(65535).decode()]
    except OSError as exc:  # EPERM: the guard's reject; a timeout: dropped on the way
        out["bypass"] = ["blocked", repr(exc)]
print(json.dumps(out))
'''
