"""Who is calling: the gateway's own ``/auth/*`` endpoints, its tokens, the
identity a route's policy resolves from a token, and revocations (logout).

May import: :mod:`gateway.config`, :mod:`gateway.errors`,
:mod:`gateway.storage`, :mod:`gateway.wechat`, :mod:`gateway.ratelimit`, the
request record (:mod:`gateway.server.request`), from the proxy the path, route
and header rules that ``/auth/verify`` applies as the proxy would
(:mod:`gateway.proxy.paths`, :mod:`gateway.proxy.routing`,
:mod:`gateway.proxy.headers`), and the type of the services its endpoints are
handed (:class:`~gateway.runtime.services.Services`). Public aiohttp only.
"""
