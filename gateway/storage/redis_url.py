"""From a ``storage.url`` to a redis-py client, and the URL as it may be shown.

Forms (contract section 10): ``redis://[:password@]host:port/db``,
``rediss://`` (TLS; redis-py reads ``?ssl_ca_certs=``, ``?ssl_cert_reqs=`` and
the like from the query) and ``redis+sentinel://[:password@]h:p[,h:p...]/service/db``
(the password is the master's; Sentinels are asked without one).

Every connection is bounded: ``timeout`` applies to connecting and to each
reply, and one retry only (a pooled connection that died with a Redis restart
is replaced once, then the call fails), so a Redis that is down or stalled
turns into an error within a few seconds instead of a hang. redis-py's own
default (ten retries with backoff) would stretch that to tens of seconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, unquote

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError, TimeoutError

SENTINEL_SCHEME = "redis+sentinel"
SCHEMES = ("redis", "rediss", SENTINEL_SCHEME)
DEFAULT_SENTINEL_PORT = 26379
_SECRET_PARAMS = ("password", "sentinel_password")


@dataclass(frozen=True, slots=True)
class Connected:
    """A client, what else must be closed with it, and the password to scrub."""

    client: Redis
    extra: tuple[Redis, ...]
    password: str | None


def masked(url: str) -> str:
    """``url`` with its password (in the userinfo or the query) replaced by ``***``."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    netloc, slash, tail = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    if at and userinfo:
        user, colon, _ = userinfo.partition(":")
        netloc = f"{user}:***@{hosts}" if colon else f"***@{hosts}"
    path, question, query = tail.partition("?")
    if question:
        pairs = [
            f"{k}=***" if k in _SECRET_PARAMS else f"{k}={v}"
            for k, v in parse_qsl(query, keep_blank_values=True)
        ]
        path = f"{path}?{'&'.join(pairs)}"
    return f"{scheme}://{netloc}{slash}{path}"


def password_of(url: str) -> str | None:
    """The password the URL carries (userinfo or ``?password=``), to scrub from errors."""
    rest = url.partition("://")[2]
    netloc = rest.partition("/")[0].partition("?")[0]
    userinfo, at, _ = netloc.rpartition("@")
    if at and ":" in userinfo:
        return unquote(userinfo.partition(":")[2]) or None
    query = dict(parse_qsl(rest.partition("?")[2]))
    return query.get("password") or None


def connect(url: str, timeout: float) -> Connected:
    """A client for ``url`` (no I/O yet: redis-py connects on the first command)."""
    bounded: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": Retry(NoBackoff(), 1),
        # Named, not left to the version's default: redis-py 5 retries only the
        # errors listed here, and a restarted Redis first shows as a closed connection.
        "retry_on_error": [ConnectionError, TimeoutError],
        "decode_responses": True,
    }
    password = password_of(url)
    if url.startswith(f"{SENTINEL_SCHEME}://"):
        sentinels, service, db = _sentinel_parts(url)
        sentinel = Sentinel(
            sentinels,
            sentinel_kwargs={"socket_timeout": timeout, "socket_connect_timeout": timeout},
        )
        client = sentinel.master_for(service, db=db, password=password, **bounded)
        return Connected(client, tuple(sentinel.sentinels), password)
    return Connected(Redis.from_url(url, **bounded), (), password)


def _sentinel_parts(url: str) -> tuple[list[tuple[str, int]], str, int]:
    rest = url.split("://", 1)[1].split("?", 1)[0]
    netloc, _, path = rest.partition("/")
    hosts = netloc.rpartition("@")[2]
    sentinels = []
    for item in hosts.split(","):
        host, colon, port = item.strip().rpartition(":")
        if not colon:
            host, port = item.strip(), str(DEFAULT_SENTINEL_PORT)
        if not host or not port.isdigit():
            raise ValueError(f"{masked(url)!r}: {item!r} is not host:port")
        sentinels.append((host.strip("[]"), int(port)))
    service, _, db = path.strip("/").partition("/")
    if not service:
        raise ValueError(f"{masked(url)!r}: name the Sentinel service (…/service/db)")
    if db and not db.isdigit():
        raise ValueError(f"{masked(url)!r}: the database must be a number")
    return sentinels, service, int(db or 0)
