"""``gateway users show|revoke``: one user's records, and a ban.

Works on the store a running gateway uses (``storage.url`` of its config), not
through an HTTP endpoint: whoever can run this can already read that store, so
no new credential exists to be stolen. A revocation is a row in the store; every
worker of every gateway on that store applies it within its poll (well under
the contract's 1 s), closes the user's WebSockets, and refuses every token issued
before it. The user's next login works again (a new epoch).

Output is one JSON object per record (a tool can parse it, a human can read it);
``session_key`` is never printed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TextIO

from gateway.config import Config
from gateway.storage import Storage, UserRecord


class NoSuchUser(LookupError):
    """Nothing matched: the command fails (exit 1), nothing is written."""


def describe(user: UserRecord) -> str:
    """A record as one JSON line, without the session_key."""
    return json.dumps(
        {
            "appid": user.appid,
            "openid": user.openid,
            "unionid": user.unionid,
            "phone_number": user.phone_number,
            "created_at": user.created_at,
            "last_login_at": user.last_login_at,
            "has_session_key": bool(user.session_key),
            "epoch": user.epoch,
        },
        ensure_ascii=False,
    )


async def find(
    storage: Storage, *, appid: str | None, openid: str | None, unionid: str | None
) -> list[UserRecord]:
    """The records named by ``--appid --openid`` (one) or ``--unionid`` (every app)."""
    if unionid is not None:
        records = await storage.users_by_unionid(unionid)
        if appid is not None:
            records = [r for r in records if r.appid == appid]
    else:
        assert appid is not None and openid is not None
        record = await storage.get_user(appid, openid)
        records = [record] if record is not None else []
    if not records:
        raise NoSuchUser("no such user")
    return records


async def show(storage: Storage, out: TextIO, **who: str | None) -> None:
    for record in await find(storage, **who):
        print(describe(record), file=out)


async def revoke(
    storage: Storage,
    config: Config,
    clock: Callable[[], float],
    out: TextIO,
    **who: str | None,
) -> None:
    """Revoke every session of the matched records, one record at a time."""
    now = clock()
    # The ban is kept as long as a token issued just before it can live.
    until = now + config.token.ttl + config.token.leeway + 60
    for record in await find(storage, **who):
        updated = await storage.revoke_user(record.appid, record.openid, now, until)
        if updated is None:  # deleted in between: nothing of it can be used anyway
            continue
        print(describe(updated), file=out)
