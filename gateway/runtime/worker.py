"""Serving: the HTTP server of one worker, and the supervisor of several.

``workers: N`` runs N processes, each binding the port with SO_REUSEPORT so
the kernel spreads connections across them; the supervisor replaces a worker
that dies and passes SIGTERM/SIGINT/SIGHUP on to every worker.

SIGHUP's default action ends a process, and a gateway is ready to reload only
after a second or so of start-up: so it stays blocked (pending, not lost) from
the first line of ``gateway run`` until a handler is in place, in the
supervisor, in each worker, and in a worker spawned to replace one.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from gateway.app import Gateway
from gateway.config import Config, ConfigError, load_config
from gateway.observability import logs
from gateway.observability.metrics import DIR_ENV as METRICS_DIR_ENV
from gateway.observability.metrics import shared_directory
from gateway.server.protocol import HttpServer, Incoming

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
            self._http = HttpServer(self._handle, on_done=_request_done)
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

    def _handle(self, request: Incoming) -> Awaitable[None] | None:
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


def _request_done(request: Incoming) -> None:
    # The gateway that handled the request, which may have been retired since.
    if request.owner is not None:
        request.owner.request_done(request)


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
        "wx-gateway listening on http://%s:%s (pid %s)",
        config.server.host,
        listener.port,
        os.getpid(),
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


class Supervisor:
    """Starts N worker processes and keeps N running until told to stop."""

    RESTART_WINDOW = 10.0
    RESTART_BURST = 5

    def __init__(self, worker_argv: list[str], workers: int, grace: float) -> None:
        self._argv = worker_argv
        self._count = workers
        self._grace = grace
        self._procs: dict[int, subprocess.Popen[bytes]] = {}
        self._restarts: list[float] = []
        self._stopping = False
        self._pending: list[int] = []
        # Each worker saves its counters here; /metrics on any worker adds them up.
        self._metrics_dir = shared_directory()

    def _spawn(self, slot: int) -> None:
        env = {**os.environ, "WX_GATEWAY_WORKER": str(slot), METRICS_DIR_ENV: self._metrics_dir}
        argv = [*self._argv, "--worker-of", str(os.getpid())]
        # The worker inherits the signal mask: with SIGHUP blocked from its first
        # instruction, a hangup passed on while it starts waits for its handler
        # (gateway.runtime.worker.serve) instead of killing it. Ours is back as it was
        # right after, so nothing sent to the supervisor meanwhile is lost.
        held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
        try:
            self._procs[slot] = subprocess.Popen(argv, env=env)  # noqa: S603 - our own argv
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            self._stopping = True
        self._pending.append(signum)

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        for slot in range(self._count):
            self._spawn(slot)
        # Held back since start-up (gateway.cli); from here a hangup is passed on.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
        log.info("supervisor %s started %d workers", os.getpid(), self._count)
        while not self._stopping:
            self._forward_signals()
            for slot, proc in list(self._procs.items()):
                if proc.poll() is not None and not self._stopping:
                    log.warning(
                        "worker %s (pid %s) exited with %s; replacing it",
                        slot,
                        proc.pid,
                        proc.returncode,
                    )
                    self._throttle()
                    self._spawn(slot)
            time.sleep(0.1)
        self._forward_signals()
        try:
            return self._wait_all()
        finally:
            shutil.rmtree(self._metrics_dir, ignore_errors=True)

    def _forward_signals(self) -> None:
        while self._pending:
            signum = self._pending.pop(0)
            for proc in self._procs.values():
                if proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        proc.send_signal(signum)

    def _throttle(self) -> None:
        # A worker that dies at once (bad disk, port taken) must not spin the CPU.
        now = time.monotonic()
        self._restarts = [t for t in self._restarts if now - t < self.RESTART_WINDOW]
        self._restarts.append(now)
        if len(self._restarts) > self.RESTART_BURST:
            time.sleep(1.0)

    def _wait_all(self) -> int:
        deadline = time.monotonic() + self._grace + 5.0
        worst = 0
        for proc in self._procs.values():
            try:
                code = proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
            worst = worst or (code if code > 0 else 0)
        return worst


def worker_argv(config_path: str) -> list[str]:
    return [sys.executable, "-m", "gateway", "run", "-c", config_path, "--workers", "1"]
