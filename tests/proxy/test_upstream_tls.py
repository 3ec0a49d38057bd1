"""TLS to upstreams, with a client certificate (issue 17): real TLS upstreams
on loopback that require a client certificate, with certificates made here
(tests/support/certs.py).

What the upstream saw proves the gateway's side: the subject of the client
certificate it was shown, the SNI name it was sent, the gateway-side port of
each connection (one port for two requests: one kept-alive connection). Every
failed handshake is a 502 ``upstream_unavailable`` and one warning naming the
route, the target and OpenSSL's reason, never a certificate or a key. The
config errors are the loader's, checked through ``build_config``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.config import ConfigError, build_config
from gateway.proxy.routing import Router
from gateway.proxy.tls import CLOSED_AFTER_HANDSHAKE
from tests.support.certs import Authority, Issued, server_context
from tests.support.errors import error_of
from tests.support.gateway import StartGateway, base_config, route, url_of
from tests.support.procs import RunGateway
from tests.support.waiting import PROMPT

GATEWAY_CN = "wx-gateway"
PREFIX = "/secure/"


@dataclass(frozen=True)
class PKI:
    """The upstreams' CA with a loopback server certificate, the CA upstreams
    trust for callers with the gateway's client certificate, and a stranger."""

    server_ca: Authority
    server: Issued
    client_ca: Authority
    client: Issued
    other: Authority
    directory: Path


@pytest.fixture
def pki(tmp_path: Path) -> PKI:
    server_ca = Authority(tmp_path, "servers")
    client_ca = Authority(tmp_path, "callers")
    return PKI(
        server_ca,
        server_ca.server(),
        client_ca,
        client_ca.client(GATEWAY_CN),
        Authority(tmp_path, "other"),
        tmp_path,
    )


def tls_of(pki: PKI, client: Issued | None = None, **extra: str) -> dict[str, str]:
    """A route's ``tls``: trust the upstreams' CA, show ``client`` (default: the
    gateway's certificate)."""
    client = client or pki.client
    return {
        "ca": str(pki.server_ca.cert),
        "cert": str(client.cert),
        "key": str(client.key),
        **extra,
    }


# -- the TLS upstream -----------------------------------------------------------------


@dataclass
class Seen:
    sni: list[str | None]


def _peer_cn(request: web.Request) -> str | None:
    assert request.transport is not None
    cert = request.transport.get_extra_info("peercert") or {}
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


async def _peer(request: web.Request) -> web.StreamResponse:
    """Who called: the client certificate's CN and the caller's port."""
    assert request.transport is not None
    body = await request.read()
    return web.json_response(
        {
            "client": _peer_cn(request),
            "port": request.transport.get_extra_info("peername")[1],
            "path": request.path,
            "body": body.decode(),
        }
    )


async def _socket(request: web.Request) -> web.StreamResponse:
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    await ws.send_str(f"client={_peer_cn(request)}")
    async for message in ws:
        if message.type is web.WSMsgType.TEXT:
            await ws.send_str("echo:" + message.data)
    return ws


TLSUpstream = Callable[..., contextlib.AbstractAsyncContextManager[TestServer]]


@pytest.fixture
def tls_upstream(pki: PKI) -> tuple[TLSUpstream, Seen]:
    """Start a TLS upstream: ``cert`` (default: the loopback certificate) and, unless
    ``require_client`` is false, a client certificate from the callers' CA required."""
    seen = Seen([])

    @contextlib.asynccontextmanager
    async def start(
        cert: Issued | None = None, require_client: bool = True
    ) -> AsyncIterator[TestServer]:
        context = server_context(cert or pki.server, pki.client_ca if require_client else None)

        def note_sni(_: ssl.SSLObject, name: str | None, __: ssl.SSLContext) -> None:
            seen.sni.append(name)

        context.sni_callback = note_sni
        app = web.Application()
        app.router.add_get("/secure/ws", _socket)
        app.router.add_route("*", "/{tail:.*}", _peer)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server(ssl=context)
        try:
            yield server
        finally:
            await server.close()

    return start, seen


# -- the log line -----------------------------------------------------------------


def tls_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "gateway.proxy" and r.levelno == logging.WARNING and "TLS" in r.getMessage()
    ]


def assert_one_line(caplog: pytest.LogCaptureFixture, target: str, reasons: tuple[str, ...]) -> str:
    """Exactly one TLS warning, naming the route, the target and one of ``reasons``,
    and no PEM anywhere in the log."""
    lines = tls_lines(caplog)
    assert len(lines) == 1, lines
    line = lines[0]
    assert f"route {PREFIX}" in line and target in line, line
    assert any(line.endswith(": " + reason) for reason in reasons), (line, reasons)
    assert "BEGIN" not in caplog.text and "PRIVATE" not in caplog.text
    return line


# How a refused client certificate reaches the gateway depends on the upstream's
# TLS stack and on timing: an alert (TLS 1.3 sends it after the handshake, TLS 1.2
# during it), or only a close or a reset when the upstream does not flush the alert
# (asyncio's server, here). Each has its own sentence; none is a success.
REFUSED_CLIENT = (
    "tlsv13 alert certificate required",
    "tlsv1 alert unknown ca",
    "sslv3 alert bad certificate",
    CLOSED_AFTER_HANDSHAKE,
    "the connection was cut during the TLS handshake (Connection reset by peer)",
)


# -- success ----------------------------------------------------------------------


async def test_mtls_upstream_sees_the_gateways_client_certificate(
    start_gateway: StartGateway,
    http: aiohttp.ClientSession,
    pki: PKI,
    tls_upstream: tuple[TLSUpstream, Seen],
    caplog: pytest.LogCaptureFixture,
) -> None:
    start, seen = tls_upstream
    async with start() as upstream:
        gw = await start_gateway(routes=[route(PREFIX, url_of(upstream), tls=tls_of(pki))])
        async with http.get(gw.url + PREFIX + "a") as resp:
            assert resp.status == 200, await resp.text()
            first = await resp.json()
        # A body takes the coroutine path; the connection is the same one.
        async with http.post(gw.url + PREFIX + "b", data=b"payload") as resp:
            assert resp.status == 200, await resp.text()
            second = await resp.json()
    assert first["client"] == second["client"] == GATEWAY_CN
    assert second["body"] == "payload"
    # Keep-alive over TLS: both requests on one connection (one gateway-side port).
    assert first["port"] == second["port"]
    # One handshake, with no SNI: an IP address is never sent as one (RFC 6066 section 3).
    assert seen.sni == [None]
    assert tls_lines(caplog) == []


async def test_two_routes_with_different_client_certificates_never_share_a_connection(
    start_gateway: StartGateway,
    http: aiohttp.ClientSession,
    pki: PKI,
    tls_upstream: tuple[TLSUpstream, Seen],
) -> None:
    start, _ = tls_upstream
    other_client = pki.client_ca.client("wx-gateway-reports")
    async with start() as upstream:
        url = url_of(upstream)
        gw = await start_gateway(
            routes=[
                route("/one/", url, tls=tls_of(pki)),
                route("/two/", url, tls=tls_of(pki, other_client)),
            ]
        )
        answers: dict[str, list[dict[str, Any]]] = {"/one/": [], "/two/": []}
        # Interleaved, so a pool shared by both routes would hand each the other's
        # idle connection.
        for prefix in ("/one/", "/two/", "/one/", "/two/"):
            async with http.get(gw.url + prefix + "x") as resp:
                assert resp.status == 200, await resp.text()
                answers[prefix].append(await resp.json())
    assert {a["client"] for a in answers["/one/"]} == {GATEWAY_CN}
    assert {a["client"] for a in answers["/two/"]} == {"wx-gateway-reports"}
    ports_one = {a["port"] for a in answers["/one/"]}
    ports_two = {a["port"] for a in answers["/two/"]}
    assert len(ports_one) == len(ports_two) == 1 and ports_one != ports_two


async def test_server_name_is_the_name_checked_and_sent_as_sni(
    start_gateway: StartGateway,
    http: aiohttp.ClientSession,
    pki: PKI,
    tls_upstream: tuple[TLSUpstream, Seen],
    caplog: pytest.LogCaptureFixture,
) -> None:
    start, seen = tls_upstream
    # A certificate for another name only: reached by IP, it passes only because
    # the route names what the certificate says.
    named = pki.server_ca.server("backend", names=("backend.internal",))
    async with start(cert=named) as upstream:
        tls = tls_of(pki, server_name="backend.internal")
        gw = await start_gateway(
            routes=[
                route(PREFIX, url_of(upstream), tls=tls),
                route("/unnamed/", url_of(upstream), tls=tls_of(pki)),
            ]
        )
        async with http.get(gw.url + PREFIX + "x") as resp:
            assert resp.status == 200, await resp.text()
            assert (await resp.json())["client"] == GATEWAY_CN
        assert seen.sni == ["backend.internal"]
        assert tls_lines(caplog) == []
        # The same upstream, without server_name: the URL's host is checked.
        async with http.get(gw.url + "/unnamed/x") as resp:
            assert resp.status == 502
            assert await error_of(resp) == "upstream_unavailable"
    line = tls_lines(caplog)[0]
    assert line.startswith("route /unnamed/"), line
    assert line.endswith("IP address mismatch, certificate is not valid for '127.0.0.1'."), line


# -- failures: 502 and one line ----------------------------------------------------

# A case: what the test sets up (the upstream's `cert`, the route's `tls`) and
# the reasons the log line may give.
Failure = tuple[Callable[[PKI], dict[str, Any]], tuple[str, ...]]
FAILURES: dict[str, Failure] = {
    "gateway trusts another CA": (
        lambda pki: {"tls": {**tls_of(pki), "ca": str(pki.other.cert)}},
        ("certificate verify failed: unable to get local issuer certificate",),
    ),
    "expired server certificate": (
        lambda pki: {
            "cert": pki.server_ca.server("stale", expired=True),
            "tls": tls_of(pki),
        },
        ("certificate verify failed: certificate has expired",),
    ),
    "server_name the certificate does not carry": (
        lambda pki: {"tls": tls_of(pki, server_name="api.internal")},
        (
            "certificate verify failed: Hostname mismatch, "
            "certificate is not valid for 'api.internal'.",
        ),
    ),
    "no client certificate": (
        lambda pki: {"tls": {"ca": str(pki.server_ca.cert)}},
        REFUSED_CLIENT,
    ),
    "client certificate from another CA": (
        lambda pki: {"tls": tls_of(pki, pki.other.client(GATEWAY_CN))},
        REFUSED_CLIENT,
    ),
}


@pytest.mark.parametrize("method", ["GET", "POST"])
@pytest.mark.parametrize("case", list(FAILURES))
async def test_failed_handshake_is_502_and_one_clear_line(
    start_gateway: StartGateway,
    http: aiohttp.ClientSession,
    pki: PKI,
    tls_upstream: tuple[TLSUpstream, Seen],
    caplog: pytest.LogCaptureFixture,
    case: str,
    method: str,
) -> None:
    setup, reasons = FAILURES[case]
    given = setup(pki)
    start, _ = tls_upstream
    async with start(cert=given.get("cert")) as upstream:
        target = url_of(upstream)
        gw = await start_gateway(routes=[route(PREFIX, target, tls=given["tls"])])
        # POST carries a body: it takes the coroutine path, with its body spent.
        async with http.request(method, gw.url + PREFIX + "x", data=b"b" * 100) as resp:
            assert resp.status == 502
            assert await error_of(resp) == "upstream_unavailable"
    assert_one_line(caplog, target, reasons)


async def test_a_handshake_failure_marks_the_target_like_a_refused_connection(
    start_gateway: StartGateway,
    http: aiohttp.ClientSession,
    pki: PKI,
    tls_upstream: tuple[TLSUpstream, Seen],
    caplog: pytest.LogCaptureFixture,
) -> None:
    start, _ = tls_upstream
    expired = pki.server_ca.server("stale", expired=True)
    async with start(cert=expired) as bad, start() as good:
        bad_url = url_of(bad)
        gw = await start_gateway(routes=[route(PREFIX, [bad_url, url_of(good)], tls=tls_of(pki))])
        for _ in range(4):
            # GET and POST alike: nothing reached the bad target's application,
            # so even a request with a body goes on to the next one.
            async with http.post(gw.url + PREFIX + "x", data=b"body") as resp:
                assert resp.status == 200, await resp.text()
                assert (await resp.json())["body"] == "body"
    # Round robin would come back to the bad target by the third request: it was
    # skipped, marked dead by its failed handshake.
    assert_one_line(caplog, bad_url, ("certificate verify failed: certificate has expired",))


async def test_a_refused_client_certificate_spends_a_body_but_not_a_bodyless_request(
    start_gateway: StartGateway,
    http: aiohttp.ClientSession,
    pki: PKI,
    tls_upstream: tuple[TLSUpstream, Seen],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An upstream refuses a client certificate after the handshake (TLS 1.3):
    a request with no body goes on to the next target; one with a body has
    started sending it, cannot replay it, and is a 502 (not the next target
    waiting for a body that never comes)."""
    start, _ = tls_upstream
    no_client_cert = {"ca": str(pki.server_ca.cert)}
    async with start() as strict, start(require_client=False) as lenient:
        targets = [url_of(strict), url_of(lenient)]
        for method, status in (("GET", 200), ("POST", 502)):
            # A gateway each: each request's round robin starts at the strict target.
            gw = await start_gateway(
                routes=[route(PREFIX, targets, tls=no_client_cert, timeout="2s")]
            )
            data = b"body" if method == "POST" else None
            async with http.request(method, gw.url + PREFIX + "x", data=data) as resp:
                assert resp.status == status, await resp.text()
                if status == 200:
                    assert (await resp.json())["client"] is None
                else:
                    assert await error_of(resp) == "upstream_unavailable"
            assert_one_line(caplog, targets[0], REFUSED_CLIENT)
            caplog.clear()


async def test_failed_handshakes_in_a_real_process_under_uvloop(
    run_gateway: RunGateway,
    http: aiohttp.ClientSession,
    pki: PKI,
    tls_upstream: tuple[TLSUpstream, Seen],
) -> None:
    """``gateway run`` uses uvloop, whose TLS errors surface in their own places:
    the same 502s, and the lines in the process's own output."""
    start, _ = tls_upstream
    expired = pki.server_ca.server("stale", expired=True)
    async with start(cert=expired) as stale, start() as strict:
        stale_url, strict_url = url_of(stale), url_of(strict)
        gw = await run_gateway(
            routes=[
                route("/stale/", stale_url, tls=tls_of(pki)),
                route("/anonymous/", strict_url, tls={"ca": str(pki.server_ca.cert)}),
                route("/fine/", strict_url, tls=tls_of(pki)),
            ]
        )
        for prefix in ("/stale/", "/anonymous/"):
            async with http.get(gw.url + prefix + "x") as resp:
                assert resp.status == 502
                assert await error_of(resp) == "upstream_unavailable"
        async with http.get(gw.url + "/fine/x") as resp:
            assert resp.status == 200, await resp.text()
            assert (await resp.json())["client"] == GATEWAY_CN
        await asyncio.to_thread(gw.stop)
    lines = [line for line in gw.output().splitlines() if "TLS to upstream" in line]
    assert len(lines) == 2, gw.output()[-3000:]
    stale_line = next(line for line in lines if "route /stale/" in line)
    assert stale_url in stale_line
    assert "certificate verify failed: certificate has expired" in stale_line
    refused = next(line for line in lines if "route /anonymous/" in line)
    assert strict_url in refused and any(r in refused for r in REFUSED_CLIENT), refused
    assert "BEGIN" not in gw.output()


# -- WebSockets ---------------------------------------------------------------------


async def test_websocket_through_wss_with_mtls_and_server_name(
    start_gateway: StartGateway,
    http: aiohttp.ClientSession,
    pki: PKI,
    tls_upstream: tuple[TLSUpstream, Seen],
    caplog: pytest.LogCaptureFixture,
) -> None:
    start, seen = tls_upstream
    named = pki.server_ca.server("backend", names=("backend.internal",))
    async with start(cert=named) as upstream:
        tls = tls_of(pki, server_name="backend.internal")
        gw = await start_gateway(routes=[route(PREFIX, url_of(upstream), tls=tls, websocket=True)])
        async with http.ws_connect(gw.url + PREFIX + "ws") as ws:
            assert await ws.receive_str(timeout=PROMPT) == f"client={GATEWAY_CN}"
            await ws.send_str("hi")
            assert await ws.receive_str(timeout=PROMPT) == "echo:hi"
    assert seen.sni == ["backend.internal"]
    assert tls_lines(caplog) == []


@pytest.mark.parametrize("case", ["expired server certificate", "no client certificate"])
async def test_websocket_failed_handshake_is_502_and_one_clear_line(
    start_gateway: StartGateway,
    http: aiohttp.ClientSession,
    pki: PKI,
    tls_upstream: tuple[TLSUpstream, Seen],
    caplog: pytest.LogCaptureFixture,
    case: str,
) -> None:
    setup, reasons = FAILURES[case]
    given = setup(pki)
    start, _ = tls_upstream
    async with start(cert=given.get("cert")) as upstream:
        target = url_of(upstream)
        gw = await start_gateway(routes=[route(PREFIX, target, tls=given["tls"], websocket=True)])
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await http.ws_connect(gw.url + PREFIX + "ws")
        assert info.value.status == 502
    assert_one_line(caplog, target, reasons)


# -- upstream_tls: the shared block ---------------------------------------------------


async def test_upstream_tls_serves_routes_without_their_own(
    start_gateway: StartGateway,
    http: aiohttp.ClientSession,
    pki: PKI,
    tls_upstream: tuple[TLSUpstream, Seen],
) -> None:
    start, _ = tls_upstream
    own = pki.client_ca.client("wx-gateway-own")
    async with start() as upstream:
        url = url_of(upstream)
        gw = await start_gateway(
            upstream_tls=tls_of(pki),
            routes=[route("/shared/", url), route("/own/", url, tls=tls_of(pki, own))],
        )
        for prefix, expected in (("/shared/", GATEWAY_CN), ("/own/", "wx-gateway-own")):
            async with http.get(gw.url + prefix + "x") as resp:
                assert resp.status == 200, await resp.text()
                assert (await resp.json())["client"] == expected


def test_router_compiles_tls_once_per_setting(tmp_path: Path, pki: PKI) -> None:
    """Routes sharing a setting share one UpstreamTLS (and so their pools);
    http targets carry none; https routes with no setting get the system's CAs."""
    raw = base_config(tmp_path, "http://127.0.0.1:1", "http://127.0.0.1:2")
    raw["upstream_tls"] = tls_of(pki, server_name="backend.internal")
    raw["routes"] = [
        route("/a/", "https://127.0.0.1:8443"),
        route("/b/", ["https://127.0.0.1:8444", "http://127.0.0.1:8080"]),
        route("/c/", "https://127.0.0.1:8443", tls=tls_of(pki)),
        route("/d/", "http://127.0.0.1:8080"),
    ]
    cfg = build_config(raw, env={})
    router = Router(cfg.routes, cfg.server.max_body, upstream_tls=cfg.upstream_tls)
    targets = {r.prefix: r.balancer.targets for r in router.routes}
    shared = targets["/a/"][0].tls
    assert shared is not None and shared.server_name == "backend.internal"
    assert shared.context is cfg.upstream_tls.context  # type: ignore[union-attr]
    assert targets["/b/"][0].tls is shared and targets["/b/"][1].tls is None
    own = targets["/c/"][0].tls
    assert own is not None and own is not shared and own.server_name is None
    assert targets["/a/"][0].pool_key != targets["/c/"][0].pool_key  # same host:port
    assert targets["/d/"][0].tls is None
    bare = Router(cfg.routes, cfg.server.max_body)  # no upstream_tls: the system's CAs
    system = next(r for r in bare.routes if r.prefix == "/a/").balancer.targets[0].tls
    assert system is not None and system.context is not shared.context


# -- config errors (the loader's) ------------------------------------------------------


def _problems(tmp_path: Path, tls: dict[str, str], upstream: str = "https://127.0.0.1:8443") -> str:
    raw = base_config(tmp_path, "http://127.0.0.1:1", "http://127.0.0.1:2")
    raw["routes"] = [route(PREFIX, upstream, tls=tls)]
    with pytest.raises(ConfigError) as info:
        build_config(raw, env={})
    return "\n".join(info.value.problems)


def test_config_unreadable_file(tmp_path: Path, pki: PKI) -> None:
    missing = str(tmp_path / "nowhere.pem")
    text = _problems(tmp_path, {**tls_of(pki), "ca": missing})
    assert "routes[0].tls.ca" in text and f"{missing}: not a readable file" in text


def test_config_key_without_cert(tmp_path: Path, pki: PKI) -> None:
    text = _problems(tmp_path, {"ca": str(pki.server_ca.cert), "key": str(pki.client.key)})
    assert "routes[0].tls: cert and key go together" in text


def test_config_garbage_pem_is_reported_without_its_content(tmp_path: Path, pki: PKI) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text(
        "-----BEGIN CERTIFICATE-----\nnot-base64-at-all\n-----END CERTIFICATE-----\n"
    )
    for key in ("ca", "cert"):
        text = _problems(tmp_path, {**tls_of(pki), key: str(garbage)})
        assert "routes[0].tls: the certificates cannot be used" in text, text
        assert "not-base64-at-all" not in text
    # A key file that is not the certificate's key.
    wrong_key = pki.other.client("someone").key
    text = _problems(tmp_path, {**tls_of(pki), "key": str(wrong_key)})
    assert "routes[0].tls: the certificates cannot be used" in text, text
    assert wrong_key.read_text().splitlines()[1] not in text


def test_config_tls_on_a_route_with_only_http_upstreams(tmp_path: Path, pki: PKI) -> None:
    text = _problems(tmp_path, tls_of(pki), upstream="http://127.0.0.1:8080")
    assert "routes[0].tls: the route has no https:// upstream to use it" in text
