"""Which store a ``storage.url`` names: the one place that maps a URL to a backend.

The Redis client is imported only for a Redis URL, so the embedded default
(SQLite) starts without paying for it.
"""

from __future__ import annotations

from gateway.storage.base import Storage


def store_for(
    url: str,
    *,
    default_appid: str | None,
    prefix: str = "wxgw:",  # config.model.DEFAULT_STORAGE_PREFIX (no config import here)
    timeout: float | None = None,
) -> Storage:
    """An unopened store for ``url`` (``sqlite:///...``, ``redis://``, ``rediss://``,
    ``redis+sentinel://``). ``default_appid`` owns data a single-app release wrote;
    ``prefix`` namespaces a shared store's keys; ``timeout`` bounds each Redis call
    (None: the backend's default). Raises ValueError for a URL of no known form."""
    scheme = url.partition("://")[0]
    if scheme == "sqlite":
        from gateway.storage.sqlite import SQLiteStorage, sqlite_path_from_url

        return SQLiteStorage(sqlite_path_from_url(url), default_appid=default_appid)
    if scheme in ("redis", "rediss", "redis+sentinel"):
        from gateway.storage.redis import DEFAULT_TIMEOUT, RedisStorage

        return RedisStorage(
            url,
            prefix=prefix,
            default_appid=default_appid,
            timeout=DEFAULT_TIMEOUT if timeout is None else timeout,
        )
    raise ValueError(
        f"storage URL must start with sqlite://, redis://, rediss:// or redis+sentinel:// "
        f"(got {scheme + '://' if scheme != url else 'no scheme'})"
    )
