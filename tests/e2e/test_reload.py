"""SIGHUP: the config file is re-read and applied without dropping connections;
an invalid file keeps the running configuration and logs every problem; with
several workers, every worker reloads. A SIGHUP during start-up (of the gateway,
or of a worker the supervisor is replacing) is never fatal (issue 12, item 7)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from aiohttp.test_utils import TestServer

from tests.support.gateway import config_for, free_port
from tests.support.procs import ROOT, children, poll_healthy, write_config
from tests.support.rawhttp import Conn, request_bytes
from tests.support.waiting import PROMPT, until_sync


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

    def wait_for(self, text: str, count: int = 1, timeout: float = PROMPT) -> list[str]:
        def found() -> list[str]:
            return [line for line in self.lines if text in line]

        try:
            until_sync(lambda: len(found()) >= count, f"{text!r} x{count} logged", timeout)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; log:\n" + "\n".join(self.lines)) from None
        return found()

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(20)
        self._reader.join(5)
        assert self.proc.stderr is not None
        self.proc.stderr.close()
        return code


async def _stop_cleanly(gw: Gateway) -> None:
    """Stop ``gw``: it must exit 0 and have logged no traceback on its way."""
    code = await asyncio.to_thread(gw.stop)
    assert code == 0, gw.lines
    assert not any("Traceback" in line for line in gw.lines), gw.lines


async def _exchange(conn: Conn, path: str) -> tuple[int, bytes]:
    """One request on an open keep-alive connection: (status, body)."""
    await conn.send(request_bytes(path, host="gw", close=False))
    answer = await conn.next()
    return answer.status, answer.body


@dataclass
class Started:
    gw: Gateway
    raw: dict[str, Any]  # its config, which a test may change and write back to `path`
    path: Path
    port: int


async def _started(
    tmp_path: Path, upstream: TestServer, wechat: TestServer, workers: int = 1
) -> Started:
    """`gateway run` with ``workers`` workers, once every one of them listens
    (/healthz answering means one does)."""
    port = free_port()
    raw = config_for(tmp_path, upstream, wechat, server={"port": port})
    path = write_config(tmp_path / "gw.yaml", raw)
    gw = Gateway(path, workers)
    try:
        await asyncio.to_thread(_serving, gw, f"http://127.0.0.1:{port}")
        await asyncio.to_thread(gw.wait_for, "listening on", workers)
    except BaseException:
        await asyncio.to_thread(gw.stop)
        raise
    return Started(gw, raw, path, port)


async def test_sighup_applies_a_new_config_on_open_connections(
    tmp_path: Path, upstream: TestServer, wechat: TestServer
) -> None:
    started = await _started(tmp_path, upstream, wechat)
    gw, raw, path, port = started.gw, started.raw, started.path, started.port
    try:
        conn = await Conn.open(port)
        assert (await _exchange(conn, "/public/x"))[0] == 200
        assert (await _exchange(conn, "/extra/x"))[0] == 404

        # A new route, and /public/ now requires a token.
        raw["routes"].append(
            {"prefix": "/extra/", "upstream": raw["routes"][0]["upstream"], "auth": "public"}
        )
        raw["routes"][2]["auth"] = "required"
        write_config(path, raw)
        gw.proc.send_signal(signal.SIGHUP)
        await asyncio.to_thread(gw.wait_for, "configuration reloaded")

        # Same connection, new rules: nothing was dropped.
        assert (await _exchange(conn, "/extra/x"))[0] == 200
        status, body = await _exchange(conn, "/public/x")
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
        assert (await _exchange(conn, "/extra/x"))[0] == 200
        await conn.close()
        # Fresh connections see the kept configuration too.
        conn = await Conn.open(port)
        assert (await _exchange(conn, "/extra/y"))[0] == 200
        await conn.close()
    finally:
        await _stop_cleanly(gw)


async def test_sighup_reaches_every_worker(
    tmp_path: Path, upstream: TestServer, wechat: TestServer
) -> None:
    started = await _started(tmp_path, upstream, wechat, workers=2)
    gw, raw, path, port = started.gw, started.raw, started.path, started.port
    try:
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
            conn = await Conn.open(port)
            assert (await _exchange(conn, "/extra/x"))[0] == 200
            await conn.close()
        assert children(gw.proc.pid) == workers  # reloaded in place, not restarted
    finally:
        await _stop_cleanly(gw)


# -- SIGHUP during start-up (issue 12, item 7) ------------------------------------


def _sighup_disposed(pid: int) -> bool:
    """True once SIGHUP is blocked, ignored or caught in ``pid``: no longer fatal."""
    masks = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            name, _, value = line.partition(":")
            if name in ("SigBlk", "SigIgn", "SigCgt"):
                masks[name] = int(value, 16)
    return any(mask & 1 for mask in masks.values())  # bit 0: signal 1, SIGHUP


# Extension modules of the gateway's own dependencies, the first it imports
# (not any site-packages one: a coverage .pth loads its tracer during site init).
_DEPENDENCY_EXTENSIONS = ("/yaml/_yaml.", "/multidict/_multidict.", "/aiohttp/_http_parser.")


def _running_gateway_code(pid: int) -> bool:
    """True once the process runs the gateway's own code, past the interpreter's
    start-up (which no Python program can shield from a signal): SIGHUP has a
    disposition, or a dependency's extension module is mapped."""
    try:
        if _sighup_disposed(pid):
            return True
        with open(f"/proc/{pid}/maps") as maps:
            return any(ext in line for line in maps for ext in _DEPENDENCY_EXTENSIONS)
    except (FileNotFoundError, ProcessLookupError):
        return False


def _hangups(gw: Gateway, pid: int, seconds: float, *, start: float = 0.0) -> list[float]:
    """SIGHUP to ``pid`` every 50 ms for ``seconds``; the times they were sent."""
    sent: list[float] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and gw.proc.poll() is None:
        try:
            os.kill(pid, signal.SIGHUP)
        except ProcessLookupError:
            break
        sent.append(time.monotonic() - start)
        time.sleep(0.05)
    return sent


def _serving(gw: Gateway, url: str, timeout: float = 60.0) -> None:
    if not poll_healthy(url, gw.proc, timeout):
        raise AssertionError(
            f"gateway exited with {gw.proc.returncode}; log:\n" + "\n".join(gw.lines)
        )


def _early_hangups(gw: Gateway) -> tuple[list[float], float | None]:
    """Wait for the gateway's own code to run, then SIGHUP it for 2 s: (when each
    was sent, when "listening on" was first seen), both in seconds from then."""
    deadline = time.monotonic() + 20
    while not _running_gateway_code(gw.proc.pid):
        assert gw.proc.poll() is None, f"exited with {gw.proc.returncode}: {gw.lines}"
        assert time.monotonic() < deadline, "the gateway's code never ran"
        time.sleep(0.002)
    start = time.monotonic()
    listening: float | None = None

    def watch() -> None:
        nonlocal listening
        while listening is None and time.monotonic() - start < 30 and gw.proc.poll() is None:
            if any("listening on" in line for line in gw.lines):
                listening = time.monotonic() - start
            time.sleep(0.01)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    sent = _hangups(gw, gw.proc.pid, 2.0, start=start)
    watcher.join(35)
    return sent, listening


async def test_sighup_during_start_up_is_not_fatal(
    tmp_path: Path, upstream: TestServer, wechat: TestServer
) -> None:
    port = free_port()
    raw = config_for(tmp_path, upstream, wechat, server={"port": port})
    gw = Gateway(write_config(tmp_path / "gw.yaml", raw))
    try:
        sent, listening = await asyncio.to_thread(_early_hangups, gw)
        await asyncio.to_thread(_serving, gw, f"http://127.0.0.1:{port}")
        # The window was really hit: hangups went out before the gateway served.
        assert listening is not None and sent and sent[0] < listening, (sent, listening)
        conn = await Conn.open(port)
        assert (await _exchange(conn, "/public/x"))[0] == 200
        await conn.close()
        # Those after the config was read were held, then taken as a reload
        # once the gateway served (coalesced: a burst is not a reload each).
        if sent[-1] > listening:
            reloads = await asyncio.to_thread(gw.wait_for, "configuration reloaded")
            assert len(reloads) < len(sent)
    finally:
        await _stop_cleanly(gw)


async def test_sighup_while_the_supervisor_replaces_a_worker_is_not_fatal(
    tmp_path: Path, upstream: TestServer, wechat: TestServer
) -> None:
    started = await _started(tmp_path, upstream, wechat, workers=2)
    gw, raw, path, port = started.gw, started.raw, started.path, started.port
    try:
        workers = children(gw.proc.pid)
        assert len(workers) == 2
        raw["routes"].append(
            {"prefix": "/extra/", "upstream": raw["routes"][0]["upstream"], "auth": "public"}
        )
        write_config(path, raw)

        # Kill one worker; while the supervisor starts its replacement (a second
        # or so of imports and start-up), hang up on the supervisor again and
        # again: every hangup is passed on to every worker, the new one too.
        os.kill(workers[0], signal.SIGKILL)
        await asyncio.to_thread(_hangups, gw, gw.proc.pid, 2.5)
        await asyncio.to_thread(gw.wait_for, "listening on", 3, 30.0)

        # No worker died of a hangup (Popen's -1 is SIGHUP): one replacement.
        exits = [line for line in gw.lines if "exited with" in line]
        assert len(exits) == 1 and "exited with -9" in exits[0], exits
        assert gw.proc.poll() is None
        now = children(gw.proc.pid)
        assert len(now) == 2 and workers[1] in now, (workers, now)
        # The surviving worker reloaded; the new one read the new file: the
        # new route answers on every fresh connection, whichever worker has it.
        await asyncio.to_thread(gw.wait_for, "configuration reloaded", 1, 30.0)
        for _ in range(20):
            conn = await Conn.open(port)
            assert (await _exchange(conn, "/extra/x"))[0] == 200
            await conn.close()
    finally:
        await _stop_cleanly(gw)
