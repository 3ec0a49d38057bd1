"""/metrics: the Prometheus exposition (parsed with prometheus-client's own
parser), counting requests, latency, upstream errors, logins, WeChat calls,
access-token fetches and revocations; summed across workers."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Running, StartGateway, base_config, free_port
from tests.support.procs import GatewayProcess, children, wait_healthy, write_config


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} of an exposition."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(text: str, name: str, **labels: str) -> float:
    return samples(text).get((name, tuple(sorted(labels.items()))), 0.0)


async def scrape(http: aiohttp.ClientSession, url: str) -> str:
    async with http.get(url + "/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        return await resp.text()


async def login(http: aiohttp.ClientSession, url: str, code: str) -> tuple[int, dict[str, Any]]:
    async with http.post(url + "/auth/login", json={"code": code}) as resp:
        return resp.status, await resp.json()


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
    status, ok = await login(http, gw.url, "metrics-user")
    assert status == 200
    assert (await login(http, gw.url, "invalid-metrics"))[0] == 401
    assert (await login(http, gw.url, "busy-metrics"))[0] == 502
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


async def test_counts_are_summed_across_workers(
    tmp_path: Path, upstream: TestServer, wechat: TestServer
) -> None:
    port = free_port()
    raw = base_config(
        tmp_path, str(upstream.make_url("")).rstrip("/"), str(wechat.make_url("")).rstrip("/")
    )
    raw["server"].update({"port": port, "workers": 2})
    gateway = GatewayProcess(["run", "-c", str(write_config(tmp_path / "gw.yaml", raw))])
    url = f"http://127.0.0.1:{port}"
    try:
        await asyncio.to_thread(wait_healthy, url, gateway.proc)

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
        await asyncio.sleep(1.5)  # past the workers' save interval
        async with aiohttp.ClientSession() as http:
            for _ in range(6):  # whichever worker answers, the sum is the same
                text = await scrape(http, url)
                assert (
                    value(text, "wxgateway_requests_total", route="/public/", status="200") == sent
                )
        assert len(children(gateway.proc.pid)) == 2
    finally:
        assert gateway.stop() == 0
