"""Request-path normalisation: one path for routing, policy and forwarding.

Split views between a proxy and its upstream are a classic auth bypass
(``/public/../private`` matched as public by one and served as private by the
other). So the path is normalised *once* here, the route is chosen on that
result, and the upstream receives exactly that result, already resolved, with
no URL library re-resolving it later (contract section 5).

Order (contract section 8): percent-decode once (for comparison only), fold
repeated slashes, resolve dot segments. The forwarded path keeps each surviving
segment exactly as the client encoded it.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

# Encoded '/', '\' and NUL change where segments split depending on who decodes;
# nothing legitimate needs them, so they are refused rather than guessed at.
_FORBIDDEN_ENCODED = re.compile(r"%(?:2[fF]|5[cC]|00)")
_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
# What can make a path differ from its normal form: percent-escapes, `;params`,
# empty or dot segments, and the refused characters. Most paths have none of
# them and are their own normal form (the proxy path's common case).
_NOT_PLAIN = re.compile(r"[%;\\\x00]|//|/\.")


class BadPath(ValueError):
    """The path cannot be routed safely; the gateway answers 400 bad_request."""


class NormalisedPath:
    """One of these is made per proxied request: a plain class with slots, not
    a dataclass, whose generated ``__init__`` would stay interpreted where this
    module is compiled (setup.py). Never mutated."""

    __slots__ = ("forward", "match")

    def __init__(self, match: str, forward: str) -> None:
        self.match = match  # decoded, for comparing with route prefixes
        self.forward = forward  # same segments, as the client encoded them, for the upstream

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, NormalisedPath):
            return NotImplemented
        return self.match == other.match and self.forward == other.forward

    __hash__ = None  # type: ignore[assignment]  # equal by value, and not frozen

    def __repr__(self) -> str:
        return f"NormalisedPath(match={self.match!r}, forward={self.forward!r})"

    def strip_segments(self, count: int) -> str:
        """``forward`` without its first ``count`` segments (for ``strip_prefix``)."""
        if count == 0:
            return self.forward
        rest = self.forward.split("/", count + 1)
        return "/" + (rest[count + 1] if len(rest) > count + 1 else "")


def _without_params(decoded: str) -> str:
    # Servlet containers (Tomcat, Jetty) drop `;params` from a segment before
    # routing: `/private;x/a` is `/private/a` and `/..;/` is `/../` to them, a
    # well-known bypass of proxies in front of Java backends. Matching on the
    # segment without its parameters gives the route those backends will serve.
    return decoded.split(";", 1)[0] if ";" in decoded else decoded


def normalise(raw_path: str) -> NormalisedPath:
    """Normalise the path part of a request target (no query string)."""
    if raw_path.startswith("/") and not _NOT_PLAIN.search(raw_path):
        return NormalisedPath(raw_path, raw_path)
    return normalise_segments(raw_path)


def normalise_segments(raw_path: str) -> NormalisedPath:
    """The general case of :func:`normalise`, segment by segment."""
    if not raw_path.startswith("/"):
        raise BadPath("the path must start with /")
    if "\\" in raw_path or "\x00" in raw_path:
        raise BadPath("backslash or NUL in the path")
    if "%" in raw_path:
        if _FORBIDDEN_ENCODED.search(raw_path):
            raise BadPath("encoded /, \\ or NUL in the path")
        if _BAD_PERCENT.search(raw_path):
            raise BadPath("malformed percent-encoding in the path")
    raw_segments = raw_path.split("/")[1:]
    last = len(raw_segments) - 1
    kept: list[tuple[str, str]] = []
    for i, raw in enumerate(raw_segments):
        decoded = _without_params(unquote(raw, errors="surrogateescape") if "%" in raw else raw)
        if decoded == "..":
            if not kept:
                raise BadPath("the path climbs above /")
            kept.pop()
        elif decoded not in ("", "."):
            kept.append((raw, decoded))
            continue
        # A trailing slash, `.` or `..` leaves the path ending in "/" (RFC 3986 5.2.4).
        if i == last:
            kept.append(("", ""))
    return NormalisedPath(
        match="/" + "/".join(d for _, d in kept),
        forward="/" + "/".join(r for r, _ in kept),
    )


# RFC 3986 3.2: the authority ends at the first "/", "?" or "#" (or the end).
_AUTHORITY_END = re.compile(r"[/?#]")


def split_target(target: str) -> tuple[str, str]:
    """(path, query) of a request target, accepting the absolute form too."""
    if not target.startswith("/"):
        scheme, sep, rest = target.partition("://")
        if not sep or scheme.lower() not in ("http", "https"):
            raise BadPath("the request target must be a path")
        # Not the first "/": in `http://h?/private/x` that one is in the query,
        # and the path is empty, which is "/" (RFC 9110 4.2.3).
        end = _AUTHORITY_END.search(rest)
        after = rest[end.start() :] if end else ""
        target = after if after.startswith("/") else "/" + after
    if "#" in target:
        raise BadPath("a fragment is not allowed in a request")
    path, _, query = target.partition("?")
    return path, query
