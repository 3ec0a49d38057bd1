"""``gateway storage migrate``: copy one store into another (SQLite to Redis and back).

What is copied, and why:

* every user of every app, epochs and phone numbers kept (``import_user``: the
  epoch never goes down, so a copy never brings back a banned user's tokens);
* every revocation still in force: a logged-out token stays refused;
* the ``revoke`` user events still in force: a worker learns of a ban only from
  that feed (it never reads the user record per request), so without them every
  token of a banned user would work again on the new store until it expired.
  ``phone`` events are not copied: they only tell running workers to drop a
  cached number, and the new store's workers start with an empty cache.

Not copied: WeChat access tokens (refetched on first use, and ``stable_token``
does not invalidate the old one) and leases (short-lived by design).

Idempotent: users are upserted, revocations are idempotent, and a ban event the
target already holds (same app, user and epoch) is not appended again; so a
second run writes nothing new and prints the same counts.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.storage.base import Storage


@dataclass(frozen=True, slots=True)
class Copied:
    users: int
    revocations: int
    bans: int

    def __str__(self) -> str:
        return (
            f"{self.users} users, {self.revocations} live revocations, "
            f"{self.bans} live bans (revoke events)"
        )


async def copy_store(source: Storage, target: Storage, now: float) -> Copied:
    """Copy what ``source`` holds at ``now`` into ``target``; both are open."""
    users = 0
    async for user in source.all_users():
        await target.import_user(user)
        users += 1
    revocations = await source.live_revocations(now)
    for session_id, expires_at in revocations:
        await target.revoke_session(session_id, expires_at, now)
    held = {
        (event.appid, event.openid, event.epoch)
        for event, _ in await target.live_user_events(now)
        if event.kind == "revoke"
    }
    bans = [(e, until) for e, until in await source.live_user_events(now) if e.kind == "revoke"]
    for event, until in bans:
        key = (event.appid, event.openid, event.epoch)
        if key not in held:
            await target.append_user_event(event, until, now)
            held.add(key)
    return Copied(users, len(revocations), len(bans))
