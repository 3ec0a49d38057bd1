"""/metrics label values stay bounded whatever WeChat answers (issue 13 item 9).

WeChat chooses its errcodes; a label value per errcode let 300 distinct ones
make 300 series of ``wxgateway_logins_total``. Known errcodes keep their value,
every other one is ``other``.
"""

from __future__ import annotations

import asyncio

import aiohttp

from tests.support.gateway import Running
from tests.support.metrics import Series, samples, scrape

KNOWN = {"", "-1", "40001", "40013", "40014", "40029", "40125", "40163", "40226", "42001", "45011"}


async def scrape_logins(http: aiohttp.ClientSession, url: str) -> Series:
    """The samples of the logins and WeChat error families."""
    families = ("wxgateway_logins_total", "wxgateway_wechat_errors_total")
    return {k: v for k, v in samples(await scrape(http, url)).items() if k[0] in families}


async def test_300_distinct_errcodes_make_a_bounded_set_of_series(
    gw: Running, http: aiohttp.ClientSession
) -> None:
    async def login(code: str) -> int:
        async with http.post(gw.url + "/auth/login", json={"code": code}) as resp:
            await resp.read()
            return resp.status

    codes = [f"errcode-{50000 + i}" for i in range(300)] + ["errcode-99999999", "errcode--7"]
    for start in range(0, len(codes), 50):
        statuses = await asyncio.gather(*(login(c) for c in codes[start : start + 50]))
        assert set(statuses) == {502}
    assert await login("invalid-code") == 401
    assert await login("busy-now") == 502
    assert await login("ratelimit-now") == 429
    assert await login("errcode-40125") == 502  # a wrong secret: worth its own series
    assert await login("good-user") == 200

    series = await scrape_logins(http, gw.url)
    logins = {
        dict(labels)["errcode"]: value
        for (name, labels), value in series.items()
        if name == "wxgateway_logins_total"
    }
    assert set(logins) <= KNOWN | {"other"}, sorted(logins)
    assert logins["other"] == 302
    assert logins["40029"] == logins["-1"] == logins["45011"] == logins["40125"] == 1
    assert logins[""] == 1  # the successful login: no errcode
    assert len(series) < 30, sorted(series)
