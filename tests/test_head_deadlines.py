"""proxy.http.deadline: a request told over twice (the relay ends its answer, then the middleware) leaves the next
request's head deadline armed."""

from __future__ import annotations

import asyncio

from proxy.http.deadline import HeadDeadlines, _State


class _Inner(asyncio.Protocol):
    pass


class _Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written = b""
        self.closed = False

    def is_closing(self) -> bool:
        return self.closed

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += bytes(data)

    def close(self) -> None:
        self.closed = True


async def test_a_second_request_done_keeps_the_next_heads_timer() -> None:
    deadlines = HeadDeadlines(timeout_s=30)
    guard = deadlines.factory(_Inner)()
    transport = _Transport()
    guard.connection_made(transport)
    deadlines.head_arrived(transport)
    deadlines.request_done(transport)  # the relay, as it ends the answer
    guard.data_received(b"P")  # the client's next request begins at once
    deadlines.request_done(transport)  # the middleware, afterwards
    assert guard._state is _State.AWAITING_HEAD and guard._due > asyncio.get_running_loop().time()
    guard.connection_lost(None)


async def test_the_sweep_cuts_a_late_head_and_spares_a_request_in_progress() -> None:
    deadlines = HeadDeadlines(timeout_s=0.2)
    late, busy = _Transport(), _Transport()
    for transport in (late, busy):
        deadlines.factory(_Inner)().connection_made(transport)
    deadlines.head_arrived(busy)  # its head came in time: a long answer (or a slow body) is not cut
    await asyncio.sleep(0.2 + 0.2 / 4 + 0.1)  # the deadline, a sweep's period, and slack
    assert late.closed and late.written.startswith(b"HTTP/1.1 408")
    assert not busy.closed and deadlines.closed_late == 1
