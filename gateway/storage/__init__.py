"""Persistent state behind one small interface.

Owns: the :class:`Storage` ABC and its records (``base``), the SQLite store
every worker of a host shares (``sqlite``), its schema and migrations
(``schema``), and that file's place on disk, private from its first byte
(``files``); the Redis store several instances share (``redis``, its Lua
scripts in ``redis_lua``, its URLs and client in ``redis_url``); which store a
URL names (``urls``); and the copy from one store to another (``migrate``).

May import: the standard library, aiosqlite and redis; nothing else of the
gateway, so any side can hold a store and a further backend needs only this
package.
"""

from gateway.storage.base import (
    PHONE_EVENT_RETAIN,
    AccessToken,
    Storage,
    StorageError,
    UserEvent,
    UserRecord,
)

__all__ = [
    "PHONE_EVENT_RETAIN",
    "AccessToken",
    "Storage",
    "StorageError",
    "UserEvent",
    "UserRecord",
]
