"""A wall clock stepped back in the middle of a request (NTP correcting the gateway's host) still leaves its bill.

The gateway stamps a request four times from ``time.time_ns()``: received, released to a backend, first token,
done. Here the clock the gateway's request path reads (``proxy.gateway``'s ``time``) jumps 2 s back after its n-th
read; everything else in the process keeps the true clock. Before, a step between release and the first token gave
a timeline whose first token preceded its release: the timeline was refused (``timeline_record_failed``), the
request's row stayed open, unbilled, and held its backend's attribution back until the open-request timeout.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import structlog.testing

import proxy.gateway
from meter.store.models import Request as RequestRow
from proxy.pb.fmaas import generation_pb2 as pb

from .harness import running_stack

STEP_NS = 2_000_000_000


class _SteppedClock:
    """``time`` for one module: ``time_ns`` runs ``STEP_NS`` behind from its ``after_reads + 1``-th read on."""

    def __init__(self, after_reads: int) -> None:
        self.after_reads = after_reads
        self.reads = 0

    def time_ns(self) -> int:
        self.reads += 1
        now = time.time_ns()
        return now - STEP_NS if self.reads > self.after_reads else now

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


@pytest.mark.parametrize(
    ("after_reads", "where"),
    [
        (0, "while queued: released before received"),
        (1, "after the release"),
        (2, "after the first token (the control: done was clamped before)"),
    ],
)
async def test_a_request_whose_clock_steps_back_is_recorded_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, after_reads: int, where: str
) -> None:
    async with running_stack(tmp_path) as s:
        clock = _SteppedClock(after_reads)
        monkeypatch.setattr(proxy.gateway, "time", clock)
        with structlog.testing.capture_logs() as logs:
            call = s.stub.GenerateStream(
                pb.SingleGenerationRequest(
                    model_id="sim-model",
                    request=pb.GenerationRequest(text="a clock that steps"),
                    params=pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=5)),
                ),
                metadata=s.auth,
            )
            got = [m async for m in call]
            rid = dict(await call.initial_metadata())["x-request-id"]
            await s.app.gateway.flush_records()
            assert await asyncio.to_thread(s.app.ledger.flush, 10.0)
        assert clock.reads >= 3, where  # released, first token, done: the step fell where the case says
        assert sum(len(m.text) > 0 for m in got) >= 1
        assert [e for e in logs if e["event"] == "timeline_record_failed"] == []
        assert s.app.ledger.stats.rejected == 0
        engine = sa.create_engine(s.db_url)
        with engine.connect() as conn:
            row = conn.execute(sa.select(RequestRow.__table__).where(RequestRow.request_id == rid)).mappings().one()
        engine.dispose()
        assert (row["status"], row["generated_tokens"]) == ("OK", 5)  # finished, billed
        assert row["received_ns"] <= row["released_ns"] <= row["first_token_ns"] <= row["done_ns"]
