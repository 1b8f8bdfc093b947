"""proxy.http.deadline: a request told over twice (the relay ends its answer, then the middleware) leaves the next
request's head deadline armed."""

from __future__ import annotations

import asyncio

from proxy.http.deadline import HeadDeadlines, _State


class _Inner(asyncio.Protocol):
    pass


class _Transport(asyncio.Transport):
    def is_closing(self) -> bool:
        return False


async def test_a_second_request_done_keeps_the_next_heads_timer() -> None:
    deadlines = HeadDeadlines(timeout_s=30)
    guard = deadlines.factory(_Inner)()
    transport = _Transport()
    guard.connection_made(transport)
    deadlines.head_arrived(transport)
    deadlines.request_done(transport)  # the relay, as it ends the answer
    guard.data_received(b"P")  # the client's next request begins at once
    deadlines.request_done(transport)  # the middleware, afterwards
    assert guard._state is _State.AWAITING_HEAD and guard._timer is not None
    guard.connection_lost(None)
