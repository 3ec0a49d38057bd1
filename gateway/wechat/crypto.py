"""WeChat's legacy "open data" encryption (``encryptedData`` + ``iv``).

getUserInfo, the old getPhoneNumber, share info and WeRun data arrive as
AES-128-CBC ciphertext under the user's ``session_key`` with PKCS#7 padding; the
plaintext is a JSON object whose ``watermark.appid`` names the mini program it
was made for. Errors::

    ValueError
    ├── MalformedInput   the inputs are not what WeChat sends (400 bad_request)
    └── DecryptFailed    well-formed, but not ours to read (400 decrypt_failed)

SECURITY: CBC without a MAC is WeChat's design, so a caller who can tell a
padding failure from any other failure has a padding oracle. Every failure after
base64 decoding (padding, JSON, watermark) is therefore one ``DecryptFailed``
with one fixed message, and the
original exception is dropped (``from None``): a UnicodeDecodeError, for
instance, would quote a plaintext byte. Messages never carry the key or the
plaintext.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
from typing import Any, NoReturn

from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

__all__ = ["DecryptFailed", "MalformedInput", "decrypt_payload", "encrypt_payload"]

# WeChat session keys are AES-128 keys, and CBC's IV is one block.
KEY_BYTES = 16
BLOCK_BYTES = 16

_FAILED = "The data could not be decrypted with this session key."


class MalformedInput(ValueError):
    """Bad base64, or a key or iv of the wrong length."""


class DecryptFailed(ValueError):
    """Wrong key, bad padding, not a JSON object, or a watermark for another appid."""


def decrypt_payload(session_key: str, encrypted_data: str, iv: str, appid: str) -> dict[str, Any]:
    """Decrypt ``encrypted_data`` and return its JSON object once its watermark names ``appid``.

    A ciphertext that is valid base64 but not a whole number of blocks (truncated)
    raises DecryptFailed, like any other ciphertext that does not decrypt: only
    the encoding and the key/iv sizes are MalformedInput.
    """
    key = _key(session_key)
    block_iv = _iv(iv)
    ciphertext = _b64("encrypted_data", encrypted_data)
    if not ciphertext or len(ciphertext) % BLOCK_BYTES:
        raise DecryptFailed(_FAILED)
    decryptor = Cipher(algorithms.AES(key), modes.CBC(block_iv)).decryptor()
    padded = decryptor.update(ciphertext) + decryptor.finalize()
    unpadder = padding.PKCS7(BLOCK_BYTES * 8).unpadder()
    try:
        plaintext = unpadder.update(padded) + unpadder.finalize()
        data = json.loads(plaintext.decode("utf-8"), parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        # ValueError covers bad padding, UnicodeDecodeError and JSONDecodeError alike.
        raise DecryptFailed(_FAILED) from None
    if not isinstance(data, dict):
        raise DecryptFailed(_FAILED)
    _check_watermark(data, appid)
    return data


def encrypt_payload(session_key: str, payload: dict[str, Any], iv: str) -> str:
    """The inverse of :func:`decrypt_payload`, as WeChat does it (tests and the fake WeChat)."""
    key = _key(session_key)
    block_iv = _iv(iv)
    plaintext = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    padder = padding.PKCS7(BLOCK_BYTES * 8).padder()
    padded = padder.update(plaintext) + padder.finalize()
    encryptor = Cipher(algorithms.AES(key), modes.CBC(block_iv)).encryptor()
    return base64.b64encode(encryptor.update(padded) + encryptor.finalize()).decode("ascii")


def _key(session_key: str) -> bytes:
    key = _b64("session_key", session_key)
    if len(key) != KEY_BYTES:
        raise MalformedInput(f"session_key must decode to {KEY_BYTES} bytes")
    return key


def _iv(iv: str) -> bytes:
    raw = _b64("iv", iv)
    if len(raw) != BLOCK_BYTES:
        raise MalformedInput(f"iv must decode to {BLOCK_BYTES} bytes")
    return raw


def _b64(name: str, value: str) -> bytes:
    # validate=True: characters outside the standard alphabet ("+" and "/" are in
    # it) are errors instead of being skipped, so a mangled value (a "+" turned
    # into a space by form decoding, say) fails loudly rather than decrypting junk.
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError, TypeError):
        # The message names the field only: the value may be a session key.
        raise MalformedInput(f"{name} is not valid base64") from None


def _reject_constant(name: str) -> NoReturn:
    # NaN/Infinity are not JSON; accepting them would hand invalid JSON back to clients.
    raise ValueError("non-standard JSON constant")


def _check_watermark(data: dict[str, Any], appid: str) -> None:
    watermark = data.get("watermark")
    stamped = watermark.get("appid") if isinstance(watermark, dict) else None
    if not isinstance(stamped, str) or not hmac.compare_digest(
        stamped.encode("utf-8"), appid.encode("utf-8")
    ):
        # Data made for another mini program (or none) must not be accepted as
        # this user's: that is the watermark's whole purpose.
        raise DecryptFailed(_FAILED)
