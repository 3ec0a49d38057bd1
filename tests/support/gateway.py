"""The gateway under test: its test secrets, its raw config, and a started one."""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestServer

from gateway.auth.tokens import TokenCodec
from gateway.config import Config
from gateway.runtime.worker import Listener

TOKEN_SECRET = "test-token-secret-0123456789abcdef-0123456789"
APPID = "wxtestappid0000001"
WECHAT_SECRET = "wechat-secret-value"  # what the `wechat` fixture's fake expects


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def url_of(server: TestServer) -> str:
    """A test server's base URL as a route's `upstream` or `wechat.api_base` takes it."""
    return str(server.make_url("")).rstrip("/")


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
            "secret": WECHAT_SECRET,
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


def config_for(
    tmp_path: Path, upstream: TestServer, wechat: TestServer, /, **sections: Any
) -> dict[str, Any]:
    """``base_config`` for the `upstream` and `wechat` fixtures' servers (positional:
    ``sections`` may have a `wechat` section of their own)."""
    return base_config(tmp_path, url_of(upstream), url_of(wechat), **sections)


class Running:
    """A started gateway: its URL, its config and a token minter."""

    def __init__(self, listener: Listener) -> None:
        self.listener = listener
        self.config: Config = listener.config
        self.url = f"http://127.0.0.1:{listener.port}"
        self.codec = TokenCodec.for_config(self.config)

    def token(self, openid: str = "o-test-user", unionid: str | None = None) -> str:
        return self.codec.issue(openid, unionid, self.listener.gateway.clock())[0]

    def auth(self, openid: str = "o-test-user", unionid: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(openid, unionid)}"}


StartGateway = Callable[..., Awaitable[Running]]


def route(prefix: str, upstream: str | list[str], **extra: Any) -> dict[str, Any]:
    """A public route (``extra`` overrides any key) for a test's own ``routes``."""
    return {"prefix": prefix, "upstream": upstream, "auth": "public", **extra}
