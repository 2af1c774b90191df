"""One-shot certificate work for tsnet2d, in a child process: ``python -m tsnet2.daemon.certtool``.

Making the node's key, signing a CSR and checking an issued chain need ``cryptography``'s
X.509 and EC code, which cost a running daemon about 2.7 MB of resident memory for good once
used (measured on CPython 3.11, cryptography 46: 0.6 MB of modules, the rest OpenSSL state).
They run rarely (at the first start and at each renewal), so :class:`~tsnet2.daemon.certs.
NodeCerts` runs them here, in a short-lived child, and the daemon itself only loads the
result with :mod:`ssl`. Commands (one JSON object on stdout; on failure a message on stderr
and exit status 1, or 3 when the key cannot be used or created):

- ``csr KEY FQDN``: create ``KEY`` (EC P-256, 0600) if it does not exist, print
  ``{"csr": PEM, "created_key": bool}``;
- ``check KEY FQDN`` with a chain (leaf PEM, CA PEM) on stdin: check it is for ``KEY`` and
  ``FQDN``, signed by the CA in it and valid now; print ``{"ca": PEM, "info": {...}}``
  (:class:`~tsnet2.daemon.certs.CertInfo`'s fields).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from tsnet2.daemon.certs import MAX_PEM, _check_chain, _load_or_create_key, _make_csr, _read

KEY_ERROR = 3
"""Exit status: the node's key cannot be read or created."""


def main(argv: list[str] | None = None) -> int:
    """Run one command (see the module docstring); return the exit status."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 3 or args[0] not in ("csr", "check"):
        print("usage: python -m tsnet2.daemon.certtool csr|check KEY FQDN", file=sys.stderr)
        return 2
    command, key_path, fqdn = args[0], Path(args[1]), args[2]
    existed = key_path.exists()
    try:
        key_pem = _load_or_create_key(key_path) if command == "csr" else _read(key_path)
    except (OSError, ValueError) as exc:
        print(f"the node's TLS key {key_path}: {exc}", file=sys.stderr)
        return KEY_ERROR
    try:
        if command == "csr":
            out = {"csr": _make_csr(key_pem, fqdn), "created_key": not existed}
        else:
            chain = sys.stdin.buffer.read(MAX_PEM + 1)
            if len(chain) > MAX_PEM:
                raise ValueError(f"the certificate chain is larger than {MAX_PEM} bytes")
            ca, info = _check_chain(chain, key_pem, fqdn)
            out = {"ca": ca.decode(), "info": dataclasses.asdict(info)}
    except ValueError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    json.dump(out, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
