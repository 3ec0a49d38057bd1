"""Header rules, compiled once from the config: what is dropped, what is set.

Strip, then inject: every identity header a client sends is removed, on every
route, before the gateway sets its own; so are its claims about where it comes
from (X-Forwarded-*, Forwarded, X-Real-IP) unless the peer is a trusted proxy.
Names are compared case-insensitively *and* with ``_`` folded to ``-``,
because many backends (nginx with ``underscores_in_headers``, CGI/WSGI/PHP
``HTTP_X_OPENID``) read ``X_OpenId`` as ``X-OpenId``.
"""

from __future__ import annotations

import ipaddress
import itertools
import re
import uuid
from collections.abc import Iterable

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
# Other claims about the client that backends believe (RFC 7239 `Forwarded`,
# nginx's `X-Real-IP`; Spring's ForwardedHeaderFilter reads both): kept as sent
# from a trusted proxy, which set them; removed from anyone else (contract
# section 8). The gateway appends nothing to them: its own account of the hop
# is X-Forwarded-For.
_PEER_CLAIMS = ("forwarded", "x-real-ip")
_PEER_CLAIMS_RAW = frozenset(n.encode() for n in _PEER_CLAIMS)
# Headers the gateway owns on the way upstream; their `_` spellings are spoofs.
_REQUEST_ID = "x-request-id"
_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


RawHeaders = Iterable[tuple[bytes, bytes]]
_NOT_REMOVABLE_RAW = frozenset(n.encode() for n in _NOT_REMOVABLE_BY_CONNECTION)


# Header names as the policy compares them (lower case, ``_`` read as ``-``),
# by the bytes the parser gave. Upstreams and clients send few distinct names,
# so folding is a dictionary lookup rather than two bytes methods per field;
# bounded, since nothing limits the names a peer may invent.
_FOLDED: dict[bytes, bytes] = {}
MAX_FOLDED = 1024


def _folded(name: bytes) -> bytes:
    key = _FOLDED.get(name)
    if key is None:
        key = name.lower().replace(b"_", b"-")
        if len(_FOLDED) < MAX_FOLDED:
            _FOLDED[name] = key
    return key


def _tokens(value: bytes) -> frozenset[bytes]:
    """The field names a Connection value lists, folded."""
    return frozenset(t.strip().lower().replace(b"_", b"-") for t in value.split(b","))


def _enc(text: str) -> bytes:
    # Header text came from the parser as UTF-8 with surrogateescape: this gives
    # back the exact bytes, including ones that were not UTF-8.
    return text.encode("utf-8", "surrogateescape")


def _dec(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


def _first(folded: list[tuple[bytes, bytes, bytes]], lower_name: bytes) -> bytes | None:
    # Exact names only (no `_` folding): these are read, not stripped.
    for _, name, value in folded:
        if name.lower() == lower_name:
            return value
    return None


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
        self.appid_header = ident.appid_header
        self.phone_header = ident.phone_header
        token_header = config.token.header
        self.token_header = token_header
        self.bearer = token_header.lower() == "authorization"
        # The configured names and the defaults: a renamed header's default
        # spelling must not reach an upstream that still reads it.
        identity = {fold(n) for n in (*ident.headers(), "X-OpenId", "X-UnionId", "X-AppId")}
        # Folded names removed from every inbound request before anything is set.
        self._drop_in = frozenset(
            HOP_BY_HOP
            | identity
            | {fold(token_header), "host", "expect"}
            | set(_FORWARDED)
            | set(_PEER_CLAIMS)
            | {_REQUEST_ID}
        )
        self._drop_in_raw = frozenset(_enc(n) for n in self._drop_in)
        self._openid_prefix = _enc(ident.openid_header) + b": "
        self._unionid_prefix = _enc(ident.unionid_header) + b": "
        self._appid_prefix = _enc(ident.appid_header) + b": "
        # The X-AppId line of each configured app, built once: no encode per request.
        self._appid_lines = {
            app.appid: self._appid_prefix + _enc(app.appid) + b"\r\n" for app in config.wechat.apps
        }
        self._phone_prefix = _enc(ident.phone_header) + b": " if ident.phone_header else None
        assertion = ident.assertion
        self._assertion_prefix = _enc(assertion.header) + b": " if assertion else b""
        self._drop_out = HOP_BY_HOP
        self._drop_out_raw = frozenset(n.encode() for n in HOP_BY_HOP) | {b"content-length"}
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
        inbound: CIMultiDictProxy[str] | CIMultiDict[str],
        *,
        peer: str | None,
        scheme: str,
        request_id: str,
        openid: str | None,
        unionid: str | None,
        appid: str | None = None,
        phone: str | None = None,
        assertion: str | None = None,
    ) -> CIMultiDict[str]:
        """:meth:`upstream_lines` for decoded headers (WebSocket handshakes)."""
        raw = tuple((_enc(k), _enc(v)) for k, v in inbound.items())
        lines = self.upstream_lines(
            raw,
            peer=peer,
            scheme=scheme,
            request_id=request_id,
            openid=openid,
            unionid=unionid,
            appid=appid,
            phone=phone,
            assertion=assertion,
        )
        out: CIMultiDict[str] = CIMultiDict()
        for line in lines:
            name, _, value = line[:-2].partition(b": ")
            out.add(_dec(name), _dec(value))
        return out

    def upstream_lines(
        self,
        raw: RawHeaders,
        *,
        peer: str | None,
        scheme: str,
        request_id: str,
        openid: str | None,
        unionid: str | None,
        appid: str | None = None,
        phone: str | None = None,
        assertion: str | None = None,
    ) -> list[bytes]:
        """The header lines sent upstream: inbound minus everything the gateway
        owns, then the gateway's own forwarded, request-id and identity headers.

        Works on the parser's raw bytes: the one implementation of the policy,
        with no decode and re-encode per request on the proxy path."""
        folded = [(_folded(name), name, value) for name, value in raw]
        drop = self._drop_in_raw
        listed: set[bytes] = set()
        for key, _, value in folded:
            if key == b"connection":
                listed |= {t.strip().lower().replace(b"_", b"-") for t in value.split(b",")}
        if listed:
            drop = drop | (listed - _NOT_REMOVABLE_RAW - {b""})
        trusted = self.is_trusted(peer)
        if trusted:
            # A trusted proxy's Forwarded / X-Real-IP pass; their `_` spellings
            # are not what a proxy sends (a client's, read as the real name by
            # backends that fold `_`), and a hop-by-hop listing still removes them.
            out = [
                name + b": " + value + b"\r\n"
                for key, name, value in folded
                if key not in drop
                or (key in _PEER_CLAIMS_RAW and key not in listed and b"_" not in name)
            ]
        else:
            out = [name + b": " + value + b"\r\n" for key, name, value in folded if key not in drop]
        peer_b = _enc(peer or "")
        prior = (
            b", ".join(v for _, n, v in folded if n.lower() == b"x-forwarded-for")
            if trusted
            else b""
        )
        out.append(b"X-Forwarded-For: " + (prior + b", " + peer_b if prior else peer_b) + b"\r\n")
        proto = _first(folded, b"x-forwarded-proto") if trusted else None
        out.append(b"X-Forwarded-Proto: " + (proto or _enc(scheme)) + b"\r\n")
        host = (_first(folded, b"x-forwarded-host") if trusted else None) or _first(folded, b"host")
        if host:
            out.append(b"X-Forwarded-Host: " + host + b"\r\n")
        out.append(b"X-Request-Id: " + _enc(request_id) + b"\r\n")
        if openid:
            out.append(self._openid_prefix + _enc(openid) + b"\r\n")
            if unionid:
                out.append(self._unionid_prefix + _enc(unionid) + b"\r\n")
            if appid:
                line = self._appid_lines.get(appid)
                out.append(line or self._appid_prefix + _enc(appid) + b"\r\n")
            if phone and self._phone_prefix is not None:
                out.append(self._phone_prefix + _enc(phone) + b"\r\n")
            if assertion:
                out.append(self._assertion_prefix + assertion.encode() + b"\r\n")
        return out

    def downstream_lines(
        self, raw: tuple[tuple[bytes, bytes], ...], request_id: bytes
    ) -> list[bytes]:
        """The upstream's response header lines minus hop-by-hop ones (every
        Set-Cookie kept), ready for the wire with no decode and re-encode, without
        the framing fields (Content-Length is re-set by whoever frames the answer).

        ``X-Request-Id`` is added unless the upstream sent its own: its headers
        pass unchanged, and the client gets exactly one id (an upstream that
        echoes the id it received sends the same value)."""
        drop = self._drop_out_raw
        has_id = False
        lines = []
        for name, value in raw:
            key = _folded(name)
            if key in drop:
                if key == b"connection" and not _tokens(value) <= drop:
                    # It names more than the fixed hop-by-hop fields (rare): the
                    # general form, which also drops fields listed before it.
                    return self._downstream_listed(raw, request_id)
                continue
            if key == b"x-request-id" and b"_" not in name:
                has_id = True
            lines.append(name + b": " + value + b"\r\n")
        if not has_id:
            lines.append(b"X-Request-Id: " + request_id + b"\r\n")
        return lines

    def _downstream_listed(
        self, raw: tuple[tuple[bytes, bytes], ...], request_id: bytes
    ) -> list[bytes]:
        drop = self._drop_out_raw
        has_id = False
        for name, value in raw:
            lowered = name.lower()
            if lowered == b"connection":
                drop = drop | _tokens(value)
            elif lowered == b"x-request-id":
                has_id = True
        lines = [name + b": " + value + b"\r\n" for name, value in raw if _folded(name) not in drop]
        if not has_id or b"x-request-id" in drop:
            lines.append(b"X-Request-Id: " + request_id + b"\r\n")
        return lines

    @staticmethod
    def length_lines(raw: tuple[tuple[bytes, bytes], ...]) -> list[bytes]:
        """The upstream's own Content-Length line(s), for answers passed on as framed."""
        return [
            name + b": " + value + b"\r\n"
            for name, value in raw
            if name.lower() == b"content-length"
        ]


# Fresh request ids: a random per-process prefix and a counter. Unique across
# workers and restarts without a getrandom() call per request (uuid4 was 3% of
# the proxy path's profile); nothing relies on an id being unguessable.
_ID_PREFIX = uuid.uuid4().hex[:16]
_ids = itertools.count(1)


def new_request_id() -> str:
    # No format spec in an f-string: see gateway.observability.accesslog._time.
    return _ID_PREFIX + "%016x" % next(_ids)  # noqa: UP031


def request_id_from(inbound: CIMultiDictProxy[str]) -> str:
    """The client's X-Request-Id when it is a sane token, else a fresh one
    (an arbitrary value would end up in upstream logs unescaped)."""
    given = inbound.get("X-Request-Id")
    if given and _VALID_REQUEST_ID.match(given):
        return given
    return new_request_id()
