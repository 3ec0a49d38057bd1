"""Request counters in Prometheus text format (per worker process)."""

from __future__ import annotations

import time
from collections import Counter


class Metrics:
    def __init__(self) -> None:
        self._requests: Counter[tuple[str, int]] = Counter()
        self._seconds: dict[str, float] = {}

    def observe(self, route: str | None, status: int, started: float) -> None:
        key = route or "(own)"
        self._requests[(key, status)] += 1
        self._seconds[key] = self._seconds.get(key, 0.0) + time.perf_counter() - started

    def render(self) -> str:
        lines = [
            "# HELP wxgateway_requests_total Requests handled, by route prefix and status.",
            "# TYPE wxgateway_requests_total counter",
        ]
        for (route, status), count in sorted(self._requests.items()):
            lines.append(
                f'wxgateway_requests_total{{route="{_escape(route)}",status="{status}"}} {count}'
            )
        lines += [
            "# HELP wxgateway_request_seconds_total Time spent handling requests, by route prefix.",
            "# TYPE wxgateway_request_seconds_total counter",
        ]
        for route, seconds in sorted(self._seconds.items()):
            lines.append(
                f'wxgateway_request_seconds_total{{route="{_escape(route)}"}} {seconds:.6f}'
            )
        return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
