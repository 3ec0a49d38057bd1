"""The paths the gateway serves itself: one list, read by the dispatcher, by
``/auth/verify`` (which never treats them as a route) and by the config loader
(which refuses a route that would shadow them)."""

from __future__ import annotations

# Exact paths (after normalisation) of the operational endpoints, and the
# assertion keys (contract section 11; an empty key set while it is off).
JWKS_PATH = "/.well-known/jwks.json"
OWN_EXACT = ("/healthz", "/readyz", "/metrics", JWKS_PATH)
# The whole of /auth is the gateway's (contract section 4): an unknown
# /auth/... is a 404, never forwarded.
OWN_PREFIX = "/auth"


def is_reserved(path: str) -> bool:
    """Whether the normalised ``path`` is the gateway's own, never a route's."""
    return path in OWN_EXACT or path == OWN_PREFIX or path.startswith(OWN_PREFIX + "/")


def shadows_reserved(prefix: str) -> bool:
    """Whether a route ``prefix`` would claim one of the gateway's own paths."""
    p = prefix.rstrip("/")
    return any(p == own or prefix.startswith(own + "/") for own in (OWN_PREFIX, *OWN_EXACT))
