"""The phone number of each user, for ``identity.phone_header``.

The proxy path never waits on storage for a known user: numbers (and "has no
number") are cached per worker, filled at login and from storage on a user's
first request here. A number set on another worker reaches this one through the
user-event feed (:class:`~gateway.auth.revocations.Revocations` calls
:meth:`Phones.forget`), within the same poll that carries logouts.
"""

from __future__ import annotations

from gateway.auth.tokens import make_room
from gateway.storage import Storage

# Marks "not cached" apart from "cached: no number" (None).
MISSING = object()


class Phones:
    def __init__(self, storage: Storage, max_entries: int = 50_000) -> None:
        self._storage = storage
        self._max = max_entries
        self._numbers: dict[tuple[str, str], str | None] = {}
        # Bumped by every forget: a load that raced with one does not cache what
        # it read, which may be the number from before the change.
        self._changes = 0

    def cached(self, appid: str, openid: str) -> str | object | None:
        """The cached number, None (cached: the user has none), or MISSING."""
        return self._numbers.get((appid, openid), MISSING)

    async def load(self, appid: str, openid: str) -> str | None:
        """The user's number, read from storage and cached (StorageError passes)."""
        changes = self._changes
        user = await self._storage.get_user(appid, openid)
        number = user.phone_number if user is not None else None
        if self._changes == changes:
            self.remember(appid, openid, number)
        return number

    def remember(self, appid: str, openid: str, number: str | None) -> None:
        make_room(self._numbers, self._max)
        self._numbers[(appid, openid)] = number

    def forget(self, appid: str, openid: str) -> None:
        self._changes += 1
        self._numbers.pop((appid, openid), None)
