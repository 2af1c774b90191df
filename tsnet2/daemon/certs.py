"""The node's TLS certificate and the tailnet CA, as the daemon's TLS code uses them.

CONTRACT SKELETON (issue 15): the interface below is what the TLS datapath relies on; the
implementation (key in the state dir, CSR over the control session, renewal, metrics, the CA
bundle file) replaces the bodies.
"""

from __future__ import annotations

import ssl

from tsnet2.proto.codes import ErrorCode

__all__ = ["CA_BUNDLE_NAME", "CertUnavailable", "NodeCerts"]

CA_BUNDLE_NAME = "tailnet-ca.pem"
"""The tailnet CA bundle's file name, written next to the daemon's socket (in a pod: on the
shared emptyDir, ``/var/run/tsnet2/tailnet-ca.pem``) for apps that verify tailnet TLS."""


class CertUnavailable(Exception):
    """The node has no certificate (or the tailnet CA is unknown) right now; the message
    says why and what to do. ``code`` is :data:`ErrorCode.NO_CERTIFICATE`."""

    code = ErrorCode.NO_CERTIFICATE


class NodeCerts:
    """The node's certificate (for its FQDN and ``cert_domains``) and the tailnet CA."""

    def server_context(self) -> ssl.SSLContext:
        """An SSLContext for terminating TLS with the node's certificate (TLS 1.2+). It is
        the same object across renewals (the renewed chain is loaded into it), so a
        listener may keep it. Raises :class:`CertUnavailable`."""
        raise CertUnavailable("daemon: TLS certificates are not implemented yet")

    def client_context(self) -> ssl.SSLContext:
        """An SSLContext for originating TLS to a peer: trusts only the tailnet CA,
        ``check_hostname`` on, ``CERT_REQUIRED``, TLS 1.2+. Raises :class:`CertUnavailable`
        when the CA is not known yet."""
        raise CertUnavailable("daemon: the tailnet CA is not known yet")

    def ca_pem(self) -> bytes | None:
        """The tailnet CA bundle (PEM), or None while unknown."""
        return None
