"""What needs real processes: kill -9 durability, and one access-token fetch
across gateways sharing one database. (Logout across workers: tests/auth/test_sessions.py.)"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
from pathlib import Path

import aiohttp
from aiohttp.test_utils import TestServer

from gateway.wechat import fake
from tests.support.client import bearer, fake_stats, logged_in
from tests.support.procs import RunGateway


async def test_kill_9_right_after_login_loses_nothing(
    tmp_path: Path, run_gateway: RunGateway
) -> None:
    proc = await run_gateway()
    try:
        async with (
            aiohttp.ClientSession() as http,
            http.post(proc.url + "/auth/login", json={"code": "durable-user"}) as resp,
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


async def test_access_token_fetched_once_across_two_gateways(
    wechat: TestServer, run_gateway: RunGateway
) -> None:
    # Both on the same storage file (tmp_path/gateway.db).
    a, b = await run_gateway(name="a"), await run_gateway(name="b")
    try:
        async with aiohttp.ClientSession() as http:
            tokens = [
                bearer((await logged_in(http, url, "phone-multi"))["token"])
                for url in (a.url, b.url)
            ]

            async def phone(url: str, auth: dict[str, str]) -> int:
                async with http.post(
                    url + "/auth/phone", headers=auth, json={"code": "phone-13600000000"}
                ) as resp:
                    return resp.status

            calls = [phone(a.url, tokens[0]) for _ in range(10)] + [
                phone(b.url, tokens[1]) for _ in range(10)
            ]
            assert set(await asyncio.gather(*calls)) == {200}
            assert (await fake_stats(http, wechat))["calls"]["stable_token"] == 1
    finally:
        assert a.stop() == 0 and b.stop() == 0
