"""The two sample apps of the pod test: plain Python with the tsnet2 library, run by
``python3 -c`` in the image. Both print one ``RESULT {json}`` line the test reads, then stay
up (the test reads logs and metrics, then takes the pods down).

The server answers every connection (one at a time) and prints a ``RESULT`` per
connection; :data:`PING` is a one-shot client for ``exec`` into a running app container.

Neither retries a flow: a cut flow (docs/image.md, fixed known issue #2) fails the test. The
client retries only dials that fail before a connection exists (the server may not be in
its netmap yet) and reports how many tries it took.
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
