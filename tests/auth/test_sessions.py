"""Sessions: logout, /auth/me, /auth/verify and the /auth/* namespace (contract 4, 6, 8).

The cross-worker logout runs a real ``gateway run --workers 2`` and pins one
keep-alive connection to each worker process (found through /proc), so the
worker that did *not* answer the logout is provably the one being checked.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from gateway.wechat import fake
from tests.support.client import bearer, fake_stats, logged_in, send
from tests.support.errors import assert_error
from tests.support.gateway import Running, StartGateway, config_for, url_of
from tests.support.pinning import ask, pinned
from tests.support.procs import spawn, wait_workers
from tests.support.rawhttp import Conn
from tests.support.upstream import Recorder

# -- helpers -------------------------------------------------------------------


# -- logout ------------------------------------------------------------------------


async def test_logout_revokes_that_token_only(
    gw: Running, http: aiohttp.ClientSession, seen: Recorder
) -> None:
    first = await logged_in(http, gw.url, "union-logout")
    second = await logged_in(http, gw.url, "union-logout")
    a, b = bearer(first["token"]), bearer(second["token"])
    assert (await send(http, "GET", gw.url + "/api/before", headers=a)).status == 200

    out = await send(http, "POST", gw.url + "/auth/logout", headers=a)
    assert out.status == 200, out.raw
    assert out.headers["Content-Type"].startswith("application/json")
    assert out.body == {"ok": True}

    upstream_calls = len(seen.seen)
    for method, path, kwargs in (
        ("GET", "/api/orders", {}),
        ("POST", "/api/orders", {"data": b"x"}),
        ("GET", "/opt/maybe", {}),  # optional auth: a bad token is still 401
        ("GET", "/auth/me", {}),
        ("GET", "/auth/verify", {}),
        ("POST", "/auth/phone", {"json": {"code": "phone-13000000000"}}),
        ("POST", "/auth/decrypt", {"json": {"encrypted_data": "AAAA", "iv": "AAAA"}}),
        ("POST", "/auth/logout", {}),
    ):
        reply = await send(http, method, gw.url + path, headers=a, **kwargs)
        assert_error(reply, 401, "token_revoked")
        assert "X-OpenId" not in reply.headers
    assert len(seen.seen) == upstream_calls, "a revoked token reached the upstream"

    # The same user's other session is untouched.
    ok = await send(http, "GET", gw.url + "/api/after", headers=b)
    assert ok.status == 200
    assert seen.last.header("X-OpenId") == first["openid"]
    me = await send(http, "GET", gw.url + "/auth/me", headers=b)
    assert me.status == 200 and me.body["openid"] == first["openid"]
    assert (await send(http, "GET", gw.url + "/auth/verify", headers=b)).status == 200
    # And the user can log in again.
    third = await logged_in(http, gw.url, "union-logout")
    assert (
        await send(http, "GET", gw.url + "/auth/me", headers=bearer(third["token"]))
    ).status == 200


async def test_logout_needs_a_valid_token(gw: Running, http: aiohttp.ClientSession) -> None:
    assert_error(await send(http, "POST", gw.url + "/auth/logout"), 401, "token_missing")
    assert_error(
        await send(http, "POST", gw.url + "/auth/logout", headers=bearer("not.a.jwt")),
        401,
        "token_invalid",
    )


async def test_logout_survives_a_restart(
    start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    first = await start_gateway()
    gone = await logged_in(http, first.url, "restart-logout")
    kept = await logged_in(http, first.url, "restart-logout")
    out = await send(http, "POST", first.url + "/auth/logout", headers=bearer(gone["token"]))
    assert out.status == 200
    await first.listener.stop()

    second = await start_gateway()
    assert_error(
        await send(http, "GET", second.url + "/auth/me", headers=bearer(gone["token"])),
        401,
        "token_revoked",
    )
    assert_error(
        await send(http, "GET", second.url + "/api/x", headers=bearer(gone["token"])),
        401,
        "token_revoked",
    )
    me = await send(http, "GET", second.url + "/auth/me", headers=bearer(kept["token"]))
    assert me.status == 200 and me.body["openid"] == kept["openid"]


# -- /auth/me and /auth/verify ---------------------------------------------------------


async def test_me_returns_openid_unionid_phone(gw: Running, http: aiohttp.ClientSession) -> None:
    union = await logged_in(http, gw.url, "union-me")
    me = await send(http, "GET", gw.url + "/auth/me", headers=bearer(union["token"]))
    assert me.status == 200
    assert me.headers["Content-Type"].startswith("application/json")
    assert me.body == {
        "openid": fake.openid_for("union-me"),
        "unionid": fake.unionid_for("union-me"),
        "phone_number": None,
    }
    plain = await logged_in(http, gw.url, "plain-me")
    phone = await send(
        http,
        "POST",
        gw.url + "/auth/phone",
        headers=bearer(plain["token"]),
        json={"code": "phone-15500001111"},
    )
    assert phone.status == 200
    me = await send(http, "GET", gw.url + "/auth/me", headers=bearer(plain["token"]))
    assert me.body == {
        "openid": fake.openid_for("plain-me"),
        "unionid": None,
        "phone_number": "15500001111",
    }


async def test_verify_answers_identity_headers(gw: Running, http: aiohttp.ClientSession) -> None:
    union = await logged_in(http, gw.url, "union-verify")
    forged = {**bearer(union["token"]), "X-OpenId": "forged", "X-UnionId": "forged"}
    reply = await send(http, "GET", gw.url + "/auth/verify", headers=forged)
    assert reply.status == 200
    assert reply.headers.getall("X-OpenId") == [fake.openid_for("union-verify")]
    assert reply.headers.getall("X-UnionId") == [fake.unionid_for("union-verify")]

    head = await send(http, "HEAD", gw.url + "/auth/verify", headers=bearer(union["token"]))
    assert head.status == 200
    assert head.headers["X-OpenId"] == fake.openid_for("union-verify")

    plain = await logged_in(http, gw.url, "plain-verify")
    reply = await send(http, "GET", gw.url + "/auth/verify", headers=bearer(plain["token"]))
    assert reply.status == 200
    assert reply.headers["X-OpenId"] == fake.openid_for("plain-verify")
    assert "X-UnionId" not in reply.headers

    for headers, code in (
        ({}, "token_missing"),
        (bearer("garbage"), "token_invalid"),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, "token_invalid"),
    ):
        reply = await send(http, "GET", gw.url + "/auth/verify", headers=headers)
        assert_error(reply, 401, code)
        assert "X-OpenId" not in reply.headers


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/auth/me", None),
        ("POST", "/auth/logout", None),
        ("POST", "/auth/phone", {"code": "phone-13100000000"}),
        ("POST", "/auth/phone", None),
        ("POST", "/auth/decrypt", {"encrypted_data": "AAAA", "iv": "AAAA"}),
        ("POST", "/auth/decrypt", None),
        ("GET", "/auth/verify", None),
    ],
)
async def test_own_endpoints_without_token(
    gw: Running,
    http: aiohttp.ClientSession,
    wechat: TestServer,
    method: str,
    path: str,
    body: Any,
) -> None:
    kwargs = {} if body is None else {"json": body}
    assert_error(await send(http, method, gw.url + path, **kwargs), 401, "token_missing")
    calls = (await fake_stats(http, wechat))["calls"]
    assert sum(calls.values()) == 0, calls


async def test_unknown_auth_path_is_404_and_never_proxied(
    start_gateway: StartGateway, http: aiohttp.ClientSession, upstream: TestServer, seen: Recorder
) -> None:
    # A catch-all public route: anything not handled by the gateway would be proxied.
    url = url_of(upstream)
    gw = await start_gateway(routes=[{"prefix": "/", "upstream": url, "auth": "public"}])
    for method, path in (
        ("GET", "/auth/x"),
        ("POST", "/auth/x"),
        ("GET", "/auth"),
        ("GET", "/auth/"),
        ("GET", "/auth/login/extra"),
        ("GET", "/auth/me/"),
        ("GET", "/auth//x"),
        ("GET", "/auth/./x"),
        ("GET", "/other/../auth/x"),
    ):
        assert_error(await send(http, method, gw.url + path), 404, "no_route")
    assert seen.seen == []
    # Control: the catch-all route does proxy other paths.
    assert (await send(http, "GET", gw.url + "/authx")).status == 200
    assert [s.raw_path for s in seen.seen] == ["/authx"]


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("GET", "/auth/login", "POST"),
        ("PUT", "/auth/login", "POST"),
        ("DELETE", "/auth/logout", "POST"),
        ("POST", "/auth/me", "GET"),
        ("POST", "/auth/verify", "GET"),
        ("GET", "/auth/phone", "POST"),
        ("GET", "/auth/decrypt", "POST"),
    ],
)
async def test_wrong_method_on_own_endpoint(
    gw: Running, http: aiohttp.ClientSession, method: str, path: str, allowed: str
) -> None:
    reply = await send(http, method, gw.url + path, headers=bearer(gw.token()))
    assert_error(reply, 405, "method_not_allowed")
    # RFC 9110 15.5.6: a 405 names the methods that are allowed.
    assert allowed in [m.strip() for m in reply.headers.get("Allow", "").split(",")]


# -- logout across workers ------------------------------------------------------------


@dataclass
class Seen:
    at: float  # seconds after the logout answer, when the request was sent
    who: str
    status: int
    error: str | None


async def test_logout_reaches_every_worker_within_1s(
    tmp_path: Path, upstream: TestServer, wechat: TestServer
) -> None:
    proc = await spawn(tmp_path, config_for(tmp_path, upstream, wechat), "--workers", "2")
    url, port = proc.url, proc.port
    assert port is not None
    workers = await wait_workers(proc, 2)
    results: list[Seen] = []
    try:
        async with pinned(port, workers) as pins:
            await _logout_rounds(url, pins, results)
    finally:
        output = await asyncio.to_thread(proc.output)
    _judge(results, output)


async def _logout_rounds(url: str, pins: dict[int, Conn], results: list[Seen]) -> None:
    """Log in, log out through worker A, then probe both workers and fresh
    connections in rounds for 2.5 s, noting each answer in ``results``."""
    (pid_a, pin_a), (pid_b, pin_b) = pins.items()
    assert pid_a != pid_b

    async with aiohttp.ClientSession() as http:
        user = await logged_in(http, url, "union-two-workers")
    token = user["token"]
    # Before the logout both workers accept the token.
    assert (await ask(pin_a, "GET", "/auth/verify", token)).status == 200
    assert (await ask(pin_b, "GET", "/auth/verify", token)).status == 200

    fresh = aiohttp.TCPConnector(force_close=True, limit=0)
    async with aiohttp.ClientSession(connector=fresh) as http:
        before = await asyncio.gather(
            *(send(http, "GET", url + f"/api/pre{i}", headers=bearer(token)) for i in range(20))
        )
        assert [r.status for r in before] == [200] * 20

        # Worker A answers the logout; worker B only learns of it through storage.
        out = await ask(pin_a, "POST", "/auth/logout", token)
        assert (out.status, out.json) == (200, {"ok": True})
        t0 = time.monotonic()

        async def probe_pin(who: str, pin: Conn) -> None:
            at = time.monotonic() - t0
            answer = await ask(pin, "GET", "/auth/verify", token)
            error = answer.json.get("error") if answer.body else None
            results.append(Seen(at, who, answer.status, error))

        async def probe_fresh(i: int) -> None:
            at = time.monotonic() - t0
            reply = await send(http, "GET", url + f"/api/after{i}", headers=bearer(token))
            error = reply.body.get("error") if reply.status != 200 else None
            results.append(Seen(at, "fresh", reply.status, error))

        i = 0
        # Rounds until 2.5 s have passed and one round started after 1.5 s (on
        # a busy machine a round may take a while).
        while time.monotonic() - t0 < 2.5 or not any(s.at > 1.5 for s in results):
            await asyncio.gather(
                probe_pin("A", pin_a),
                probe_pin("B", pin_b),
                *(probe_fresh(i + k) for k in range(4)),
            )
            i += 4
            await asyncio.sleep(0.02)


def _judge(results: list[Seen], output: str) -> None:
    """Every answer a 200 or token_revoked; none accepted past the bound."""
    for seen in results:
        assert (seen.status, seen.error) in ((200, None), (401, "token_revoked")), (seen, output)
    # The worker that answered the logout rejects the token from then on.
    assert all(s.status == 401 for s in results if s.who == "A"), results
    first_b = min((s.at for s in results if s.who == "B" and s.status == 401), default=None)
    assert first_b is not None, "worker B never rejected the revoked token"
    # Once rejected, never accepted again.
    assert all(s.status == 401 for s in results if s.who == "B" and s.at >= first_b)
    last_accept = max((s.at for s in results if s.status == 200), default=0.0)
    # Contract: within 1 s; 0.5 s of slack for the measurement on a loaded machine.
    assert last_accept <= 1.5, (last_accept, results)
    late = [s for s in results if s.at > 1.5]
    assert {s.who for s in late} == {"A", "B", "fresh"}
    assert all(s.status == 401 for s in late)
    print(f"worker B rejected the revoked token {first_b:.3f}s after the logout answer")


# -- from the end-to-end login flow --------------------------------------------


async def test_logout_me_and_other_sessions(gw: Running, http: aiohttp.ClientSession) -> None:
    first = await logged_in(http, gw.url, "phone-user")
    second = await logged_in(http, gw.url, "phone-user")
    a = {"Authorization": f"Bearer {first['token']}"}
    b = {"Authorization": f"Bearer {second['token']}"}
    async with http.get(gw.url + "/auth/me", headers=a) as resp:
        assert await resp.json() == {
            "openid": first["openid"],
            "unionid": None,
            "phone_number": None,
        }
    async with http.post(gw.url + "/auth/logout", headers=a) as resp:
        assert resp.status == 200 and await resp.json() == {"ok": True}
    for method, path in (("GET", "/api/x"), ("GET", "/auth/me"), ("POST", "/auth/logout")):
        async with http.request(method, gw.url + path, headers=a) as resp:
            assert resp.status == 401 and (await resp.json())["error"] == "token_revoked"
    async with http.get(gw.url + "/api/x", headers=b) as resp:
        assert resp.status == 200
    for method, path in (
        ("POST", "/auth/logout"),
        ("GET", "/auth/me"),
        ("POST", "/auth/phone"),
        ("POST", "/auth/decrypt"),
        ("GET", "/auth/verify"),
    ):
        async with http.request(method, gw.url + path) as resp:
            assert resp.status == 401 and (await resp.json())["error"] == "token_missing"


async def test_verify_endpoint(gw: Running, http: aiohttp.ClientSession) -> None:
    body = await logged_in(http, gw.url, "union-verify")
    async with http.get(
        gw.url + "/auth/verify", headers={"Authorization": f"Bearer {body['token']}"}
    ) as resp:
        assert resp.status == 200
        assert resp.headers["X-OpenId"] == body["openid"]
        assert resp.headers["X-UnionId"] == body["unionid"]


async def test_logout_and_user_survive_restart(
    start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    gw = await start_gateway()
    body = await logged_in(http, gw.url, "restart-user")
    auth = {"Authorization": f"Bearer {body['token']}"}
    async with http.post(
        gw.url + "/auth/phone", headers=auth, json={"code": "phone-13700000000"}
    ) as resp:
        assert resp.status == 200
    other = await logged_in(http, gw.url, "restart-user")
    async with http.post(gw.url + "/auth/logout", headers=auth) as resp:
        assert resp.status == 200
    await gw.listener.stop()
    again = await start_gateway()
    async with http.get(again.url + "/auth/me", headers=auth) as resp:
        assert (await resp.json())["error"] == "token_revoked"
    async with http.get(
        again.url + "/auth/me", headers={"Authorization": f"Bearer {other['token']}"}
    ) as resp:
        assert (await resp.json())["phone_number"] == "13700000000"
