"""A tiny HTTP/1.1 client over a raw socket, for tests that must send bytes
exactly as written (pipelines, malformed input) and see every answer in order."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from tests.support.headers import HeaderLines

# Long enough for any answer on a busy machine: it only catches a hang.
READ_WAIT = 20.0


@dataclass
class Response(HeaderLines):
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    reason: str = ""

    @property
    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Exchange:
    responses: list[Response]
    closed: bool  # the gateway closed (or reset) the connection
    rest: bytes  # bytes that did not parse as a complete response

    def statuses(self) -> list[int]:
        return [r.status for r in self.responses]


class _Incomplete(Exception):
    pass


def _dechunk(data: bytes) -> tuple[bytes, int]:
    """(body, bytes consumed) of a chunked body; _Incomplete if it has not all arrived."""
    body, pos = bytearray(), 0
    while True:
        end = data.find(b"\r\n", pos)
        if end < 0:
            raise _Incomplete
        size = int(data[pos:end].split(b";")[0].strip() or b"0", 16)
        pos = end + 2
        if size == 0:
            # Trailer section: field lines up to an empty line.
            while True:
                end = data.find(b"\r\n", pos)
                if end < 0:
                    raise _Incomplete
                line, pos = data[pos:end], end + 2
                if not line:
                    return bytes(body), pos
        if len(data) < pos + size + 2:
            raise _Incomplete
        body += data[pos : pos + size]
        pos += size + 2


def parse_responses(
    buf: bytes, closed: bool, head_requests: frozenset[int] = frozenset()
) -> tuple[list[Response], bytes]:
    """The complete responses at the start of ``buf`` (``closed``: no more bytes
    will come, so a body without length ends here), and the bytes left over.
    ``head_requests``: indexes of responses that answer HEAD (never a body)."""
    out: list[Response] = []
    while True:
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            return out, buf
        lines = buf[:end].decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        assert parts[0].startswith("HTTP/"), f"not an HTTP response: {buf[:200]!r}"
        status = int(parts[1])
        headers = []
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers.append((name.strip(), value.strip()))
        rest = buf[end + 4 :]
        if 100 <= status < 200:  # interim (100 Continue): not a response of its own
            buf = rest
            continue
        response = Response(status, headers, b"", parts[2] if len(parts) > 2 else "")
        length = response.header("Content-Length")
        if len(out) in head_requests or status in (204, 304):
            buf = rest  # never a body, whatever Content-Length says (RFC 9112 6.3)
        elif length is not None:
            n = int(length)
            if len(rest) < n:
                return out, buf
            response.body, buf = rest[:n], rest[n:]
        elif "chunked" in (response.header("Transfer-Encoding") or "").lower():
            try:
                response.body, used = _dechunk(rest)
            except _Incomplete:
                return out, buf
            buf = rest[used:]
        else:
            if not closed:
                return out, buf
            response.body, buf = rest, b""
        out.append(response)


def parse_all(data: bytes, head_requests: frozenset[int] = frozenset()) -> list[Response]:
    """Every response in ``data``, read to the connection's end: a truncated
    response or a stray byte fails."""
    responses, rest = parse_responses(data, True, head_requests)
    assert rest == b"", f"bytes that are not a whole response: {rest[:200]!r}"
    return responses


def request_bytes(
    target: str,
    headers: Iterable[tuple[str, str]] = (),
    *,
    method: str = "GET",
    host: str | None = "t",
    body: bytes = b"",
    close: bool = True,
) -> bytes:
    """A request with its header lines exactly as given (repeats, `_` names and
    odd values reach the gateway as written); Content-Length for a body."""
    lines = [f"{method} {target} HTTP/1.1"]
    if host is not None:
        lines.append(f"Host: {host}")
    lines += [f"{k}: {v}" for k, v in headers]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape") + body


async def read_to_close(port: int, data: bytes, timeout: float = READ_WAIT) -> bytes:
    """Send ``data`` on a fresh connection (its last request must say
    ``Connection: close``) and read every byte until the gateway closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def request(
    port: int, target: str, headers: Iterable[tuple[str, str]] = (), **kwargs: Any
) -> Response:
    """One request (see ``request_bytes``) on a fresh connection; its answer."""
    return await request_once(port, request_bytes(target, headers, **kwargs))


async def request_once(port: int, data: bytes, timeout: float = READ_WAIT) -> Response:
    """Send ``data`` (a request ending with ``Connection: close``) on a fresh
    connection and read until the gateway closes: the answer, its body being
    everything after the head (de-chunked when chunked)."""
    raw = await read_to_close(port, data, timeout)
    assert raw.startswith(b"HTTP/"), f"no HTTP answer before the close: {raw[:200]!r}"
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = [(k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in lines)]
    _, status, *reason = status_line.split(" ", 2)
    response = Response(int(status), headers, body, reason[0] if reason else "")
    if (response.header("Transfer-Encoding") or "").lower() == "chunked":
        response.body = _dechunk(body)[0]
    return response


async def exchange(
    port: int,
    data: bytes | list[bytes],
    *,
    expect: int = 1,
    deadline: float = 5.0,
    idle: float = 0.3,
    pause: float = 0.0,
) -> Exchange:
    """Send ``data`` (pieces ``pause`` seconds apart) and read responses until the
    gateway closes, or ``expect`` responses arrived and nothing more came for
    ``idle`` seconds, or ``deadline`` passed."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    buf, closed = b"", False
    pieces = [data] if isinstance(data, bytes) else data
    try:
        for i, piece in enumerate(pieces):
            if i and pause:
                await asyncio.sleep(pause)
            writer.write(piece)
            await writer.drain()
    except (ConnectionError, OSError):
        closed = True  # the gateway gave up on us mid-send; read what it said
    end = time.monotonic() + deadline
    while True:
        responses, _ = parse_responses(buf, closed)
        left = end - time.monotonic()
        if closed or left <= 0:
            break
        wait = min(left, idle) if len(responses) >= expect else left
        try:
            chunk = await asyncio.wait_for(reader.read(65536), wait)
        except TimeoutError:
            if len(responses) >= expect:
                break
            continue
        except (ConnectionError, OSError):
            closed = True
            continue
        if not chunk:
            closed = True
        buf += chunk
    writer.close()
    with contextlib.suppress(ConnectionError, OSError):
        await writer.wait_closed()
    responses, rest = parse_responses(buf, closed)
    return Exchange(responses, closed, rest)


class Cut(Exception):
    """The connection ended before the answer a test waited for was whole."""


class Conn:
    """A raw keep-alive client connection: send bytes, read answers as they
    come (every byte kept, as sent), and see when the gateway ends it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.local_port: int = writer.get_extra_info("sockname")[1]
        self.received = b""  # every byte the gateway sent, as sent
        self.closed = False  # the gateway closed (or reset) the connection
        self.taken = 0  # answers handed out by next()

    @classmethod
    async def open(cls, port: int) -> Conn:
        return cls(*await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), READ_WAIT))

    async def send(self, data: bytes) -> None:
        try:
            self.writer.write(data)
            await asyncio.wait_for(self.writer.drain(), READ_WAIT)
        except (ConnectionError, TimeoutError):
            self.closed = True

    async def _read(self, timeout: float) -> bool:
        """Read what arrives within ``timeout``; False if nothing came."""
        try:
            chunk = await asyncio.wait_for(self.reader.read(65536), timeout)
        except TimeoutError:
            return False
        except ConnectionError:
            chunk = b""
        self.closed = not chunk
        self.received += chunk
        return True

    async def responses(self, count: int, timeout: float = READ_WAIT) -> list[Response]:
        """Every answer so far, once there are ``count`` of them, the connection
        ended or ``timeout`` passed."""
        end = time.monotonic() + timeout
        while True:
            answers, _ = parse_responses(self.received, self.closed)
            left = end - time.monotonic()
            if len(answers) >= count or self.closed or left <= 0:
                return answers
            await self._read(left)

    async def wait_for(self, marker: bytes, timeout: float = READ_WAIT) -> None:
        """Read until ``marker`` has arrived; fail if it has not within ``timeout``."""
        end = time.monotonic() + timeout
        while marker not in self.received:
            left = end - time.monotonic()
            assert not self.closed and left > 0, f"no {marker!r} in {self.received[-200:]!r}"
            await self._read(left)

    async def next(self, timeout: float = READ_WAIT) -> Response:
        """The next answer not yet handed out; ``Cut`` if the connection ends
        first, a failure if none is whole within ``timeout``."""
        answers = await self.responses(self.taken + 1, timeout)
        if len(answers) <= self.taken:
            if self.closed:
                raise Cut(f"closed after {self.received[-200:]!r}")
            raise AssertionError(f"no answer within {timeout:g} s")
        self.taken += 1
        return answers[self.taken - 1]

    async def closed_at(self, timeout: float) -> float | None:
        """When the gateway ended the connection (EOF or reset), sending nothing
        more than the answers already taken; None if still open after ``timeout``."""
        end = time.monotonic() + timeout
        while not self.closed and (left := end - time.monotonic()) > 0:
            await self._read(left)
        answers, rest = parse_responses(self.received, self.closed)
        assert len(answers) == self.taken and not rest, f"unexpected bytes: {self.received!r}"
        return time.monotonic() if self.closed else None

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()
