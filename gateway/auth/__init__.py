"""Who is calling: the gateway's own ``/auth/*`` endpoints, its tokens, the
identity a route's policy resolves from a token, and revocations (logout).

May import: :mod:`gateway.config`, :mod:`gateway.errors`,
:mod:`gateway.storage`, :mod:`gateway.wechat`, :mod:`gateway.ratelimit`, the
request record of :mod:`gateway.server`, and from :mod:`gateway.proxy` the
path, route and header rules that ``/auth/verify`` applies as the proxy would.
Public aiohttp only.
"""
