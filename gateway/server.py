"""Serving: the HTTP server of one worker, and the supervisor of several.

``workers: N`` runs N processes, each binding the port with SO_REUSEPORT so
the kernel spreads connections across them; the supervisor replaces a worker
that dies and passes SIGTERM/SIGINT/SIGHUP on to every worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from gateway.app import Gateway
from gateway.config import Config
from gateway.http_server import HttpServer

log = logging.getLogger("gateway")


class Listener:
    """One worker's gateway and HTTP server; tests start exactly what ``run`` starts."""

    def __init__(self, config: Config, *, reuse_port: bool = False) -> None:
        self.config = config
        self.gateway = Gateway(config)
        self._reuse_port = reuse_port
        self._server: asyncio.Server | None = None
        self._http: HttpServer | None = None
        self.port: int = config.server.port

    async def start(self) -> None:
        await self.gateway.start()
        try:
            server = self.config.server
            self._http = HttpServer(
                self.gateway.handle,
                on_done=self.gateway.request_done,
                idle_timeout=server.idle_timeout,
                header_timeout=server.header_timeout,
                body_timeout=server.body_timeout,
                max_connections=server.max_connections,
            )
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

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish (up to shutdown_grace), close."""
        self.gateway.draining = True
        if self._server is not None:
            self._server.close()
        if self._http is not None:
            await self._http.drain(self.config.server.shutdown_grace)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        await self.gateway.close()


async def serve(config: Config, *, reuse_port: bool = False, parent_pid: int | None = None) -> None:
    """Run one worker until SIGTERM/SIGINT (or until its supervisor is gone)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    listener = Listener(config, reuse_port=reuse_port)
    await listener.start()
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
        if watchdog is not None:
            watchdog.cancel()
        await listener.stop()


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


def run_worker(config: Config, *, reuse_port: bool = False, parent_pid: int | None = None) -> int:
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(serve(config, reuse_port=reuse_port, parent_pid=parent_pid))
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

    def _spawn(self, slot: int) -> None:
        env = {**os.environ, "WX_GATEWAY_WORKER": str(slot)}
        argv = [*self._argv, "--worker-of", str(os.getpid())]
        self._procs[slot] = subprocess.Popen(argv, env=env)  # noqa: S603 - our own argv

    def _on_signal(self, signum: int, _frame: Any) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            self._stopping = True
        self._pending.append(signum)

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        for slot in range(self._count):
            self._spawn(slot)
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
        return self._wait_all()

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
