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
