"""Logging for every gateway process (supervisor and workers): stderr, one
format, and ``log.level`` applied to the gateway's own loggers only.

SECURITY: libraries log what they handle. aiosqlite's DEBUG records print every
bound parameter (session keys, access tokens, phone numbers, openids, revoked
session ids); aiohttp's and asyncio's DEBUG records can carry URLs, whose
queries hold the WeChat secret or an access token. So ``log.level: debug``
lowers the ``gateway`` loggers only: everything else stays at INFO or above,
held twice, by the root logger's level and by a filter on the handler (which
also catches a library that sets its own logger to DEBUG). The gateway's own
records never carry a secret at any level (docs/security.md, "Logging").
"""

from __future__ import annotations

import logging
import sys

OWN = "gateway"
# The lowest level a record from outside the gateway's own loggers is written at.
THIRD_PARTY_FLOOR = logging.INFO
FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d] %(message)s"


class ThirdPartyFloor(logging.Filter):
    """Drops records below INFO unless they come from a ``gateway`` logger."""

    def filter(self, record: logging.LogRecord) -> bool:
        return (
            record.levelno >= THIRD_PARTY_FLOOR
            or record.name == OWN
            or record.name.startswith(OWN + ".")
        )


def setup() -> None:
    """stderr at INFO until the config says otherwise (:func:`set_level`)."""
    logging.basicConfig(level=logging.INFO, format=FORMAT, stream=sys.stderr)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, ThirdPartyFloor) for f in handler.filters):
            handler.addFilter(ThirdPartyFloor())
    set_level("info")


def set_level(level: str) -> None:
    """Apply ``log.level``: the gateway's loggers at ``level``, the rest never below INFO."""
    value = logging.getLevelName(level.upper())
    if not isinstance(value, int):
        raise ValueError(f"unknown log level {level!r}")
    logging.getLogger(OWN).setLevel(value)
    logging.getLogger().setLevel(max(value, THIRD_PARTY_FLOOR))
