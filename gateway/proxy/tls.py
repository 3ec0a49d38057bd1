"""TLS to upstreams: the setting a route's https targets are opened with, and
why a handshake failed, in words an operator can act on.

Kept apart from the pool (:mod:`gateway.proxy.pool`), which only carries the
setting to ``create_connection``; nothing here runs per request.
"""

from __future__ import annotations

import re
import ssl
from dataclasses import dataclass

__all__ = ["CLOSED_AFTER_HANDSHAKE", "UpstreamTLS", "tls_reason"]


# Compared by identity (eq=False): the router makes one per distinct TLS setting,
# so a pool key hashes it at C speed, with no field-by-field comparison.
@dataclass(frozen=True, slots=True, eq=False)
class UpstreamTLS:
    """How connections to an https target are opened: ``context`` (trusted CAs
    and any client certificate, built at config load) and the name expected on
    the upstream's certificate and sent as SNI (None: the target's host)."""

    context: ssl.SSLContext
    server_name: str | None = None


# "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: certificate has
# expired (_ssl.c:1006)": the sentence between the code and the source line.
_OPENSSL_SENTENCE = re.compile(r"^\[[^\]]*\]\s*(.*?)\s*\(_ssl\.c:\d+\)$")
# A new TLS connection closed before any answer, with no alert to say why.
CLOSED_AFTER_HANDSHAKE = (
    "the upstream closed the connection right after the TLS handshake, before any answer "
    "(did it refuse the gateway's client certificate?)"
)


def tls_reason(exc: BaseException | None) -> str:
    """Why a TLS connection failed, in OpenSSL's words ("certificate verify
    failed: certificate has expired", "tlsv13 alert certificate required").
    Never a certificate or a key: OpenSSL's messages carry neither."""
    if isinstance(exc, ssl.SSLError):
        found = _OPENSSL_SENTENCE.match(str(exc))
        if found and found.group(1):
            return found.group(1)
        return str(exc.reason or exc.strerror or type(exc).__name__)
    return CLOSED_AFTER_HANDSHAKE
