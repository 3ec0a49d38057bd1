"""The access log: one JSON line per request, on standard output.

Fields: ``time`` (UTC, ms), ``request_id``, ``route`` (the matched prefix, or
null for the gateway's own endpoints), ``method``, ``path`` (without the query
string, which may carry anything), ``status``, ``bytes`` (response body bytes
sent), ``latency_ms``, ``upstream`` (the target tried last, or null),
``client`` (the client address, behind trusted proxies the forwarded one) and
the caller's openid as configured by ``log.openid``: ``openid_hash`` (a keyed
hash, default), ``openid`` in clear, or nothing. Never a token or a secret.

Why not :mod:`logging`: a record per request through handlers and formatters
cost more than a proxied request itself. Lines are built directly, buffered,
and handed every 100 ms (or every 512 lines) to a writer thread: a slow or full
stdout (a pipe nobody reads) then blocks that thread, never the event loop.
Past ``MAX_PENDING`` unwritten batches, lines are dropped and counted rather
than held without bound.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import queue
import threading
import time
from json.encoder import encode_basestring_ascii as _json_str
from typing import Protocol

from gateway.config import Config

log = logging.getLogger("gateway.access")
MAX_PENDING = 1024  # batches waiting for the writer thread
FLUSH_EVERY = 0.1  # seconds; waking the writer per loop iteration cost a fifth of the proxy path
FLUSH_LINES = 512
MAX_CACHED_HASHES = 10_000


class Finished(Protocol):
    """What a line is made of: fields of the request record
    (:class:`gateway.server.request.Request`), named here so that this package
    needs nothing of the server's."""

    request_id: str
    route: str | None
    method: str
    raw_path: str
    status: int
    sent: int
    started: float
    upstream: str | None
    openid: str | None


class AccessLog:
    def __init__(self, config: Config, fd: int = 1) -> None:
        self._fd = fd
        self._mode = config.log.openid
        # Keyed with a label derived from the token key, so the hash cannot be
        # reversed by hashing candidate openids without that key, and differs
        # between deployments.
        self._key = hmac.new(
            config.token.secret.reveal().encode(), b"wx-gateway access log", hashlib.sha256
        ).digest()
        self._lines: list[str] = []
        self._hashes: dict[str, str] = {}
        self._strings: dict[str | None, str] = {}
        self._flush_scheduled = False
        self._pending: queue.Queue[bytes | None] = queue.Queue(MAX_PENDING)
        self.dropped = 0
        self._writer = threading.Thread(target=self._write_out, name="access-log", daemon=True)
        self._writer.start()
        self._second = -1
        self._stamp = ""

    def _time(self, now: float) -> str:
        second = int(now)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        # printf-style, not a format spec in an f-string: compiled (setup.py),
        # the latter becomes a str.format call that parses its template per line.
        return "%s.%03dZ" % (self._stamp, int((now - second) * 1000))  # noqa: UP031

    def _json(self, value: str | None) -> str:
        text = self._strings.get(value)
        if text is None:
            if len(self._strings) >= MAX_CACHED_HASHES:
                self._strings.clear()
            text = self._strings[value] = "null" if value is None else _json_str(value)
        return text

    def _who(self, openid: str | None) -> str:
        if openid is None or self._mode == "omit":
            return ""
        if self._mode == "clear":
            return ',"openid":' + _json_str(openid)
        field = self._hashes.get(openid)
        if field is None:
            if len(self._hashes) >= MAX_CACHED_HASHES:
                self._hashes.clear()
            digest = hmac.new(self._key, openid.encode(), hashlib.sha256).hexdigest()[:16]
            field = self._hashes[openid] = ',"openid_hash":"' + digest + '"'
        return field

    def record(self, request: Finished, client: str) -> None:
        now = time.time()
        path = request.raw_path.partition("?")[0]
        latency = "%.3f" % ((time.perf_counter() - request.started) * 1000)
        # Route prefixes, methods, targets and client addresses repeat: their JSON
        # forms are cached. The request id needs none: a client's is only kept
        # when it matches [A-Za-z0-9._:-]{1,128}, ours are hex.
        self._lines.append(
            f'{{"time":"{self._time(now)}","request_id":"{request.request_id}",'
            f'"route":{self._json(request.route)},"method":{self._json(request.method)},'
            f'"path":{_json_str(path)},"status":{request.status},"bytes":{request.sent},'
            f'"latency_ms":{latency},"upstream":{self._json(request.upstream)},'
            f'"client":{self._json(client)}{self._who(request.openid)}}}\n'
        )
        if len(self._lines) >= FLUSH_LINES:
            self.flush()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            try:
                asyncio.get_running_loop().call_later(FLUSH_EVERY, self._timed_flush)
            except RuntimeError:
                self.flush()

    def _timed_flush(self) -> None:
        self._flush_scheduled = False
        self.flush()

    def flush(self) -> None:
        if not self._lines:
            return
        data = "".join(self._lines).encode("utf-8", "backslashreplace")
        count = len(self._lines)
        self._lines.clear()
        try:
            self._pending.put_nowait(data)
        except queue.Full:
            if not self.dropped:
                log.warning("access log output is not keeping up; dropping lines")
            self.dropped += count

    def close(self, timeout: float = 2.0) -> None:
        """Write what is buffered (best effort, bounded), then stop the writer."""
        self.flush()
        try:
            self._pending.put(None, timeout=timeout)
        except queue.Full:
            return
        self._writer.join(timeout)

    def _write_out(self) -> None:
        while (data := self._pending.get()) is not None:
            try:
                while data:
                    data = data[os.write(self._fd, data) :]
            except OSError:
                pass  # a closed stdout must not take the gateway down
