"""Calls to the gateway through aiohttp, answered as plain values the tests compare."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict


@dataclass
class Reply:
    status: int
    headers: CIMultiDict[str]
    raw: bytes

    @property
    def body(self) -> Any:
        return json.loads(self.raw)


async def send(http: aiohttp.ClientSession, method: str, url: str, **kwargs: Any) -> Reply:
    """The whole answer, read before the response is released."""
    async with http.request(method, url, **kwargs) as resp:
        return Reply(resp.status, resp.headers.copy(), await resp.read())


async def login(http: aiohttp.ClientSession, base: str, code: Any) -> Reply:
    """POST /auth/login with ``code`` (the fake WeChat's codes choose its answer)."""
    return await send(http, "POST", base + "/auth/login", json={"code": code})


async def logged_in(http: aiohttp.ClientSession, base: str, code: str) -> dict[str, Any]:
    """The login answer's body (token, openid, ...), once it is a 200."""
    reply = await login(http, base, code)
    assert reply.status == 200, reply.raw
    body: dict[str, Any] = reply.body
    return body


async def fake_stats(http: aiohttp.ClientSession, wechat: TestServer) -> dict[str, Any]:
    """What the fake WeChat has counted: its ``calls`` per API, and more."""
    async with http.get(wechat.make_url("/_fake/stats")) as resp:
        assert resp.status == 200
        stats: dict[str, Any] = await resp.json()
        return stats


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}
