"""A late row makes stale exactly the epochs that sealing waits for.

An epoch looks at requests that ended up to ``reach_ns`` before its start (a calibrated lag moves its readings
earlier), so sealing a request waits for every such epoch computed before the row arrived. Recomputation must mark
the same epochs stale: one it leaves out is never redone, and the request is never sealed (found by
``bench/fleet.py``: a request that ended ~110 ms before an epoch boundary, replayed from a killed gateway's journal
after that epoch was attributed, stayed provisional for good)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from meter.engine import sql
from meter.engine.recompute import stale_epochs
from meter.engine.sealing import sealable
from meter.engine.settings import EngineSettings

MS = 1_000_000
S = 1000 * MS
# Calibrating: reach_ns = 200 ms - 50 ms (and no abandoned step's tail, which would add its 2 s to it).
SETTINGS = EngineSettings(epoch_ns=1 * S, lag_ns=50 * MS, abandoned_step_max_ns=0)


def epochs(n: int, attributed_at: list[int], tails: list[int]) -> list[sql.EpochMark]:
    return [
        sql.EpochMark(i * S, (i + 1) * S, (i + 1) * S + SETTINGS.lag_ns + tails[i], attributed_at[i]) for i in range(n)
    ]


def row(released: int, done: int, ingested: int) -> sql.IngestedRow:
    return sql.IngestedRow("r", "tgi-0", released, done, ingested, "t", "m", released, 1, 1)


def test_an_epoch_starting_just_after_the_end_of_a_late_row_is_redone() -> None:
    assert SETTINGS.reach_ns == 150 * MS
    marks = epochs(4, [10 * S] * 4, [0] * 4)
    late = row(released=1 * S + 500 * MS, done=2 * S - 110 * MS, ingested=20 * S)  # ends 110 ms before epoch 2
    assert stale_epochs(SETTINGS, marks, [late]) == {1 * S: 2 * S, 2 * S: 3 * S}
    ok, waiting = sealable(SETTINGS, [sql.SealCandidate("r", late.released_ns, late.done_ns, 20 * S)], marks, {})
    assert waiting == {"r"} and not ok
    # once the stale epochs are redone (after the row arrived), the request is sealed
    redone = [e._replace(attributed_at_ns=21 * S) if e.epoch_start_ns in (1 * S, 2 * S) else e for e in marks]
    ok, waiting = sealable(SETTINGS, [sql.SealCandidate("r", late.released_ns, late.done_ns, 20 * S)], redone, {})
    assert ok == {"r"} and not waiting


@given(
    st.integers(0, 7_999),  # released, ms
    st.integers(0, 3_000),  # duration, ms
    st.lists(st.integers(0, 300), min_size=10, max_size=10),  # how far each epoch's last reading lies past its end
    st.lists(st.booleans(), min_size=10, max_size=10),  # whether each epoch was attributed before the row arrived
)
def test_redoing_the_stale_epochs_always_lets_the_row_be_sealed(
    released_ms: int, duration_ms: int, tails_ms: list[int], before: list[bool]
) -> None:
    ingested = 50 * S
    marks = epochs(10, [ingested - S if b else ingested + S for b in before], [t * MS for t in tails_ms])
    released = released_ms * MS
    done = min(released + duration_ms * MS, 10 * S - 1)
    stale = stale_epochs(SETTINGS, marks, [row(released, done, ingested)])
    redone = [e._replace(attributed_at_ns=ingested + 2 * S) if e.epoch_start_ns in stale else e for e in marks]
    ok, _ = sealable(SETTINGS, [sql.SealCandidate("r", released, done, ingested)], redone, {})
    assert ok == {"r"}, (stale, marks)
