"""Two mini programs behind a real ``gateway run --workers 2``, seen from outside:
the config, the ``gateway users`` command, logins per app, WebSockets spread
over the workers, and rounds of probes timed from one moment (contract section
9, issue 15). Connections pinned to each worker: :mod:`tests.support.pinning`.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable, Hashable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from gateway.wechat import fake
from tests.support import ROOT
from tests.support.client import send
from tests.support.gateway import base_config
from tests.support.sockets import owner_of
from tests.support.waiting import PROMPT

APP_A = "wxshopapp00000000a"
APP_B = "wxcardapp00000000b"
SECRET_A = "shop-wechat-secret-aaaa"
SECRET_B = "card-wechat-secret-bbbb"
PHONE_HEADER = "X-Phone-Number"
# The contract's bound for a logout or a ban to reach every worker.
CONTRACT_BOUND = 1.0


def two_apps_fake() -> web.Application:
    """The fake WeChat serving both apps, each checking its own secret."""
    return fake.create_app(apps={APP_A: SECRET_A, APP_B: SECRET_B})


def two_apps_config(tmp_path: Path, upstream_url: str, wechat_url: str) -> dict[str, Any]:
    """Two named apps, two workers, the phone header on, a WebSocket route."""
    raw = base_config(tmp_path, upstream_url, wechat_url)
    raw["wechat"] = {
        "apps": [
            {"appid": APP_A, "secret": SECRET_A, "name": "shop"},
            {"appid": APP_B, "secret": SECRET_B, "name": "card"},
        ],
        "api_base": wechat_url,
        "timeout": "2s",
    }
    raw["identity"] = {"phone_header": PHONE_HEADER}
    raw["server"]["workers"] = 2
    return raw


# -- the command -------------------------------------------------------------------


@dataclass(frozen=True)
class CliRun:
    code: int
    out: str
    err: str
    exited: float  # time.monotonic() once the process had ended

    def records(self) -> list[dict[str, Any]]:
        """stdout as the command promises it: one JSON object per line."""
        return [json.loads(line) for line in self.out.splitlines()]


async def users_cli(config: Path, command: str, *args: str) -> CliRun:
    """``python -m gateway users <command> -c <config> <args>``, run to its end."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway",
        "users",
        command,
        "-c",
        str(config),
        *args,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    # Generous: a Python start-up on a loaded machine; the deadline only catches a hang.
    out, err = await asyncio.wait_for(proc.communicate(), 3 * PROMPT)
    exited = time.monotonic()
    assert proc.returncode is not None
    return CliRun(proc.returncode, out.decode(), err.decode(), exited)


# -- logins ------------------------------------------------------------------------


async def login_to(http: aiohttp.ClientSession, base: str, code: str, appid: str) -> dict[str, Any]:
    """The login answer's body for ``code`` in ``appid``, once it is a 200."""
    reply = await send(http, "POST", base + "/auth/login", json={"code": code, "appid": appid})
    assert reply.status == 200, reply.raw
    body: dict[str, Any] = reply.body
    return body


# -- one keep-alive connection per worker: tests/support/pinning.py ---------------------


async def sockets_on_each_worker(
    http: aiohttp.ClientSession,
    url: str,
    port: int,
    workers: list[int],
    token: str,
    per_worker: int,
) -> list[tuple[int, aiohttp.ClientWebSocketResponse]]:
    """Open WebSockets with ``token`` until each worker holds ``per_worker`` of
    them: every one opened, with the worker that holds it, each echoing."""
    opened: list[tuple[int, aiohttp.ClientWebSocketResponse]] = []
    # All on one worker has a chance of 2**-n: 64 is a hang, not bad luck.
    for _ in range(64):
        counts = [sum(1 for pid, _ in opened if pid == w) for w in workers]
        if min(counts) >= per_worker:
            return opened
        ws = await http.ws_connect(url + "/api/ws", headers={"Authorization": f"Bearer {token}"})
        await ws.send_str("hello")
        assert await ws.receive_str(timeout=PROMPT) == "echo:hello"
        owner = owner_of(port, ws.get_extra_info("sockname")[1], workers)
        assert owner is not None, "no worker holds an open WebSocket"
        opened.append((owner, ws))
    raise AssertionError(f"64 WebSockets did not reach each of {workers} {per_worker} times")


async def close_code_and_delay(ws: aiohttp.ClientWebSocketResponse, t0: float) -> tuple[Any, float]:
    """The next message the gateway sends (a close, expected) and when it came,
    in seconds after ``t0``."""
    message = await ws.receive(timeout=PROMPT)
    at = time.monotonic() - t0
    return (message.data if message.type is aiohttp.WSMsgType.CLOSE else message), at


# -- rounds of probes, timed from one moment ------------------------------------


@dataclass(frozen=True)
class Seen:
    at: float  # seconds after t0 when the request was sent
    where: str  # which worker (or "fresh": a new connection, any worker)
    what: Hashable  # what it observed


Probe = Callable[[], Awaitable[list[Seen]]]


async def rounds(t0: float, probe: Probe, *, past: float = 1.5, span: float = 2.5) -> list[Seen]:
    """Every observation of ``probe`` run in rounds until ``span`` seconds have
    passed since ``t0`` and one round started ``past`` seconds after it (on a
    busy machine one round may take a while)."""
    seen: list[Seen] = []
    while time.monotonic() - t0 < span or not any(s.at > past for s in seen):
        seen += await probe()
        await asyncio.sleep(0.02)  # a breath between rounds, not a wait for anything
    return seen


def changed_within(
    seen: list[Seen], before: Hashable, after: Hashable, wheres: Iterable[str]
) -> dict[str, float]:
    """Check that each of ``wheres`` went from ``before`` to ``after`` for good,
    and that nothing sent later than the contract's bound saw ``before``; return
    when each first saw ``after`` (seconds after t0), for the report."""
    odd = [s for s in seen if s.what not in (before, after)]
    assert not odd, odd
    first: dict[str, float] = {}
    for where in wheres:
        mine = sorted((s for s in seen if s.where == where), key=lambda s: s.at)
        changed = [s.at for s in mine if s.what == after]
        assert changed, f"{where} never saw {after!r}: {mine}"
        first[where] = changed[0]
        assert all(s.what == after for s in mine if s.at >= first[where]), f"{where} went back"
    # A request sent after the bound that still saw `before` was answered after
    # the bound by a worker that had not learnt: the contract broken.
    late = [s for s in seen if s.what == before and s.at > CONTRACT_BOUND]
    assert not late, (late, seen)
    return first
