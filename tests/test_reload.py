"""SIGHUP: the config file is re-read and applied without dropping connections;
an invalid file keeps the running configuration and logs every problem; with
several workers, every worker reloads."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml
from aiohttp.test_utils import TestServer

from tests.conftest import base_config, free_port
from tests.procs import ROOT, children, wait_healthy, write_config


class Gateway:
    """`gateway run` with its stderr read line by line as it comes."""

    def __init__(self, config: Path, workers: int = 1) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "run", "-c", str(config), "--workers", str(workers)],
            cwd=ROOT,
            env={**os.environ},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, text: str, count: int = 1, timeout: float = 10.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [line for line in self.lines if text in line]
            if len(found) >= count:
                return found
            time.sleep(0.05)
        raise AssertionError(f"{text!r} x{count} not logged; log:\n" + "\n".join(self.lines))

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(20)
        self._reader.join(5)
        assert self.proc.stderr is not None
        self.proc.stderr.close()
        return code


async def _exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str
) -> tuple[int, bytes]:
    """One request on an open keep-alive connection: (status, body)."""
    writer.write(f"GET {path} HTTP/1.1\r\nHost: gw\r\n\r\n".encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return status, await reader.readexactly(length)


def _config(tmp_path: Path, upstream: TestServer, wechat: TestServer, port: int) -> dict[str, Any]:
    raw = base_config(
        tmp_path, str(upstream.make_url("")).rstrip("/"), str(wechat.make_url("")).rstrip("/")
    )
    raw["server"]["port"] = port
    return raw


async def test_sighup_applies_a_new_config_on_open_connections(
    tmp_path: Path, upstream: TestServer, wechat: TestServer
) -> None:
    port = free_port()
    raw = _config(tmp_path, upstream, wechat, port)
    path = write_config(tmp_path / "gw.yaml", raw)
    gw = Gateway(path)
    try:
        await asyncio.to_thread(wait_healthy, f"http://127.0.0.1:{port}", gw.proc)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert (await _exchange(reader, writer, "/public/x"))[0] == 200
        assert (await _exchange(reader, writer, "/extra/x"))[0] == 404

        # A new route, and /public/ now requires a token.
        raw["routes"].append(
            {"prefix": "/extra/", "upstream": raw["routes"][0]["upstream"], "auth": "public"}
        )
        raw["routes"][2]["auth"] = "required"
        write_config(path, raw)
        gw.proc.send_signal(signal.SIGHUP)
        await asyncio.to_thread(gw.wait_for, "configuration reloaded")

        # Same connection, new rules: nothing was dropped.
        assert (await _exchange(reader, writer, "/extra/x"))[0] == 200
        status, body = await _exchange(reader, writer, "/public/x")
        assert status == 401 and b"token_missing" in body

        # An invalid file: every problem logged, the running config kept.
        path.write_text(
            yaml.safe_dump(
                {**raw, "routes": [{"prefix": "/x/", "upstream": "not a url"}], "surprise": 1}
            )
        )
        gw.proc.send_signal(signal.SIGHUP)
        await asyncio.to_thread(gw.wait_for, "reload refused")
        problems = [line for line in gw.lines if "reload: " in line]
        assert any("routes[0].upstream" in line for line in problems), problems
        assert any("surprise" in line for line in problems), problems
        assert (await _exchange(reader, writer, "/extra/x"))[0] == 200
        writer.close()
        await writer.wait_closed()
        # Fresh connections see the kept configuration too.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert (await _exchange(reader, writer, "/extra/y"))[0] == 200
        writer.close()
        await writer.wait_closed()
    finally:
        code = await asyncio.to_thread(gw.stop)
    assert code == 0
    assert not any("Traceback" in line for line in gw.lines), gw.lines


async def test_sighup_reaches_every_worker(
    tmp_path: Path, upstream: TestServer, wechat: TestServer
) -> None:
    port = free_port()
    raw = _config(tmp_path, upstream, wechat, port)
    path = write_config(tmp_path / "gw.yaml", raw)
    gw = Gateway(path, workers=2)
    try:
        await asyncio.to_thread(wait_healthy, f"http://127.0.0.1:{port}", gw.proc)
        await asyncio.to_thread(gw.wait_for, "listening on", 2)
        workers = children(gw.proc.pid)
        assert len(workers) == 2
        raw["routes"].append(
            {"prefix": "/extra/", "upstream": raw["routes"][0]["upstream"], "auth": "public"}
        )
        write_config(path, raw)
        gw.proc.send_signal(signal.SIGHUP)
        reloaded = await asyncio.to_thread(gw.wait_for, "configuration reloaded", 2)
        assert {int(line.rsplit("pid ", 1)[1].rstrip(")")) for line in reloaded} == set(workers)
        # Many fresh connections (spread by SO_REUSEPORT): all see the new route.
        for _ in range(20):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            assert (await _exchange(reader, writer, "/extra/x"))[0] == 200
            writer.close()
            await writer.wait_closed()
        assert children(gw.proc.pid) == workers  # reloaded in place, not restarted
    finally:
        code = await asyncio.to_thread(gw.stop)
    assert code == 0
