"""``gateway keys generate PATH``: a new private key for ``identity.assertion``.

The file is created with mode 0600 from its first byte (``O_EXCL``: an existing
key, perhaps the one signing right now, is never overwritten) and holds an
unencrypted PKCS#8 PEM, which the gateway reads at start and on reload.
"""

from __future__ import annotations

import os

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.auth.assertion import public_jwk


class KeyFileExists(FileExistsError):
    """PATH exists already."""


def generate_key(path: str) -> str:
    """Write a new P-256 key to ``path``; returns its ``kid`` (as the JWKS shows it)."""
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise KeyFileExists(path) from None
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    return public_jwk(key)["kid"]
