"""`gateway run` as a real subprocess, and looking at it from outside (/proc)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import IO, Any

import yaml

from tests.support import ROOT
from tests.support.gateway import free_port
from tests.support.waiting import PROMPT, until

__all__ = [
    "ROOT",
    "GatewayProcess",
    "RunGateway",
    "children",
    "peak_rss_kib",
    "poll_healthy",
    "rss_kib",
    "spawn",
    "wait_healthy",
    "wait_workers",
    "write_config",
]


def children(pid: int) -> list[int]:
    """Direct child processes of ``pid`` (from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # The command name may contain spaces; the parent pid follows the closing ")".
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid:
            found.append(int(entry))
    return found


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def peak_rss_kib(pid: int) -> int:
    return _status_kib(pid, "VmHWM")


def rss_kib(pid: int) -> int:
    return _status_kib(pid, "VmRSS")


def poll_healthy(url: str, proc: subprocess.Popen[Any], timeout: float) -> bool:
    """Poll ``url``/healthz until it answers 200 (True) or ``proc`` exits (False).
    The deadline is for a machine busy with other work: it only catches a hang."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=2) as resp:
                if resp.status == 200:
                    return True
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"gateway did not become healthy within {timeout:g} s")
        time.sleep(0.1)
    return False


def wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    if not poll_healthy(url, proc, timeout):
        err = proc.communicate()[1] if proc.stderr else None
        raise AssertionError(f"gateway exited with {proc.returncode}: {(err or b'').decode()}")


class GatewayProcess:
    """`python -m gateway <args>`. Its output goes to files, not pipes: a pipe
    nobody reads until the end would stall a chatty gateway once it fills."""

    def __init__(
        self,
        args: list[str],
        env: dict[str, str] | None = None,
        cwd: Path = ROOT,
        port: int | None = None,
        drop_env: tuple[str, ...] = (),
    ) -> None:
        self.port = port
        # Closed by stop(), once the process has ended.
        self._out: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115
        self._err: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", *args],
            cwd=cwd,
            env={k: v for k, v in {**os.environ, **(env or {})}.items() if k not in drop_env},
            stdout=self._out,
            stderr=self._err,
        )
        self.stdout = ""  # what it wrote, once it has stopped
        self.stderr = ""
        self._stopped = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def url(self) -> str:
        assert self.port is not None, "started without a known port"
        return f"http://127.0.0.1:{self.port}"

    async def healthy(self) -> None:
        try:
            await asyncio.to_thread(self._wait_healthy)
        except BaseException:
            self.stop(signal.SIGKILL)
            raise

    def _wait_healthy(self) -> None:
        if not poll_healthy(self.url, self.proc, 60.0):
            raise AssertionError(f"gateway exited with {self.proc.returncode}: {self.output()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Signal the process, wait for it (killing it past ``timeout``): its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if not self._stopped:
            self._stopped = True
            self.stdout, self.stderr = self._read(self._out), self._read(self._err)
        return self.proc.returncode

    @staticmethod
    def _read(file: IO[bytes]) -> str:
        file.seek(0)
        text = file.read().decode(errors="replace")
        file.close()
        return text

    def output(self) -> str:
        """Everything it wrote (stdout, then stderr), once it has stopped."""
        self.stop()
        return self.stdout + self.stderr


async def spawn(
    tmp_path: Path, raw: dict[str, Any], *args: str, name: str = "gw"
) -> GatewayProcess:
    """`gateway run -c <raw as YAML> <args>`, on a free port unless ``raw``
    names one, once /healthz answers (killed if it never does)."""
    if not raw["server"].get("port"):
        raw["server"]["port"] = free_port()
    config = write_config(tmp_path / f"{name}.yaml", raw)
    gateway = GatewayProcess(["run", "-c", str(config), *args], port=raw["server"]["port"])
    await gateway.healthy()
    return gateway


async def wait_workers(gateway: GatewayProcess, count: int, timeout: float = PROMPT) -> list[int]:
    """The supervisor's ``count`` workers, once it has forked them all. (Forked
    is not listening yet: /healthz answers as soon as one worker does.)"""
    await until(lambda: len(children(gateway.pid)) == count, f"{count} workers", timeout)
    return sorted(children(gateway.pid))


# The `run_gateway` fixture (tests/conftest.py): `gateway run <args>`, started.
RunGateway = Callable[..., Awaitable[GatewayProcess]]


def write_config(path: Path, raw: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path
