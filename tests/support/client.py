"""Calls to the gateway through aiohttp, answered as plain values the tests compare."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import aiohttp
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


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def assert_error(reply: Reply, status: int, code: str) -> dict[str, Any]:
    """The contract's error shape: JSON with a stable `error` and a human `message`."""
    assert reply.status == status, reply.raw
    assert reply.headers["Content-Type"].startswith("application/json")
    body: dict[str, Any] = reply.body
    assert body["error"] == code, body
    assert isinstance(body["message"], str) and body["message"].strip()
    return body
