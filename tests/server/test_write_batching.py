"""Writes held to the end of the loop's pass (gateway.server.batching) keep every
answer whole and in order, whichever path sends the next one."""

from __future__ import annotations

import asyncio

import aiohttp

from gateway.server.batching import WriteBatch
from tests.support.gateway import Running
from tests.support.rawhttp import exchange
from tests.support.upstream import Recorder


class _Writer:
    def __init__(self, name: str, log: list[str]) -> None:
        self.name = name
        self.log = log

    def flush_out(self) -> None:
        self.log.append(self.name)


async def test_held_writes_go_out_at_the_end_of_the_pass_in_order() -> None:
    log: list[str] = []
    batch = WriteBatch(asyncio.get_running_loop())
    batch.hold(_Writer("a", log))
    batch.hold(_Writer("b", log))
    assert log == []  # nothing leaves while this callback runs
    await asyncio.sleep(0)
    assert log == ["a", "b"]
    batch.hold(_Writer("c", log))  # a new pass gets a flush of its own
    await asyncio.sleep(0)
    assert log == ["a", "b", "c"]


async def _warm(gw: Running) -> None:
    # An idle upstream connection in the pool: the next body-less request takes
    # the fast lane, whose head and answer are both held writes.
    async with (
        aiohttp.ClientSession() as http,
        http.get(gw.url + "/api/warm", headers=gw.auth()) as resp,
    ):
        assert resp.status == 200


def _get(gw: Running, path: str, *extra: str, auth: bool = True) -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: gw.example"]
    if auth:
        lines.append(f"Authorization: Bearer {gw.token('o-batch')}")
    lines.extend(extra)
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def test_pipelined_answers_from_every_path_arrive_in_order(
    gw: Running, seen: Recorder
) -> None:
    await _warm(gw)
    port = gw.listener.port
    pipeline = b"".join(
        (
            _get(gw, "/api/first"),  # fast lane: held answer
            _get(gw, "/api/events?n=2&interval=0.05"),  # streamed: direct writes
            _get(gw, "/api/third", auth=False),  # the gateway's own 401
            _get(gw, "/healthz"),  # own endpoint, answered from a task
            _get(gw, "/api/last", "Connection: close"),  # held answer, then close
        )
    )
    ex = await exchange(port, pipeline, expect=5)
    assert ex.statuses() == [200, 200, 401, 200, 200]
    first, events, refused, health, last = ex.responses
    assert first.json["path"] == "/api/first"
    assert events.body == b"data: event 0\n\ndata: event 1\n\n"
    assert refused.json["error"] == "token_missing"
    assert health.json == {"status": "ok"}
    assert last.json["path"] == "/api/last"
    assert ex.closed and ex.rest == b""  # the close came after the held answer
    # (the upstream's event stream is not recorded)
    assert [s.raw_path for s in seen.seen[1:]] == ["/api/first", "/api/last"]


async def test_many_connections_answered_in_one_pass_each_get_their_own(
    gw: Running,
) -> None:
    await _warm(gw)
    port = gw.listener.port
    # Requests arriving together are served in the same loop pass: each
    # connection must get exactly its own answer.
    names = [f"/api/c{i}" for i in range(40)]
    results = await asyncio.gather(*(exchange(port, _get(gw, name)) for name in names))
    for name, ex in zip(names, results, strict=True):
        assert ex.statuses() == [200]
        assert ex.responses[0].json["path"] == name
