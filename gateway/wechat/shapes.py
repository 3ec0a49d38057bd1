"""What a WeChat answer may contain, checked before anything is stored or sent on.

WeChat is trusted for *who* a user is, not for the bytes that say it: an openid
becomes an ``X-OpenId`` header and a token claim, a session_key becomes an AES
key, a phone number is stored and returned. A value outside WeChat's documented
shape is refused here (502 ``wechat_error``), never cleaned up: an openid
``" admin "`` trimmed to ``admin``, or ``"victim, attacker"`` folded into a
header list, would name someone else. Shapes:

- openid, unionid: ``[A-Za-z0-9_-]``, 1 to 128 characters (real ones are 28);
- session_key: standard base64 of exactly 16 bytes (an AES-128 key), canonical;
- access_token: visible ASCII, 1 to 2048 characters (WeChat asks callers to keep
  room for 512); expires_in: a positive integer of at most 30 days;
- phone numbers: digits with an optional leading ``+``, at most 20 digits
  (``phoneNumber`` may also separate its country code with one space, as in
  ``+86 13912345678``: WeChat documents that foreign numbers carry their code
  there, not how); the country code 1 to 6 digits (a string or a number; it
  leaves as a string). Never a control character, never longer than 32.

The answer itself must be strict JSON text (RFC 8259) in UTF-8, an object,
with no lone surrogate anywhere (I-JSON, RFC 7493 section 2.1) and no
``NaN``/``Infinity``.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Any, NoReturn

from gateway.errors import WechatError

MAX_ID_LENGTH = 128
SESSION_KEY_BYTES = 16
MAX_ACCESS_TOKEN_LENGTH = 2048
MAX_EXPIRES_IN = 30 * 24 * 3600

MAX_PHONE_LENGTH = 32

_ID = re.compile(rf"[A-Za-z0-9_-]{{1,{MAX_ID_LENGTH}}}")
_ACCESS_TOKEN = re.compile(rf"[\x21-\x7e]{{1,{MAX_ACCESS_TOKEN_LENGTH}}}")
_PHONE = re.compile(r"\+?[0-9]{1,20}(?: [0-9]{1,20}){0,2}")
_PURE_PHONE = re.compile(r"[0-9]{1,20}")
_COUNTRY_CODE = re.compile(r"\+?[0-9]{1,6}")


def _refuse(what: str) -> NoReturn:
    # The message names the field, never its value: it may be a secret, or junk
    # meant for a log line.
    raise WechatError(f"WeChat answered with a malformed {what}.")


def parse_answer(raw: bytes) -> dict[str, Any]:
    """The answer as a JSON object, or WechatError."""
    try:
        value = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
        # Re-encoding finds lone surrogates ("\ud800" is valid JSON syntax but no
        # text: SQLite, headers and UTF-8 output all fail on it later).
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except (ValueError, RecursionError):
        # ValueError covers UnicodeDecodeError/UnicodeEncodeError and
        # JSONDecodeError; RecursionError, nesting deeper than the decoder's stack.
        raise WechatError("WeChat answered with something that is not JSON.") from None
    if not isinstance(value, dict):
        raise WechatError("WeChat answered with something that is not a JSON object.")
    return value


def _reject_constant(name: str) -> NoReturn:
    raise ValueError("NaN and Infinity are not JSON")


def identifier(value: object, what: str) -> str:
    """An openid or unionid."""
    if not isinstance(value, str) or not _ID.fullmatch(value):
        _refuse(what)
    return value


def optional_identifier(value: object, what: str) -> str | None:
    """A unionid: absent (missing, null or "") is None, present must be well formed."""
    if value is None or value == "":
        return None
    return identifier(value, what)


def session_key(value: object) -> str:
    if not isinstance(value, str) or len(value) > 64:
        _refuse("session_key")
    try:
        key = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        _refuse("session_key")
    # Canonical: the one base64 spelling of those 16 bytes, so the value stored
    # is exactly the key used.
    if len(key) != SESSION_KEY_BYTES or base64.b64encode(key).decode() != value:
        _refuse("session_key")
    return value


def access_token(value: object) -> str:
    if not isinstance(value, str) or not _ACCESS_TOKEN.fullmatch(value):
        _refuse("access_token")
    return value


def expires_in(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= MAX_EXPIRES_IN:
        _refuse("expires_in")
    return value


def phone_fields(data: dict[str, Any]) -> tuple[str, str, str]:
    """(phoneNumber, purePhoneNumber, countryCode as a string) of a phone_info."""
    number, pure, country = (
        data.get("phoneNumber"),
        data.get("purePhoneNumber"),
        data.get("countryCode"),
    )
    if not isinstance(number, str) or len(number) > MAX_PHONE_LENGTH:
        _refuse("phone number")
    if not _PHONE.fullmatch(number):
        _refuse("phone number")
    if not isinstance(pure, str) or not _PURE_PHONE.fullmatch(pure):
        _refuse("phone number")
    if isinstance(country, int) and not isinstance(country, bool) and 0 < country < 10**6:
        country = str(country)
    if not isinstance(country, str) or not _COUNTRY_CODE.fullmatch(country):
        _refuse("country code")
    return number, pure, country
