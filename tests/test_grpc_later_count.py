"""proxy.grpc_api._Later: a TGIS input count taken at the loop's next turn (while the request travels), on demand
if asked for first, never when cancelled, and 0 when the tokenizer failed: it is informative."""

from __future__ import annotations

import asyncio

from proxy.grpc_api import _Later


async def test_counted_at_the_next_turn_once() -> None:
    calls: list[int] = []
    later = _Later(lambda: calls.append(1) or 7)
    assert calls == []  # not on the caller's path
    await asyncio.sleep(0)
    assert calls == [1] and later.value() == 7 and calls == [1]


async def test_asked_for_before_the_turn_it_is_counted_then_and_not_again() -> None:
    calls: list[int] = []
    later = _Later(lambda: calls.append(1) or 3)
    assert later.value() == 3
    await asyncio.sleep(0)
    assert calls == [1]


async def test_cancelled_it_never_runs() -> None:
    calls: list[int] = []
    later = _Later(lambda: calls.append(1) or 3)
    later.cancel()
    await asyncio.sleep(0)
    assert calls == []


async def test_a_failed_count_gives_zero_not_a_failed_call() -> None:
    later = _Later(lambda: None)  # InputCounts.count when the tokenizer raised
    await asyncio.sleep(0)
    assert later.value() == 0
