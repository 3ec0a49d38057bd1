"""Shared fixtures: a reflecting upstream, the fake WeChat and the gateway itself,
each a real server on loopback. Plain helpers live in tests/support/."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from gateway.config import build_config
from gateway.runtime.worker import Listener
from gateway.wechat import fake
from tests.support.gateway import APPID, WECHAT_SECRET, Running, StartGateway, config_for
from tests.support.procs import GatewayProcess, RunGateway, spawn
from tests.support.rawupstream import Handler, RawUpstream, RawUpstreams
from tests.support.upstream import RECORDER, Recorder, create_upstream_app, served


@pytest.fixture
async def upstream() -> AsyncIterator[TestServer]:
    async with served(create_upstream_app()) as server:
        yield server


@pytest.fixture
def seen(upstream: TestServer) -> Recorder:
    return upstream.app[RECORDER]


@pytest.fixture
async def raw_upstream() -> AsyncIterator[RawUpstreams]:
    """Start TCP upstreams whose connections run a test's handler; closed at teardown."""
    made: list[RawUpstream] = []

    async def make(handler: Handler) -> RawUpstream:
        made.append(await RawUpstream(handler).start())
        return made[-1]

    yield make
    for upstream in made:
        await upstream.close()


@pytest.fixture
async def wechat() -> AsyncIterator[TestServer]:
    async with served(fake.create_app(appid=APPID, secret=WECHAT_SECRET, slow_seconds=5)) as server:
        yield server


@pytest.fixture
async def start_gateway(
    tmp_path: Path, upstream: TestServer, wechat: TestServer
) -> AsyncIterator[StartGateway]:
    """Start a gateway; keyword arguments override config sections."""
    started: list[Listener] = []

    async def start(raw: dict[str, Any] | None = None, **sections: Any) -> Running:
        if raw is None:
            raw = config_for(tmp_path, upstream, wechat, **sections)
        listener = Listener(build_config(raw, env={}))
        await listener.start()
        started.append(listener)
        return Running(listener)

    yield start
    for listener in reversed(started):
        await listener.stop()


@pytest.fixture
async def run_gateway(
    tmp_path: Path, upstream: TestServer, wechat: TestServer
) -> AsyncIterator[RunGateway]:
    """Start `gateway run <args>` as a subprocess, once healthy: keyword arguments
    override config sections, or ``raw`` is the whole config. Stopped at teardown."""
    started: list[GatewayProcess] = []

    async def start(
        *args: str, raw: dict[str, Any] | None = None, name: str = "gw", **sections: Any
    ) -> GatewayProcess:
        if raw is None:
            raw = config_for(tmp_path, upstream, wechat, **sections)
        started.append(await spawn(tmp_path, raw, *args, name=name))
        return started[-1]

    yield start
    for process in started:
        await asyncio.to_thread(process.stop)


@pytest.fixture
async def gw(start_gateway: StartGateway) -> Running:
    return await start_gateway()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session
