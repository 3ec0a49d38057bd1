"""The parsed heads the gateway reads, as the attributes it reads.

aiohttp's stubs declare ``RawRequestMessage`` and ``RawResponseMessage`` as
NamedTuples, but its C parser hands out objects of its own class. Interpreted
Python never notices; code compiled with mypyc checks a value against its
declared type where it crosses into compiled code, and a NamedTuple
declaration means "a tuple". So the request path declares these protocols
instead: what it reads, checked by mypy, and no runtime check to fail.
"""

from __future__ import annotations

from typing import Protocol

from aiohttp.http_writer import HttpVersion
from multidict import CIMultiDictProxy

RawHeaders = tuple[tuple[bytes, bytes], ...]


class _Head(Protocol):
    """What both heads have."""

    @property
    def version(self) -> HttpVersion: ...
    @property
    def headers(self) -> CIMultiDictProxy[str]: ...
    @property
    def raw_headers(self) -> RawHeaders: ...
    @property
    def should_close(self) -> bool: ...
    @property
    def chunked(self) -> bool: ...


class RequestHead(_Head, Protocol):
    @property
    def method(self) -> str: ...
    @property
    def path(self) -> str: ...
    @property
    def upgrade(self) -> bool: ...


class ResponseHead(_Head, Protocol):
    @property
    def code(self) -> int: ...
    @property
    def reason(self) -> str: ...
