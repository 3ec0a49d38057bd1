"""Header rules, compiled once from the config: what is dropped, what is set.

Strip, then inject: every identity header a client sends is removed, on every
route, before the gateway sets its own. Names are compared case-insensitively
*and* with ``_`` folded to ``-``, because many backends (nginx with
``underscores_in_headers``, CGI/WSGI/PHP ``HTTP_X_OPENID``) read ``X_OpenId``
as ``X-OpenId``.
"""

from __future__ import annotations

import ipaddress
import re
import uuid

from multidict import CIMultiDict, CIMultiDictProxy

from gateway.config import Config

# RFC 9110 7.6.1 hop-by-hop fields, the obsolete Keep-Alive/Proxy-Connection, and
# the proxy credentials the gateway consumes (contract section 8).
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-authorization",
        "proxy-authenticate",
    }
)
# A client listing these in `Connection` must not make the gateway drop them:
# they frame the message or are set by the gateway anyway.
_NOT_REMOVABLE_BY_CONNECTION = frozenset({"content-length", "host"})
_FORWARDED = ("x-forwarded-for", "x-forwarded-proto", "x-forwarded-host")
# Headers the gateway owns on the way upstream; their `_` spellings are spoofs.
_REQUEST_ID = "x-request-id"
_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


def fold(name: str) -> str:
    """The comparison form of a header name: lower case, ``_`` read as ``-``."""
    return name.lower().replace("_", "-")


def connection_tokens(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> set[str]:
    tokens: set[str] = set()
    for value in headers.getall("Connection", ()):
        tokens.update(fold(t.strip()) for t in value.split(",") if t.strip())
    return tokens - _NOT_REMOVABLE_BY_CONNECTION


class HeaderRules:
    """Compiled header policy for the request and response directions."""

    def __init__(self, config: Config) -> None:
        ident = config.identity
        self.openid_header = ident.openid_header
        self.unionid_header = ident.unionid_header
        token_header = config.token.header
        self.token_header = token_header
        self.bearer = token_header.lower() == "authorization"
        identity = {
            fold(n) for n in (ident.openid_header, ident.unionid_header, "X-OpenId", "X-UnionId")
        }
        # Folded names removed from every inbound request before anything is set.
        self._drop_in = frozenset(
            HOP_BY_HOP
            | identity
            | {fold(token_header), "host", "expect"}
            | set(_FORWARDED)
            | {_REQUEST_ID}
        )
        self._drop_out = HOP_BY_HOP
        self._trusted = config.server.trusted_proxies

    def is_trusted(self, peer: str | None) -> bool:
        if not self._trusted or not peer:
            return False
        try:
            address = ipaddress.ip_address(peer)
        except ValueError:
            return False
        return any(address in net for net in self._trusted)

    def client_ip(self, inbound: CIMultiDictProxy[str], peer: str | None) -> str:
        """The client's address: the peer, or behind trusted proxies the rightmost
        X-Forwarded-For entry that is not itself a trusted proxy."""
        if not self.is_trusted(peer):
            return peer or "unknown"
        hops = [h.strip() for v in inbound.getall("X-Forwarded-For", ()) for h in v.split(",")]
        for hop in reversed(hops):
            if hop and not self.is_trusted(hop):
                return hop
        return peer or "unknown"

    def upstream_request(
        self,
        inbound: CIMultiDictProxy[str],
        *,
        peer: str | None,
        scheme: str,
        request_id: str,
        openid: str | None,
        unionid: str | None,
    ) -> CIMultiDict[str]:
        """The headers sent upstream: inbound minus everything the gateway owns,
        then the gateway's own forwarded, request-id and identity headers."""
        drop = (
            self._drop_in | connection_tokens(inbound) if "Connection" in inbound else self._drop_in
        )
        out: CIMultiDict[str] = CIMultiDict()
        for name, value in inbound.items():
            if fold(name) not in drop:
                out.add(name, value)
        trusted = self.is_trusted(peer)
        prior = ", ".join(inbound.getall("X-Forwarded-For", ())) if trusted else ""
        out["X-Forwarded-For"] = f"{prior}, {peer}" if prior else (peer or "")
        proto = inbound.get("X-Forwarded-Proto") if trusted else None
        out["X-Forwarded-Proto"] = proto or scheme
        host = (inbound.get("X-Forwarded-Host") if trusted else None) or inbound.get("Host")
        if host:
            out["X-Forwarded-Host"] = host
        out["X-Request-Id"] = request_id
        if openid:
            out[self.openid_header] = openid
            if unionid:
                out[self.unionid_header] = unionid
        return out

    def downstream_response(self, upstream: CIMultiDictProxy[str]) -> CIMultiDict[str]:
        """Upstream response headers minus hop-by-hop ones; every Set-Cookie kept."""
        drop = (
            self._drop_out | connection_tokens(upstream)
            if "Connection" in upstream
            else self._drop_out
        )
        return CIMultiDict((k, v) for k, v in upstream.items() if fold(k) not in drop)


def request_id_from(inbound: CIMultiDictProxy[str]) -> str:
    """The client's X-Request-Id when it is a sane token, else a fresh one
    (an arbitrary value would end up in upstream logs unescaped)."""
    given = inbound.get("X-Request-Id")
    if given and _VALID_REQUEST_ID.match(given):
        return given
    return uuid.uuid4().hex
