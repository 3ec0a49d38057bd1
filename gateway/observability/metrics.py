"""Prometheus metrics, summed across workers.

Counted per worker in plain dicts: an observation on the request path is a
dict increment and a bisect, not a lock and an mmap write per sample (what
prometheus-client's own multiprocess mode costs). With several workers each
one saves its counts to ``<dir>/<pid>.json`` every second; ``/metrics``, on any
worker, adds them up and renders them through prometheus-client's collector
and exposition code. A worker that died keeps its file, so counters never go
backwards (as in prometheus-client's multiprocess mode). Other workers' counts
may be up to a second old.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import os
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

# Seconds; the proxy path sits in the low milliseconds, WeChat in the hundreds.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SAVE_EVERY = 1.0
# The environment variable the supervisor sets for its workers.
DIR_ENV = "WX_GATEWAY_METRICS_DIR"
OWN = "(own)"  # the route label of the gateway's own endpoints
# A worker's gauges are shown while its file is this fresh: a dead worker's file
# is kept for its counters, but its storage state would be a false alarm.
GAUGE_FRESH = 5 * SAVE_EVERY
# WeChat errcodes that keep their own ``errcode`` label value: the contract's
# table (40029/40163 invalid_code, 45011, 40226, -1 busy), the access-token
# codes (40001/40014/42001), and the two an operator must see to fix a
# misconfiguration (40013 invalid appid, 40125 invalid secret). Every other
# errcode is "other": WeChat chooses errcodes, and each distinct value would be
# a new series (300 errcodes, 300 series) in every scrape, for ever.
KNOWN_ERRCODES = frozenset({-1, 40001, 40013, 40014, 40029, 40125, 40163, 40226, 42001, 45011})
OTHER_ERRCODE = "other"


def errcode_label(errcode: int | None) -> str:
    """The ``errcode`` label value: "" for none, the code when known, else "other"."""
    if errcode is None:
        return ""
    return str(errcode) if errcode in KNOWN_ERRCODES else OTHER_ERRCODE


class _Histogram:
    """Per-bucket counts (not cumulative), sum and count."""

    __slots__ = ("buckets", "count", "total")

    def __init__(self) -> None:
        self.buckets = [0] * (len(BUCKETS) + 1)
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.buckets[bisect.bisect_left(BUCKETS, value)] += 1
        self.total += value
        self.count += 1


class Metrics:
    def __init__(self, directory: str | None = None) -> None:
        self.requests: Counter[tuple[str, int]] = Counter()
        self.latency: dict[str, _Histogram] = {}
        self.upstream_errors: Counter[tuple[str, str]] = Counter()
        self.logins: Counter[tuple[str, str]] = Counter()
        self.wechat: dict[str, _Histogram] = {}
        self.wechat_errors: Counter[tuple[str, str]] = Counter()
        self.token_fetches: Counter[str] = Counter()
        self.revocations = 0
        # The worker's view of storage: (last feed read succeeded, seconds since
        # the last successful one); set by the services that read the feeds.
        self.storage_state: Callable[[], tuple[bool, float]] | None = None
        self._dir = Path(directory) if directory else None
        self._file = self._dir / f"{os.getpid()}.json" if self._dir else None

    # -- counting (hot path) ------------------------------------------------------
    def observe(self, route: str | None, status: int, started: float) -> None:
        key = route or OWN
        self.requests[(key, status)] += 1
        histogram = self.latency.get(key)
        if histogram is None:
            histogram = self.latency[key] = _Histogram()
        histogram.observe(time.perf_counter() - started)

    def login(self, outcome: str, errcode: int | None) -> None:
        """One /auth/login answer: ``ok`` or the contract's error code (a fixed set)."""
        self.logins[(outcome, errcode_label(errcode))] += 1

    def wechat_call(self, api: str, seconds: float, outcome: str) -> None:
        histogram = self.wechat.get(api)
        if histogram is None:
            histogram = self.wechat[api] = _Histogram()
        histogram.observe(seconds)
        if outcome != "ok":
            self.wechat_errors[(api, outcome)] += 1

    # -- across workers -----------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        def hist(h: _Histogram) -> list[Any]:
            return [h.buckets, h.total, h.count]

        return {
            "requests": [[r, s, n] for (r, s), n in self.requests.items()],
            "latency": {k: hist(h) for k, h in self.latency.items()},
            "upstream_errors": [[r, k, n] for (r, k), n in self.upstream_errors.items()],
            "logins": [[o, e, n] for (o, e), n in self.logins.items()],
            "wechat": {k: hist(h) for k, h in self.wechat.items()},
            "wechat_errors": [[a, o, n] for (a, o), n in self.wechat_errors.items()],
            "token_fetches": dict(self.token_fetches),
            "revocations": self.revocations,
            "storage": self._storage_snapshot(),
        }

    def _storage_snapshot(self) -> list[Any] | None:
        if self.storage_state is None:
            return None
        up, age = self.storage_state()
        # The age is as of now; the reader adds how long the file waited.
        return [os.getpid(), int(up), age, time.time()]

    def save(self) -> None:
        """Write this worker's counts for the others' /metrics (atomic rename)."""
        if self._file is None:
            return
        tmp = self._file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.snapshot()))
        tmp.replace(self._file)

    def _snapshots(self) -> Iterator[dict[str, Any]]:
        yield self.snapshot()
        if self._dir is None:
            return
        for path in self._dir.glob("*.json"):
            if path == self._file:
                continue
            with contextlib.suppress(OSError, ValueError):
                yield json.loads(path.read_text())

    def render(self) -> bytes:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector(list(self._snapshots())))
        return bytes(generate_latest(registry))


class _Collector:
    def __init__(self, snapshots: list[dict[str, Any]]) -> None:
        self._snapshots = snapshots

    def collect(self) -> Iterator[Metric]:
        snaps = self._snapshots
        requests = CounterMetricFamily(
            "wxgateway_requests",
            "Requests answered, by route prefix and status.",
            labels=["route", "status"],
        )
        for (route, status), n in _sum_rows(snaps, "requests").items():
            requests.add_metric([route, str(status)], n)
        yield requests
        yield _histograms(
            "wxgateway_request_duration_seconds",
            "Time from the request head to the end of the answer, by route prefix.",
            "route",
            snaps,
            "latency",
        )
        upstream = CounterMetricFamily(
            "wxgateway_upstream_errors",
            "Proxied requests the upstream failed, by route prefix and kind.",
            labels=["route", "kind"],
        )
        for (route, kind), n in _sum_rows(snaps, "upstream_errors").items():
            upstream.add_metric([route, kind], n)
        yield upstream
        logins = CounterMetricFamily(
            "wxgateway_logins",
            "Logins by outcome (ok or the error code) and WeChat errcode.",
            labels=["outcome", "errcode"],
        )
        for (outcome, errcode), n in _sum_rows(snaps, "logins").items():
            logins.add_metric([outcome, errcode], n)
        yield logins
        yield _histograms(
            "wxgateway_wechat_request_duration_seconds",
            "WeChat API calls, by API.",
            "api",
            snaps,
            "wechat",
        )
        wechat_errors = CounterMetricFamily(
            "wxgateway_wechat_errors",
            "WeChat API calls that failed, by API and outcome.",
            labels=["api", "outcome"],
        )
        for (api, outcome), n in _sum_rows(snaps, "wechat_errors").items():
            wechat_errors.add_metric([api, outcome], n)
        yield wechat_errors
        fetches = CounterMetricFamily(
            "wxgateway_access_token_fetches",
            "Access tokens fetched from WeChat (stable_token), by reason.",
            labels=["reason"],
        )
        totals: Counter[str] = Counter()
        for snap in snaps:
            totals.update(snap.get("token_fetches", {}))
        for reason, n in sorted(totals.items()):
            fetches.add_metric([reason], n)
        yield fetches
        yield CounterMetricFamily(
            "wxgateway_revocations",
            "Sessions revoked by logout.",
            value=sum(int(s.get("revocations", 0)) for s in snaps),
        )
        yield from _storage_gauges(snaps)


def _storage_gauges(snapshots: list[dict[str, Any]]) -> Iterator[Metric]:
    """Per worker (label ``worker``: its pid), from workers whose file is fresh."""
    up = GaugeMetricFamily(
        "wxgateway_storage_up",
        "1 when the worker's last read of the revocation feeds succeeded, else 0.",
        labels=["worker"],
    )
    age = GaugeMetricFamily(
        "wxgateway_storage_feed_age_seconds",
        "Seconds since the worker last read the revocation feeds successfully.",
        labels=["worker"],
    )
    now = time.time()
    for snap in snapshots:
        state = snap.get("storage")
        if not state:
            continue
        pid, is_up, seconds, saved = state
        if now - saved > GAUGE_FRESH:
            continue
        up.add_metric([str(pid)], is_up)
        age.add_metric([str(pid)], seconds + max(now - saved, 0.0))
    yield up
    yield age


def _sum_rows(snapshots: list[dict[str, Any]], key: str) -> Counter[tuple[Any, Any]]:
    total: Counter[tuple[Any, Any]] = Counter()
    for snap in snapshots:
        for a, b, n in snap.get(key, []):
            total[(a, b)] += n
    return Counter(dict(sorted(total.items(), key=lambda kv: (str(kv[0][0]), str(kv[0][1])))))


def _histograms(
    name: str, doc: str, label: str, snapshots: list[dict[str, Any]], key: str
) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc, labels=[label])
    merged: dict[str, list[Any]] = {}
    for snap in snapshots:
        for value, (buckets, total, _count) in snap.get(key, {}).items():
            into = merged.setdefault(value, [[0] * (len(BUCKETS) + 1), 0.0])
            into[0] = [a + b for a, b in zip(into[0], buckets, strict=True)]
            into[1] += total
    for value in sorted(merged):
        buckets, total = merged[value]
        cumulative, running = [], 0
        for bound, n in zip((*BUCKETS, float("inf")), buckets, strict=True):
            running += n
            cumulative.append((_bound(bound), running))
        family.add_metric([value], cumulative, total)
    return family


def _bound(value: float) -> str:
    return "+Inf" if value == float("inf") else repr(value)


def shared_directory() -> str:
    """A fresh directory for the workers' files (the supervisor makes one per run)."""
    return tempfile.mkdtemp(prefix="wx-gateway-metrics-")
