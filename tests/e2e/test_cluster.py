"""Three gateways as one, proven as a user would run them (contract section 10,
issue 16): a real redis-server with AOF on, three ``gateway run`` instances
(separate processes and ports, ``workers: 2`` each) and a real HAProxy
round-robin in front that health-checks ``/readyz``; the fake WeChat is a server
of its own, so its call counts are what all the instances did together.

One cluster serves the whole module (starting nine gateway processes is the slow
part). Every test uses its own users and, through the balancer, its own client
address (127.0.0.N as the source: HAProxy forwards it in X-Forwarded-For, which
the instances believe from it), so ``login_per_ip`` budgets never mix.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from gateway.storage.redis import RedisStorage
from gateway.wechat import fake
from tests.support.client import Reply, bearer, logged_in, send
from tests.support.cluster import (
    APPID,
    PREFIX,
    REDIS_PASSWORD,
    WECHAT_SECRET,
    Cluster,
    Settings,
    running_cluster,
)
from tests.support.gateway import TOKEN_SECRET
from tests.support.secrets import leaking_lines
from tests.support.waiting import eventually, until

pytestmark = pytest.mark.timeout(240)

LOGIN_LIMIT = 10  # rate_limits.login_per_ip: 10/m
ROUTE_LIMIT = 30  # the /limited/ route's rate_limit: 30/m
# The contract's bound for a logout to reach every instance.
PROPAGATION_BOUND = 1.0
OUTAGE = 10.0  # seconds Redis stays away in the outage test
# Generous: a call that needs Redis while it is down must answer, not hang
# (docs/deployment.md: 2 s connect and reply timeouts, one retry, 7 s overall).
NO_HANG = aiohttp.ClientTimeout(total=15)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    settings = Settings(
        instances=3,
        workers=2,
        login_per_ip=f"{LOGIN_LIMIT}/m",
        route_rate=f"{ROUTE_LIMIT}/m",
    )
    with running_cluster(tmp_path_factory.mktemp("cluster"), settings) as started:
        yield started
        # Shown only when a test of the module failed: what every process said.
        print(started.logs())


@pytest.fixture(autouse=True)
def healthy(cluster: Cluster) -> None:
    """Each test starts from a whole cluster (whatever the test before did):
    Redis up and every instance in HAProxy's rotation."""
    if not cluster.redis.process:
        cluster.redis.start()
    cluster.front.wait_status({i.name: "UP" for i in cluster.instances})


@asynccontextmanager
async def client_from(address: str) -> AsyncIterator[aiohttp.ClientSession]:
    """A client whose connections leave from ``address`` (127.0.0.N): a client
    address of its own, as the balancer and the instances behind it see it."""
    connector = aiohttp.TCPConnector(local_addr=(address, 0))
    async with aiohttp.ClientSession(connector=connector, timeout=NO_HANG) as http:
        yield http


async def get(http: aiohttp.ClientSession, url: str, token: str) -> Reply:
    return await send(http, "GET", url, headers=bearer(token))


def error_of(reply: Reply) -> str | None:
    try:
        code = reply.body.get("error")
    except (ValueError, AttributeError):
        return None
    return code if isinstance(code, str) else None


def seen_openid(reply: Reply) -> str | None:
    """The X-OpenId the demo upstream received (it echoes the headers it saw)."""
    headers = {name.lower(): value for name, value in reply.body["headers"].items()}
    return headers.get("x-openid")


def session_id(token: str) -> str:
    """The ``sid`` claim (what a logout revokes), read without verifying."""
    payload = token.split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    sid: str = claims["sid"]
    return sid


async def refused_by(http: aiohttp.ClientSession, url: str, token: str) -> float:
    """Seconds until ``url`` answers ``token`` with 401 token_revoked (polled)."""
    started = time.monotonic()

    async def refused() -> bool:
        reply = await get(http, url + "/api/probe", token)
        assert reply.status in (200, 401), reply.raw
        return reply.status == 401 and error_of(reply) == "token_revoked"

    await eventually(refused, f"{url} refusing a logged-out token", every=0.01)
    return time.monotonic() - started


async def test_a_logout_through_one_instance_is_refused_by_the_others_within_a_second(
    cluster: Cluster,
) -> None:
    gateways = cluster.instances
    delays: list[float] = []
    async with client_from("127.0.0.2") as http:
        for round_ in range(6):
            login = await logged_in(http, cluster.front.url, f"propagate-{round_}")
            token = login["token"]
            # Known everywhere first: a refusal below is the logout's doing.
            for gateway in gateways:
                reply = await get(http, gateway.url + "/api/who", token)
                assert reply.status == 200, reply.raw
                assert seen_openid(reply) == login["openid"], reply.body
            by, others = (
                gateways[round_ % 3],
                [g for g in gateways if g is not gateways[round_ % 3]],
            )
            out = await send(http, "POST", by.url + "/auth/logout", headers=bearer(token))
            assert out.status == 200, out.raw
            delays += await asyncio.gather(*(refused_by(http, g.url, token) for g in others))
            # The instance that took the logout refuses at once.
            assert (await get(http, by.url + "/api/who", token)).status == 401
    print(f"\n[cluster] logout reached the other instances in {sorted(delays)} s")
    # The contract's bound, for every logout and instance: pushed, a logout takes
    # milliseconds (bench/cluster.py reports p50/p99 over 200), so the second is
    # a wide margin even on a loaded host.
    assert max(delays) < PROPAGATION_BOUND, delays


async def test_twenty_phone_calls_over_three_instances_fetch_one_access_token(
    cluster: Cluster,
) -> None:
    assert cluster.fake_stats()["calls"]["stable_token"] == 0, "no test before needs a token"
    async with client_from("127.0.0.3") as http:
        token = (await logged_in(http, cluster.front.url, "phone-user"))["token"]

        async def phone(n: int) -> Reply:
            url = cluster.instances[n % 3].url + "/auth/phone"
            return await send(
                http, "POST", url, headers=bearer(token), json={"code": "phone-13600000000"}
            )

        replies = await asyncio.gather(*(phone(n) for n in range(20)))
        assert [r.status for r in replies] == [200] * 20, [r.raw for r in replies]
        assert {r.body["phone_number"] for r in replies} == {"13600000000"}
        assert cluster.fake_stats()["calls"]["stable_token"] == 1
        # The number is on the shared user record: any instance shows it.
        for gateway in cluster.instances:
            me = await get(http, gateway.url + "/auth/me", token)
            assert me.body["phone_number"] == "13600000000", me.raw


@dataclass
class Tally:
    passed: int
    limited: int
    served_by: set[str]
    seconds: float


async def tally(replies: list[Reply], started: float) -> Tally:
    statuses = [r.status for r in replies]
    assert set(statuses) <= {200, 429}, [r.raw for r in replies if r.status not in (200, 429)]
    assert all(error_of(r) == "rate_limited" for r in replies if r.status == 429)
    return Tally(
        passed=statuses.count(200),
        limited=statuses.count(429),
        served_by={r.headers.get("X-Served-By", "?") for r in replies},
        seconds=time.monotonic() - started,
    )


async def test_login_per_ip_holds_across_the_instances(cluster: Cluster) -> None:
    # 3x the limit from one client, round-robin over three instances (six workers):
    # counted per process, up to all of them would pass; counted in Redis, the limit.
    async with client_from("127.0.0.50") as http:
        started = time.monotonic()
        replies = [
            await send(http, "POST", cluster.front.url + "/auth/login", json={"code": f"lim-{n}"})
            for n in range(3 * LOGIN_LIMIT)
        ]
        got = await tally(replies, started)
    assert got.served_by == {"gw1", "gw2", "gw3"}, got
    # Exact, up to what the bucket refilled while the test ran (10/m: one per 6 s).
    refilled = int(got.seconds * LOGIN_LIMIT / 60) + 1
    print(f"\n[cluster] login_per_ip {LOGIN_LIMIT}/m across three instances: {got}")
    assert LOGIN_LIMIT <= got.passed <= LOGIN_LIMIT + refilled, got


async def test_a_route_rate_limit_holds_across_the_instances(cluster: Cluster) -> None:
    async with client_from("127.0.0.4") as http:
        token = (await logged_in(http, cluster.front.url, "route-limited"))["token"]
        started = time.monotonic()
        replies: list[Reply] = []
        # In rounds of six (two per instance), so the instances' background
        # exchange with Redis runs between rounds as it would under real traffic.
        for _ in range(3 * ROUTE_LIMIT // 6):
            replies += await asyncio.gather(
                *(get(http, cluster.front.url + "/limited/x", token) for _ in range(6))
            )
        got = await tally(replies, started)
    assert got.served_by == {"gw1", "gw2", "gw3"}, got
    print(f"\n[cluster] route rate_limit {ROUTE_LIMIT}/m across three instances: {got}")
    # Near the limit, not three (or six) times it. The accuracy of the shared route
    # limit is documented in docs/configuration.md; this bound is the intent.
    refilled = int(got.seconds * ROUTE_LIMIT / 60) + 1
    assert got.passed <= ROUTE_LIMIT * 1.5 + refilled, got
    assert got.passed >= ROUTE_LIMIT // 2, got


async def stored(cluster: Cluster, openid: str, token: str) -> tuple[bool, bool]:
    """Whether Redis itself holds the user and the revocation of ``token``: read
    with a client of its own, not through a gateway's memory."""
    store = RedisStorage(cluster.redis.url, prefix=PREFIX)
    await store.open()
    try:
        user = await store.get_user(APPID, openid)
        revoked = {sid for sid, _ in await store.live_revocations(time.time())}
    finally:
        await store.close()
    return user is not None, session_id(token) in revoked


async def logged_out(http: aiohttp.ClientSession, cluster: Cluster, code: str) -> dict[str, Any]:
    """A user logged in through the balancer, then out through gw1, and refused by all."""
    login = await logged_in(http, cluster.front.url, code)
    out = await send(
        http, "POST", cluster.instances[0].url + "/auth/logout", headers=bearer(login["token"])
    )
    assert out.status == 200, out.raw
    for gateway in cluster.instances:
        await refused_by(http, gateway.url, login["token"])
    return login


async def test_a_redis_restart_keeps_users_and_revocations(cluster: Cluster) -> None:
    async with client_from("127.0.0.5") as http:
        kept = await logged_in(http, cluster.front.url, "restart-kept")
        gone = await logged_out(http, cluster, "restart-gone")
        cluster.redis.stop()
        cluster.redis.start()  # same port, same directory: the AOF is read back
        assert await stored(cluster, kept["openid"], gone["token"]) == (True, True)

        async def logs_in() -> bool:
            return (await send(http, "POST", cluster.front.url + "/auth/login",
                               json={"code": "restart-after"})).status == 200  # fmt: skip

        await eventually(logs_in, "a login through the balancer after the Redis restart")
        for gateway in cluster.instances:
            assert (await get(http, gateway.url + "/api/x", kept["token"])).status == 200
            refused = await get(http, gateway.url + "/api/x", gone["token"])
            assert (refused.status, error_of(refused)) == (401, "token_revoked")
        # And a logout after the restart still reaches every instance.
        await logged_out(http, cluster, "restart-later")


async def test_a_redis_outage_keeps_the_fleet_in_the_balancer_then_recovers(
    cluster: Cluster,
) -> None:
    pids = [i.service.proc.pid for i in cluster.instances if i.service.proc]
    async with client_from("127.0.0.6") as http:
        known = await logged_in(http, cluster.front.url, "outage-known")
        cluster.redis.stop()
        try:
            # A login needs Redis: an answer, 503 storage_unavailable, not a hang.
            login = await send(http, "POST", cluster.front.url + "/auth/login",
                               json={"code": "outage-login"})  # fmt: skip
            assert (login.status, error_of(login)) == (503, "storage_unavailable"), login.raw
            problems = await outage_probes(http, cluster, known["token"], OUTAGE)
        finally:
            cluster.redis.start()
        assert problems == [], problems[:10]

        async def logs_in() -> bool:
            return (await send(http, "POST", cluster.front.url + "/auth/login",
                               json={"code": "outage-after"})).status == 200  # fmt: skip

        await eventually(logs_in, "a login through the balancer once Redis is back")
        # Recovered by itself: the same processes, and logouts reach every instance.
        await logged_out(http, cluster, "outage-recovered")
    assert [i.service.proc.pid for i in cluster.instances if i.service.proc] == pids


async def outage_probes(
    http: aiohttp.ClientSession, cluster: Cluster, token: str, seconds: float
) -> list[str]:
    """For ``seconds`` of the outage: /readyz stays 200 on every instance (a
    shared store's outage must not empty the balancer), HAProxy keeps them all
    UP, and a known token keeps working through it (within storage.max_staleness,
    30 s by default). Every deviation, as a line."""
    problems: list[str] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        at = f"{seconds - (deadline - time.monotonic()):.1f}s"
        for gateway in cluster.instances:
            ready = await send(http, "GET", gateway.url + "/readyz")
            if ready.status != 200:
                problems.append(f"{at} {gateway.name} /readyz {ready.status}")
        if set(statuses := cluster.front.statuses().values()) != {"UP"}:
            problems.append(f"{at} HAProxy: {sorted(statuses)}")
        proxied = await get(http, cluster.front.url + "/api/during", token)
        if proxied.status != 200:
            problems.append(f"{at} proxied {proxied.status} {proxied.raw[:100]!r}")
        await asyncio.sleep(0.25)  # the pace of the probes, not a wait for a condition
    return problems


@dataclass
class Answer:
    sent: float
    status: int  # 0: no HTTP answer at all (the balancer dropped the connection)
    served_by: str | None


async def load(
    http: aiohttp.ClientSession, url: str, token: str, answers: list[Answer], stop: asyncio.Event
) -> None:
    while not stop.is_set():
        sent = time.monotonic()
        try:
            reply = await get(http, url + "/api/load", token)
        except aiohttp.ClientError:
            answers.append(Answer(sent, 0, None))
            continue
        answers.append(Answer(sent, reply.status, reply.headers.get("X-Served-By")))


async def test_kill_9_one_instance_under_load(cluster: Cluster) -> None:
    victim = cluster.instances[2]
    async with client_from("127.0.0.7") as http:
        user = await logged_in(http, cluster.front.url, "kill-user")
        gone = await logged_out(http, cluster, "kill-gone")
        # A login the victim itself answered, just before it dies.
        last = await logged_in(http, victim.url, "kill-last-login")
        answers: list[Answer] = []
        stop = asyncio.Event()
        loops = [
            asyncio.create_task(load(http, cluster.front.url, user["token"], answers, stop))
            for _ in range(4)
        ]
        try:
            await until(lambda: served_each(answers, 10), "load reaching every instance")
            killed_at = time.monotonic()
            victim.service.kill9()
            await asyncio.to_thread(cluster.front.wait_status, {victim.name: "DOWN"})
            down_at = time.monotonic()
            await until(
                lambda: served_each(answers, 20, after=down_at, names=("gw1", "gw2")),
                "load going on after the instance is out",
            )
        finally:
            stop.set()
            await asyncio.gather(*loops)
        report = {s: sum(a.status == s for a in answers) for s in {a.status for a in answers}}
        print(f"\n[cluster] kill -9 under load: {len(answers)} answers {report}")
        # Nothing answered by the dead instance once it was dead; the balancer
        # answers for it at most with its own documented errors, never a dropped
        # connection; once its health check has it out, everything is answered.
        assert [a for a in answers if a.sent > killed_at and a.served_by == victim.name] == []
        assert {a.status for a in answers} <= {200, 502, 503}, report
        assert [a for a in answers if a.sent > down_at and a.status != 200] == []
        # Nothing lost: the live user, the logout, the victim's last login.
        await expect_state(http, cluster.front.url, user, gone, last)
        # The victim back with an empty memory: it learns all of it from Redis.
        await asyncio.to_thread(victim.start)
        await asyncio.to_thread(cluster.front.wait_status, {victim.name: "UP"})
        await expect_state(http, victim.url, user, gone, last)


def served_each(
    answers: list[Answer],
    count: int,
    after: float = 0.0,
    names: tuple[str, ...] = ("gw1", "gw2", "gw3"),
) -> bool:
    """Whether each of ``names`` answered ``count`` requests sent after ``after``."""
    served = [a.served_by for a in answers if a.sent > after and a.status == 200]
    return all(served.count(name) >= count for name in names)


async def expect_state(
    http: aiohttp.ClientSession,
    url: str,
    user: dict[str, Any],
    gone: dict[str, Any],
    last: dict[str, Any],
) -> None:
    assert (await get(http, url + "/api/x", user["token"])).status == 200
    refused = await get(http, url + "/api/x", gone["token"])
    assert (refused.status, error_of(refused)) == (401, "token_revoked"), refused.raw
    me = await get(http, url + "/auth/me", last["token"])
    assert (me.status, me.body.get("openid")) == (200, last["openid"]), me.raw


def test_no_secret_in_any_instance_log(cluster: Cluster) -> None:
    # Last in the module: by now the logs hold logins, logouts, a Redis restart,
    # an outage (whose messages name the Redis URL) and a kill -9.
    secrets = {
        "token.secret": TOKEN_SECRET,
        "wechat.secret": WECHAT_SECRET,
        "redis password": REDIS_PASSWORD,
        **{
            f"session_key of {code}": fake.session_key_for(code, appid)
            for code in ("propagate-0", "phone-user", "kill-user")
            for appid in (None, APPID)
        },
    }
    logs = cluster.gateway_logs()
    assert "redis://:***@" in logs  # the outage was logged, with the URL masked
    assert leaking_lines(logs, secrets) == []
