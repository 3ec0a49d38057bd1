"""/metrics: the Prometheus exposition (parsed with prometheus-client's own
parser), counting requests, latency, upstream errors, logins, WeChat calls,
access-token fetches and revocations; summed across workers."""

from __future__ import annotations

import asyncio
import time
import urllib.request

import aiohttp

from tests.support.client import logged_in, login
from tests.support.gateway import Running, StartGateway, free_port
from tests.support.metrics import scrape, value
from tests.support.procs import RunGateway, children
from tests.support.waiting import eventually


async def test_requests_latency_and_upstream_errors(
    start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    gw = await start_gateway()
    broken = await start_gateway(
        routes=[{"prefix": "/dead/", "upstream": dead, "auth": "public", "timeout": "2s"}]
    )
    for _ in range(7):
        async with http.get(gw.url + "/api/x", headers=gw.auth()) as resp:
            assert resp.status == 200
    for _ in range(3):
        async with http.get(gw.url + "/api/x") as resp:
            assert resp.status == 401
    for _ in range(2):
        async with http.get(broken.url + "/dead/x") as resp:
            assert resp.status == 502

    text = await scrape(http, gw.url)
    assert value(text, "wxgateway_requests_total", route="/api/", status="200") == 7
    assert value(text, "wxgateway_requests_total", route="/api/", status="401") == 3
    count = value(text, "wxgateway_request_duration_seconds_count", route="/api/")
    assert count == 10
    assert value(text, "wxgateway_request_duration_seconds_bucket", route="/api/", le="+Inf") == 10
    assert 0 < value(text, "wxgateway_request_duration_seconds_sum", route="/api/") < 10
    # Buckets are cumulative.
    le_1ms = value(text, "wxgateway_request_duration_seconds_bucket", route="/api/", le="0.001")
    le_10s = value(text, "wxgateway_request_duration_seconds_bucket", route="/api/", le="10.0")
    assert le_1ms <= le_10s == 10

    text = await scrape(http, broken.url)
    assert (
        value(text, "wxgateway_upstream_errors_total", route="/dead/", kind="upstream_unavailable")
        == 2
    )
    assert value(text, "wxgateway_requests_total", route="/dead/", status="502") == 2


async def test_logins_wechat_calls_token_fetches_and_revocations(
    gw: Running, http: aiohttp.ClientSession
) -> None:
    ok = await logged_in(http, gw.url, "metrics-user")
    assert (await login(http, gw.url, "invalid-metrics")).status == 401
    assert (await login(http, gw.url, "busy-metrics")).status == 502
    auth = {"Authorization": f"Bearer {ok['token']}"}
    async with http.post(
        gw.url + "/auth/phone", json={"code": "phone-13800000000"}, headers=auth
    ) as r:
        assert r.status == 200
    async with http.post(gw.url + "/auth/logout", headers=auth) as r:
        assert r.status == 200

    text = await scrape(http, gw.url)
    assert value(text, "wxgateway_logins_total", outcome="ok", errcode="") == 1
    assert value(text, "wxgateway_logins_total", outcome="invalid_code", errcode="40029") == 1
    assert value(text, "wxgateway_logins_total", outcome="wechat_error", errcode="-1") == 1
    api = "/sns/jscode2session"
    assert value(text, "wxgateway_wechat_request_duration_seconds_count", api=api) == 3
    assert value(text, "wxgateway_wechat_errors_total", api=api, outcome="errcode") == 2
    phone_api = "/wxa/business/getuserphonenumber"
    assert value(text, "wxgateway_wechat_request_duration_seconds_count", api=phone_api) == 1
    assert value(text, "wxgateway_access_token_fetches_total", reason="expired") == 1
    assert value(text, "wxgateway_revocations_total") == 1
    # Nothing secret or personal in the exposition.
    assert ok["openid"] not in text and ok["token"] not in text


async def test_counts_are_summed_across_workers(run_gateway: RunGateway) -> None:
    gateway = await run_gateway(server={"workers": 2})
    url = gateway.url
    try:

        def hammer() -> tuple[set[str], int]:
            # A fresh connection per request: SO_REUSEPORT spreads them over both
            # workers. Each answer names the worker that wrote it (X-Request-Id
            # prefixes are per process). /healthz answering means one worker is
            # up, not both: on a busy machine the second may take a while.
            seen, sent = set(), 0
            deadline = time.monotonic() + 30
            while sent < 200 or (len(seen) < 2 and time.monotonic() < deadline):
                with urllib.request.urlopen(url + "/public/x", timeout=5) as resp:
                    assert resp.status == 200
                    seen.add(resp.headers["X-Request-Id"][:16])
                sent += 1
            return seen, sent

        writers, sent = await asyncio.to_thread(hammer)
        assert len(writers) == 2, "both workers should have served some requests"
        # A fresh connection per scrape, so that both workers answer some.
        fresh = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=fresh) as http:

            async def summed() -> bool:
                # Whichever worker answers, the sum is the same, once each worker
                # has saved its counts (every second).
                texts = [await scrape(http, url) for _ in range(6)]
                route = {"route": "/public/", "status": "200"}
                return all(value(t, "wxgateway_requests_total", **route) == sent for t in texts)

            await eventually(summed, f"{sent} requests counted by every worker's /metrics")
        assert len(children(gateway.pid)) == 2
    finally:
        assert gateway.stop() == 0
