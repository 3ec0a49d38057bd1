"""Logging for every gateway process (supervisor and workers): stderr, one
format (``log.format``: text, or one JSON object per line like the access
log), and ``log.level`` applied to the gateway's own loggers only.

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

import json
import logging
import sys
import time

OWN = "gateway"
# The lowest level a record from outside the gateway's own loggers is written at.
THIRD_PARTY_FLOOR = logging.INFO
FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d] %(message)s"
FORMATS = ("text", "json")


class ThirdPartyFloor(logging.Filter):
    """Drops records below INFO unless they come from a ``gateway`` logger."""

    def filter(self, record: logging.LogRecord) -> bool:
        return (
            record.levelno >= THIRD_PARTY_FLOOR
            or record.name == OWN
            or record.name.startswith(OWN + ".")
        )


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``time`` (UTC, ms, as in the access log),
    ``level``, ``logger``, ``pid`` (supervisor and workers share stderr),
    ``message``, and ``exc_info`` (the formatted traceback) when there is one.

    A log shipper then parses both logs one way, and a message holding a
    newline or a quote (a traceback, a path) stays one line.
    """

    def format(self, record: logging.LogRecord) -> str:
        seconds = int(record.created)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
        entry: dict[str, object] = {
            "time": f"{stamp}.{int((record.created - seconds) * 1000):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(entry)


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


def set_format(name: str) -> None:
    """Apply ``log.format`` (``text`` or ``json``) to the root logger's handlers,
    the ones :func:`setup` installed (and filtered).

    Lines written before the config is read (its own problems among them) are
    text: the format is not known yet.
    """
    if name not in FORMATS:
        raise ValueError(f"unknown log format {name!r}")
    for handler in logging.getLogger().handlers:
        handler.setFormatter(JsonFormatter() if name == "json" else logging.Formatter(FORMAT))
