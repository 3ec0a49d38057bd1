"""The contract's error answer (section 5): JSON with a stable snake_case `error`
and a human `message`, checked alike whichever client read it."""

from __future__ import annotations

import json
import re
from typing import Any

import aiohttp

from tests.support.client import Reply
from tests.support.rawhttp import Response

ERROR_CODE = re.compile(r"[a-z][a-z0-9_]*")


def assert_error(
    answer: Reply | Response, status: int | None, code: str | tuple[str, ...] | None = None
) -> dict[str, Any]:
    """The parsed error body, once it is the contract's shape with ``status``
    (None: any 4xx/5xx) and ``code`` (a tuple: any of them; None: any code)."""
    if isinstance(answer, Reply):
        content_type, raw = answer.headers.get("Content-Type", ""), answer.raw
    else:
        content_type, raw = answer.header("Content-Type") or "", answer.body
    return check_error(answer.status, content_type, raw, status, code)


async def error_of(resp: aiohttp.ClientResponse) -> str:
    """The `error` of an aiohttp response, once it has the contract's shape."""
    body = check_error(resp.status, resp.content_type, await resp.read(), None)
    return str(body["error"])


def check_error(
    got_status: int,
    content_type: str,
    raw: bytes,
    status: int | None,
    code: str | tuple[str, ...] | None = None,
) -> dict[str, Any]:
    where = (got_status, content_type, raw[:300])
    if status is None:
        assert 400 <= got_status < 600, where
    else:
        assert got_status == status, where
    assert content_type.startswith("application/json"), where
    body = json.loads(raw)
    assert isinstance(body, dict), where
    assert isinstance(body.get("error"), str) and ERROR_CODE.fullmatch(body["error"]), body
    assert isinstance(body.get("message"), str) and body["message"].strip(), body
    if isinstance(code, tuple):
        assert body["error"] in code, (body, code)
    elif code is not None:
        assert body["error"] == code, body
    return body
