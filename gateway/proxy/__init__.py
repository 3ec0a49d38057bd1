"""Forwarding to upstreams: everything between a matched request and the bytes an
upstream receives, and back.

Owns: path normalisation (one path for routing, policy and forwarding), route
rules, header rules (strip, then inject), the forward paths (fast lane and
coroutine path), WebSocket relays and the pool of upstream connections.

May import: :mod:`gateway.server` (the request record), :mod:`gateway.config`,
:mod:`gateway.errors`, :mod:`gateway.ratelimit`, and the :class:`Identity` type
from :mod:`gateway.auth.identity`. aiohttp's internal modules only in
:mod:`gateway.proxy.pool`, which offers the rest of the package what it needs.
"""
