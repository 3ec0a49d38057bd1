"""One keep-alive connection held by each worker of a `gateway run`: how a test
proves that every worker (not just the one the kernel happened to pick) sees a
change. SO_REUSEPORT spreads connections; /proc says which worker holds each
(:func:`tests.support.sockets.owner_of`)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any

from tests.support.rawhttp import Conn, Cut, Response, request_bytes
from tests.support.sockets import owner_of
from tests.support.waiting import PROMPT

__all__ = ["ask", "pinned"]


async def ask(
    pin: Conn,
    method: str,
    path: str,
    token: str | None = None,
    headers: Iterable[tuple[str, str]] = (),
    body: Any = None,
) -> Response:
    """One request on a pinned connection, spoken by hand so it stays on its
    worker (which must keep the connection open)."""
    lines = [*headers]
    data = b"" if body is None else json.dumps(body).encode()
    if body is None:
        lines.append(("Content-Length", "0"))
    else:
        lines.append(("Content-Type", "application/json"))
    if token is not None:
        lines.append(("Authorization", f"Bearer {token}"))
    await pin.send(
        request_bytes(path, lines, method=method, host="127.0.0.1", body=data, close=False)
    )
    answer = await pin.next()
    assert (answer.header("connection") or "").lower() != "close", "the worker closed the pin"
    return answer


@asynccontextmanager
async def pinned(port: int, workers: list[int]) -> AsyncIterator[dict[int, Conn]]:
    """A keep-alive connection held by each of ``workers`` (pid -> connection),
    closed at the end of the block, with every spare one opened to find them."""
    pins: dict[int, Conn] = {}
    spare: list[Conn] = []
    deadline = time.monotonic() + 3 * PROMPT
    try:
        while len(pins) < len(workers):
            assert time.monotonic() < deadline, f"no connection reached each of {workers}"
            pin = await Conn.open(port)
            try:
                status = (await ask(pin, "GET", "/healthz")).status
            except (OSError, Cut):  # a worker still starting: try again
                await pin.close()
                await asyncio.sleep(0.05)
                continue
            assert status == 200
            owner = owner_of(port, pin.local_port, workers)
            if owner is not None and owner not in pins:
                pins[owner] = pin
            else:
                spare.append(pin)
        yield pins
    finally:
        for conn in [*pins.values(), *spare]:
            await conn.close()
