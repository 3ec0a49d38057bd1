"""Forwarding to upstreams: everything between a matched request and the bytes an
upstream receives, and back.

Owns: path normalisation (one path for routing, policy and forwarding), route
rules, header rules (strip, then inject), the forward paths (fast lane and
coroutine path), proxied WebSockets (handshakes and relays) and the pool of
upstream connections.

May import: :mod:`gateway.server` (the request record, the WebSocket
hand-over, write batching), :mod:`gateway.config`, :mod:`gateway.errors`,
:mod:`gateway.ratelimit`, and from authentication the
:class:`~gateway.auth.identity.Identity` a route's policy resolved and the
:class:`~gateway.auth.revocations.Revocations` a WebSocket's lifetime watches.
Never :mod:`gateway.app` or :mod:`gateway.runtime`, which wire it.

aiohttp's internal modules only in ``gateway.proxy.pool``, which offers the
rest of the package what it needs.
"""
