"""The event loop a gateway process runs on: asyncio's own (the default) or uvloop's (libuv).

Measured by ``bench/event_loop.py`` (two gateways, one per loop, the same streams interleaved; 5 runs at 16 streams,
medians of uvloop's CPU per request over asyncio's): gRPC 0.93, TGI's route 0.99, OpenAI's 1.01, and the worse
route's tokens/s 0.90. Only gRPC gains, so asyncio's loop stays the default; ``server.event_loop = "uvloop"`` is
there for a gRPC-heavy deployment to measure on its own hardware.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, Literal, TypeVar

T = TypeVar("T")

EventLoop = Literal["asyncio", "uvloop"]


def run(main: Coroutine[Any, Any, T], loop: EventLoop) -> T:
    """``asyncio.run(main)`` on a new loop of the given kind."""
    if loop == "uvloop":
        try:
            import uvloop
        except ImportError as exc:  # a platform uvloop does not build on; the config names the fallback
            main.close()
            raise RuntimeError('event loop "uvloop" is not installed: set server.event_loop = "asyncio"') from exc
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(main)
    return asyncio.run(main)
