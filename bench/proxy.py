"""The proxy-path benchmark (docs/performance.md): wx-gateway beside the upstream
alone, HAProxy doing the same token check, and a plain aiohttp proxy.

On loopback, interleaved rounds, medians; `wrk -t1 -c32` keep-alive GETs with a
valid token. Needs nginx, haproxy (>= 2.5 for jwt_verify) and wrk:
    apt-get install nginx-light haproxy wrk
    python -m bench.proxy [--rounds 2] [--seconds 10]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import yaml

from bench.common import (
    cpu_ticks,
    free_port,
    need_wrk,
    parse_wrk,
    pinned,
    start,
    steal_percent,
    tree_cpu_seconds,
    wait_http,
)
from gateway.auth.tokens import TokenCodec
from gateway.config import Secret, TokenConfig

SECRET = "bench-token-secret-0123456789abcdef0123456789"
# With two CPUs or more, each contender runs on CPU 0 and the load side (nginx
# and wrk) on CPU 1, the same for all: the scheduler then never moves the proxy
# onto the load generator's CPU mid-run, which made runs noisy. `workers: 2`
# needs both CPUs and is left unpinned. --no-pin turns it off.
PROXY_CPU, LOAD_CPU = "0", "1"

NGINX = """
daemon off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  client_body_temp_path {tmp}; proxy_temp_path {tmp}; fastcgi_temp_path {tmp};
  uwsgi_temp_path {tmp}; scgi_temp_path {tmp};
  server {{
    listen 127.0.0.1:{port};
    keepalive_requests 1000000;
    location / {{ return 200 "hello from upstream\\n"; }}
  }}
}}
"""

# The HS256 check a team would write in HAProxy instead of wx-gateway.
HAPROXY = """
global
  nbthread 1
  maxconn 4096
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
  option http-keep-alive
frontend fe
  bind 127.0.0.1:{port}
  http-request set-var(txn.bearer) http_auth_bearer
  http-request deny deny_status 401 unless {{ var(txn.bearer) -m found }}
  http-request set-var(txn.alg) var(txn.bearer),jwt_header_query('$.alg')
  http-request deny deny_status 401 unless {{ var(txn.alg) -m str HS256 }}
  http-request deny deny_status 401 unless {{ var(txn.bearer),jwt_verify(txn.alg,"{secret}") -m int 1 }}
  http-request set-var(txn.exp) var(txn.bearer),jwt_payload_query('$.exp','int')
  http-request set-var(txn.now) date()
  http-request deny deny_status 401 unless {{ var(txn.exp),sub(txn.now) -m int gt 0 }}
  http-request del-header X-OpenId
  http-request del-header Authorization
  http-request set-header X-OpenId %[var(txn.bearer),jwt_payload_query('$.sub')]
  default_backend be
backend be
  http-reuse always
  server s1 127.0.0.1:{upstream_port}
"""


def wrk_run(
    url: str, token: str, seconds: int, connections: int, cpus: str | None = None
) -> dict[str, float]:
    out = subprocess.run(
        pinned(
            cpus,
            [
                need_wrk(),
                "-t1",
                f"-c{connections}",
                f"-d{seconds}s",
                "--latency",
                "-H",
                f"Authorization: Bearer {token}",
                url,
            ],
        ),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return parse_wrk(out)


def _check_rejects_forgery(port: int, token: str) -> None:
    """Each contender must really check the token: a tampered one is refused."""
    head, payload, signature = token.split(".")
    forged = f"{head}.{payload}.{signature[:-4]}AAAA"
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/x", headers={"Authorization": f"Bearer {forged}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            status = resp.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    if status != 401:
        raise SystemExit(f"port {port} accepted a forged token (status {status})")


def _measure(
    port: int, pid: int, token: str, connections: int, cpus: str | None, seconds: int
) -> dict[str, float]:
    before, used = cpu_ticks(), tree_cpu_seconds(pid)
    result = wrk_run(f"http://127.0.0.1:{port}/api/x", token, seconds, connections, cpus)
    result["steal"] = steal_percent(before, cpu_ticks())
    # Requests per second of CPU the contender (all its processes) was busy: a
    # one-thread HAProxy against `workers: 2` on two CPUs compared per CPU used.
    busy = tree_cpu_seconds(pid) - used
    result["cpu"] = busy / seconds
    result["per_cpu"] = result["rps"] * seconds / busy if busy > 0 else 0.0
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--only", nargs="*", help="subset of targets to run")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument(
        "--access-log-file",
        action="store_true",
        help="the gateways' access log written to a file, as a deployment would "
        "(default: /dev/null)",
    )
    parser.add_argument(
        "--assertion",
        action="store_true",
        help="also run workers: 1 with identity.assertion on (contract section 11)",
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        metavar="DIR",
        help="also run workers: 1 from the checkout in DIR (e.g. a git worktree of main), "
        "interleaved with this tree's, for a before/after ratio from one run",
    )
    args = parser.parse_args()
    pin = not args.no_pin and (os.cpu_count() or 1) >= 2 and shutil.which("taskset") is not None
    proxy_cpu, load_cpu = (PROXY_CPU, LOAD_CPU) if pin else (None, None)
    for tool in ("nginx", "haproxy"):
        if not shutil.which(tool) and not Path(f"/usr/sbin/{tool}").exists():
            raise SystemExit(f"{tool} is needed: apt-get install nginx-light haproxy wrk")
    token = TokenCodec(TokenConfig(secret=Secret(SECRET)), ["wxbench"]).issue(
        "o-bench-user", None, time.time()
    )[0]
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as logs:
        names = ["nginx", "haproxy", "plain", "gw1", "gw2"]
        names += ["gw1a"] if args.assertion else []
        names += ["gw1b"] if args.baseline else []
        ports = {name: free_port() for name in names}
        upstream = f"http://127.0.0.1:{ports['nginx']}"
        Path(tmp, "nginx.conf").write_text(NGINX.format(tmp=tmp, port=ports["nginx"]))
        Path(tmp, "haproxy.cfg").write_text(
            HAPROXY.format(port=ports["haproxy"], upstream_port=ports["nginx"], secret=SECRET)
        )
        procs = [
            subprocess.Popen(
                pinned(load_cpu, ["nginx", "-c", f"{tmp}/nginx.conf"]), stderr=subprocess.DEVNULL
            ),
            subprocess.Popen(
                pinned(proxy_cpu, ["haproxy", "-f", f"{tmp}/haproxy.cfg"]),
                stderr=subprocess.DEVNULL,
            ),
            subprocess.Popen(
                pinned(
                    proxy_cpu,
                    [
                        sys.executable,
                        "-m",
                        "bench.plain_proxy",
                        str(ports["plain"]),
                        upstream,
                        SECRET,
                    ],
                ),
                cwd=Path(__file__).parent.parent,
            ),
        ]
        pids = {"nginx": procs[0].pid, "haproxy": procs[1].pid, "plain": procs[2].pid}
        gateways = [(1, "gw1", None), (2, "gw2", None)]
        gateways += [(1, "gw1a", None)] if args.assertion else []
        gateways += [(1, "gw1b", args.baseline)] if args.baseline else []
        for workers, name, root in gateways:
            config: dict[str, object] = {
                "server": {"host": "127.0.0.1", "port": ports[name], "workers": workers},
                "wechat": {"appid": "wxbench", "secret": "x", "fake": True},
                "token": {"secret": SECRET},
                "storage": {"url": f"sqlite:///{tmp}/{name}.db"},
                "routes": [{"prefix": "/", "upstream": upstream}],
            }
            if name == "gw1a":
                key = Path(tmp, "assertion.pem")
                start(["keys", "generate", str(key)]).wait(30)
                config["identity"] = {"assertion": {"keys": [str(key)]}}
            Path(tmp, f"{name}.yaml").write_text(yaml.safe_dump(config))
            log: Any = subprocess.DEVNULL
            if args.access_log_file:
                log = logs.enter_context(open(Path(tmp, f"{name}-access.log"), "wb"))
            procs.append(
                start(
                    ["run", "-c", f"{tmp}/{name}.yaml"],
                    cpus=proxy_cpu if workers == 1 else None,
                    root=root,
                    stdout=log,
                    env={**os.environ},
                )
            )
            pids[name] = procs[-1].pid
        try:
            for port in ports.values():
                wait_http(f"http://127.0.0.1:{port}/healthz")
            for name in ports:
                if name != "nginx":
                    _check_rejects_forgery(ports[name], token)
            names = [n for n in ports if not args.only or n in args.only]
            targets: dict[str, Callable[[int], dict[str, float]]] = {
                name: partial(_measure, ports[name], pids[name], token, args.connections, load_cpu)
                for name in names
            }
            for run in targets.values():  # warm-up: pools filled, code paths hot
                run(2)
            results: dict[str, list[dict[str, float]]] = {name: [] for name in targets}
            for _ in range(args.rounds):
                for name, run in targets.items():
                    results[name].append(run(args.seconds))
        finally:
            for proc in reversed(procs):
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
    report(results)
    print(
        f"pinned: contenders on CPU {PROXY_CPU} (workers: 2 unpinned), nginx and wrk on CPU {LOAD_CPU}"
        if pin
        else "not pinned to CPUs"
    )


LABELS = {
    "nginx": "upstream direct (nginx)",
    "haproxy": "HAProxy 2.6, jwt_verify, 1 thread",
    "plain": "plain aiohttp proxy",
    "gw1": "wx-gateway, workers: 1",
    "gw2": "wx-gateway, workers: 2",
    "gw1a": "wx-gateway, workers: 1, assertion on",
    "gw1b": "wx-gateway, workers: 1, baseline checkout",
}


def report(results: dict[str, list[dict[str, float]]]) -> None:
    med = {
        name: {
            k: statistics.median(r.get(k, 0.0) for r in runs)
            for k in ("rps", "p50", "p99", "non2xx", "steal", "cpu", "per_cpu")
        }
        for name, runs in results.items()
    }

    def rps(name: str) -> float:
        return med[name]["rps"]

    print(
        "| target | req/s | p50 ms | p99 ms | non-2xx | rounds | CPU steal % "
        "| CPUs busy | req per CPU-s |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, m in med.items():
        print(
            f"| {LABELS[name]} | {m['rps']:.0f} | {m['p50']:.2f} | {m['p99']:.2f} "
            f"| {m['non2xx']:.0f} | {len(results[name])} | {m['steal']:.1f} "
            f"| {m['cpu']:.2f} | {m['per_cpu']:.0f} |"
        )
    worst = max((r.get("steal", 0.0) for runs in results.values() for r in runs), default=0.0)
    if worst > 2.0:
        print(
            f"warning: up to {worst:.0f}% of CPU time was stolen by the hypervisor during a "
            "run; the host was busy: compare ratios only from runs without this warning"
        )
    if "haproxy" in med:
        for name in ("gw1", "gw2"):
            if name in med and med["haproxy"]["rps"]:
                per_cpu = med["haproxy"]["per_cpu"]
                ratio_cpu = med[name]["per_cpu"] / per_cpu if per_cpu else 0.0
                print(
                    f"{LABELS[name]} / HAProxy: {med[name]['rps'] / med['haproxy']['rps']:.2f}x"
                    f" (per CPU-second: {ratio_cpu:.2f}x)"
                )
    if "gw1" in med and "gw1a" in med and med["gw1"]["rps"]:
        print(f"wx-gateway (1 worker), assertion on / off: {rps('gw1a') / rps('gw1'):.3f}x")
    if "gw1" in med and "gw1b" in med and med["gw1b"]["rps"]:
        print(f"wx-gateway (1 worker), this tree / baseline: {rps('gw1') / rps('gw1b'):.3f}x")
    if "plain" in med and "gw1" in med and med["plain"]["rps"]:
        print(
            f"wx-gateway (1 worker) / plain aiohttp: {med['gw1']['rps'] / med['plain']['rps']:.2f}x"
        )


if __name__ == "__main__":
    main()
