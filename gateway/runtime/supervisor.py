"""The supervisor of several workers (``server.workers`` > 1).

It starts N worker processes (``gateway run --worker-of``), each binding the
port with SO_REUSEPORT, replaces one that dies (throttled), and passes
SIGTERM/SIGINT/SIGHUP on to every worker. It imports none of the request
path: a worker is a process of its own (:mod:`gateway.runtime.worker`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from typing import Any

from gateway.observability.metrics import DIR_ENV as METRICS_DIR_ENV
from gateway.observability.metrics import shared_directory

log = logging.getLogger("gateway")


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
