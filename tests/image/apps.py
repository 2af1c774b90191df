"""The two sample apps of the pod test: plain Python with the tsnet2 library, run by
``python3 -c`` in the image. Both print one ``RESULT {json}`` line the test reads, then stay
up (the test reads logs and metrics, then takes the pods down)."""

SERVER = r'''
import json, time, tsnet2
with tsnet2.Server() as srv:
    st = srv.up(timeout=60)
    with srv.listen("tcp", ":8080") as ln:
        print("LISTENING", flush=True)
        aborted = 0
        while True:  # serve until one exchange completes (docs/image.md, known issues)
            conn = ln.accept(timeout=120)
            try:
                with conn:
                    data = b""
                    while not data.endswith(b"\n") and len(data) < 4096:
                        chunk = conn.recv(4096)
                        if not chunk:
                            break
                        data += chunk
                    who = srv.local_client().whois(str(conn.tailnet_remote[0]))
                    conn.sendall(b"pong: " + data)
            except OSError as exc:
                aborted += 1
                print("ABORTED", repr(exc), flush=True)
                continue
            print("RESULT " + json.dumps({"got": data.decode(), "whois": who, "aborted": aborted,
                                          "remote": str(conn.tailnet_remote[0])}), flush=True)
            break
    time.sleep(600)
'''

CLIENT = r'''
import json, os, sys, time, tsnet2
from tsnet2.client.errors import DialError
target = os.environ["SERVER_HOST"] + ":8080"
with tsnet2.Server() as srv:
    srv.up(timeout=60)
    deadline = time.monotonic() + 60
    tries = 0
    while True:  # the server may not be in our netmap yet; a flow may be cut (known issue)
        tries += 1
        try:
            conn = srv.dial("tcp", target, timeout=10)
            with conn:
                conn.sendall(b"ping from " + os.environ["POD_NAME"].encode() + b"\n")
                reply = b""
                while not reply.endswith(b"\n"):
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    reply += chunk
            if reply.endswith(b"\n") or tries >= 5:
                break
            print("EMPTY REPLY, retrying", flush=True)
        except (DialError, OSError) as exc:
            print("RETRY", repr(exc), flush=True)
            if time.monotonic() > deadline:
                sys.exit(f"dial {target}: {exc}")
        time.sleep(0.5)
    print("RESULT " + json.dumps({"reply": reply.decode(), "tries": tries}), flush=True)
    time.sleep(600)  # stay in the tailnet while the test looks at the server
'''
