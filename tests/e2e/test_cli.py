"""`gateway run` / `gateway check` as real subprocesses, the shipped config included."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from tests.support.gateway import free_port, url_of
from tests.support.procs import ROOT, GatewayProcess, RunGateway, children, wait_workers
from tests.support.upstream import Recorder
from tests.support.waiting import until


def run_cli(
    *args: str, cwd: Path = ROOT, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_check_prints_routes_for_the_shipped_config() -> None:
    result = run_cli("check", "-c", "config.yaml")
    assert result.returncode == 0, result.stderr
    assert "/api/" in result.stdout and "auth=required" in result.stdout
    assert "dev-only" not in result.stdout + result.stderr


def test_check_reports_every_problem_one_line_each(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "server: {port: http}\n"
        "wechat: {appid: wx, secret: top-secret-wechat}\n"
        "token: {secret: short-token-secret}\n"
        "routes:\n  - {prefix: /a/, upstream: x}\n  - {prefix: /b/, upstream: 'http://h', auht: public}\n"
    )
    result = run_cli("check", "-c", str(bad))
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert lines[0] == "server.port: must be an integer"
    assert any(line.startswith("token.secret: must be at least 32 bytes") for line in lines)
    assert any(line.startswith("routes[0].upstream: 'x' is not a URL") for line in lines)
    assert any(
        line.startswith("routes[1].auht: unknown key; did you mean 'auth'?") for line in lines
    )
    assert len(lines) == 4
    assert "short-token-secret" not in result.stderr and "top-secret-wechat" not in result.stderr


def test_run_with_bad_config_exits_before_binding(tmp_path: Path) -> None:
    port = free_port()
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        f"server: {{port: {port}}}\nwechat: {{appid: wx, secret: s}}\ntoken: {{secret: short}}\n"
    )
    started = time.monotonic()
    result = run_cli("run", "-c", str(bad))
    assert result.returncode != 0
    assert "token.secret: must be at least 32 bytes" in result.stderr
    assert "listening" not in result.stderr
    assert time.monotonic() - started < 30


async def test_shipped_config_logs_in_and_routes(
    tmp_path: Path, upstream: TestServer, seen: Recorder
) -> None:
    """The README's first command: the shipped config.yaml, no credentials."""
    port = free_port()
    env = {
        "GATEWAY_PORT": str(port),
        "GATEWAY_STORAGE_URL": f"sqlite:///{tmp_path}/gw.db",
        "DEMO_UPSTREAM": url_of(upstream),
    }
    credentials = ("WECHAT_APPID", "WECHAT_SECRET", "GATEWAY_TOKEN_SECRET", "WECHAT_FAKE")
    proc = GatewayProcess(["run", "-c", "config.yaml"], env=env, port=port, drop_env=credentials)
    url = proc.url
    try:
        await proc.healthy()
        async with aiohttp.ClientSession() as http:
            async with http.post(url + "/auth/login", json={"code": "readme-code"}) as resp:
                assert resp.status == 200, await resp.text()
                login = await resp.json()
            headers = {"Authorization": f"Bearer {login['token']}", "X-OpenId": "forged"}
            async with http.get(url + "/api/orders", headers=headers) as resp:
                assert resp.status == 200
            async with http.post(
                url + "/auth/phone", headers=headers, json={"code": "phone-13800138000"}
            ) as resp:
                assert resp.status == 200
                assert (await resp.json())["pure_phone_number"] == "13800138000"
        assert seen.last.raw_path == "/api/orders"
        assert [v for k, v in seen.last.headers if k.lower() == "x-openid"] == [login["openid"]]
    finally:
        code = proc.stop()
    assert code == 0, proc.stderr
    assert "FAKE WeChat" in proc.stderr
    assert "development default" in proc.stderr


async def test_workers_share_the_port_and_a_dead_worker_is_replaced(
    run_gateway: RunGateway,
) -> None:
    gateway = await run_gateway("--workers", "2")
    url = gateway.url
    try:
        workers = await wait_workers(gateway, 2)
        os.kill(workers[0], signal.SIGKILL)

        def replacement() -> bool:
            now = children(gateway.pid)
            return len(now) == 2 and workers[0] not in now

        await until(replacement, "a new worker in place of the killed one", every=0.1)
        replaced = children(gateway.pid)
        assert workers[1] in replaced
        await gateway.healthy()
        async with aiohttp.ClientSession() as http:
            for _ in range(20):
                async with http.get(url + "/healthz") as resp:
                    assert resp.status == 200
    finally:
        code = gateway.stop()
    assert code == 0, gateway.output()
    assert not any(pid in children(1) for pid in replaced if os.path.exists(f"/proc/{pid}"))


@pytest.mark.parametrize(
    "module", [["-m", "gateway"], ["-c", "from gateway.cli import main; raise SystemExit(main())"]]
)
def test_entry_points(module: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, *module, "--help"], capture_output=True, text=True, cwd=ROOT, timeout=30
    )
    assert result.returncode == 0
    assert "run" in result.stdout and "check" in result.stdout and "fake-wechat" in result.stdout
