"""A demo upstream for the quickstart: answers every request with JSON describing
what it received, so ``curl`` shows the ``X-OpenId`` the gateway injected."""

from __future__ import annotations

import json
from functools import partial

from aiohttp import web


async def _echo(request: web.BaseRequest) -> web.StreamResponse:
    body = await request.read()
    return web.json_response(
        {
            "upstream": "demo",
            "method": request.method,
            "path": request.raw_path,
            "headers": dict(request.headers),
            "body_bytes": len(body),
        },
        dumps=partial(json.dumps, indent=2),
    )


def run(host: str = "127.0.0.1", port: int = 9000) -> None:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", _echo)
    print(f"demo-upstream: echoing requests on http://{host}:{port}", flush=True)
    # No access log: ./scripts/demo shares one terminal with the gateway, whose
    # JSON access log already records each request; aiohttp's plain lines in
    # between made that log unreadable. The answer itself shows what arrived.
    web.run_app(app, host=host, port=port, print=None, access_log=None)
