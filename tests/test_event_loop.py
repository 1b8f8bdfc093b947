"""common.loop: the gateway's processes run on the event loop the configuration names."""

from __future__ import annotations

import asyncio

import pytest
import uvloop

from app.config import ServerConfig
from common.loop import run


async def _loop_type() -> type:
    return type(asyncio.get_running_loop())


def test_uvloop_runs_a_uvloop_loop() -> None:
    assert issubclass(run(_loop_type(), "uvloop"), uvloop.Loop)


def test_asyncio_is_the_default_and_runs_the_standard_loop() -> None:
    assert ServerConfig().event_loop == "asyncio"
    kind = run(_loop_type(), "asyncio")
    assert not issubclass(kind, uvloop.Loop) and issubclass(kind, asyncio.BaseEventLoop)


def test_an_unknown_loop_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="event_loop"):
        ServerConfig(event_loop="trio")  # type: ignore[arg-type]
