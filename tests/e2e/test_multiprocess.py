"""What needs real processes: kill -9 durability, logout across workers, and one
access-token fetch across gateways sharing one database."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp.test_utils import TestServer

from gateway.wechat import fake
from tests.conftest import base_config, free_port
from tests.support.procs import GatewayProcess, children, wait_healthy, write_config


def gateway_config(
    tmp_path: Path, upstream: TestServer, wechat: TestServer, port: int
) -> dict[str, Any]:
    raw = base_config(
        tmp_path, str(upstream.make_url("")).rstrip("/"), str(wechat.make_url("")).rstrip("/")
    )
    raw["server"]["port"] = port
    return raw


async def start(
    tmp_path: Path, raw: dict[str, Any], name: str, *args: str
) -> tuple[GatewayProcess, str]:
    path = write_config(tmp_path / f"{name}.yaml", raw)
    proc = GatewayProcess(["run", "-c", str(path), *args])
    url = f"http://127.0.0.1:{raw['server']['port']}"
    await asyncio.to_thread(wait_healthy, url, proc.proc)
    return proc, url


async def test_kill_9_right_after_login_loses_nothing(
    tmp_path: Path, upstream: TestServer, wechat: TestServer
) -> None:
    raw = gateway_config(tmp_path, upstream, wechat, free_port())
    proc, url = await start(tmp_path, raw, "gw")
    try:
        async with (
            aiohttp.ClientSession() as http,
            http.post(url + "/auth/login", json={"code": "durable-user"}) as resp,
        ):
            assert resp.status == 200
            os.kill(proc.pid, signal.SIGKILL)  # the instant the answer arrived
    finally:
        proc.stop()
    assert proc.proc.returncode == -signal.SIGKILL
    db = sqlite3.connect(tmp_path / "gateway.db")
    try:
        row = db.execute(
            "SELECT session_key FROM users WHERE openid = ?", (fake.openid_for("durable-user"),)
        ).fetchone()
    finally:
        db.close()
    assert row == (fake.session_key_for("durable-user"),)
    assert fake.session_key_for("durable-user") not in proc.output()


async def test_logout_reaches_every_worker_within_a_second(
    tmp_path: Path, upstream: TestServer, wechat: TestServer
) -> None:
    raw = gateway_config(tmp_path, upstream, wechat, free_port())
    proc, url = await start(tmp_path, raw, "gw", "--workers", "2")
    try:
        deadline = time.monotonic() + 20
        while len(children(proc.pid)) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert len(children(proc.pid)) == 2
        async with aiohttp.ClientSession() as http:
            async with http.post(url + "/auth/login", json={"code": "two-workers"}) as resp:
                auth = {"Authorization": f"Bearer {(await resp.json())['token']}"}

            async def statuses(n: int) -> list[int]:
                # A fresh connection each time, so the kernel spreads them over both workers.
                result = []
                for _ in range(n):
                    async with (
                        aiohttp.ClientSession() as fresh,
                        fresh.get(url + "/api/x", headers=auth) as resp,
                    ):
                        result.append(resp.status)
                return result

            assert set(await statuses(20)) == {200}
            async with http.post(url + "/auth/logout", headers=auth) as resp:
                assert resp.status == 200
            logged_out = time.monotonic()
            await asyncio.sleep(1.0)
            after = await statuses(40)
            assert time.monotonic() - logged_out < 5
        assert set(after) == {401}
    finally:
        assert proc.stop() == 0, proc.output()


async def test_access_token_fetched_once_across_two_gateways(
    tmp_path: Path, upstream: TestServer, wechat: TestServer
) -> None:
    first, second = (
        gateway_config(tmp_path, upstream, wechat, free_port()),
        gateway_config(tmp_path, upstream, wechat, free_port()),
    )
    a, url_a = await start(tmp_path, first, "a")
    b, url_b = await start(tmp_path, second, "b")
    try:
        async with aiohttp.ClientSession() as http:
            tokens = []
            for url in (url_a, url_b):
                async with http.post(url + "/auth/login", json={"code": "phone-multi"}) as resp:
                    tokens.append({"Authorization": f"Bearer {(await resp.json())['token']}"})

            async def phone(url: str, auth: dict[str, str]) -> int:
                async with http.post(
                    url + "/auth/phone", headers=auth, json={"code": "phone-13600000000"}
                ) as resp:
                    return resp.status

            calls = [phone(url_a, tokens[0]) for _ in range(10)] + [
                phone(url_b, tokens[1]) for _ in range(10)
            ]
            assert set(await asyncio.gather(*calls)) == {200}
            async with http.get(wechat.make_url("/_fake/stats")) as resp:
                assert (await resp.json())["calls"]["stable_token"] == 1
    finally:
        assert a.stop() == 0 and b.stop() == 0
