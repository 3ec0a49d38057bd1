"""A tiny HTTP/1.1 client over a raw socket, for tests that must send bytes
exactly as written (pipelines, malformed input) and see every answer in order."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass
from typing import Any


@dataclass
class Response:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

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


def parse_responses(buf: bytes, closed: bool) -> tuple[list[Response], bytes]:
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
        response = Response(status, headers, b"")
        length = response.header("Content-Length")
        if length is not None:
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
        elif status in (204, 304):
            buf = rest
        else:
            if not closed:
                return out, buf
            response.body, buf = rest, b""
        out.append(response)


async def request_once(port: int, data: bytes, timeout: float = 10.0) -> Response:
    """Send ``data`` (a request ending with ``Connection: close``) on a fresh
    connection and read until the gateway closes: the answer, its body being
    everything after the head (de-chunked when chunked)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = [(k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in lines)]
    response = Response(int(status_line.split(" ")[1]), headers, body)
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
