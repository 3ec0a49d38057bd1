"""Shared helpers for the benchmarks: free ports, subprocesses, wrk output."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pinned(cpus: str | None, argv: list[str]) -> list[str]:
    """``argv`` run on the given CPUs (taskset), or as is when ``cpus`` is None."""
    return ["taskset", "-c", cpus, *argv] if cpus else argv


def start(
    args: list[str],
    cpus: str | None = None,
    root: Path | None = None,
    stdout: Any = subprocess.DEVNULL,
    **kwargs: object,
) -> subprocess.Popen[bytes]:
    """``gateway ARGS`` from this tree, or from the checkout at ``root`` (a baseline);
    its standard output (the access log) to ``stdout``."""
    proc: subprocess.Popen[bytes] = subprocess.Popen(
        pinned(cpus, [sys.executable, "-m", "gateway", *args]),
        cwd=root or ROOT,
        stdout=stdout,
        stderr=subprocess.DEVNULL,
        **kwargs,  # type: ignore[call-overload]
    )
    return proc


def wait_http(url: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError as exc:
            if getattr(exc, "code", None):  # any HTTP answer means it is up
                return
            time.sleep(0.1)
    raise SystemExit(f"{url} did not come up")


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def cpu_ticks() -> tuple[int, int]:
    """(stolen, total) CPU ticks since boot, all CPUs (/proc/stat; zeros elsewhere).

    Steal is time a CPU of this VM was ready to run and the busy host ran
    something else (a woken CPU waiting to be scheduled counts too): a run with
    more than a few percent of it measured the host as much as the code.
    """
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return 0, 0
    ticks = [int(f) for f in fields]
    return (ticks[7] if len(ticks) > 7 else 0), sum(ticks[:8])


def tree_cpu_seconds(pid: int) -> float:
    """CPU time (user + system) used so far by ``pid`` and every process below
    it (a gateway's supervisor and its workers), from /proc; 0.0 elsewhere."""
    tick = os.sysconf("SC_CLK_TCK")
    children: dict[int, list[int]] = {}
    used: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        # The command name may hold spaces: fields start after its ")".
        fields = stat.rsplit(")", 1)[1].split()
        child = int(entry.name)
        children.setdefault(int(fields[1]), []).append(child)
        used[child] = int(fields[11]) + int(fields[12])
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        total += used.get(current, 0)
        todo += children.get(current, [])
    return total / tick


def steal_percent(before: tuple[int, int], after: tuple[int, int]) -> float:
    total = after[1] - before[1]
    return 100.0 * (after[0] - before[0]) / total if total > 0 else 0.0


def need_wrk() -> str:
    wrk = shutil.which("wrk")
    if not wrk:
        raise SystemExit("wrk is needed: apt-get install wrk")
    return wrk


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def parse_wrk(output: str) -> dict[str, float]:
    """req/s, p50/p99 latency (ms) and non-2xx count from `wrk --latency` output."""
    result: dict[str, float] = {"non2xx": 0.0}
    if m := re.search(r"Requests/sec:\s+([\d.]+)", output):
        result["rps"] = float(m.group(1))
    for pct in ("50", "99"):
        if m := re.search(rf"^\s+{pct}(?:\.0+)?%\s+([\d.]+)(us|ms|s)", output, re.M):
            result[f"p{pct}"] = float(m.group(1)) * _UNITS[m.group(2)]
    if m := re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output):
        result["non2xx"] = float(m.group(1))
    if m := re.search(r"Socket errors:.*", output):
        result["socket_errors"] = float(sum(int(n) for n in re.findall(r"\d+", m.group(0))))
    return result


def env_without(*names: str) -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in names}
