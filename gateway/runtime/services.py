"""The long-lived parts behind the request path, opened once per worker:
storage, the revocation set, the WeChat client (or the in-process fake) and
the shared access token."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable

from aiohttp import web

from gateway.auth.phones import Phones
from gateway.auth.revocations import Revocations
from gateway.auth.tokens import TokenCodec
from gateway.config import Config, StorageConfig
from gateway.errors import NotReady
from gateway.observability.metrics import Metrics
from gateway.storage import Storage, StorageError
from gateway.storage.urls import store_for
from gateway.wechat.access_token import AccessTokens
from gateway.wechat.client import WechatClient

log = logging.getLogger("gateway")

FAKE_WARNING = (
    "wechat.fake is true: WeChat calls are answered by the built-in FAKE WeChat. "
    "Any code logs in. This is a development aid; never run it in production."
)


# While a shared store could not be opened at start: how often to try again.
REOPEN_EVERY = 1.0


def open_storage(config: StorageConfig, default_appid: str) -> Storage:
    """The store ``storage.url`` names, its keys under ``storage.prefix`` when it is
    shared. ``default_appid`` owns what a single-app release wrote (users, access
    token), which the store cannot know by itself."""
    store = store_for(config.url, default_appid=default_appid, prefix=config.prefix)
    if config.wait_replicas:
        # Imported here: the Redis client is loaded only for a Redis store (the
        # loader allows wait_replicas with nothing else).
        from gateway.storage.redis import RedisStorage

        if isinstance(store, RedisStorage):
            store.wait_for_replicas(config.wait_replicas, config.wait_timeout)
    return store


class Services:
    def __init__(
        self, config: Config, *, clock: Callable[[], float], metrics: Metrics | None = None
    ) -> None:
        self.config = config
        self.clock = clock
        self.metrics = metrics or Metrics()
        self.tokens = TokenCodec.for_config(config)
        # The default app: data and tokens from before apps existed belong to it.
        self.appid = config.wechat.default_app.appid
        self.storage = open_storage(config.storage, self.appid)
        self.phones = Phones(self.storage)
        # Revoked ids are kept locally a bit longer than any token can live.
        retain = 2 * (config.token.ttl + config.token.leeway) + 60
        # A shared store may be down while this instance serves: tokens are then
        # accepted for at most max_staleness on the revocations known. A local
        # file that fails is a fault of this instance alone (readiness reports it).
        self.shared = config.storage.shared
        self.sessions = Revocations(
            self.storage,
            clock,
            retain=retain,
            on_phone=self.phones.forget,
            max_staleness=config.storage.max_staleness if self.shared else None,
        )
        self.metrics.storage_state = self._storage_state
        self.wechat = WechatClient(config.wechat, observe=self.metrics.wechat_call)
        # One shared access token per app: its own cache, lease and refetches.
        self.access_tokens = {
            app.appid: AccessTokens(
                self.wechat,
                self.storage,
                clock,
                app=app,
                lease_ttl=config.wechat.timeout + 1.0,
                on_fetch=self._count_fetch,
            )
            for app in config.wechat.apps
        }
        self._stack = contextlib.AsyncExitStack()

    async def start(self) -> None:
        try:
            if self.config.wechat.fake:
                await self._start_fake()
            await self._open_storage()
            await self.sessions.start()
            self._stack.push_async_callback(self.sessions.close)
            await self.wechat.start()
            self._stack.push_async_callback(self.wechat.close)
        except BaseException:
            await self._stack.aclose()
            raise

    async def _open_storage(self) -> None:
        """Open the store. A shared one that cannot be reached does not stop the
        start (every instance would stay down with it): this one serves degraded,
        tokens refused until the feeds are read, and opens the store when it can."""
        self._stack.push_async_callback(self.storage.close)
        try:
            await self.storage.open()
        except StorageError as exc:
            if not self.shared:
                raise
            log.warning(
                "%s; starting without the store, opening it again every %g s", exc, REOPEN_EVERY
            )
            retry = asyncio.create_task(self._open_later(), name="storage-open")
            self._stack.push_async_callback(_cancel, retry)  # before the close above

    async def _open_later(self) -> None:
        while True:
            await asyncio.sleep(REOPEN_EVERY)
            try:
                await self.storage.open()
            except StorageError as exc:
                log.debug("storage: still cannot open: %s", exc)
                continue
            return  # the next feed read logs the end of the outage

    def _storage_state(self) -> tuple[bool, float]:
        """For /metrics: did the last feed read succeed, and how old is the last
        successful one (seconds)."""
        freshness = self.sessions.freshness
        return bool(freshness.up), freshness.age()

    async def _start_fake(self) -> None:
        from gateway.wechat import fake

        log.warning(FAKE_WARNING)
        # Every configured app, in config order: the fake's first app keeps the
        # openids of the single-app fake, so the default app's users stay the same.
        apps = {app.appid: app.secret.reveal() for app in self.config.wechat.apps}
        runner = web.AppRunner(fake.create_app(apps=apps), access_log=None)
        await runner.setup()
        self._stack.push_async_callback(runner.cleanup)
        # Bind the socket ourselves to learn the ephemeral port the fake got.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        await web.SockSite(runner, sock).start()
        self.wechat.api_base = f"http://127.0.0.1:{sock.getsockname()[1]}"

    def _count_fetch(self, reason: str) -> None:
        self.metrics.token_fetches[reason] += 1

    async def close(self) -> None:
        await self._stack.aclose()

    async def check_ready(self) -> None:
        if self.shared:
            # Every instance shares the store: a 503 here would take the whole fleet
            # out of the load balancer at once (contract section 10). The outage
            # shows in /metrics and the log instead.
            return
        try:
            await self.storage.ping()
        except StorageError:
            raise NotReady("Storage is not usable.") from None


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
