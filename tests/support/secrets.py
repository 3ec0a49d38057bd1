"""Finding a secret in text however it was written into it."""

from __future__ import annotations

import json
import urllib.parse


def variants(secret: str) -> set[str]:
    """A secret as a response, a request or a log line could carry it: raw,
    URL-encoded, JSON-escaped."""
    return {
        secret,
        urllib.parse.quote(secret, safe=""),
        urllib.parse.quote_plus(secret),
        json.dumps(secret)[1:-1],
    }


def leaks(text: str, secrets: dict[str, str]) -> list[str]:
    """The names of the ``secrets`` (name -> value) found in ``text``."""
    return sorted(
        name for name, value in secrets.items() if any(v in text for v in variants(value))
    )


def leaking_lines(text: str, secrets: dict[str, str]) -> list[str]:
    """The first lines that carry a secret, for a failure message."""
    found = [line for line in text.splitlines() if leaks(line, secrets)]
    return [line[:300] for line in found[:20]]
