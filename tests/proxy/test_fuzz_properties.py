"""Property-based fuzzing of the three parsers a client controls the input of:
the path normaliser (gateway.proxy.paths), the header rules (gateway.proxy.headers) and the
token codec and bearer parsing (gateway.auth.tokens).

Deterministic for CI: a profile registered here (derandomized, no example
database, bounded example counts) is applied to each test explicitly, so other
modules' hypothesis settings are left alone.
"""

from __future__ import annotations

import base64
import hmac
import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.auth.tokens import TokenCodec, bearer_from_header, key_id
from gateway.config import Config, build_config
from gateway.errors import TokenExpired, TokenInvalid, TokenMissing
from gateway.proxy.headers import HeaderRules
from gateway.proxy.paths import BadPath, NormalisedPath, normalise
from tests.support.gateway import TOKEN_SECRET, base_config
from tests.support.headers import fold

settings.register_profile(
    "wx-gateway-fuzz",
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=300,
    print_blob=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
FUZZ = settings.get_profile("wx-gateway-fuzz")


def fuzz(max_examples: int = 300) -> settings:
    return settings(FUZZ, max_examples=max_examples)


def config(**sections: Any) -> Config:
    raw = base_config(Path("/nonexistent"), "http://127.0.0.1:9", "http://127.0.0.1:9", **sections)
    return build_config(raw, env={})


# ===================================================================================
# gateway.proxy.paths.normalise
# ===================================================================================

SEGMENTS = [
    "a",
    "api",
    "public",
    "x.json",
    "",
    ".",
    "..",
    "...",
    "%2e",
    "%2E",
    ".%2e",
    "%2e.",
    "%2e%2E",
    "..;",
    "..;x=1",
    ".;a",
    ";",
    ";x",
    "a;b=c",
    "%3B",
    "%3b..",
    "%41",
    "%20",
    "%25",
    "%252e",
    "%252F",
    "%C3%A9",
    "%ff",
    "é",
    "~",
    "a.b",
    "+",
    "%2B",
    ":",
    "@",
]
# Each of these, anywhere in a path, must be refused (contract section 5).
FORBIDDEN = ["%2F", "%2f", "%5C", "%5c", "%00", "\\", "\x00"]
# Malformed escapes are refused as well (docs/design.md).
MALFORMED = ["%zz", "%g0", "%0g", "%-1", "%%"]

SEGMENT = st.one_of(
    st.sampled_from(SEGMENTS),
    st.text(alphabet="abcxyz.;=~-_%0123456789AEFaef", max_size=6),
)
SEG_LISTS = st.lists(SEGMENT, max_size=14)
PATHS = SEG_LISTS.map(lambda segs: "/" + "/".join(segs))


def matched_segment(raw: str) -> str:
    """What a route compares for one raw segment: decoded once, `;params` dropped."""
    return unquote(raw, errors="surrogateescape").split(";", 1)[0]


def try_normalise(path: str) -> NormalisedPath | None:
    try:
        return normalise(path)
    except BadPath:
        return None


@fuzz(500)
@given(st.one_of(PATHS, st.text(max_size=40), st.text(max_size=40).map(lambda s: "/" + s)))
def test_normalise_only_raises_badpath(path: str) -> None:
    try:
        result = normalise(path)
    except BadPath:
        return
    assert isinstance(result, NormalisedPath)
    assert path.startswith("/")


@fuzz(500)
@given(PATHS)
def test_match_path_shape(path: str) -> None:
    n = try_normalise(path)
    if n is None:
        return
    assert n.match.startswith("/") and n.forward.startswith("/")
    assert "//" not in n.match and "//" not in n.forward
    segments = n.match.split("/")[1:]
    # Only the last segment may be empty (a trailing slash); no dot segment survives.
    assert all(s for s in segments[:-1]), n
    assert not any(s in (".", "..") for s in segments), n
    # Matching ignores `;params`, as servlet containers do.
    assert ";" not in n.match
    assert "\\" not in n.match and "\x00" not in n.match


@fuzz(500)
@given(SEG_LISTS)
def test_never_escapes_root(segments: list[str]) -> None:
    """An independent depth count: a `..` that would climb above `/` is refused,
    and an accepted path keeps exactly the segments that were not climbed over."""
    path = "/" + "/".join(segments)
    depth, escaped = 0, False
    for raw in segments:
        decoded = matched_segment(raw)
        if decoded == "..":
            depth -= 1
            if depth < 0:
                escaped = True
                break
        elif decoded not in ("", "."):
            depth += 1
    n = try_normalise(path)
    if escaped:
        assert n is None, (path, n)
        return
    if n is None:
        # Refused for another reason: one of the forbidden or malformed escapes.
        assert re.search(r"%(?![0-9A-Fa-f]{2})|%2[fF]|%5[cC]|%00", path), path
        return
    assert len([s for s in n.match.split("/") if s]) == depth, (path, n)


@fuzz(400)
@given(SEG_LISTS, SEG_LISTS)
def test_prefix_is_left_only_through_dot_dot(under: list[str], tail: list[str]) -> None:
    """Without a `..` (in any spelling) a path under /public/ stays under /public/."""
    segments = [s for s in under if matched_segment(s) != ".."]
    path = "/public/" + "/".join(segments)
    n = try_normalise(path)
    if n is not None:
        assert n.match == "/public" or n.match.startswith("/public/"), (path, n)
        assert n.forward.startswith("/public"), (path, n)
    # And with them, where it lands is exactly what a route sees upstream too.
    climbing = "/public/" + "/".join(tail)
    m = try_normalise(climbing)
    if m is not None and not (m.match == "/public" or m.match.startswith("/public/")):
        assert any(matched_segment(s) == ".." for s in tail), (climbing, m)


@fuzz(500)
@given(PATHS, st.integers(min_value=1, max_value=200), st.sampled_from(FORBIDDEN + MALFORMED))
@example("/public/x", 8, "%2F")
@example("/a", 2, "%00")
def test_forbidden_and_malformed_escapes_are_refused(path: str, at: int, bad: str) -> None:
    at = min(at, len(path))
    with pytest.raises(BadPath):
        normalise(path[:at] + bad + path[at:])


@fuzz(200)
@given(st.sampled_from(["%", "%4", "%e"]), PATHS)
def test_truncated_escape_at_end_is_refused(end: str, path: str) -> None:
    with pytest.raises(BadPath):
        normalise(path + end)


@fuzz(200)
@given(st.text(max_size=20).filter(lambda s: not s.startswith("/")))
def test_path_must_start_with_slash(path: str) -> None:
    with pytest.raises(BadPath):
        normalise(path)


@fuzz(500)
@given(PATHS)
def test_match_and_forward_agree(path: str) -> None:
    """One path for routing and forwarding: the forwarded segments, decoded the way
    matching decodes, are the matched segments; the upstream re-normalising the
    forwarded path lands on the same route; and the match path is a fixed point."""
    n = try_normalise(path)
    if n is None:
        return
    match_segments = n.match.split("/")[1:]
    forward_segments = n.forward.split("/")[1:]
    assert len(match_segments) == len(forward_segments), n
    for m, f in zip(match_segments, forward_segments, strict=True):
        assert matched_segment(f) == m, (path, n)
    again = normalise(n.forward)
    assert again == n, (path, n, again)
    if "%" not in n.match:
        assert normalise(n.match).match == n.match, n
    for k in range(len(forward_segments) + 1):
        assert n.strip_segments(k) == "/" + "/".join(forward_segments[k:]), (n, k)


@fuzz(300)
@given(SEG_LISTS)
def test_forward_keeps_client_encoding(segments: list[str]) -> None:
    """Segments that survive are forwarded exactly as the client spelled them."""
    path = "/" + "/".join(segments)
    n = try_normalise(path)
    if n is None:
        return
    raw_kept = [s for s in n.forward.split("/")[1:] if s]
    # Every forwarded segment is one of the client's, in the client's order.
    it = iter(segments)
    assert all(any(seg == s for s in it) for seg in raw_kept), (segments, n)


# ===================================================================================
# gateway.proxy.headers.HeaderRules.upstream_request
# ===================================================================================

DEFAULT_CONFIG = config()
CUSTOM_CONFIG = config(
    token={"secret": TOKEN_SECRET, "header": "X-Token"},
    identity={"openid_header": "X-User-Id", "unionid_header": "X-User-Union"},
)

RFC_HOP_BY_HOP = {
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
GATEWAY_SET = {"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-request-id"}
BASE_NAMES = [
    "X-OpenId",
    "X-UnionId",
    "X-User-Id",
    "X-User-Union",
    "Authorization",
    "X-Token",
    "Connection",
    "Keep-Alive",
    "Proxy-Connection",
    "TE",
    "Trailer",
    "Transfer-Encoding",
    "Upgrade",
    "Proxy-Authorization",
    "Proxy-Authenticate",
    "X-Forwarded-For",
    "X-Forwarded-Proto",
    "X-Forwarded-Host",
    "X-Request-Id",
    "Host",
    "Expect",
    "Content-Length",
    "Content-Type",
    "Cookie",
    "X-Open-Id",
    "X-OpenIdx",
    "OpenId",
    "X-Custom",
    "X-Private",
]
TCHAR = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


@st.composite
def spelling(draw: st.DrawFn, name: str) -> str:
    """``name`` with each letter's case and each `-`/`_` chosen at random."""
    out = []
    for ch in name:
        if ch in "-_":
            out.append(draw(st.sampled_from("-_")))
        elif ch.isalpha():
            out.append(ch.upper() if draw(st.booleans()) else ch.lower())
        else:
            out.append(ch)
    return "".join(out)


HEADER_NAMES = st.one_of(
    st.sampled_from(BASE_NAMES).flatmap(spelling),
    st.text(alphabet=TCHAR, min_size=1, max_size=10),
)
# What aiohttp's parser can hand over: no CR, LF or NUL; other bytes may come
# through as surrogate escapes.
VALUES = st.text(
    alphabet=st.characters(exclude_characters="\r\n\x00", exclude_categories=("Cs",)),
    max_size=20,
)
CONNECTION_VALUES = st.lists(
    st.tuples(HEADER_NAMES, st.sampled_from(["", " ", "  ", "\t"])), max_size=5
).map(lambda items: ",".join(sp + name + sp for name, sp in items))


@st.composite
def inbound_headers(draw: st.DrawFn) -> list[tuple[str, str]]:
    items = draw(st.lists(st.tuples(HEADER_NAMES, VALUES), max_size=14))
    out = []
    for name, value in items:
        if name.lower() == "connection":
            value = draw(CONNECTION_VALUES)
        out.append((name, value))
    return out


def connection_listed(inbound: list[tuple[str, str]]) -> set[str]:
    return {
        t.strip().lower()
        for name, value in inbound
        if name.lower() == "connection"
        for t in value.split(",")
        if t.strip()
    }


@fuzz(400)
@given(
    st.sampled_from(["default", "custom"]),
    inbound_headers(),
    st.sampled_from([None, "o-real-openid"]),
    st.sampled_from([None, "u-real-unionid"]),
)
@example("default", [("X_OpenId", "forged"), ("Connection", "X-OpenId")], "o-real-openid", None)
@example("custom", [("x_user_id", "forged"), ("X-OPENID", "forged")], None, "u-real-unionid")
@example("custom", [("Authorization", "Bearer kept"), ("X_Token", "t")], "o-real-openid", None)
def test_upstream_request_headers(
    which: str,
    inbound: list[tuple[str, str]],
    openid: str | None,
    unionid: str | None,
) -> None:
    cfg = DEFAULT_CONFIG if which == "default" else CUSTOM_CONFIG
    rules = HeaderRules(cfg)
    peer = "203.0.113.9"
    out = rules.upstream_request(
        CIMultiDictProxy(CIMultiDict(inbound)),
        peer=peer,
        scheme="http",
        request_id="rid-fuzz-1",
        openid=openid,
        unionid=unionid,
    )
    items = list(out.items())
    openid_name, unionid_name = cfg.identity.openid_header, cfg.identity.unionid_header
    identity_names = {fold(n) for n in (openid_name, unionid_name, "X-OpenId", "X-UnionId")}

    # Identity: exactly what the gateway injected, nothing the client sent.
    expected_identity = []
    if openid:
        expected_identity.append((openid_name, openid))
        if unionid:
            expected_identity.append((unionid_name, unionid))
    assert [(k, v) for k, v in items if fold(k) in identity_names] == expected_identity

    # The token header is consumed, in any spelling.
    token_header = fold(cfg.token.header)
    assert not [k for k, _ in items if fold(k) == token_header]

    # No hop-by-hop field, and nothing the client listed in Connection (except the
    # framing fields and the ones the gateway sets itself).
    assert not [k for k, _ in items if k.lower() in RFC_HOP_BY_HOP]
    framing = {"content-length", "host"}
    listed = {t for t in connection_listed(inbound) if fold(t) not in framing}
    own = GATEWAY_SET | identity_names
    assert not [k for k, _ in items if k.lower() in listed and fold(k) not in own]

    # The gateway's own fields: once each, with its values, no `_` spelling left.
    assert [v for k, v in items if fold(k) == "x-forwarded-for"] == [peer]
    assert [v for k, v in items if fold(k) == "x-forwarded-proto"] == ["http"]
    assert [v for k, v in items if fold(k) == "x-request-id"] == ["rid-fuzz-1"]
    hosts = [v for k, v in inbound if k.lower() == "host"]
    expected_host = hosts[:1] if hosts and hosts[0] else []
    assert [v for k, v in items if fold(k) == "x-forwarded-host"] == expected_host

    # Everything else passes through unchanged and in order.
    dropped = (
        RFC_HOP_BY_HOP
        | identity_names
        | {token_header, "host", "expect"}
        | GATEWAY_SET
        | ({fold(t) for t in listed})
    )
    expected_rest = [(k, v) for k, v in inbound if fold(k) not in dropped]
    assert [(k, v) for k, v in items if fold(k) not in own] == expected_rest


@fuzz(200)
@given(inbound_headers())
def test_custom_token_header_leaves_authorization_alone(inbound: list[tuple[str, str]]) -> None:
    """With `token.header: X-Token`, Authorization is an ordinary header (section 8)."""
    rules = HeaderRules(CUSTOM_CONFIG)
    inbound = [*inbound, ("Authorization", "Basic dXNlcjpwdw==")]
    out = rules.upstream_request(
        CIMultiDictProxy(CIMultiDict(inbound)),
        peer="198.51.100.1",
        scheme="https",
        request_id="r",
        openid="o",
        unionid=None,
    )
    listed = connection_listed(inbound)
    if "authorization" not in listed:
        assert "Basic dXNlcjpwdw==" in out.getall("Authorization", [])
    assert not [k for k in out if fold(k) == "x-token"]


# ===================================================================================
# gateway.auth.tokens: the codec and bearer parsing
# ===================================================================================

NOW = 1_800_000_000.0
CODEC = TokenCodec.for_config(DEFAULT_CONFIG)
VALID, VALID_CLAIMS = CODEC.issue("o-valid-user", "u-valid", NOW)
TOKEN_ERRORS = (TokenInvalid, TokenExpired)
KEY = TOKEN_SECRET.encode()
KID = key_id(DEFAULT_CONFIG.token.secret)
B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
MUTATION_CHARS = st.one_of(
    st.sampled_from(B64URL + "=.+/ \t\n\x00"),
    st.characters(exclude_categories=("Cs",)),
)
MUTATIONS = st.tuples(
    st.sampled_from(["replace", "insert", "delete", "truncate", "append", "prepend", "swap"]),
    st.integers(min_value=0, max_value=len(VALID)),
    MUTATION_CHARS,
)


def mutate(token: str, mutation: tuple[str, int, str]) -> str:
    op, at, ch = mutation
    at = min(at, len(token) - 1)
    if op == "replace":
        return token[:at] + ch + token[at + 1 :]
    if op == "insert":
        return token[:at] + ch + token[at:]
    if op == "delete":
        return token[:at] + token[at + 1 :]
    if op == "truncate":
        return token[:at]
    if op == "append":
        return token + ch
    if op == "prepend":
        return ch + token
    parts = token.split(".")
    if len(parts) < 2:
        return token[::-1]
    parts[0], parts[1] = parts[1], parts[0]
    return ".".join(parts)


def test_the_valid_token_verifies() -> None:
    claims = CODEC.verify(VALID, NOW)
    assert claims == VALID_CLAIMS


@fuzz(600)
@given(st.lists(MUTATIONS, min_size=1, max_size=3))
# RFC 7515: base64url segments carry no `=` padding; a padded signature is a
# different, malformed token even if its bytes decode the same.
@example([("append", 0, "=")])
@example([("replace", len(VALID) - 1, VALID[-1].swapcase())])
@example([("insert", VALID.index("."), "=")])
def test_mutated_tokens_never_verify(mutations: list[tuple[str, int, str]]) -> None:
    token = VALID
    for mutation in mutations:
        token = mutate(token, mutation)
    if token == VALID:
        assert CODEC.verify(token, NOW) == VALID_CLAIMS
        return
    with pytest.raises(TOKEN_ERRORS):
        CODEC.verify(token, NOW)


@fuzz(400)
@given(
    st.one_of(
        st.text(max_size=60),
        st.from_regex(r"\A[A-Za-z0-9_=-]{0,40}\.[A-Za-z0-9_=-]{0,60}\.[A-Za-z0-9_=-]{0,50}\Z"),
        st.text(max_size=30).map(lambda s: VALID.rsplit(".", 1)[0] + "." + s),
        st.integers(min_value=4000, max_value=20000).map(lambda n: "a" * n),
    )
)
def test_arbitrary_strings_never_verify(token: str) -> None:
    with pytest.raises(TOKEN_ERRORS):
        CODEC.verify(token, NOW)


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=4), children, max_size=3)
    ),
    max_leaves=6,
)
CLAIM_VALUES = {
    "sub": st.one_of(st.just("o-user"), st.text(max_size=6), JSON_VALUES),
    "iss": st.one_of(st.just("wx-gateway"), st.text(max_size=6), JSON_VALUES),
    "iat": st.one_of(st.just(int(NOW) - 10), st.integers(), JSON_VALUES),
    "exp": st.one_of(st.just(int(NOW) + 100), st.integers(), JSON_VALUES),
    "sid": st.one_of(st.just("sid-1"), st.text(max_size=6), JSON_VALUES),
    "uid": st.one_of(st.just("u-1"), st.text(max_size=6), JSON_VALUES),
    "nbf": JSON_VALUES,
    "aud": JSON_VALUES,
}


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def sign(
    header: dict[str, Any], claims: dict[str, Any], key: bytes = KEY, digest: str = "sha256"
) -> str:
    """A JWS signed by hand, so no library check on the way in limits what is tried
    (digest "" leaves the signature empty, as `alg: none` does)."""
    head = b64url(json.dumps(header).encode()) + "." + b64url(json.dumps(claims).encode())
    mac = hmac.new(key, head.encode(), digest).digest() if digest else b""
    return head + "." + b64url(mac)


@st.composite
def signed_claims(draw: st.DrawFn) -> dict[str, Any]:
    names = draw(st.sets(st.sampled_from(sorted(CLAIM_VALUES))))
    return {name: draw(CLAIM_VALUES[name]) for name in sorted(names)}


HEADERS = st.one_of(
    st.just({"kid": KID}),
    st.fixed_dictionaries({"kid": st.one_of(st.just(KID), JSON_VALUES)}),
    st.fixed_dictionaries(
        {"kid": st.just(KID)},
        optional={
            "alg": st.sampled_from(["HS256", "hs256", "none", "HS512", "RS256", ""]) | JSON_VALUES,
            "typ": JSON_VALUES,
            "crit": st.one_of(st.just(["b64"]), JSON_VALUES),
            "b64": st.one_of(st.just(False), JSON_VALUES),
            "jku": JSON_VALUES,
        },
    ),
)


@fuzz(500)
@given(signed_claims(), HEADERS)
@example({"sub": "o", "iss": "wx-gateway", "iat": True, "exp": 2**62, "sid": "s"}, {"kid": KID})
@example(
    {"sub": "o\r\nX-OpenId: x", "iss": "wx-gateway", "iat": 1, "exp": 2**40, "sid": "s"},
    {"kid": KID},
)
@example({"sub": ["o"], "iss": "wx-gateway", "iat": 1, "exp": 2**40, "sid": "s"}, {"kid": KID})
@example({"sub": "o", "iss": ["wx-gateway"], "iat": 1, "exp": 2**40, "sid": "s"}, {"kid": KID})
def test_correctly_signed_odd_claims(claims: dict[str, Any], header: dict[str, Any]) -> None:
    """Signed with the right key: only well-formed, current claims verify, and any
    refusal is the gateway's own token error."""
    token = sign({"alg": "HS256", "typ": "JWT", **header}, claims)
    try:
        got = CODEC.verify(token, NOW)
    except TOKEN_ERRORS:
        return
    control = re.compile(r"[\x00-\x1f\x7f]")
    assert header.get("kid") == KID
    assert header.get("alg", "HS256") == "HS256"
    assert claims.get("iss") == "wx-gateway"
    assert (
        isinstance(claims.get("sub"), str) and claims["sub"] and not control.search(claims["sub"])
    )
    assert isinstance(claims.get("sid"), str) and claims["sid"]
    # (JSON `true` passes as the integer 1 here; only the key holder can sign it.)
    assert isinstance(claims.get("exp"), int) and claims["exp"] > NOW
    assert isinstance(claims.get("iat"), int) and claims["iat"] <= NOW
    assert got.openid == claims["sub"] and got.session_id == claims["sid"]
    uid = claims.get("uid")
    assert got.unionid == (uid if isinstance(uid, str) else None)
    if got.unionid is not None:
        assert not control.search(got.unionid)


GOOD_CLAIMS = {"sub": "o", "iss": "wx-gateway", "iat": int(NOW), "exp": int(NOW) + 60, "sid": "s"}
OTHER_KEY = b"another-secret-of-at-least-32-bytes!!"


def test_hand_signed_good_claims_verify() -> None:
    """The hand signer agrees with the codec (so the refusals below mean something)."""
    got = CODEC.verify(sign({"alg": "HS256", "typ": "JWT", "kid": KID}, GOOD_CLAIMS), NOW)
    assert got.openid == "o" and got.session_id == "s"


@fuzz(100)
@given(
    st.sampled_from(
        [
            ("HS256", "sha256", OTHER_KEY),
            ("HS384", "sha384", KEY),
            ("HS512", "sha512", KEY),
            ("none", "", KEY),
            ("None", "", KEY),
            ("NONE", "", KEY),
            ("hs256", "sha256", KEY),
            ("HS256 ", "sha256", KEY),
        ]
    ),
    st.sampled_from([KID, key_id(DEFAULT_CONFIG.token.secret).upper(), "", None]),
)
def test_other_algorithms_and_keys_never_verify(
    alg_digest_key: tuple[str, str, bytes], kid: str | None
) -> None:
    alg, digest, key = alg_digest_key
    header = {"alg": alg, "typ": "JWT"} if kid is None else {"alg": alg, "typ": "JWT", "kid": kid}
    with pytest.raises(TOKEN_ERRORS):
        CODEC.verify(sign(header, GOOD_CLAIMS, key, digest), NOW)
    # A valid HS256 signature under the right key but a kid naming no key.
    if kid != KID:
        with pytest.raises(TOKEN_ERRORS):
            CODEC.verify(sign({**header, "alg": "HS256"}, GOOD_CLAIMS), NOW)


@fuzz(500)
@given(st.one_of(st.none(), st.text(max_size=40)), st.booleans())
def test_bearer_parsing_is_total(value: str | None, bearer: bool) -> None:
    try:
        token = bearer_from_header(value, bearer)
    except (TokenMissing, TokenInvalid):
        return
    assert value is not None
    assert token and token == token.strip()
    if bearer:
        scheme, _, rest = value.strip().partition(" ")
        assert scheme.lower() == "bearer" and rest.strip() == token
    else:
        assert token == value.strip()


@fuzz(300)
@given(
    st.sampled_from("Bb").flatmap(lambda b: spelling("earer").map(lambda rest: b + rest)),
    st.sampled_from(["", " ", "\t", "  "]),
    st.sampled_from([" ", "  ", "   "]),
    st.sampled_from(["", " ", "\t "]),
)
def test_bearer_scheme_any_case_and_spacing(
    scheme: str, lead: str, between: str, trail: str
) -> None:
    value = f"{lead}{scheme}{between}{VALID}{trail}"
    assert bearer_from_header(value, True) == VALID
    assert CODEC.verify(bearer_from_header(value, True), NOW) == VALID_CLAIMS


@fuzz(400)
@given(st.lists(MUTATIONS, min_size=1, max_size=2))
@example([("append", 0, "=")])
def test_mutated_authorization_value_verifies_only_the_exact_token(
    mutations: list[tuple[str, int, str]],
) -> None:
    """Parsing and verification together: whatever the header value, a value that
    gets through names exactly the valid token."""
    value = "Bearer " + VALID
    for mutation in mutations:
        value = mutate(value, mutation)
    try:
        claims = CODEC.verify(bearer_from_header(value, True), NOW)
    except (TokenMissing, *TOKEN_ERRORS):
        return
    assert bearer_from_header(value, True) == VALID, repr(value)
    assert claims == VALID_CLAIMS


def test_expiry_is_judged_against_the_given_clock() -> None:
    assert CODEC.verify(VALID, VALID_CLAIMS.expires_at - 1) == VALID_CLAIMS
    with pytest.raises(TokenExpired):
        CODEC.verify(VALID, VALID_CLAIMS.expires_at)
    with pytest.raises(TokenInvalid):
        CODEC.verify(VALID, VALID_CLAIMS.issued_at - 1)  # issued in the future
