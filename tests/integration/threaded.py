"""Run an async stack on its own event-loop thread, so sync clients (and hypothesis) can drive it."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .harness import Stack, running_stack


@contextlib.contextmanager
def stack_in_thread(tmp_path: Path, **kwargs: Any) -> Iterator[Stack]:
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    box: dict[str, Any] = {}
    started = threading.Event()

    async def main() -> None:
        async with running_stack(tmp_path, **kwargs) as s:
            box["stack"] = s
            started.set()
            await stop.wait()

    def run() -> None:
        try:
            loop.run_until_complete(main())
        except BaseException as exc:  # surfaced to the test below
            box["error"] = exc
            started.set()
        finally:
            loop.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    started.wait(30)
    if "error" in box:
        raise box["error"]
    try:
        yield box["stack"]
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(30)
