"""``gateway users show|revoke`` and the phone header against a real
``gateway run`` with two workers and two mini programs (issue 15, contract 9).

The fake WeChat runs in this process as a real server for both apps; the
command runs as its own subprocess on the gateway's SQLite file while the
gateway serves. "Every worker" is proved with one keep-alive connection pinned
to each worker process (tests/support/users.py), and each 1 s bound is measured
from the moment the command (or the /auth/phone answer) is seen to end.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from gateway.wechat.fake import FAKE_STATE
from tests.support.client import bearer, send
from tests.support.gateway import TOKEN_SECRET, url_of
from tests.support.headers import fold
from tests.support.pinning import ask, pinned
from tests.support.procs import GatewayProcess, spawn, wait_workers, write_config
from tests.support.rawhttp import Conn, Response
from tests.support.secrets import leaking_lines
from tests.support.upstream import served
from tests.support.users import (
    APP_A,
    APP_B,
    CONTRACT_BOUND,
    PHONE_HEADER,
    SECRET_A,
    SECRET_B,
    CliRun,
    Probe,
    Seen,
    changed_within,
    close_code_and_delay,
    login_to,
    rounds,
    sockets_on_each_worker,
    two_apps_config,
    two_apps_fake,
    users_cli,
)
from tests.support.waiting import PROMPT, eventually

OK = (200, None)
REVOKED = (401, "token_revoked")
RECORD_FIELDS = {
    "appid",
    "openid",
    "unionid",
    "phone_number",
    "created_at",
    "last_login_at",
    "has_session_key",
    "epoch",
}


class TwoApps:
    """The gateway (restartable on its SQLite file), its config file, the fake
    WeChat, and the command run against them; nothing a test runs may show a
    secret or a session_key the fake handed out."""

    def __init__(self, tmp_path: Path, upstream: TestServer, wechat: TestServer) -> None:
        self.tmp_path = tmp_path
        self.wechat = wechat
        self.raw = two_apps_config(tmp_path, url_of(upstream), url_of(wechat))
        self.config = tmp_path / "gw.yaml"  # where spawn(name="gw") writes it
        self.procs: list[GatewayProcess] = []
        self.workers: list[int] = []

    async def start(self) -> GatewayProcess:
        self.raw["server"]["port"] = 0  # a new free port: a restart never waits on the old one
        proc = await spawn(self.tmp_path, self.raw, name="gw")
        self.procs.append(proc)
        self.workers = await wait_workers(proc, 2)
        return proc

    def secrets(self) -> dict[str, str]:
        state = self.wechat.app[FAKE_STATE]
        found = {"wechat.secret A": SECRET_A, "wechat.secret B": SECRET_B, "token": TOKEN_SECRET}
        for appid, app in state.apps.items():
            for code in app.js_codes:
                found[f"session_key {code}@{appid}"] = state.session_key_for(code, appid)
        return found

    async def cli(self, command: str, *args: str) -> CliRun:
        ran = await users_cli(self.config, command, *args)
        assert not leaking_lines(ran.out + ran.err, self.secrets()), ran
        return ran

    def stop(self, proc: GatewayProcess) -> None:
        assert proc.stop() == 0, proc.output()
        assert not leaking_lines(proc.output(), self.secrets())


@pytest.fixture
async def two_apps(tmp_path: Path, upstream: TestServer) -> AsyncIterator[TwoApps]:
    async with served(two_apps_fake()) as wechat:
        stack = TwoApps(tmp_path, upstream, wechat)
        yield stack
        for proc in stack.procs:
            await asyncio.to_thread(stack.stop, proc)


def verdict(answer: Response) -> tuple[int, str | None]:
    """(status, error code or None): what a probe compares."""
    if answer.status == 200:
        return OK
    return answer.status, answer.json.get("error")


async def status_on(pin: Conn, token: str, path: str = "/api/probe") -> tuple[int, str | None]:
    return verdict(await ask(pin, "GET", path, token))


async def status_fresh(url: str, token: str) -> tuple[int, str | None]:
    """On a new connection: whichever worker the kernel picks."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
        reply = await send(http, "GET", url + "/api/fresh", headers=bearer(token))
    return OK if reply.status == 200 else (reply.status, reply.body.get("error"))


def token_probe(t0: float, url: str, pins: dict[int, Conn], tokens: dict[str, str]) -> Probe:
    """A round: every token on every pinned worker, and each on a fresh connection."""

    async def probe() -> list[Seen]:
        seen = []
        for pid, pin in pins.items():
            for label, token in tokens.items():
                at = time.monotonic() - t0
                seen.append(Seen(at, f"{label}@{pid}", await status_on(pin, token)))
        for label, token in tokens.items():
            at = time.monotonic() - t0
            seen.append(Seen(at, f"{label}@fresh", await status_fresh(url, token)))
        return seen

    return probe


def of(seen: list[Seen], label: str) -> list[Seen]:
    return [s for s in seen if s.where.startswith(label + "@")]


# -- gateway users show ------------------------------------------------------------------


async def test_show_prints_one_json_object_per_record_and_no_session_key(
    two_apps: TwoApps,
) -> None:
    gw = await two_apps.start()
    async with aiohttp.ClientSession() as http:
        in_a = await login_to(http, gw.url, "union-show", APP_A)
        in_b = await login_to(http, gw.url, "union-show", APP_B)
        plain = await login_to(http, gw.url, "plain-show", APP_A)
        only_a = await login_to(http, gw.url, "union-only-a", APP_A)
        phone = await send(
            http,
            "POST",
            gw.url + "/auth/phone",
            headers=bearer(plain["token"]),
            json={"code": "phone-13900001111"},
        )
        assert phone.status == 200, phone.raw
    assert in_a["unionid"] == in_b["unionid"] is not None
    assert in_a["openid"] != in_b["openid"]

    one = await two_apps.cli("show", "--appid", APP_A, "--openid", plain["openid"])
    assert (one.code, one.err) == (0, "")
    [record] = one.records()
    assert set(record) == RECORD_FIELDS  # no session_key field, and nothing else
    assert {k: record[k] for k in ("appid", "openid", "unionid", "phone_number")} == {
        "appid": APP_A,
        "openid": plain["openid"],
        "unionid": None,
        "phone_number": "13900001111",
    }
    assert (record["has_session_key"], record["epoch"]) == (True, 0)

    person = await two_apps.cli("show", "--unionid", in_a["unionid"])
    assert (person.code, person.err) == (0, "")
    # Both apps' records (in no promised order), one unionid linking them.
    assert sorted((r["appid"], r["openid"], r["unionid"]) for r in person.records()) == sorted(
        [(APP_A, in_a["openid"], in_a["unionid"]), (APP_B, in_b["openid"], in_b["unionid"])]
    )
    assert all(set(r) == RECORD_FIELDS for r in person.records())

    narrowed = await two_apps.cli("show", "--unionid", in_a["unionid"], "--appid", APP_B)
    assert narrowed.code == 0
    assert [(r["appid"], r["openid"]) for r in narrowed.records()] == [(APP_B, in_b["openid"])]

    nobody = [
        ("--appid", APP_A, "--openid", "o-nobody-here"),
        ("--appid", APP_B, "--openid", plain["openid"]),  # a user of A only
        ("--unionid", "u-nobody-here"),
        ("--unionid", only_a["unionid"], "--appid", APP_B),
    ]
    runs = [(command, args) for command in ("show", "revoke") for args in nobody]
    results = await asyncio.gather(*(two_apps.cli(c, *a) for c, a in runs))
    for run, missing in zip(runs, results, strict=True):
        assert (missing.code, missing.out) == (1, ""), (run, missing)
        assert "no such user" in missing.err, (run, missing)
    # A refused revoke wrote nothing: the records are as they were.
    for who in (plain, only_a):
        shown = await two_apps.cli("show", "--appid", APP_A, "--openid", who["openid"])
        assert [r["epoch"] for r in shown.records()] == [0]


BAD_ARGUMENTS = [
    (),
    ("--openid", "o-x"),  # an openid is per app: --appid is needed
    ("--appid", APP_A),  # whom?
    ("--appid", APP_A, "--openid", "o-x", "--unionid", "u-x"),
    ("--openid", "o-x", "--unionid", "u-x"),
    ("--appid", "wxnotconfigured00", "--openid", "OPENID"),
    ("--appid", "wxnotconfigured00", "--unionid", "UNIONID"),
]


async def test_bad_arguments_exit_2_and_change_nothing(two_apps: TwoApps) -> None:
    gw = await two_apps.start()
    async with aiohttp.ClientSession() as http:
        user = await login_to(http, gw.url, "union-bad-args", APP_A)

    def real(args: tuple[str, ...]) -> list[str]:
        # A real user behind the placeholders: a refusal is for the arguments alone.
        names = {"OPENID": user["openid"], "UNIONID": user["unionid"]}
        return [names.get(a, a) for a in args]

    runs = [(command, args) for command in ("show", "revoke") for args in BAD_ARGUMENTS]
    results = await asyncio.gather(*(two_apps.cli(c, *real(a)) for c, a in runs))
    for (command, args), ran in zip(runs, results, strict=True):
        assert (ran.code, ran.out) == (2, ""), (command, args, ran)
        assert ran.err.strip(), (command, args)  # says what is wrong
    broken = two_apps.tmp_path / "broken.yaml"
    broken.write_text("wechat: [not, a, mapping]\n")
    for command in ("show", "revoke"):
        ran = await users_cli(broken, command, "--appid", APP_A, "--openid", user["openid"])
        assert (ran.code, ran.out) == (2, ""), ran

    # Nothing was revoked: the token works, the record is at epoch 0.
    async with aiohttp.ClientSession() as http:
        reply = await send(http, "GET", gw.url + "/api/x", headers=bearer(user["token"]))
    assert reply.status == 200
    shown = await two_apps.cli("show", "--appid", APP_A, "--openid", user["openid"])
    assert [r["epoch"] for r in shown.records()] == [0]


async def test_an_app_name_works_as_appid(two_apps: TwoApps) -> None:
    gw = await two_apps.start()
    async with aiohttp.ClientSession() as http:
        user = await login_to(http, gw.url, "union-by-name", APP_B)
    shown = await two_apps.cli("show", "--appid", "card", "--openid", user["openid"])
    assert shown.code == 0, shown
    assert [(r["appid"], r["openid"]) for r in shown.records()] == [(APP_B, user["openid"])]


async def test_a_store_that_does_not_exist_is_not_created(two_apps: TwoApps) -> None:
    # Run from the wrong directory (or with the wrong config), the command must
    # say it looks at nothing, not create an empty store and report "no such user".
    raw = two_apps_config(two_apps.tmp_path, "http://127.0.0.1:9", "http://127.0.0.1:9")
    absent = two_apps.tmp_path / "absent"
    raw["storage"] = {"url": f"sqlite:///{absent}/gateway.db"}
    config = write_config(two_apps.tmp_path / "elsewhere.yaml", raw)
    for command in ("show", "revoke"):
        ran = await users_cli(config, command, "--appid", APP_A, "--openid", "o-x")
        assert (ran.code, ran.out) == (2, ""), ran
        assert "no database at" in ran.err
    assert not absent.exists()


# -- gateway users revoke -----------------------------------------------------------------


async def test_revoke_reaches_every_worker_and_its_websockets_within_1s(
    two_apps: TwoApps,
) -> None:
    gw = await two_apps.start()
    port, workers = gw.port, two_apps.workers
    assert port is not None
    async with aiohttp.ClientSession() as http, pinned(port, workers) as pins:
        victim = await login_to(http, gw.url, "union-banned", APP_A)
        victim_in_b = await login_to(http, gw.url, "union-banned", APP_B)
        other = await login_to(http, gw.url, "union-bystander", APP_A)
        tokens = {"victim": victim["token"], "b": victim_in_b["token"], "other": other["token"]}
        for pin in pins.values():
            for token in tokens.values():
                assert await status_on(pin, token) == OK
        doomed = await sockets_on_each_worker(http, gw.url, port, workers, victim["token"], 2)
        kept = [
            *await sockets_on_each_worker(http, gw.url, port, workers, other["token"], 1),
            *await sockets_on_each_worker(http, gw.url, port, workers, victim_in_b["token"], 1),
        ]

        ran = await two_apps.cli("revoke", "--appid", APP_A, "--openid", victim["openid"])
        t0 = ran.exited
        # At once, on whichever worker, even within the second of the ban.
        again = await login_to(http, gw.url, "union-banned", APP_A)
        tokens["again"] = again["token"]
        seen, closes = await asyncio.gather(
            rounds(t0, token_probe(t0, gw.url, pins, tokens)),
            asyncio.gather(*(close_code_and_delay(ws, t0) for _, ws in doomed)),
        )

        # The bystanders' sockets are open after both workers applied the ban
        # (each closed its own share of the victim's sockets).
        for _, ws in kept:
            await ws.send_str("still")
            assert await ws.receive_str(timeout=PROMPT) == "echo:still"
        for _, ws in [*doomed, *kept]:
            await ws.close()
        for pin in pins.values():
            for path in ("/auth/me", "/auth/verify"):
                assert await status_on(pin, victim["token"], path) == REVOKED, path

    assert (ran.code, ran.err) == (0, "")
    [record] = ran.records()
    assert (record["appid"], record["openid"], record["epoch"]) == (APP_A, victim["openid"], 1)
    assert set(record) == RECORD_FIELDS
    first = changed_within(of(seen, "victim"), OK, REVOKED, [f"victim@{p}" for p in workers])
    for label in ("b", "other", "again"):
        assert {s.what for s in of(seen, label)} == {OK}, (label, of(seen, label))
    assert {pid for pid, _ in doomed} == set(workers)
    assert [code for code, _ in closes] == [1008] * len(doomed), closes
    assert max(at for _, at in closes) <= CONTRACT_BOUND, closes
    print(f"workers refused the token at {first}, sockets closed at {[at for _, at in closes]}")


async def test_revoke_by_unionid_covers_every_app_unless_narrowed(two_apps: TwoApps) -> None:
    gw = await two_apps.start()
    port, workers = gw.port, two_apps.workers
    assert port is not None
    async with aiohttp.ClientSession() as http, pinned(port, workers) as pins:
        in_a = await login_to(http, gw.url, "union-person", APP_A)
        in_b = await login_to(http, gw.url, "union-person", APP_B)
        other = await login_to(http, gw.url, "union-someone-else", APP_B)
        tokens = {"a": in_a["token"], "b": in_b["token"], "other": other["token"]}

        narrowed = await two_apps.cli("revoke", "--unionid", in_a["unionid"], "--appid", APP_B)
        seen = await rounds(narrowed.exited, token_probe(narrowed.exited, gw.url, pins, tokens))
        assert (narrowed.code, narrowed.err) == (0, "")
        assert [(r["appid"], r["epoch"]) for r in narrowed.records()] == [(APP_B, 1)]
        changed_within(of(seen, "b"), OK, REVOKED, [f"b@{p}" for p in workers])
        assert {s.what for s in [*of(seen, "a"), *of(seen, "other")]} == {OK}

        every = await two_apps.cli("revoke", "--unionid", in_a["unionid"])
        seen = await rounds(every.exited, token_probe(every.exited, gw.url, pins, tokens))
        assert (every.code, every.err) == (0, "")
        assert sorted((r["appid"], r["epoch"]) for r in every.records()) == sorted(
            [(APP_A, 1), (APP_B, 2)]
        )
        changed_within(of(seen, "a"), OK, REVOKED, [f"a@{p}" for p in workers])
        assert {s.what for s in of(seen, "b")} == {REVOKED}
        assert {s.what for s in of(seen, "other")} == {OK}

        # The person logs in again in both apps, and both tokens work everywhere.
        fresh = [await login_to(http, gw.url, "union-person", app) for app in (APP_A, APP_B)]
        for pin in pins.values():
            for login in fresh:
                assert await status_on(pin, login["token"]) == OK


async def test_a_revocation_survives_a_restart(two_apps: TwoApps) -> None:
    gw = await two_apps.start()
    async with aiohttp.ClientSession() as http:
        banned = await login_to(http, gw.url, "union-restart-banned", APP_A)
        banned_down = await login_to(http, gw.url, "union-banned-while-down", APP_B)
        other = await login_to(http, gw.url, "union-restart-other", APP_A)
        ran = await two_apps.cli("revoke", "--appid", APP_A, "--openid", banned["openid"])
        assert ran.code == 0, ran.err

        async def refused() -> bool:
            return await status_fresh(gw.url, banned["token"]) == REVOKED

        await eventually(refused, "the ban before the restart")
    two_apps.stop(gw)
    # A ban written while no gateway runs is read at start like the others.
    down = await two_apps.cli("revoke", "--appid", APP_B, "--openid", banned_down["openid"])
    assert down.code == 0, down.err

    again = await two_apps.start()
    assert again.port is not None
    async with (
        aiohttp.ClientSession() as http,
        pinned(again.port, two_apps.workers) as pins,
    ):
        relogin = await login_to(http, again.url, "union-restart-banned", APP_A)
        for pin in pins.values():
            assert await status_on(pin, banned["token"]) == REVOKED
            assert await status_on(pin, banned_down["token"]) == REVOKED
            assert await status_on(pin, other["token"]) == OK
            assert await status_on(pin, relogin["token"]) == OK


# -- the phone header ---------------------------------------------------------------------

# What a client sends to pass for the gateway: both spellings must be dropped.
FORGED = [(PHONE_HEADER, "19999999999"), (PHONE_HEADER.replace("-", "_"), "18888888888")]


async def phones_upstream_saw(pin: Conn, token: str) -> tuple[str, ...]:
    """The phone header lines (any spelling) the upstream received for one
    request carrying forged ones (the reflecting upstream answers with them)."""
    answer = await ask(pin, "GET", "/api/whoami", token, headers=FORGED)
    assert answer.status == 200, answer
    lines: list[list[str]] = answer.json["headers"]
    return tuple(value for name, value in lines if fold(name) == fold(PHONE_HEADER))


async def test_phone_header_reaches_every_worker_within_1s(two_apps: TwoApps) -> None:
    gw = await two_apps.start()
    port, workers = gw.port, two_apps.workers
    assert port is not None
    async with aiohttp.ClientSession() as http, pinned(port, workers) as pins:
        caller = await login_to(http, gw.url, "union-phone-later", APP_A)
        # The same person in the other app: a number belongs to one app's record.
        caller_in_b = await login_to(http, gw.url, "union-phone-later", APP_B)
        nobody = await login_to(http, gw.url, "no-number", APP_A)
        tokens = {"caller": caller["token"], "b": caller_in_b["token"], "nobody": nobody["token"]}
        # Every worker looks the caller up now and caches "no number".
        for pin in pins.values():
            for token in tokens.values():
                assert await phones_upstream_saw(pin, token) == ()

        setter = pins[workers[0]]
        answer = await ask(
            setter, "POST", "/auth/phone", caller["token"], body={"code": "phone-13912345678"}
        )
        t0 = time.monotonic()
        assert answer.status == 200, answer
        number = answer.json["phone_number"]
        assert number == "13912345678"

        async def probe() -> list[Seen]:
            seen = []
            for pid, pin in pins.items():
                for label, token in tokens.items():
                    at = time.monotonic() - t0
                    seen.append(Seen(at, f"{label}@{pid}", await phones_upstream_saw(pin, token)))
            return seen

        seen = await rounds(t0, probe)
        verified = {
            p: await ask(pin, "GET", "/auth/verify", caller["token"]) for p, pin in pins.items()
        }
        unknown = {
            p: await ask(pin, "GET", "/auth/verify", nobody["token"]) for p, pin in pins.items()
        }

    first = changed_within(of(seen, "caller"), (), (number,), [f"caller@{p}" for p in workers])
    # The worker that stored the number knows it at once.
    assert {s.what for s in seen if s.where == f"caller@{workers[0]}"} == {(number,)}
    assert {s.what for s in [*of(seen, "b"), *of(seen, "nobody")]} == {()}
    for pid in workers:
        assert [v for _, v in verified[pid].header_values(PHONE_HEADER)] == [number]
        assert unknown[pid].status == 200 and unknown[pid].header_values(PHONE_HEADER) == []
    print(f"the number reached the workers at {first}")
