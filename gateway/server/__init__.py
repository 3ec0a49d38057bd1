"""Our HTTP/1.1 server: what happens on a client connection.

Owns: the connection protocol (aiohttp's llhttp parser fed directly, keep-alive,
pipelining, timers, lingering close), the request record a handler sees
(:class:`gateway.server.request.Request`), writes batched per loop pass, and
what a parser may still hold at a message boundary.

May import: the standard library, aiohttp (its internal modules included: this
package and :mod:`gateway.proxy.pool` are the only places that may), and
:mod:`gateway.errors`. Never the request path above it (app, proxy, auth),
which it reaches only through the :class:`~gateway.server.request.Owner`
protocol a request carries.
"""
