"""/metrics read the way Prometheus reads it (prometheus-client's own parser)."""

from __future__ import annotations

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

# {(sample name, sorted labels): value}
Series = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(text: str) -> Series:
    """Every sample of an exposition."""
    out: Series = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(text: str, name: str, **labels: str) -> float:
    """One sample's value (0 when the exposition does not have it)."""
    return samples(text).get((name, tuple(sorted(labels.items()))), 0.0)


async def scrape(http: aiohttp.ClientSession, url: str) -> str:
    """GET ``url``/metrics: the exposition, once it is one."""
    async with http.get(url + "/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        return await resp.text()
