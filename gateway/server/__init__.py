"""Our HTTP/1.1 server: what happens on a client connection.

Owns: the connection protocol (aiohttp's llhttp parser fed directly, keep-alive,
pipelining, timers, lingering close), the request record a handler sees
(:class:`gateway.server.request.Request`), writes batched per loop pass, what
a parser may still hold at a message boundary, and the hand-over of a
WebSocket upgrade to aiohttp.

May import: the standard library, aiohttp (its internal modules included) and
:mod:`gateway.errors`. Never the request path above it (app, proxy, auth,
runtime, observability): a request reaches the gateway that handled it only
through the ``Owner`` protocol it carries.

aiohttp's internal modules are imported here and in the upstream pool
(``gateway.proxy.pool``) only, which offer the rest of the package what it
needs (``tests/test_layout.py`` checks it; docs/design.md lists what we rely on).
"""
