"""The proxy path's own CPU cost per request, with no I/O.

A gateway worker's request path (client parser, routing, token, header policy,
upstream head, response parser, answer, access log) driven in-process through
fake transports: what remains is the Python (and llhttp) work per request,
free of syscall and scheduler noise.

    python -m bench.path_cost                  # microseconds per request, best of 5
    python -m bench.path_cost --no-access-log
    valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        python -m bench.path_cost --once -n 6000   # minus the same with -n 1000,
                                                   # divided by 5000: instructions/request
    python -m bench.path_cost --assertion      # with identity.assertion on (cached)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, cast

import yaml

from bench.proxy import SECRET
from gateway.auth.tokens import TokenCodec
from gateway.config import Secret, TokenConfig, load_config
from gateway.proxy.pool import UpstreamConnection
from gateway.runtime.worker import Listener
from gateway.server.protocol import HttpProtocol, HttpServer

UPSTREAM_PORT = 18080
# What nginx answers in bench/proxy.py, byte for byte.
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Mon, 23 Nov 2026 07:05:01 GMT\r\n"
    b"Content-Type: application/octet-stream\r\nContent-Length: 20\r\n"
    b"Connection: keep-alive\r\n\r\nhello from upstream\n"
)


class _Transport:
    """Takes writes and keeps the last one; never blocks, never closes by itself."""

    def __init__(self, peer: tuple[str, int]) -> None:
        self.peer = peer
        self.last = b""
        self.closing = False

    def write(self, data: bytes) -> None:
        self.last = data

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": self.peer, "sockname": ("127.0.0.1", 8080)}.get(name, default)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0


async def run(n: int, access_log: bool, once: bool, assertion: bool) -> None:
    tmp = tempfile.mkdtemp()
    config_file = Path(tmp, "gw.yaml")
    config: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": 0},
        "wechat": {"appid": "wxbench", "secret": "x", "fake": True},
        "token": {"secret": SECRET},
        "storage": {"url": f"sqlite:///{tmp}/gw.db"},
        "log": {"access": access_log},
        "routes": [{"prefix": "/", "upstream": f"http://127.0.0.1:{UPSTREAM_PORT}"}],
    }
    if assertion:
        from gateway.auth.keys import generate_key

        generate_key(f"{tmp}/assertion.pem")
        config["identity"] = {"assertion": {"keys": [f"{tmp}/assertion.pem"]}}
    config_file.write_text(yaml.safe_dump(config))
    listener = Listener(load_config(str(config_file)))
    gateway = listener.gateway
    await gateway.start()
    if gateway.access_log is not None:
        gateway.access_log._fd = os.open(os.devnull, os.O_WRONLY)
    server = HttpServer(listener._handle)
    client = cast(HttpProtocol, server())
    client_transport = _Transport(("127.0.0.1", 40000))
    client.connection_made(client_transport)  # type: ignore[arg-type]
    pool = gateway.pools.get("http", "127.0.0.1", UPSTREAM_PORT)
    upstream = UpstreamConnection(asyncio.get_running_loop(), pool)
    upstream_transport = _Transport(("127.0.0.1", UPSTREAM_PORT))
    upstream.connection_made(upstream_transport)  # type: ignore[arg-type]
    pool.release(upstream, reuse=True)
    token = TokenCodec(TokenConfig(secret=Secret(SECRET)), ["wxbench"]).issue(
        "o-bench-user", None, time.time()
    )
    request = f"GET /x HTTP/1.1\r\nHost: gw.example\r\nAuthorization: Bearer {token[0]}\r\n\r\n"
    raw = request.encode()
    end_of_pass = server.batch._flush

    def one() -> None:
        client.data_received(raw)
        upstream.data_received(RESPONSE)
        end_of_pass()

    for _ in range(1000):
        one()
    # The fast lane really ran: the upstream got the identity, the client the answer.
    assert b"X-OpenId: o-bench-user\r\n" in upstream_transport.last, upstream_transport.last
    assert client_transport.last.startswith(b"HTTP/1.1 200 OK\r\n"), client_transport.last
    assert (b"X-Gateway-Assertion: " in upstream_transport.last) == assertion
    if once:
        for _ in range(n):
            one()
        return
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(n):
            one()
        best = min(best, (time.perf_counter() - started) / n * 1e6)
        await asyncio.sleep(0.15)  # let the access log's writer catch up
    print(
        f"{best:.2f} us per request (best of 5 x {n}, access log {'on' if access_log else 'off'})"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=20_000)
    parser.add_argument("--no-access-log", action="store_true")
    parser.add_argument("--once", action="store_true", help="run n requests once, print nothing")
    parser.add_argument("--assertion", action="store_true", help="identity.assertion on")
    args = parser.parse_args()
    main_run = run(args.n, not args.no_access_log, args.once, args.assertion)
    try:
        import uvloop

        uvloop.run(main_run)
    except ImportError:
        asyncio.run(main_run)
    sys.stdout.flush()
    # The storage and access-log threads would keep the process up; nothing to clean.
    os._exit(0)


if __name__ == "__main__":
    main()
