"""An abandoned prefill's step runs past its client's leaving (``abandoned_step_completes``): the engine bills the
part of it that falls in later epochs to the request too, and seals the request only once those epochs are in.

Epoch boundaries are clock-aligned, so anyone can see them coming. Picked up only where the request's recorded end
lies, a long prompt cancelled just before a boundary would leave the rest of its step to whoever decoded in the next
epoch (or to idle, or, once sealed, to the epoch's adjustment): a tenant could push the cost of its prefills onto its
neighbours at will. Real databases (SQLite and PostgreSQL), the engine's own passes.
"""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from meter.engine import EngineSettings, MeteredBackend, MeteringEngine
from meter.timeline import Timeline
from tests.engine_helpers import MS, T0, Gpu, S, make_engine, rows, samples_for, timeline, write

PROMPT = 8_000  # at the default 20,000 tokens/s and 5 ms overhead: a 405 ms step
STEP_NS = 405 * MS


def _abandoned(released: int, left: int, step_ns: int, prompt: int) -> tuple[Timeline, Timeline]:
    """What the gateway records (cancelled at ``left``, no token) and what the GPU ran (its whole step)."""
    recorded = Timeline(
        "abandoner", "mallory", "m", "b1", released - 5 * MS, released, None, left, prompt, 0, status="CANCELLED"
    )
    ran = Timeline("abandoner", "mallory", "m", "b1", released - 5 * MS, released, None, released + step_ns, prompt, 0)
    return recorded, ran


def _energy(db: sa.Engine, rid: str) -> dict[int, int]:
    q = "SELECT epoch_start_ns, prefill_mj + decode_mj AS e FROM request_energy WHERE request_id = :r"
    return {int(r.epoch_start_ns): int(r.e) for r in rows(db, q, {"r": rid})}


def test_the_tail_of_an_abandoned_step_in_the_next_epoch_is_the_abandoners(db: sa.Engine) -> None:
    gpu = Gpu()
    # Its first token after its own step's length (5 ms + 50 tokens at 20,000/s): the backend shows no queue wait.
    neighbour = timeline("neighbour", T0 + 8 * S, T0 + 8 * S + 7_500_000, T0 + 13 * S, tenant="acme", prompt=50)
    released = T0 + 9_800 * MS  # its step runs to 10.205 s, across the boundary at 10 s; the client left at 9.85 s
    recorded, ran = _abandoned(released, released + 50 * MS, STEP_NS, PROMPT)
    gpu.requests += [neighbour, ran]
    write(db, timelines=[neighbour, recorded], samples=samples_for(gpu, "gpu0", T0, T0 + 25 * S), ingested_ns=T0)

    make_engine(db).run_once(now_ns=T0 + 30 * S)

    # The model gives a prefill step the whole board while it runs (the neighbour cannot decode meanwhile).
    step_mj = (gpu.idle_w + gpu.prefill_w + gpu.decode_w) * STEP_NS * 1e-6
    got = _energy(db, "abandoner")
    assert got.get(T0 + 10 * S, 0) > 0.8 * step_mj * 205 / 405, got  # the 205 ms past the boundary
    assert sum(got.values()) == pytest.approx(step_mj, rel=0.06), (got, step_mj)
    for e in rows(db, "SELECT * FROM backend_epochs"):
        assert e.counter_mj == e.attributed_mj + e.idle_mj + e.adjustment_mj


def test_an_abandoned_request_is_sealed_only_after_the_epochs_its_step_reaches(db: sa.Engine) -> None:
    """1 s epochs, a 0.5 s settle time and a 1.605 s step (32,000 tokens) whose client left after 50 ms: its step
    ends two epochs after the one it left in. Sealed after the first of them, the rest would be booked to the
    epoch's adjustment (nobody's bill)."""
    gpu = Gpu()
    step_ns = 1_605 * MS
    released = T0 + 9_800 * MS
    recorded, ran = _abandoned(released, released + 50 * MS, step_ns, 32_000)
    gpu.requests += [ran]
    write(db, timelines=[recorded], samples=samples_for(gpu, "gpu0", T0, T0 + 20 * S), ingested_ns=T0)

    eng = make_engine(db, epoch_ns=1 * S, settle_ns=500 * MS)
    for now in range(11_600, 16_600, 1_000):  # a pass a second, each attributing the epoch that became due
        eng.run_once(now_ns=T0 + now * MS)

    step_mj = (gpu.idle_w + gpu.prefill_w) * step_ns * 1e-6
    sealed = rows(db, "SELECT prefill_mj + decode_mj AS e FROM request_seals WHERE request_id = 'abandoner'")
    assert len(sealed) == 1
    assert int(sealed[0].e) == sum(_energy(db, "abandoner").values())
    assert int(sealed[0].e) == pytest.approx(step_mj, rel=0.06), (sealed[0].e, step_mj)
    assert all(e.adjustment_mj == 0 for e in rows(db, "SELECT adjustment_mj FROM backend_epochs"))


def test_a_backend_that_prefills_in_chunks_bills_an_abandoned_prompt_up_to_the_chunk_in_flight(db: sa.Engine) -> None:
    """A 32,000-token prompt on an engine that prefills 2,048 tokens per step (vLLM, SGLang): its client leaves
    50 ms in, and the engine stops it after the chunk in flight (5 ms + 2,048 tokens at 20,000/s: 107 ms), so the
    GPU ran 157 ms of it, not the 1.6 s of the whole prompt. The backend says so (``prefill_chunk_tokens``); a
    backend that does not is billed the whole prompt's step, as an engine without chunking runs it."""
    gpu = Gpu()
    released = T0 + 9_300 * MS
    ran_ns = 50 * MS + 107_400_000
    recorded, ran = _abandoned(released, released + 50 * MS, ran_ns, 32_000)
    gpu.requests += [ran]
    write(db, timelines=[recorded], samples=samples_for(gpu, "gpu0", T0, T0 + 25 * S), ingested_ns=T0)
    settings = EngineSettings(epoch_ns=10 * S, settle_ns=2 * S, lag_ns=0, calibrate=False)
    MeteringEngine(db, [MeteredBackend("b1", ("gpu0",), 2048)], settings).run_once(now_ns=T0 + 30 * S)

    ran_mj = (gpu.idle_w + gpu.prefill_w) * ran_ns * 1e-6
    assert sum(_energy(db, "abandoner").values()) == pytest.approx(ran_mj, rel=0.06), (_energy(db, "abandoner"), ran_mj)
