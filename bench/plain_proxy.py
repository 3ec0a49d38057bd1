"""The obvious aiohttp proxy, as a baseline for bench/proxy.py: pyjwt decode and
one shared ClientSession, one process. Not part of the product.

    python bench/plain_proxy.py PORT UPSTREAM_URL TOKEN_SECRET
"""

from __future__ import annotations

import sys

import aiohttp
import jwt
from aiohttp import web

UPSTREAM = web.AppKey("upstream", str)
SECRET = web.AppKey("secret", str)
SESSION = web.AppKey("session", aiohttp.ClientSession)


async def handle(request: web.Request) -> web.Response:
    auth = request.headers.get("Authorization", "")
    try:
        claims = jwt.decode(
            auth[7:], request.app[SECRET], algorithms=["HS256"], issuer="wx-gateway"
        )
    except jwt.PyJWTError:
        return web.json_response({"error": "token_invalid"}, status=401)
    headers = {
        k: v
        for k, v in request.headers.items()
        if k.lower() not in ("host", "authorization", "x-openid")
    }
    headers["X-OpenId"] = claims["sub"]
    async with request.app[SESSION].request(
        request.method,
        request.app[UPSTREAM] + request.path_qs,
        headers=headers,
        data=await request.read(),
    ) as resp:
        body = await resp.read()
        return web.Response(
            status=resp.status, body=body, headers={"Content-Type": resp.content_type}
        )


async def session_ctx(app: web.Application):  # type: ignore[no-untyped-def]
    app[SESSION] = aiohttp.ClientSession()
    yield
    await app[SESSION].close()


def main() -> None:
    port, upstream, secret = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    app = web.Application()
    app[UPSTREAM], app[SECRET] = upstream, secret
    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{tail:.*}", handle)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


if __name__ == "__main__":
    main()
