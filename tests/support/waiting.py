"""Waiting without guessing how long things take.

A test polls for the condition it needs, with a deadline generous enough for a
busy machine (the deadline only turns a hang into a failure), instead of
sleeping a fixed time and hoping. And a connection the gateway does not accept
may end either way the kernel picks: refused, or reset before an answer.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")

# For anything that should happen promptly: it only catches hangs.
PROMPT = 20.0


async def until(
    condition: Callable[[], bool], what: str, timeout: float = PROMPT, every: float = 0.02
) -> None:
    """Return once ``condition()`` holds; fail naming ``what`` after ``timeout``."""

    async def probe() -> bool:
        return condition()

    await eventually(probe, what, timeout, every)


async def eventually(
    probe: Callable[[], Awaitable[bool]], what: str, timeout: float = PROMPT, every: float = 0.1
) -> None:
    """``until`` for a condition that takes I/O to check (a scrape, a request)."""
    deadline = time.monotonic() + timeout
    while not await probe():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g} s")
        await asyncio.sleep(every)


def until_sync(
    condition: Callable[[], bool], what: str, timeout: float = PROMPT, every: float = 0.05
) -> None:
    """``until`` for code that runs in a thread (or outside a loop)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g} s")
        time.sleep(every)


async def within(awaitable: Awaitable[T], what: str, timeout: float = PROMPT) -> T:
    """``awaitable``'s result, or a failure naming what did not happen in time."""
    try:
        return await asyncio.wait_for(awaitable, timeout)
    except TimeoutError:
        raise AssertionError(f"{what}: nothing within {timeout:g} s") from None


# A closed listener refuses; a connection the kernel had queued for a listener
# that then closed is reset, during connect or at the first read. Either way the
# gateway did not accept it: tests must not depend on which one the kernel picks.
# (ConnectionError covers both, and a broken pipe or an abort on the way.)
NOT_ACCEPTED: tuple[type[BaseException], ...] = (ConnectionError, asyncio.IncompleteReadError)


async def answers(port: int, timeout: float = PROMPT) -> bool:
    """True if a new connection to ``port`` is accepted and a request on it is
    answered; False if it is refused, reset, or closed without an answer."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except NOT_ACCEPTED:
        return False
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    except NOT_ACCEPTED:
        return False
    finally:
        writer.close()
    return head.startswith(b"HTTP/1.1 ")
