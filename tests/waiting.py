"""Waiting for a condition instead of sleeping for a guess.

A fixed ``sleep(0.3)`` before an assertion is either too short on a loaded machine (the test flakes) or longer than
needed everywhere else (the suite crawls). These poll a predicate until it holds and fail with a message naming
what was awaited when a deadline passes. Sleeps that are part of a scenario (time that must pass, traffic that
must keep flowing) stay sleeps.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")

POLL_S = 0.005  # fine enough to catch a short-lived state; a predicate that queries a database passes more


def wait_until(predicate: Callable[[], T], timeout_s: float = 15.0, *, what: str = "", poll_s: float = POLL_S) -> T:
    """Poll ``predicate`` (from this thread) until it returns something true; return that. AssertionError after
    ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        if value := predicate():
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what or _name(predicate)}")
        time.sleep(poll_s)


async def wait_until_async(
    predicate: Callable[[], T | Awaitable[T]], timeout_s: float = 15.0, *, what: str = "", poll_s: float = POLL_S
) -> T:
    """``wait_until`` for a coroutine: the event loop keeps running between polls (so the servers under test on it
    make progress). ``predicate`` is a plain function that must not block, or a coroutine function."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what or _name(predicate)}")
        await asyncio.sleep(poll_s)


def _name(predicate: Callable[[], object]) -> str:
    code = getattr(predicate, "__code__", None)
    where = f" ({code.co_filename.rsplit('/', 1)[-1]}:{code.co_firstlineno})" if code is not None else ""
    return f"{getattr(predicate, '__qualname__', repr(predicate))}{where}"
