"""What both sides ask of aiohttp's llhttp parsers at a message boundary.

The client side (:mod:`gateway.server.protocol`) and the upstream side
(:mod:`gateway.proxy.pool`) drop a parser that may carry state past a
message (docs/design.md, "State that lives on a connection"); before they do,
they need to know whether it had already read bytes of a next message.
"""

from __future__ import annotations

from typing import Any

from aiohttp.http_parser import HttpParser


def holds_bytes(parser: HttpParser[Any]) -> bool:
    """Whether ``parser`` has begun a message it has not delivered (read bytes
    past its last complete one). Harmless on a parser between messages; spoils
    one that holds bytes, so only for a parser about to be dropped or distrusted."""
    try:
        return parser.feed_eof() is not None
    except Exception:
        return True
