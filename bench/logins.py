"""Logins per second on one gateway worker against the fake WeChat run as a
separate process, with SQLite storage. Every request is a distinct user
(a fresh wx.login code), so each login is a WeChat call plus an upsert commit.

    python bench/logins.py [--seconds 10] [--connections 32]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import yaml

from bench.common import free_port, need_wrk, parse_wrk, pinned, start, stop, wait_http

LUA = """
counter = 0
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
request = function()
  counter = counter + 1
  return wrk.format(nil, "/auth/login", nil,
    '{"code": "bench-' .. tostring(counter) .. '-' .. tostring(math.random(1e9)) .. '"}')
end
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    args = parser.parse_args()
    # As in bench/proxy.py: the gateway on CPU 0, the fake WeChat and wrk on CPU 1.
    pin = not args.no_pin and (os.cpu_count() or 1) >= 2 and shutil.which("taskset") is not None
    gw_cpu, load_cpu = ("0", "1") if pin else (None, None)
    wrk = need_wrk()
    with tempfile.TemporaryDirectory() as tmp:
        wechat_port, gw_port = free_port(), free_port()
        config = {
            "server": {"host": "127.0.0.1", "port": gw_port, "workers": 1},
            "wechat": {
                "appid": "wxbench",
                "secret": "bench-secret",
                "api_base": f"http://127.0.0.1:{wechat_port}",
            },
            "token": {"secret": "bench-token-secret-0123456789abcdef0123456789"},
            "storage": {"url": f"sqlite:///{tmp}/bench.db"},
            "rate_limits": {"login_per_ip": 0},
            "routes": [],
        }
        path = Path(tmp) / "bench.yaml"
        path.write_text(yaml.safe_dump(config))
        (Path(tmp) / "login.lua").write_text(LUA)
        fake = start(["fake-wechat", "--port", str(wechat_port)], cpus=load_cpu)
        gateway = start(["run", "-c", str(path)], cpus=gw_cpu)
        try:
            wait_http(f"http://127.0.0.1:{wechat_port}/_fake/stats")
            wait_http(f"http://127.0.0.1:{gw_port}/healthz")
            cmd = [
                *pinned(load_cpu, [wrk]),
                "-t1",
                f"-c{args.connections}",
                f"-d{args.seconds}s",
                "--latency",
                "-s",
                str(Path(tmp) / "login.lua"),
                f"http://127.0.0.1:{gw_port}",
            ]
            warm = [a if not a.startswith("-d") else "-d2s" for a in cmd]
            subprocess.run(warm, capture_output=True, check=True)  # warm-up
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        finally:
            stop(gateway)
            stop(fake)
    result = parse_wrk(out)
    print(
        f"logins/s: {result.get('rps', 0):.0f}  p50 {result.get('p50', 0):.2f} ms"
        f"  p99 {result.get('p99', 0):.2f} ms  non-2xx {result['non2xx']:.0f}"
        f"  ({args.connections} connections, {args.seconds}s, 1 worker, SQLite,"
        f" {'pinned' if pin else 'not pinned'})"
    )


if __name__ == "__main__":
    main()
