"""The JSON access log (stdout) and the log level (stderr), read from a real
`gateway run` process."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer

from tests.support.gateway import TOKEN_SECRET, config_for, free_port, url_of
from tests.support.procs import ROOT, GatewayProcess, wait_healthy, write_config


def _call(url: str, headers: dict[str, str] | None = None, data: bytes | None = None) -> int:
    request = urllib.request.Request(url, headers=headers or {}, data=data)
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            resp.read()
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        exc.read()
        return int(exc.code)


def _run(tmp_path: Path, raw: dict[str, Any], calls: Any) -> tuple[list[dict[str, Any]], str]:
    """Start the gateway, make ``calls(url)``, stop it; (access lines, stderr)."""
    raw["server"]["port"] = free_port()
    config = write_config(tmp_path / "gw.yaml", raw)
    gateway = GatewayProcess(["run", "-c", str(config)], port=raw["server"]["port"])
    try:
        wait_healthy(gateway.url, gateway.proc)
        calls(gateway.url)
    finally:
        code = gateway.stop()
    assert code == 0, gateway.stderr
    lines = [json.loads(line) for line in gateway.stdout.splitlines() if line.strip()]
    return lines, gateway.stderr


def _raw(tmp_path: Path, upstream: TestServer, wechat: TestServer, **log: Any) -> dict[str, Any]:
    raw = config_for(tmp_path, upstream, wechat)
    raw["log"] = {"access": True, **log}
    return raw


def _login(url: str, code: str) -> dict[str, Any]:
    request = urllib.request.Request(
        url + "/auth/login",
        data=json.dumps({"code": code}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=5) as resp:
        return dict(json.loads(resp.read()))


async def test_one_json_line_per_request_with_a_hashed_openid(
    tmp_path: Path, upstream: TestServer, wechat: TestServer
) -> None:
    seen: dict[str, Any] = {}

    def calls(url: str) -> None:
        login = _login(url, "access-log-user")
        seen.update(login)
        auth = {"Authorization": f"Bearer {login['token']}", "X-Request-Id": "trace-42"}
        assert _call(url + "/api/orders?secret=s3cr3t", auth) == 200
        assert _call(url + "/api/orders", {"Authorization": "Bearer nope"}) == 401
        assert _call(url + "/nowhere") == 404

    lines, _ = await asyncio.to_thread(_run, tmp_path, _raw(tmp_path, upstream, wechat), calls)
    by_path = {(line["method"], line["path"]): line for line in lines}
    openid, token = seen["openid"], seen["token"]

    login = by_path[("POST", "/auth/login")]
    proxied = by_path[("GET", "/api/orders")]  # the last one: the 401
    ok = next(line for line in lines if line["path"] == "/api/orders" and line["status"] == 200)
    assert proxied["status"] == 401 and proxied["upstream"] is None
    assert "openid_hash" not in proxied  # no valid token, nobody to name
    assert ok["request_id"] == "trace-42"
    assert ok["route"] == "/api/"
    assert ok["upstream"] == url_of(upstream)
    assert ok["bytes"] > 0 and ok["latency_ms"] > 0
    assert ok["client"] == "127.0.0.1"
    key = hmac.new(TOKEN_SECRET.encode(), b"wx-gateway access log", hashlib.sha256).digest()
    expected = hmac.new(key, openid.encode(), hashlib.sha256).hexdigest()[:16]
    assert ok["openid_hash"] == login["openid_hash"] == expected
    assert by_path[("GET", "/nowhere")]["status"] == 404
    assert by_path[("GET", "/nowhere")]["route"] is None
    for line in lines:
        text = json.dumps(line)
        assert openid not in text and token not in text and "s3cr3t" not in text
        assert set(line) >= {
            "time",
            "request_id",
            "route",
            "method",
            "path",
            "status",
            "bytes",
            "latency_ms",
            "upstream",
            "client",
        }
        assert line["time"].endswith("Z")
    # Every request, the health checks of the start-up included, has its line.
    assert sum(1 for line in lines if line["path"] == "/healthz") >= 1


@pytest.mark.parametrize("mode", ["clear", "omit"])
async def test_openid_in_clear_or_omitted_when_configured(
    tmp_path: Path, upstream: TestServer, wechat: TestServer, mode: str
) -> None:
    seen: dict[str, Any] = {}

    def calls(url: str) -> None:
        seen.update(_login(url, f"access-log-{mode}"))
        assert _call(url + "/api/x", {"Authorization": f"Bearer {seen['token']}"}) == 200

    lines, _ = await asyncio.to_thread(
        _run, tmp_path, _raw(tmp_path, upstream, wechat, openid=mode), calls
    )
    line = next(line for line in lines if line["path"] == "/api/x")
    assert "openid_hash" not in line
    if mode == "clear":
        assert line["openid"] == seen["openid"]
    else:
        assert "openid" not in line


async def test_access_log_off_and_log_level(
    tmp_path: Path, upstream: TestServer, wechat: TestServer
) -> None:
    def calls(url: str) -> None:
        assert _call(url + "/nowhere") == 404

    lines, err = await asyncio.to_thread(
        _run, tmp_path, _raw(tmp_path, upstream, wechat, access=False, level="warning"), calls
    )
    assert lines == []
    # At `warning`, the start-up's INFO lines are gone; the fake WeChat's warning stays.
    assert " INFO " not in err
    assert "listening" not in err
    lines, err = await asyncio.to_thread(
        _run, tmp_path, _raw(tmp_path, upstream, wechat, level="info"), calls
    )
    assert "listening on" in err
    assert any(line["path"] == "/nowhere" for line in lines)


async def test_a_stdout_nobody_reads_never_stalls_the_gateway(
    tmp_path: Path, upstream: TestServer, wechat: TestServer
) -> None:
    """With stdout a pipe that is never read (it fills at 64 KiB), requests keep
    being answered: the access log's writer thread blocks, the event loop does not."""
    raw = _raw(tmp_path, upstream, wechat)
    port = free_port()
    raw["server"]["port"] = port
    config = write_config(tmp_path / "gw.yaml", raw)
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "run", "-c", str(config)],
        cwd=ROOT,
        stdout=subprocess.PIPE,  # never read until the end
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    long_path = "/nowhere/" + "x" * 2000  # ~2 KB a line: the pipe fills in ~40

    def calls() -> list[int]:
        wait_healthy(url, proc)
        return [_call(url + long_path) for _ in range(300)]

    try:
        statuses = await asyncio.to_thread(calls)
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(proc.communicate, timeout=20)
    assert statuses == [404] * 300
    assert proc.returncode == 0
