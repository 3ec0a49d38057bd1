"""Path normalisation, route matching and the path the upstream receives.

Contract sections 5 and 8: the path is percent-decoded once (for comparison
only), repeated slashes are folded, dot segments resolved; `..` above the root,
an encoded `/`, `\\` or NUL is 400 ``bad_request``; the route and its auth
policy are chosen on that one path, and the upstream receives that same path
with the client's other encodings kept and the query string unchanged.
docs/design.md adds: malformed `%` escapes are 400, `;params` are ignored for
matching (servlet containers drop them), the absolute form is accepted.

The first half tests the functions; the second half sends raw bytes (no client
library to tidy the URL up) to a running gateway and checks what the upstream saw.
"""

from __future__ import annotations

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from hypothesis import given, settings
from hypothesis import strategies as st
from yarl import URL

from gateway.config import RouteConfig
from gateway.proxy.paths import BadPath, normalise, normalise_segments, split_target
from gateway.proxy.routing import Router
from tests.support.errors import assert_error
from tests.support.gateway import Running, StartGateway, route, url_of
from tests.support.rawhttp import Response, request
from tests.support.upstream import Recorder

# -- gateway.proxy.paths.normalise ------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "match", "forward"),
    [
        ("/", "/", "/"),
        ("/api", "/api", "/api"),
        ("/api/", "/api/", "/api/"),
        ("/api/x", "/api/x", "/api/x"),
        # repeated slashes fold
        ("//api//x", "/api/x", "/api/x"),
        ("/api//", "/api/", "/api/"),
        ("///", "/", "/"),
        # dot segments
        ("/api/./x", "/api/x", "/api/x"),
        ("/./api", "/api", "/api"),
        ("/api/x/.", "/api/x/", "/api/x/"),
        ("/api/x/..", "/api/", "/api/"),
        ("/api/x/../y", "/api/y", "/api/y"),
        ("/a/b/../../c", "/c", "/c"),
        ("/a/..", "/", "/"),
        # folding comes before dot resolution (contract section 8)
        ("/public//../private", "/private", "/private"),
        # encoded dots are dots: decoded once for comparison
        ("/public/%2e%2e/private", "/private", "/private"),
        ("/public/%2E%2E/private", "/private", "/private"),
        ("/public/.%2e/private", "/private", "/private"),
        ("/public/%2e./private", "/private", "/private"),
        ("/public/%2e/x", "/public/x", "/public/x"),
        # ...but only once: a double-encoded dot is not a dot
        ("/public/%252e%252e/x", "/public/%2e%2e/x", "/public/%252e%252e/x"),
        # other encodings are decoded for matching and kept as sent for forwarding
        ("/a%20b/./c", "/a b/c", "/a%20b/c"),
        ("/%61pi/x", "/api/x", "/%61pi/x"),
        ("/caf%C3%A9/%2a", "/café/*", "/caf%C3%A9/%2a"),
        ("/a+b/c%2B", "/a+b/c+", "/a+b/c%2B"),
        # ;params: ignored for matching, kept for forwarding; `..;` is a `..`
        ("/private;x/a", "/private/a", "/private;x/a"),
        ("/private;jsessionid=1", "/private", "/private;jsessionid=1"),
        ("/public/..;/private", "/private", "/private"),
        ("/public/..;x=1/private", "/private", "/private"),
        ("/public/.;x/y", "/public/y", "/public/y"),
        ("/public/%2e%2e;/private", "/private", "/private"),
    ],
)
def test_normalise(raw: str, match: str, forward: str) -> None:
    result = normalise(raw)
    assert (result.match, result.forward) == (match, forward)


@pytest.mark.parametrize(
    "raw",
    [
        # above the root
        "/..",
        "/../a",
        "/a/../..",
        "/a/../../b",
        "/%2e%2e",
        "/%2E%2E/x",
        "/.%2e",
        "/..;/x",
        "//..//x",
        # encoded slash, backslash, NUL
        "/a%2Fb",
        "/a%2fb",
        "/public/..%2fprivate",
        "/a%5Cb",
        "/a%5cb",
        "/a%00b",
        "/a%00",
        # raw backslash and NUL
        "/a\\b",
        "\\",
        "/public\\..\\private",
        "/a\x00b",
        # malformed percent-encoding
        "/a%zz",
        "/a%",
        "/a%2",
        "/a%g0",
        "/%%2e%2e",
        # not a path
        "",
        "api/x",
        "*",
    ],
)
def test_normalise_refuses(raw: str) -> None:
    with pytest.raises(BadPath):
        normalise(raw)


# -- gateway.proxy.routing.Router --------------------------------------------------------

UPSTREAM = "http://127.0.0.1:9"


def router(*prefixes: str, strip: bool = False) -> Router:
    return Router(
        tuple(RouteConfig(prefix=p, upstreams=(UPSTREAM,), strip_prefix=strip) for p in prefixes),
        1024,
    )


@pytest.mark.parametrize(
    ("prefix", "path", "matches"),
    [
        ("/api", "/api", True),
        ("/api", "/api/", True),
        ("/api", "/api/x", True),
        ("/api", "/api/x/y", True),
        ("/api", "/apix", False),
        ("/api", "/api-v2", False),
        ("/api", "/ap", False),
        ("/api", "/", False),
        ("/api", "/x/api", False),
        ("/api/", "/api/", True),
        ("/api/", "/api/x", True),
        ("/api/", "/api/x/y", True),
        ("/api/", "/api", False),
        ("/api/", "/apix/", False),
        ("/a/b", "/a/b/c", True),
        ("/a/b", "/a/bc", False),
        ("/a/b", "/a", False),
        ("/", "/", True),
        ("/", "/anything/at/all", True),
    ],
)
def test_prefix_matches_at_segment_boundary(prefix: str, path: str, matches: bool) -> None:
    route = router(prefix).match(path)
    assert (route.prefix if route else None) == (prefix if matches else None)


LONGEST = ["/", "/api", "/api/v2/", "/api/v2/admin"]


@pytest.mark.parametrize("order", ["as_listed", "reversed"])
@pytest.mark.parametrize(
    ("path", "winner"),
    [
        ("/", "/"),
        ("/x", "/"),
        ("/apix", "/"),
        ("/api", "/api"),
        ("/api/v1/x", "/api"),
        ("/api/v2", "/api"),  # `/api/v2/` needs something under it
        ("/api/v2/", "/api/v2/"),
        ("/api/v2/x", "/api/v2/"),
        ("/api/v2/adminx", "/api/v2/"),
        ("/api/v2/admin", "/api/v2/admin"),
        ("/api/v2/admin/users", "/api/v2/admin"),
    ],
)
def test_longest_prefix_wins(order: str, path: str, winner: str) -> None:
    prefixes = LONGEST if order == "as_listed" else LONGEST[::-1]
    route = router(*prefixes).match(path)
    assert route is not None and route.prefix == winner


@pytest.mark.parametrize(
    ("prefix", "strip", "raw", "upstream_path"),
    [
        ("/api/", True, "/api/x", "/x"),
        ("/api/", True, "/api/x/y", "/x/y"),
        ("/api/", True, "/api/", "/"),
        ("/api/", True, "/api/x/", "/x/"),
        ("/api", True, "/api", "/"),
        ("/api", True, "/api/x", "/x"),
        ("/a/b/", True, "/a/b/c/d", "/c/d"),
        ("/a/b", True, "/a/b", "/"),
        # the rest of the path keeps the client's encodings
        ("/api/", True, "/api/a%20b/%41", "/a%20b/%41"),
        # a percent-encoded prefix segment: matched decoded, stripped as a segment
        ("/api/", True, "/%61pi/x", "/x"),
        ("/api/", True, "/api;v=1/x", "/x"),
        ("/api/", True, "/x/../api//./y", "/y"),
        # without strip_prefix the prefix segment is kept exactly as sent
        ("/api/", False, "/%61pi/x", "/%61pi/x"),
        ("/api/", False, "/%61pi/a%20b/../c", "/%61pi/c"),
        ("/api/", False, "/api;v=1/x", "/api;v=1/x"),
    ],
)
def test_strip_prefix(prefix: str, strip: bool, raw: str, upstream_path: str) -> None:
    path = normalise(raw)
    route = router(prefix, strip=strip).match(path.match)
    assert route is not None
    assert route.upstream_path(path) == upstream_path


# -- gateway.proxy.paths.split_target -------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "path", "query"),
    [
        ("/api/x", "/api/x", ""),
        ("/api/x?a=/b", "/api/x", "a=/b"),
        ("http://h/api/x", "/api/x", ""),
        ("HTTPS://h:8443/api/x?q=1", "/api/x", "q=1"),
        ("http://h", "/", ""),
        # the authority ends at the first "/", "?" or "#" (RFC 3986 3.2), so a
        # "/" after a "?" is the query's (issue 12, item 11)
        ("http://h?/api/x", "/", "/api/x"),
        ("http://h:80?a=/api/x/../y", "/", "a=/api/x/../y"),
        ("http://h?", "/", ""),
        ("http://u@h/api/x", "/api/x", ""),
    ],
)
def test_split_target(target: str, path: str, query: str) -> None:
    assert split_target(target) == (path, query)


@pytest.mark.parametrize(
    "target", ["api/x", "*", "ftp://h/x", "/a#b", "http://h#/api/x", "http://h/a#b", "http:/h/x"]
)
def test_split_target_refuses(target: str) -> None:
    with pytest.raises(BadPath):
        split_target(target)


# An authority (any characters but the three that end it) changes nothing:
# the absolute form means what the origin form after it means.
_AUTHORITY = st.text(alphabet="abz09.-:@[]%_~!$&'()*+,;=", max_size=16)
_REST = st.text(alphabet="ab/?#.%2f=&;", max_size=20)


@given(_AUTHORITY, st.sampled_from(["", "/", "?", "#"]), _REST)
@settings(max_examples=2000, deadline=None, derandomize=True, database=None)
def test_absolute_form_means_its_origin_form(authority: str, first: str, rest: str) -> None:
    after = first + rest if first else ""
    origin = after if after.startswith("/") else "/" + after
    try:
        expected = split_target(origin)
    except BadPath:
        with pytest.raises(BadPath):
            split_target(f"http://{authority}{after}")
        return
    assert split_target(f"http://{authority}{after}") == expected


# -- through a running gateway ------------------------------------------------------


async def raw_request(
    port: int, method: str, target: str, headers: list[tuple[str, str]] | None = None
) -> Response:
    """The request line exactly as given (no client library to tidy the URL up)."""
    return await request(port, target, headers or [], method=method, host="front.example")


@pytest.fixture
async def policies(start_gateway: StartGateway, upstream: TestServer) -> Running:
    url = url_of(upstream)
    return await start_gateway(
        routes=[
            {"prefix": "/public", "upstream": url, "auth": "public"},
            {"prefix": "/private", "upstream": url, "auth": "required"},
            {"prefix": "/svc/", "upstream": url, "auth": "public", "strip_prefix": True},
        ]
    )


BAD = (400, "bad_request")
MISSING = (401, "token_missing")
NO_ROUTE = (404, "no_route")

# (method, target, outcome): outcome is the path+query the upstream must see (200),
# or the (status, error) of a refusal that must not reach the upstream at all.
PATH_TRICKS: list[tuple[str, str, str | tuple[int, str]]] = [
    # climbing from the public route into the private one
    ("GET", "/public/../private", MISSING),
    ("GET", "/public/../private/x", MISSING),
    ("GET", "/public/%2e%2e/private", MISSING),
    ("GET", "/public/%2E%2E/private", MISSING),
    ("GET", "/public/.%2e/private", MISSING),
    ("GET", "/public/%2e./private", MISSING),
    ("GET", "/public/x/../../private", MISSING),
    ("GET", "/public//../private", MISSING),
    ("GET", "//private", MISSING),
    ("GET", "///private//x", MISSING),
    ("GET", "/./private", MISSING),
    ("GET", "/publicx/../private", MISSING),
    ("GET", "/svc/../private", MISSING),
    ("GET", "/%70rivate/x", MISSING),
    # servlet path parameters (Tomcat/Jetty read these as the private route)
    ("GET", "/public/..;/private", MISSING),
    ("GET", "/public/..;jsessionid=x/private", MISSING),
    ("GET", "/public/%2e%2e;/private", MISSING),
    ("GET", "/private;x/", MISSING),
    ("GET", "/private;x", MISSING),
    ("GET", "/private;x/a", MISSING),
    # encoded slash, backslash, NUL, malformed escapes, above the root
    ("GET", "/public/..%2fprivate", BAD),
    ("GET", "/public/..%2Fprivate", BAD),
    ("GET", "/public/%2F", BAD),
    ("GET", "/public/..%5cprivate", BAD),
    ("GET", "/public/..%5Cprivate", BAD),
    ("GET", "/public/..\\private", BAD),
    ("GET", "/public\\..\\private", BAD),
    ("GET", "/public/%00", BAD),
    ("GET", "/public/x%00.json", BAD),
    ("GET", "/public/a\x00b", BAD),
    ("GET", "/public/%zz", BAD),
    ("GET", "/public/%", BAD),
    ("GET", "/public/%2", BAD),
    ("GET", "/..", BAD),
    ("GET", "/public/../../private", BAD),
    ("GET", "/%2e%2e/private", BAD),
    ("GET", "/..;/private", BAD),
    ("OPTIONS", "*", BAD),
    ("GET", "private", BAD),
    ("GET", "ftp://h/public/x", BAD),
    # absolute form: its path is routed like any other
    ("GET", "http://evil.example/public/../private", MISSING),
    ("GET", "https://evil.example:8443/private/x", MISSING),
    ("GET", "http://evil.example/%2e%2e/private", BAD),
    # ...and its authority ends at "?" or "#" too: what follows is a query (or
    # a fragment, refused), never a path to route on
    ("GET", "http://evil.example?/public/x", NO_ROUTE),
    ("GET", "http://evil.example?/private/x", NO_ROUTE),
    ("GET", "http://evil.example:80?a=/public/x", NO_ROUTE),
    ("GET", "http://evil.example#/public/x", BAD),
    # no route
    ("GET", "/publicx", NO_ROUTE),
    ("GET", "/PRIVATE", NO_ROUTE),
    ("GET", "/private/../nothing", NO_ROUTE),
    ("GET", "http://evil.example", NO_ROUTE),
    # forwarded: exactly the normalised path, other encodings and the query as sent
    ("GET", "/public", "/public"),
    ("GET", "/public/x", "/public/x"),
    ("GET", "/public/a%20b/./c", "/public/a%20b/c"),
    ("GET", "/public/a/b/../c", "/public/a/c"),
    ("GET", "/public//x//y", "/public/x/y"),
    ("GET", "/public/x/.", "/public/x/"),
    ("GET", "/private/../public/x", "/public/x"),
    ("GET", "/public/%252e%252e/private", "/public/%252e%252e/private"),
    ("GET", "/%70ublic/x", "/%70ublic/x"),
    ("GET", "/public/caf%C3%A9/%7E", "/public/caf%C3%A9/%7E"),
    ("GET", "/public/x?a=%2F&b=..%2F", "/public/x?a=%2F&b=..%2F"),
    (
        "GET",
        "/public/x?a=%2F&b=..%2F&c=/../private&d=%00&e=%zz&f=\\",
        "/public/x?a=%2F&b=..%2F&c=/../private&d=%00&e=%zz&f=\\",
    ),
    ("GET", "/public/../public/x?q=%20+1", "/public/x?q=%20+1"),
    ("POST", "/public/./form?x=1", "/public/form?x=1"),
    ("GET", "http://evil.example/public/x?a=%2F", "/public/x?a=%2F"),
    ("GET", "http://evil.example/public/./a/../b", "/public/b"),
    # strip_prefix, with the prefix itself percent-encoded
    ("GET", "/svc/a%20b/./c?q=%2F", "/a%20b/c?q=%2F"),
    ("GET", "/%73vc/x", "/x"),
    ("GET", "/svc;v=1/x", "/x"),
]


@pytest.mark.parametrize(
    ("method", "target", "outcome"),
    PATH_TRICKS,
    ids=[f"{m} {t!r}" for m, t, _ in PATH_TRICKS],
)
async def test_path_tricks_without_token(
    policies: Running,
    seen: Recorder,
    method: str,
    target: str,
    outcome: str | tuple[int, str],
) -> None:
    reply = await raw_request(policies.listener.port, method, target)
    if isinstance(outcome, str):
        assert reply.status == 200, reply.body
        assert [s.raw_path for s in seen.seen] == [outcome]
        assert seen.last.method == method
    else:
        assert_error(reply, *outcome)
        assert seen.seen == []


@pytest.fixture
async def two_policies(start_gateway: StartGateway, upstream: TestServer) -> Running:
    url = url_of(upstream)
    return await start_gateway(
        routes=[
            {"prefix": "/public", "upstream": url, "auth": "public"},
            {"prefix": "/private", "upstream": url, "auth": "required"},
            {"prefix": "/", "upstream": url, "auth": "public"},
        ]
    )


@pytest.mark.parametrize(
    ("target", "status", "forwarded"),
    [
        ("/public/../private/x", 401, None),
        ("/public/%2e%2e/private/x", 401, None),
        ("/public/%2E%2E/private/x", 401, None),
        ("/public/.%2e/private/x", 401, None),
        ("/public//../private/x", 401, None),
        ("//private/x", 401, None),
        ("/public/..;/private/x", 401, None),
        ("/private;jsessionid=1/x", 401, None),
        ("/./private/x", 401, None),
        ("/public/..%2fprivate/x", 400, None),
        ("/public/..%2Fprivate", 400, None),
        ("/public/..%5cprivate", 400, None),
        ("/public/..\\private", 400, None),
        ("/public/%00", 400, None),
        ("/public/%zz", 400, None),
        ("/..", 400, None),
        ("/public/../../x", 400, None),
        ("/public/a%20b/./c?q=%2F&r=..%2F", 200, "/public/a%20b/c?q=%2F&r=..%2F"),
        ("/public/x/../y", 200, "/public/y"),
        ("/public//x", 200, "/public/x"),
        ("http://evil.example/public/x", 200, "/public/x"),
        ("/publicx/..", 200, "/"),
    ],
)
async def test_path_tricks(
    two_policies: Running, seen: Recorder, target: str, status: int, forwarded: str | None
) -> None:
    """The same tricks with a catch-all public route behind the private one."""
    reply = await request(two_policies.listener.port, target)
    assert reply.status == status, reply.body
    if forwarded is None:
        assert seen.seen == []
        assert_error(reply, status, ("bad_request", "token_missing"))
    else:
        assert seen.last.raw_path == forwarded


@pytest.fixture
async def catch_all(start_gateway: StartGateway, upstream: TestServer) -> Running:
    url = url_of(upstream)
    return await start_gateway(
        routes=[
            {"prefix": "/", "upstream": url, "auth": "public"},
            {"prefix": "/private", "upstream": url, "auth": "required"},
        ]
    )


# The absolute form's authority ends at "/", "?" or "#": a "/" in its query is
# neither routed on nor forwarded as the path (issue 12, item 11).
ABSOLUTE_QUERIES = [
    ("http://evil.example?/private/x", "/?/private/x"),
    ("http://evil.example:8080?a=/private/x&b=..%2F", "/?a=/private/x&b=..%2F"),
    ("https://evil.example?/private/../private/x", "/?/private/../private/x"),
    ("http://evil.example/public?/private/x", "/public?/private/x"),
    ("http://evil.example", "/"),
]


@pytest.mark.parametrize(("target", "forwarded"), ABSOLUTE_QUERIES)
async def test_absolute_form_query_is_never_the_path(
    catch_all: Running, seen: Recorder, target: str, forwarded: str
) -> None:
    reply = await raw_request(catch_all.listener.port, "GET", target)
    assert reply.status == 200, reply.body
    assert [s.raw_path for s in seen.seen] == [forwarded]
    assert seen.last.header("X-OpenId") is None


# With a valid token the private route is reached: the upstream must get the
# same normalised path the policy was decided on.
TOKEN_TRICKS = [
    ("/public/../private", "/private"),
    ("/public/%2e%2e/private/a%20b", "/private/a%20b"),
    ("/public/%2E%2E/private?x=..%2F", "/private?x=..%2F"),
    ("/public//../private//x", "/private/x"),
    ("//private", "/private"),
    ("/public/..;/private/x", "/private/x"),
    ("/private;x/", "/private;x/"),
    ("/private;x/a/./b/../c", "/private;x/a/c"),
    ("/%70rivate/x", "/%70rivate/x"),
    ("http://evil.example/public/../private/y", "/private/y"),
]


@pytest.mark.parametrize(("target", "forwarded"), TOKEN_TRICKS, ids=[t for t, _ in TOKEN_TRICKS])
async def test_path_tricks_with_token_reach_the_private_route_normalised(
    policies: Running, seen: Recorder, target: str, forwarded: str
) -> None:
    token = policies.token("o-path")
    reply = await raw_request(
        policies.listener.port, "GET", target, [("Authorization", f"Bearer {token}")]
    )
    assert reply.status == 200, reply.body
    assert [s.raw_path for s in seen.seen] == [forwarded]
    assert seen.last.header("X-OpenId") == "o-path"


@pytest.mark.parametrize(
    "target",
    ["/public/..%2fprivate", "/public/..\\private", "/public/%00", "/public/%zz", "/.."],
)
async def test_bad_paths_are_refused_even_with_a_token(
    policies: Running, seen: Recorder, target: str
) -> None:
    token = policies.token("o-path")
    reply = await raw_request(
        policies.listener.port, "GET", target, [("Authorization", f"Bearer {token}")]
    )
    assert_error(reply, *BAD)
    assert seen.seen == []


@pytest.mark.parametrize(
    ("target", "status"),
    [
        ("/api/../healthz", 200),
        ("/public/%2e%2e/healthz", 200),
        ("//healthz", 200),
        ("/api/../auth/me", 401),
        ("/public/..;/auth/me", 401),
        ("/public/../auth/nothing", 404),
    ],
)
async def test_own_endpoints_are_matched_on_the_normalised_path(
    gw: Running, seen: Recorder, target: str, status: int
) -> None:
    reply = await raw_request(gw.listener.port, "GET", target)
    assert reply.status == status, reply.body
    assert seen.seen == []


async def test_no_route_is_404_json(gw: Running, http: aiohttp.ClientSession) -> None:
    async with http.get(gw.url + "/nowhere") as resp:
        assert resp.status == 404
        assert (await resp.json())["error"] == "no_route"


async def test_own_endpoints_are_never_proxied(
    gw: Running, http: aiohttp.ClientSession, seen: Recorder
) -> None:
    async with http.get(gw.url + "/healthz") as resp:
        assert resp.status == 200
    async with http.get(gw.url + "/api/../readyz") as resp:
        assert resp.status == 200
    async with http.get(gw.url + "/auth/unknown") as resp:
        assert resp.status == 404
        assert (await resp.json())["error"] == "no_route"
    async with http.post(gw.url + "/healthz") as resp:
        assert resp.status == 405
        assert (await resp.json())["error"] == "method_not_allowed"
    assert seen.seen == []


async def test_strip_prefix_base_path_and_query(
    start_gateway: StartGateway, http: aiohttp.ClientSession, upstream: TestServer, seen: Recorder
) -> None:
    base = url_of(upstream)
    gw = await start_gateway(
        routes=[
            route("/svc/", base, strip_prefix=True),
            route("/one", base, strip_prefix=True),
            route("/deep/er/", base, strip_prefix=True),
            route("/b/", base + "/base"),
            route("/bs/", base + "/base/", strip_prefix=True),
            route("/keep/", base),
            route("/based/", base + "/base", strip_prefix=True),
        ]
    )
    query = "z=1&a=%2F&a=2&e=&f&sp=a+b%20c&u=%E4%BD%A0&semi=a;b&q=?&amp=%26"
    cases = {
        "/svc/x": "/x",
        "/svc/a/b/": "/a/b/",
        "/svc/": "/",
        "/one": "/",
        "/one/x": "/x",
        "/deep/er/x": "/x",
        "/b/x": "/base/b/x",
        "/bs/x/y": "/base/x/y",
        "/keep/x": "/keep/x",
        "/keep/a%20b/%E4%BD%A0": "/keep/a%20b/%E4%BD%A0",
        "/based/y": "/base/y",
    }
    for sent, expected in cases.items():
        for qs in ("", "?" + query):
            async with http.get(URL(gw.url + sent + qs, encoded=True)) as resp:
                assert resp.status == 200, (sent, await resp.text())
            assert seen.last.raw_path == expected + qs, sent


# The fast path of normalise() (a path that is already its own normal form) must
# agree with the general segment-by-segment normalisation on every input.
_PATH_ALPHABET = "ab/.;%2fF5c0-_~é\\"


@given(st.text(alphabet=_PATH_ALPHABET, max_size=24).map(lambda s: "/" + s))
@settings(max_examples=3000, deadline=None, derandomize=True, database=None)
def test_fast_path_agrees_with_the_general_normalisation(raw: str) -> None:
    try:
        general = normalise_segments(raw)
    except BadPath:
        with pytest.raises(BadPath):
            normalise(raw)
        return
    assert normalise(raw) == general
