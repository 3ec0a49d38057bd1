"""One worker: its gateway and HTTP server, reloads on SIGHUP, drain on SIGTERM.

Several workers are run by :mod:`gateway.runtime.supervisor`, each binding the
port with SO_REUSEPORT so the kernel spreads connections across them.

SIGHUP's default action ends a process, and a gateway is ready to reload only
after a second or so of start-up: so it stays blocked (pending, not lost) from
the first line of ``gateway run`` until a handler is in place, in the
supervisor, in each worker, and in a worker spawned to replace one.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import os
import signal
from collections.abc import Awaitable, Callable

from gateway._compiled import compiled
from gateway.app import Gateway
from gateway.config import Config, ConfigError, load_config
from gateway.observability import logs
from gateway.server.protocol import HttpServer
from gateway.server.request import Request

log = logging.getLogger("gateway")


class Listener:
    """One worker's gateway and HTTP server; tests start exactly what ``run`` starts."""

    def __init__(
        self, config: Config, *, reuse_port: bool = False, config_path: str | None = None
    ) -> None:
        self.config = config
        self.gateway = Gateway(config)
        self._reuse_port = reuse_port
        self._config_path = config_path
        self._server: asyncio.Server | None = None
        self._http: HttpServer | None = None
        self._reloading = asyncio.Lock()
        self._retiring: set[asyncio.Task[None]] = set()
        self.port: int = config.server.port

    async def start(self) -> None:
        await self.gateway.start()
        try:
            self._http = HttpServer(self._handle)
            self._apply_server_limits()
            self._server = await asyncio.get_running_loop().create_server(
                self._http,
                self.config.server.host,
                self.config.server.port,
                reuse_port=self._reuse_port or None,
                backlog=1024,
            )
        except BaseException:
            await self.stop()
            raise
        for sock in self._server.sockets:
            self.port = sock.getsockname()[1]
            break

    def _handle(self, request: Request) -> Awaitable[None] | None:
        # Looked up per request: a reload swaps the gateway under live connections.
        return self.gateway.handle(request)

    def _apply_server_limits(self) -> None:
        assert self._http is not None
        server = self.config.server
        self._http.idle_timeout = server.idle_timeout
        self._http.header_timeout = server.header_timeout
        self._http.body_timeout = server.body_timeout
        self._http.max_connections = server.max_connections

    async def reload(self) -> bool:
        """Re-read the config file and apply it without dropping a connection.

        The new configuration gets a new gateway (routes, keys, policies,
        storage, logs); requests already under way finish on the old one, which
        is closed once they have. An invalid file changes nothing: every problem
        is logged. The listening socket stays: ``server.host``, ``port`` and
        ``workers`` need a restart.
        """
        if self._config_path is None:
            log.warning("reload: no config file to re-read")
            return False
        async with self._reloading:
            try:
                new = load_config(self._config_path)
            except ConfigError as exc:
                for problem in exc.problems:
                    log.error("reload: %s", problem)
                log.error("reload refused; the running configuration is kept")
                return False
            old = self.config
            kept = [
                k
                for k in ("host", "port", "workers")
                if getattr(new.server, k) != getattr(old.server, k)
            ]
            if kept:
                log.warning(
                    "reload: server.%s cannot change without a restart; kept",
                    ", server.".join(kept),
                )
                new = dataclasses.replace(
                    new,
                    server=dataclasses.replace(
                        new.server,
                        host=old.server.host,
                        port=old.server.port,
                        workers=old.server.workers,
                    ),
                )
            gateway = Gateway(new)
            try:
                await gateway.start()
            except Exception as exc:
                log.error("reload refused (%s); the running configuration is kept", exc)
                await gateway.close()
                return False
            retired, self.gateway, self.config = self.gateway, gateway, new
            self._apply_server_limits()
            logs.set_level(new.log.level)  # libraries stay >= INFO (gateway/observability/logs.py)
            task = asyncio.create_task(self._retire(retired))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)
            log.info("configuration reloaded from %s (pid %s)", self._config_path, os.getpid())
            return True

    async def _retire(self, gateway: Gateway) -> None:
        deadline = asyncio.get_running_loop().time() + self.config.server.shutdown_grace
        # Polled: requests end in callbacks all over the fast lane, and a counter
        # read every 50 ms costs less than an event set per request.
        while gateway.inflight and asyncio.get_running_loop().time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        await gateway.close()

    async def stop(self, drain_delay: float = 0.0) -> None:
        """Answer /readyz 503; after ``drain_delay`` stop accepting; let in-flight
        requests finish (up to shutdown_grace); close."""
        self.gateway.draining = True
        if drain_delay > 0 and self._server is not None and self._http is not None:
            # Still accepting and serving, so a balancer polling /readyz sees the
            # 503 and takes this instance out before connections are refused.
            # Every answer now says Connection: close, so clients reconnect
            # (elsewhere, once the balancer knows).
            self._http.draining = True
            await asyncio.sleep(drain_delay)
        if self._server is not None:
            self._server.close()
        # Open WebSockets would hold the drain for all of shutdown_grace: they are
        # closed with 1001 (going away) now, each close bounded within the grace.
        grace = self.config.server.shutdown_grace
        sockets = asyncio.create_task(self.gateway.websockets.close_all(grace))
        if self._http is not None:
            await self._http.drain(grace)
        await sockets
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        for task in list(self._retiring):
            await task
        await self.gateway.close()


async def serve(
    config: Config,
    *,
    reuse_port: bool = False,
    parent_pid: int | None = None,
    config_path: str | None = None,
) -> None:
    """Run one worker until SIGTERM/SIGINT (or until its supervisor is gone);
    SIGHUP re-reads the configuration.

    SIGHUP is expected blocked on entry (``gateway run`` blocks it first
    thing): it is unblocked once the reload handler is in place, so a hangup
    during start-up is a reload once ready, and blocked again before the
    handler goes, so one during shutdown is dropped rather than fatal."""
    stop = asyncio.Event()
    interrupted = False  # Ctrl-C: someone at a terminal, no balancer to tell
    loop = asyncio.get_running_loop()

    def on_interrupt() -> None:
        nonlocal interrupted
        interrupted = True
        stop.set()

    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, on_interrupt)
    listener = Listener(config, reuse_port=reuse_port, config_path=config_path)
    await listener.start()
    reloads = _Reloads(listener)
    loop.add_signal_handler(signal.SIGHUP, reloads.request)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
    # Everything allocated so far lives as long as the worker: moved out of the
    # collector's sight, a full collection no longer walks it (shorter pauses,
    # which show in the p99), and young collections run less often.
    gc.collect()
    gc.freeze()
    gc.set_threshold(7000, 20, 20)
    log.info(
        "wx-gateway listening on http://%s:%s (pid %s, request path %s)",
        config.server.host,
        listener.port,
        os.getpid(),
        "compiled" if compiled() else "pure Python",
    )
    watchdog = asyncio.create_task(_watch_parent(parent_pid, stop)) if parent_pid else None
    try:
        await stop.wait()
        log.info("shutting down (pid %s)", os.getpid())
    finally:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
        loop.remove_signal_handler(signal.SIGHUP)
        if watchdog is not None:
            watchdog.cancel()
        await reloads.finish()
        await listener.stop(0.0 if interrupted else listener.config.server.drain_delay)


class _Reloads:
    """SIGHUPs, coalesced: one reload at a time and at most one more after it,
    since a reload that has not read the file yet covers every hangup before
    it (a burst of hangups is not a queue of full gateway restarts)."""

    def __init__(self, listener: Listener) -> None:
        self._listener = listener
        self._wanted = False
        self._task: asyncio.Task[None] | None = None

    def request(self) -> None:
        self._wanted = True
        if self._task is None:
            self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        try:
            while self._wanted:
                self._wanted = False
                await self._listener.reload()
        finally:
            self._task = None

    async def finish(self) -> None:
        """Let a reload under way end; one only asked for is dropped (stopping)."""
        self._wanted = False
        if self._task is not None:
            await self._task


async def _watch_parent(parent_pid: int, stop: asyncio.Event) -> None:
    # A worker whose supervisor was killed (kill -9) must not linger holding the port.
    while os.getppid() == parent_pid:  # noqa: ASYNC110 - nothing to wait on but the clock
        await asyncio.sleep(1.0)
    log.warning("supervisor %s is gone; stopping", parent_pid)
    stop.set()


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    # uvloop's event loop (libuv) roughly halves the loop's own overhead per
    # request; the standard loop is the fallback where uvloop is not installed.
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def run_worker(
    config: Config,
    *,
    reuse_port: bool = False,
    parent_pid: int | None = None,
    config_path: str | None = None,
) -> int:
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(
            serve(config, reuse_port=reuse_port, parent_pid=parent_pid, config_path=config_path)
        )
    return 0
