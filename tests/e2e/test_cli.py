"""`gateway run` / `gateway check` as real subprocesses, the shipped config included."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from tests.conftest import base_config, free_port
from tests.support.procs import ROOT, GatewayProcess, children, wait_healthy, write_config
from tests.support.upstream import Recorder


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
        "DEMO_UPSTREAM": str(upstream.make_url("")).rstrip("/"),
    }
    for name in ("WECHAT_APPID", "WECHAT_SECRET", "GATEWAY_TOKEN_SECRET", "WECHAT_FAKE"):
        env[name] = os.environ.get(name, "")
    env = {k: v for k, v in env.items() if v}
    clean_env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("WECHAT_APPID", "WECHAT_SECRET", "GATEWAY_TOKEN_SECRET", "WECHAT_FAKE")
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "run", "-c", "config.yaml"],
        cwd=ROOT,
        env={**clean_env, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        await asyncio.to_thread(wait_healthy, url, proc)
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
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    err = proc.communicate()[1].decode()
    assert proc.returncode == 0, err
    assert "FAKE WeChat" in err
    assert "development default" in err


async def test_workers_share_the_port_and_a_dead_worker_is_replaced(
    tmp_path: Path, upstream: TestServer, wechat: TestServer
) -> None:
    port = free_port()
    raw = base_config(
        tmp_path, str(upstream.make_url("")).rstrip("/"), str(wechat.make_url("")).rstrip("/")
    )
    raw["server"]["port"] = port
    path = write_config(tmp_path / "gw.yaml", raw)
    gateway = GatewayProcess(["run", "-c", str(path), "--workers", "2"])
    url = f"http://127.0.0.1:{port}"
    try:
        await asyncio.to_thread(wait_healthy, url, gateway.proc)
        deadline = time.monotonic() + 20
        while len(children(gateway.pid)) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        workers = children(gateway.pid)
        assert len(workers) == 2
        os.kill(workers[0], signal.SIGKILL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            now = children(gateway.pid)
            if len(now) == 2 and workers[0] not in now:
                break
            await asyncio.sleep(0.1)
        replaced = children(gateway.pid)
        assert len(replaced) == 2 and workers[0] not in replaced and workers[1] in replaced
        await asyncio.to_thread(wait_healthy, url, gateway.proc)
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
