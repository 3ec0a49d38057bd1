"""Shared fixtures: a reflecting upstream, the fake WeChat and the gateway itself,
each a real server on loopback."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from gateway.auth.tokens import TokenCodec
from gateway.config import Config, build_config
from gateway.runtime.worker import Listener
from gateway.wechat import fake
from tests.support.upstream import RECORDER, Recorder, create_upstream_app

TOKEN_SECRET = "test-token-secret-0123456789abcdef-0123456789"
APPID = "wxtestappid0000001"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def base_config(
    tmp_path: Path, upstream_url: str, wechat_url: str, **sections: Any
) -> dict[str, Any]:
    """A raw config dict (as YAML would give) that tests adjust before building."""
    raw: dict[str, Any] = {
        # The drain delay has its own tests (tests/e2e/test_lifecycle.py); elsewhere it
        # would only add a second to every gateway process stopped.
        "server": {"host": "127.0.0.1", "port": 0, "shutdown_grace": "2s", "drain_delay": 0},
        "wechat": {
            "appid": APPID,
            "secret": "wechat-secret-value",
            "api_base": wechat_url,
            "timeout": "2s",
        },
        "token": {"secret": TOKEN_SECRET},
        "storage": {"url": f"sqlite:///{tmp_path}/gateway.db"},
        "rate_limits": {"login_per_ip": 0},
        # The access log has its own tests (tests/observability/test_access_log.py); elsewhere it
        # would only interleave JSON lines with pytest's output.
        "log": {"access": False},
        "routes": [
            {"prefix": "/api/", "upstream": upstream_url, "auth": "required", "websocket": True},
            {"prefix": "/opt/", "upstream": upstream_url, "auth": "optional"},
            {"prefix": "/public/", "upstream": upstream_url, "auth": "public"},
        ],
    }
    for name, value in sections.items():
        if isinstance(value, dict) and isinstance(raw.get(name), dict):
            raw[name] = {**raw[name], **value}
        else:
            raw[name] = value
    return raw


class Running:
    """A started gateway: its URL, its config and a token minter."""

    def __init__(self, listener: Listener) -> None:
        self.listener = listener
        self.config: Config = listener.config
        self.url = f"http://127.0.0.1:{listener.port}"
        self.codec = TokenCodec(self.config.token)

    def token(self, openid: str = "o-test-user", unionid: str | None = None) -> str:
        return self.codec.issue(openid, unionid, self.listener.gateway.clock())[0]

    def auth(self, openid: str = "o-test-user", unionid: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(openid, unionid)}"}


@pytest.fixture
async def upstream() -> AsyncIterator[TestServer]:
    server = TestServer(create_upstream_app(), host="127.0.0.1")
    await server.start_server()
    yield server
    await server.close()


@pytest.fixture
def seen(upstream: TestServer) -> Recorder:
    return upstream.app[RECORDER]


@pytest.fixture
async def wechat() -> AsyncIterator[TestServer]:
    server = TestServer(
        fake.create_app(appid=APPID, secret="wechat-secret-value", slow_seconds=5), host="127.0.0.1"
    )
    await server.start_server()
    yield server
    await server.close()


StartGateway = Callable[..., Awaitable[Running]]


@pytest.fixture
async def start_gateway(
    tmp_path: Path, upstream: TestServer, wechat: TestServer
) -> AsyncIterator[StartGateway]:
    """Start a gateway; keyword arguments override config sections."""
    started: list[Listener] = []

    async def start(raw: dict[str, Any] | None = None, **sections: Any) -> Running:
        if raw is None:
            raw = base_config(
                tmp_path,
                str(upstream.make_url("")).rstrip("/"),
                str(wechat.make_url("")).rstrip("/"),
                **sections,
            )
        listener = Listener(build_config(raw, env={}))
        await listener.start()
        started.append(listener)
        return Running(listener)

    yield start
    for listener in reversed(started):
        await listener.stop()


@pytest.fixture
async def gw(start_gateway: StartGateway) -> Running:
    return await start_gateway()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session
