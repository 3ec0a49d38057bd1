"""Persistent state behind one small interface (see :mod:`gateway.storage.base`)."""

from gateway.storage.base import AccessToken, Storage, StorageError, UserRecord

__all__ = ["AccessToken", "Storage", "StorageError", "UserRecord"]
