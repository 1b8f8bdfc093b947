"""meter.engine.calibrate: the lag and the class powers come back from a counter whose board follows the model; the
engine uses them, recomputes what it attributed before they settled, and still conserves every millijoule."""

from __future__ import annotations

import random

import pytest
import sqlalchemy as sa

from meter.attribution import CounterReading
from meter.engine import attributed_until, expected_usage, usage_table
from meter.engine.calibrate import ClassTimeline, LagCalibrator, solve_least_squares
from meter.timeline import Timeline
from tests.engine_helpers import MS, T0, S, make_engine, rows, timeline, write

IDLE_W, PREFILL_W, ACTIVE_W = 80.0, 620.0, 260.0
TOKENS_PER_S, OVERHEAD_NS, TOLERANCE_NS = 20_000.0, 5 * MS, 2 * MS


def _traffic(seconds: int, seed: int = 3) -> list[tuple[int, int, int, int]]:
    """(released, first_token, done, prompt_tokens): bursts of 1-4 requests prefilled together, then decoding."""
    rnd = random.Random(seed)
    out = []
    t = T0 + 200 * MS
    while t < T0 + seconds * S:
        n = rnd.randint(1, 4)
        prompts = [rnd.randint(50, 800) for _ in range(n)]
        step_ns = OVERHEAD_NS + round(sum(prompts) * 1e9 / TOKENS_PER_S)
        released = t
        first = released + rnd.randint(0, 20) * MS + step_ns
        for p in prompts:
            out.append((released, first, first + rnd.randint(50, 900) * MS, p))
        t = first + rnd.choice([rnd.randint(0, 100), rnd.randint(300, 1500)]) * MS
    return out


def _energy_mj(classes: ClassTimeline, t_ns: int) -> float:
    prefill, active, idle = classes.durations(T0, t_ns)
    return (PREFILL_W * prefill + ACTIVE_W * active + IDLE_W * idle) * 1e-6


def _readings(classes: ClassTimeline, seconds: int, lag_ns: int, quantum_ns: int | None = None) -> list[CounterReading]:
    """A reading every 100 ms (plus 7 ms): the energy up to t - lag, or, with ``quantum_ns``, up to the last multiple
    of the quantum before t - lag (a counter that updates every 100 ms, like NVML's), in whole mJ."""
    out = []
    for k in range(1, seconds * 10):
        t = T0 + k * 100 * MS + 7 * MS
        upto = t - lag_ns
        if quantum_ns:
            upto -= upto % quantum_ns
        out.append(CounterReading(t, int(_energy_mj(classes, upto))))
    return out


def _classes(traffic: list[tuple[int, int, int, int]]) -> ClassTimeline:
    return ClassTimeline(traffic, TOKENS_PER_S, OVERHEAD_NS, TOLERANCE_NS)


def test_solve_least_squares_on_a_subset_of_columns() -> None:
    # y = 2 a + 3 b exactly, over four points; the third column is left out.
    xs = [(1.0, 0.0, 5.0), (0.0, 1.0, 1.0), (1.0, 1.0, 0.0), (2.0, 1.0, 3.0)]
    xx = [sum(x[i] * x[j] for x in xs) for i in range(3) for j in range(3)]
    xy = [sum(x[i] * (2 * x[0] + 3 * x[1]) for x in xs) for i in range(3)]
    assert solve_least_squares(xx, xy, [0, 1]) == pytest.approx([2.0, 3.0])
    assert solve_least_squares([0.0] * 9, [0.0] * 3, [0, 1]) is None  # singular


def test_class_timeline_follows_the_attribution_precedence() -> None:
    # A prefills 10 ms (5 ms + 100 tokens at 20k tok/s) ending at 100 ms, then decodes to 300 ms; B waits from 150 ms
    # for its prefill step, 200-210 ms (which outranks A's decode).
    classes = ClassTimeline(
        [(40 * MS, 100 * MS, 300 * MS, 100), (150 * MS, 210 * MS, 400 * MS, 100)], TOKENS_PER_S, OVERHEAD_NS, 0
    )
    assert classes.durations(0, 100 * MS) == (10 * MS, 50 * MS, 40 * MS)  # A waits 40-90 ms, prefills 90-100 ms
    assert classes.durations(190 * MS, 220 * MS) == (10 * MS, 20 * MS, 0)
    assert classes.durations(400 * MS, 500 * MS) == (0, 0, 100 * MS)


@pytest.mark.parametrize("lag_ms", [0, 70, 160])
def test_the_lag_and_the_powers_come_back(lag_ms: int) -> None:
    traffic = _traffic(20)
    classes = _classes(traffic)
    cal = LagCalibrator(tuple(range(0, 301 * MS, 10 * MS)))
    model = cal.add([_readings(classes, 20, lag_ms * MS)], classes)
    assert model is not None
    assert model.lag_ns == lag_ms * MS
    assert model.prefill_w == pytest.approx(PREFILL_W, rel=0.02)
    assert model.active_w == pytest.approx(ACTIVE_W, rel=0.02)
    assert model.idle_w == pytest.approx(IDLE_W, rel=0.05)
    # Given the idle floor, only the two active powers are fitted: the same answer.
    again = LagCalibrator(tuple(range(0, 301 * MS, 10 * MS))).add([_readings(classes, 20, lag_ms * MS)], classes, 80.0)
    assert again is not None and again.lag_ns == lag_ms * MS and again.prefill_w == pytest.approx(PREFILL_W, rel=0.02)


def test_class_timeline_integrates_the_prompt_tokens_of_the_steps_running() -> None:
    # A (100 tokens) prefills 90-100 ms; B (300 tokens) and C (100 tokens) share one step of 400 tokens, 205-230 ms.
    classes = ClassTimeline(
        [(40 * MS, 100 * MS, 300 * MS, 100), (150 * MS, 230 * MS, 400 * MS, 300), (150 * MS, 230 * MS, 400 * MS, 100)],
        TOKENS_PER_S, OVERHEAD_NS, 0,
    )  # fmt: skip
    assert classes.prefill_token_ns(0, 100 * MS) == 100 * 10 * MS
    assert classes.prefill_token_ns(95 * MS, 210 * MS) == 100 * 5 * MS + 400 * 5 * MS
    assert classes.prefill_token_ns(0, 500 * MS) == 100 * 10 * MS + 400 * 25 * MS
    assert classes.prefill_token_ns(300 * MS, 500 * MS) == 0


PREFILL_AT_NO_TOKENS_W, PREFILL_W_PER_1K = 350.0, 100.0


def _token_energy_mj(classes: ClassTimeline, t_ns: int) -> float:
    """A board whose prefill power rises with the step's tokens: 350 W + 100 W per 1,000 tokens."""
    prefill, active, idle = classes.durations(T0, t_ns)
    k_tokens_ns = classes.prefill_token_ns(T0, t_ns) / 1000
    return (PREFILL_AT_NO_TOKENS_W * prefill + PREFILL_W_PER_1K * k_tokens_ns + ACTIVE_W * active
            + IDLE_W * idle) * 1e-6  # fmt: skip


@pytest.mark.parametrize("idle_w", [None, IDLE_W])
def test_prefill_power_rising_with_the_steps_tokens_comes_back(idle_w: float | None) -> None:
    classes = _classes(_traffic(30, seed=9))
    readings = [CounterReading(t, int(_token_energy_mj(classes, t - 60 * MS)))
                for t in range(T0 + 107 * MS, T0 + 30 * S, 100 * MS)]  # fmt: skip
    model = LagCalibrator(tuple(range(0, 201 * MS, 10 * MS))).add([readings], classes, idle_w)
    assert model is not None and model.lag_ns == 60 * MS
    assert model.prefill_w_per_1k_tokens == pytest.approx(PREFILL_W_PER_1K, rel=0.03)
    assert model.prefill_ratio_at_no_tokens == pytest.approx(PREFILL_AT_NO_TOKENS_W / ACTIVE_W, rel=0.03)
    assert model.prefill_ratio_per_1k_tokens == pytest.approx(PREFILL_W_PER_1K / ACTIVE_W, rel=0.03)
    # prefill_w is a step of the mean size, so the flat ratio stays a fair summary for whoever uses only it.
    assert model.prefill_w == pytest.approx(
        PREFILL_AT_NO_TOKENS_W + PREFILL_W_PER_1K * model.prefill_mean_tokens / 1000
    )
    assert 500 < model.prefill_mean_tokens < 2500


def test_flat_prefill_power_gets_no_token_term() -> None:
    """Under a flat prefill power the token term is left out (what it fits is immaterial, or not positive), and with
    a counter that updates every 100 ms (which misplaces steps) too; steps all of one size leave it out (it cannot be
    told from the flat power)."""
    classes = _classes(_traffic(20))
    for readings in (_readings(classes, 20, 70 * MS), _readings(classes, 20, 40 * MS, 100 * MS)):
        model = LagCalibrator(tuple(range(0, 301 * MS, 10 * MS))).add([readings], classes)
        assert model is not None and model.prefill_w_per_1k_tokens == 0.0
    firsts = {r: (r, f, d, 400) for r, f, d, _p in reversed(_traffic(20, seed=4))}  # one 400-token request a step
    one_size = _classes(list(firsts.values()))
    model = LagCalibrator(tuple(range(0, 301 * MS, 10 * MS))).add([_readings(one_size, 20, 70 * MS)], one_size)
    assert model is not None and model.prefill_w_per_1k_tokens == 0.0 and model.prefill_mean_tokens == 0.0
    assert model.prefill_ratio_at_no_tokens == model.prefill_power_ratio


def test_a_counter_that_updates_every_100_ms_is_read_with_its_phase_as_lag() -> None:
    traffic = _traffic(30, seed=5)
    classes = _classes(traffic)
    # Updates on multiples of 100 ms, reads at +7 ms: a read shows the update of 7 ms ago, plus a 40 ms delay.
    model = LagCalibrator(tuple(range(0, 301 * MS, 10 * MS))).add([_readings(classes, 30, 40 * MS, 100 * MS)], classes)
    assert model is not None
    assert abs(model.lag_ns - (40 + 7 + 50) * MS) <= 50 * MS  # within half an update of the middle of the step
    assert model.prefill_power_ratio == pytest.approx(PREFILL_W / ACTIVE_W, rel=0.15)


def test_too_little_data_or_no_prefill_gives_no_model() -> None:
    traffic = _traffic(20)
    classes = _classes(traffic)
    assert LagCalibrator((0, 10 * MS)).add([_readings(classes, 3, 0)], classes) is None  # 29 intervals
    decode_only = ClassTimeline([(T0, None, T0 + 15 * S, 0)], TOKENS_PER_S, OVERHEAD_NS, TOLERANCE_NS)
    assert LagCalibrator((0, 10 * MS)).add([_readings(decode_only, 20, 0)], decode_only) is None


def test_engine_calibrates_recomputes_and_still_conserves(db: sa.Engine) -> None:
    traffic = _traffic(40, seed=11)
    classes = _classes(traffic)
    timelines = [timeline(f"r{i}", r, f, d, prompt=p) for i, (r, f, d, p) in enumerate(traffic)]
    samples = [("gpu0", r.t_ns, r.energy_mj, None) for r in _readings(classes, 40, 120 * MS)]
    write(db, timelines=timelines, samples=samples, ingested_ns=T0 + 40 * S)

    eng = make_engine(db, epoch_ns=2 * S, lag_ns=50 * MS, calibrate=True)
    first = eng.run_once(now_ns=T0 + 50 * S)
    model = eng.stats.calibration["b1"]
    assert model is not None and model.lag_ns == 120 * MS
    second = eng.run_once(now_ns=T0 + 51 * S)  # the epochs attributed before the model settled are redone
    assert first.attributed and second.recomputed and not second.attributed
    assert eng.run_once(now_ns=T0 + 52 * S).recomputed == []

    for e in rows(db, "SELECT * FROM backend_epochs"):
        assert e.counter_mj == e.prefill_mj + e.decode_mj + e.idle_mj
    with db.connect() as conn:
        assert usage_table(conn) == expected_usage(conn)
        until = attributed_until(conn, "b1")
        assert until is not None
        assert sum(v[0] for v in usage_table(conn).values()) == sum(1 for t in timelines if t.done_ns < until)


def _write_switching(
    db: sa.Engine, classes: ClassTimeline, timelines: list[Timeline], switch: int, lo_s: int, hi_s: int
) -> None:
    """Write the timelines released in [lo_s, hi_s) s and a reading every 100 ms of that span, of a counter that lags
    120 ms before ``switch`` and 30 ms from it (another model's board)."""
    ts = [T0 + k * 100 * MS + 7 * MS for k in range(lo_s * 10 + 1, hi_s * 10)]
    samples = [("gpu0", t, int(_energy_mj(classes, t - (120 * MS if t < switch else 30 * MS))), None) for t in ts]
    done = [t for t in timelines if T0 + lo_s * S <= t.released_ns < T0 + hi_s * S]  # type: ignore[operator]
    write(db, timelines=done, samples=samples, ingested_ns=T0 + hi_s * S)


def test_a_calibration_that_moves_never_changes_a_final_figure(db: sa.Engine) -> None:
    """Two traffic phases whose counters lag differently (120 ms, then 30 ms): the fit settles, the first phase's
    requests become final, then the fit moves and the engine redoes its recent epochs. Every figure that was final
    before is identical after; what the new model would have moved is booked to the epochs' adjustment, and every
    epoch still balances to the mJ. Requests not final yet take the new model."""
    traffic = _traffic(80, seed=7)
    classes = _classes(traffic)
    timelines = [timeline(f"r{i:03d}", r, f, d, prompt=p) for i, (r, f, d, p) in enumerate(traffic)]
    switch = T0 + 40 * S

    def phase(lo_s: int, hi_s: int) -> None:
        _write_switching(db, classes, timelines, switch, lo_s, hi_s)

    def finals() -> dict[str, tuple[int, ...]]:
        got = rows(db, "SELECT request_id, prefill_mj, decode_mj, idle_time_mj, idle_tokens_mj FROM request_seals")
        q = (
            "SELECT request_id, SUM(prefill_mj), SUM(decode_mj), SUM(idle_time_mj), SUM(idle_tokens_mj) "
            "FROM request_energy GROUP BY request_id"
        )
        sums = {r[0]: tuple(r[1:]) for r in rows(db, q)}
        out = {r[0]: tuple(r[1:]) for r in got}
        assert all(sums[k] == v for k, v in out.items())  # the seal is what its rows hold
        return out

    eng = make_engine(db, epoch_ns=2 * S, lag_ns=50 * MS, calibrate=True, calibration_refresh_ns=2 * S, idle_power=80.0)
    phase(0, 40)
    for k in range(4):
        eng.run_once(now_ns=T0 + (41 + k) * S)
    model = eng.stats.calibration["b1"]
    assert model is not None and model.lag_ns == 120 * MS
    before = finals()
    assert len(before) > 20

    phase(40, 80)
    recomputed: list[int] = []
    for k in range(8):
        recomputed += [s for _b, s in eng.run_once(now_ns=T0 + (81 + k) * S).recomputed]
    moved = eng.stats.calibration["b1"]
    assert moved is not None and moved.lag_ns <= 100 * MS  # the fit moved (towards 30 ms: the pool mixes both)...
    assert any(s < switch for s in recomputed)  # ...and redid epochs that hold final requests
    after = finals()
    assert {k: after[k] for k in before} == before
    assert len(after) > len(before)
    adjusted = rows(db, "SELECT COUNT(*), SUM(adjustment_mj) FROM backend_epochs WHERE adjustment_mj <> 0")[0]
    assert adjusted[0] > 0 and eng.stats.adjustment_mj == adjusted[1] and eng.stats.adjusted_epochs >= adjusted[0]
    for e in rows(db, "SELECT * FROM backend_epochs"):
        assert e.counter_mj == e.prefill_mj + e.decode_mj + e.idle_mj + e.adjustment_mj
    with db.connect() as conn:
        assert usage_table(conn) == expected_usage(conn)


def test_a_batch_another_meter_wrote_first_feeds_the_calibration_once(db: sa.Engine) -> None:
    """Two meters claim one backend. The second plans the epochs the first has just written: its batch write fails
    (IntegrityError) and it redoes them one by one. What it learned from the failed batch must not count: each epoch
    feeds its calibration once, so both meters end with the same pool. Two epochs of 2 s hold fewer intervals than a
    fit needs (the calibration is still warming, so every epoch is due to feed it): counted twice, they would fit."""
    seconds = 5
    traffic = _traffic(seconds, seed=11)
    classes = _classes(traffic)
    timelines = [timeline(f"r{i}", r, f, d, prompt=p) for i, (r, f, d, p) in enumerate(traffic)]
    samples = [("gpu0", r.t_ns, r.energy_mj, None) for r in _readings(classes, seconds, 120 * MS)]
    write(db, timelines=timelines, samples=samples, ingested_ns=T0 + seconds * S)
    knobs = {"epoch_ns": 2 * S, "lag_ns": 50 * MS, "calibrate": True}
    first, second = make_engine(db, **knobs), make_engine(db, **knobs)

    assert second.run_once(now_ns=T0).attributed == []  # loads its state: nothing attributed, nothing due yet
    done = first.run_once(now_ns=T0 + 10 * S).attributed
    assert len(done) == 2
    redone = second.run_once(now_ns=T0 + 10 * S).attributed  # the batch conflicts; epoch by epoch instead
    assert redone == done

    assert first.stats.calibration["b1"] is None  # too few intervals yet...
    assert second.stats.calibration["b1"] is None  # ...for the second meter too: it did not count them twice
    assert second.stats.calibration_intervals == first.stats.calibration_intervals
    assert 0 < first.stats.calibration_intervals["b1"] < 50
    for e in rows(db, "SELECT * FROM backend_epochs"):
        assert e.counter_mj == e.prefill_mj + e.decode_mj + e.idle_mj + e.adjustment_mj
    with db.connect() as conn:
        assert usage_table(conn) == expected_usage(conn)


# The seal tests below fit within a few seconds of traffic: no request of theirs is abandoned, so no abandoned step's
# tail (2 s by default) need widen the seal margin past those seconds.
NO_TAIL = {"abandoned_step_max_ns": 0}


def _warm_then_fit(db: sa.Engine, hold_ns: int) -> tuple[int, list[int]]:
    """Four seconds of traffic whose counter lags 120 ms (the configuration guesses 50 ms), too few readings to fit,
    attributed; then 36 s more, enough for the fit to settle. Returns the seals after the first part and every
    epoch's adjustment at the end."""
    traffic = _traffic(40, seed=11)
    classes = _classes(traffic)
    timelines = [timeline(f"r{i}", r, f, d, prompt=p) for i, (r, f, d, p) in enumerate(traffic)]
    readings = _readings(classes, 40, 120 * MS)
    early = [t for t in timelines if t.done_ns < T0 + 4 * S]
    first = [("gpu0", r.t_ns, r.energy_mj, None) for r in readings if r.t_ns < T0 + 5 * S]
    write(db, timelines=early, samples=first, ingested_ns=T0 + 5 * S)
    eng = make_engine(db, epoch_ns=1 * S, lag_ns=50 * MS, calibrate=True, uncalibrated_seal_hold_ns=hold_ns, **NO_TAIL)
    eng.run_once(now_ns=T0 + 10 * S)
    assert eng.stats.calibration["b1"] is None  # too few intervals to fit
    with db.connect() as conn:
        until = attributed_until(conn, "b1")
    assert until is not None and any(t.done_ns < until - eng.settings.seal_margin_ns for t in early)
    sealed_early = rows(db, "SELECT COUNT(*) FROM request_seals")[0][0]

    rest = [("gpu0", r.t_ns, r.energy_mj, None) for r in readings if r.t_ns >= T0 + 5 * S]
    write(db, timelines=[t for t in timelines if t not in early], samples=rest, ingested_ns=T0 + 40 * S)
    for k in range(4):
        eng.run_once(now_ns=T0 + (50 + k) * S)
    model = eng.stats.calibration["b1"]
    assert model is not None and model.lag_ns == 120 * MS
    assert rows(db, "SELECT COUNT(*) FROM request_seals")[0][0] > len(early)
    epochs = rows(db, "SELECT * FROM backend_epochs")
    for e in epochs:
        assert e.counter_mj == e.prefill_mj + e.decode_mj + e.idle_mj + e.adjustment_mj
    return sealed_early, [e.adjustment_mj for e in epochs]


def test_no_figure_is_sealed_with_the_configured_guess_while_the_fit_warms(db: sa.Engine) -> None:
    """The first seconds are attributed under the configured guess, but nothing is sealed, although those requests
    are past the seal margin. Once the fit settles, the epochs are redone and then sealed: every final figure is the
    calibrated one, so no recompute ever had to book a sealed request's difference to an adjustment."""
    sealed_early, adjustments = _warm_then_fit(db, hold_ns=3600 * S)
    assert sealed_early == 0
    assert all(a == 0 for a in adjustments)


def test_without_the_hold_the_guess_seals_and_the_fit_books_an_adjustment(db: sa.Engine) -> None:
    """The control of the test above: what the hold prevents does happen without it."""
    sealed_early, adjustments = _warm_then_fit(db, hold_ns=0)
    assert sealed_early > 0
    assert any(a != 0 for a in adjustments)


def test_a_fit_that_never_comes_seals_the_guess_after_the_hold(db: sa.Engine) -> None:
    """No prefill at all: nothing to fit the prefill power by, so no model ever settles. Requests are still sealed,
    with the configured guess, once they ended the hold before the attribution's end, and not before."""
    timelines = [timeline(f"d{i}", T0 + i * S, None, T0 + i * S + 500 * MS, prompt=0) for i in range(30)]
    samples = [("gpu0", T0 + k * 100 * MS + 7 * MS, 30 * k, None) for k in range(1, 300)]
    write(db, timelines=timelines, samples=samples, ingested_ns=T0 + 30 * S)
    hold = 10 * S
    eng = make_engine(db, epoch_ns=1 * S, lag_ns=50 * MS, calibrate=True, uncalibrated_seal_hold_ns=hold)
    eng.run_once(now_ns=T0 + 40 * S)
    assert eng.stats.calibration["b1"] is None
    with db.connect() as conn:
        until = attributed_until(conn, "b1")
    assert until is not None
    margin = eng.settings.seal_margin_ns
    done = [int(r[0]) for r in rows(db, "SELECT r.done_ns FROM request_seals s JOIN requests r USING (request_id)")]
    assert done and max(done) < until - hold
    assert any(until - hold <= t.done_ns < until - margin for t in timelines)


@pytest.mark.parametrize("hold", [True, False])
def test_a_restarted_meter_seals_nothing_with_the_stored_fit(db: sa.Engine, hold: bool) -> None:
    """Meter A fits the counter's 120 ms lag over 40 s and stores the fit. Then the backend keeps its name and its
    GPU but serves another model, whose counter lags 30 ms, and meter B starts afresh on the database (a restart, or a
    meter taking the backend over). B attributes the first 4 s of it with the stored fit (not the configured 50 ms
    guess), but seals none of those requests although they are past the seal margin: the fit was made on what the
    GPU served before. Once B's own fit settles (30 ms), the epochs are redone and sealed: every final figure is the
    new model's, and no epoch books an adjustment. The control (``hold`` off) shows what the hold prevents: the
    stored fit seals, and the epochs it sealed book what B's own fit would have moved."""
    traffic = _traffic(80, seed=7)
    classes = _classes(traffic)
    timelines = [timeline(f"r{i:03d}", r, f, d, prompt=p) for i, (r, f, d, p) in enumerate(traffic)]
    switch = T0 + 40 * S

    def phase(lo_s: int, hi_s: int) -> None:
        _write_switching(db, classes, timelines, switch, lo_s, hi_s)

    knobs: dict[str, object] = {
        "epoch_ns": 1 * S,
        "lag_ns": 50 * MS,
        "calibrate": True,
        "idle_power": IDLE_W,
        "calibration_refresh_ns": 2 * S,
        "uncalibrated_seal_hold_ns": 3600 * S if hold else 0,
        **NO_TAIL,
    }
    phase(0, 40)
    a = make_engine(db, **knobs)
    for k in range(4):
        a.run_once(now_ns=T0 + (41 + k) * S)
    fitted = a.stats.calibration["b1"]
    assert fitted is not None and fitted.lag_ns == 120 * MS
    assert rows(db, "SELECT lag_ns FROM backend_calibrations WHERE backend = 'b1'")[0][0] == 120 * MS
    sealed_by_a = {r[0] for r in rows(db, "SELECT request_id FROM request_seals")}
    assert sealed_by_a

    phase(40, 44)
    b = make_engine(db, **knobs)
    b.run_once(now_ns=T0 + 50 * S)
    assert b.stats.calibration["b1"] == fitted  # it attributes with the stored fit, read back whole...
    assert b.stats.calibration_intervals["b1"] < fitted.intervals  # ...its own pool being far from a fit
    with db.connect() as conn:
        until = attributed_until(conn, "b1")
    assert until is not None and until >= T0 + 43 * S
    margin = b.settings.seal_margin_ns
    due = {t.request_id for t in timelines if switch <= t.done_ns < until - margin}  # type: ignore[operator]
    assert due
    sealed_early = {r[0] for r in rows(db, "SELECT request_id FROM request_seals")} - sealed_by_a
    assert (sealed_early & due) == (set() if hold else due)

    phase(44, 80)
    for k in range(8):
        b.run_once(now_ns=T0 + (81 + k) * S)
    own = b.stats.calibration["b1"]
    assert own is not None and own.lag_ns == 30 * MS
    sealed = {r[0] for r in rows(db, "SELECT request_id FROM request_seals")}
    assert due <= sealed
    epochs = rows(db, "SELECT * FROM backend_epochs")
    for e in epochs:
        assert e.counter_mj == e.prefill_mj + e.decode_mj + e.idle_mj + e.adjustment_mj
    moved = [e.adjustment_mj for e in epochs if e.adjustment_mj != 0]
    assert (moved == []) if hold else moved
    with db.connect() as conn:
        assert usage_table(conn) == expected_usage(conn)


@pytest.mark.parametrize("change", ["model", "weights", "unseen"])
def test_a_backend_given_to_another_model_seals_nothing_with_the_old_fit(db: sa.Engine, change: str) -> None:
    """One meter runs on. For 40 s the backend serves model m-a, whose counter lags 120 ms: the fit settles and
    requests are sealed. Then the configuration gives the backend to model m-b (its server restarted with other
    weights), whose counter lags 30 ms. The first request for m-b starts the fit over: nothing is sealed with m-a's
    fit, although past the margin, until the new fit settles (30 ms); then the epochs since the change are redone and
    sealed, and no epoch books an adjustment. ``weights``: the same model name, new weights under it, which the
    backend says (``meter.weights``): the same. The control (``unseen``: new weights nobody says) seals them with the
    old fit, past the margin."""
    reassigned = change != "unseen"
    traffic = _traffic(80, seed=7)
    classes = _classes(traffic)
    switch = T0 + 40 * S
    second = "m-b" if change == "model" else "m-a"
    timelines = [
        timeline(f"r{i:03d}", r, f, d, prompt=p, model="m-a" if r < switch else second)
        for i, (r, f, d, p) in enumerate(traffic)
    ]

    def phase(lo_s: int, hi_s: int) -> None:
        _write_switching(db, classes, timelines, switch, lo_s, hi_s)

    def weights(backend: str, t_ns: int) -> str | None:  # what the backend says it serves (meter.weights)
        return None if change != "weights" else "tgi:m-a@old" if t_ns < switch else "tgi:m-a@new"

    eng = make_engine(db, weights=weights, epoch_ns=1 * S, lag_ns=50 * MS, calibrate=True, idle_power=IDLE_W,
                      calibration_refresh_ns=2 * S, uncalibrated_seal_hold_ns=3600 * S, **NO_TAIL)  # fmt: skip
    phase(0, 40)
    for k in range(4):
        eng.run_once(now_ns=T0 + (41 + k) * S)
    old = eng.stats.calibration["b1"]
    assert old is not None and old.lag_ns == 120 * MS
    sealed_before = {r[0] for r in rows(db, "SELECT request_id FROM request_seals")}
    assert sealed_before

    phase(40, 44)
    eng.run_once(now_ns=T0 + 50 * S)
    with db.connect() as conn:
        until = attributed_until(conn, "b1")
    assert until is not None and until >= T0 + 43 * S
    margin = eng.settings.seal_margin_ns
    due = {t.request_id for t in timelines if switch <= t.done_ns < until - margin}  # type: ignore[operator]
    assert due
    sealed_early = {r[0] for r in rows(db, "SELECT request_id FROM request_seals")} - sealed_before
    assert (sealed_early & due) == (set() if reassigned else due)

    phase(44, 80)
    for k in range(8):
        eng.run_once(now_ns=T0 + (81 + k) * S)
    new = eng.stats.calibration["b1"]
    assert new is not None  # the new model's lag alone, or (the control) moving towards it from a mixed pool
    assert new.lag_ns == 30 * MS if reassigned else 30 * MS <= new.lag_ns <= 100 * MS
    assert due <= {r[0] for r in rows(db, "SELECT request_id FROM request_seals")}
    epochs = rows(db, "SELECT * FROM backend_epochs")
    for e in epochs:
        assert e.counter_mj == e.prefill_mj + e.decode_mj + e.idle_mj + e.adjustment_mj
    if reassigned:  # every figure since the change was sealed under the new fit: nothing left to book
        assert all(e.adjustment_mj == 0 for e in epochs)
    with db.connect() as conn:
        assert usage_table(conn) == expected_usage(conn)


def test_a_stored_fit_is_not_reused_on_other_gpus(db: sa.Engine) -> None:
    """The backend's name now points at other GPUs (a Kubernetes service moved to another node, a host whose cards
    were swapped): the fit stored for its old GPUs says nothing about these. A meter that starts on them attributes
    with the configured guess and holds its seals until its own fit settles, as with nothing stored; a meter on the
    GPUs the fit was made on starts from it (the test above)."""
    traffic = _traffic(40, seed=11)
    classes = _classes(traffic)
    timelines = [timeline(f"r{i}", r, f, d, prompt=p) for i, (r, f, d, p) in enumerate(traffic)]
    readings = _readings(classes, 40, 120 * MS)
    hold = 3600 * S
    knobs: dict[str, object] = {"epoch_ns": 1 * S, "lag_ns": 50 * MS, "calibrate": True}

    first = [t for t in timelines if t.done_ns < T0 + 20 * S]
    on_gpu0 = [("gpu0", r.t_ns, r.energy_mj, None) for r in readings if r.t_ns < T0 + 21 * S]
    write(db, timelines=first, samples=on_gpu0, ingested_ns=T0 + 21 * S)
    a = make_engine(db, uncalibrated_seal_hold_ns=hold, **knobs)
    for k in range(4):
        a.run_once(now_ns=T0 + (25 + k) * S)
    fitted = a.stats.calibration["b1"]
    assert fitted is not None and rows(db, "SELECT COUNT(*) FROM backend_calibrations")[0][0] == 1

    later = [t for t in timelines if T0 + 20 * S <= t.done_ns < T0 + 24 * S]
    on_gpu1 = [("gpu1", r.t_ns, r.energy_mj, None) for r in readings if T0 + 21 * S <= r.t_ns < T0 + 25 * S]
    write(db, timelines=later, samples=on_gpu1, ingested_ns=T0 + 30 * S)
    sealed_before = {r[0] for r in rows(db, "SELECT request_id FROM request_seals")}
    b = make_engine(db, {"b1": ("gpu1",)}, uncalibrated_seal_hold_ns=hold, **knobs)
    b.run_once(now_ns=T0 + 35 * S)
    assert b.stats.calibration["b1"] is None  # not the stored fit: it was made on gpu0
    with db.connect() as conn:
        until = attributed_until(conn, "b1")
    assert until is not None and until >= T0 + 23 * S  # it did attribute the new GPU's epochs
    sealed = {r[0] for r in rows(db, "SELECT request_id FROM request_seals")} - sealed_before
    assert not sealed & {t.request_id for t in later}  # held, as a meter with nothing stored holds them
    # and the stored fit is still gpu0's: a meter back on gpu0 starts from it
    c = make_engine(db, uncalibrated_seal_hold_ns=hold, **knobs)
    c.run_once(now_ns=T0 + 36 * S)
    assert c.stats.calibration["b1"] == fitted


def test_a_pooled_epoch_is_pooled_again_when_a_late_row_recomputes_it() -> None:
    """The calibrator keeps one entry per epoch it was fed: feeding an epoch it already holds replaces that entry
    (the epoch's rows as they are now), it does not add a second."""
    traffic = _traffic(20, seed=6)
    whole = _classes(traffic)
    part = _classes([x for x in traffic if not T0 + 5 * S <= x[0] < T0 + 9 * S])  # what arrived on time
    readings = _readings(whole, 20, 90 * MS)
    first, second = [r for r in readings if r.t_ns < T0 + 10 * S], [r for r in readings if r.t_ns >= T0 + 10 * S]
    lags = tuple(range(0, 201 * MS, 10 * MS))
    on_time = LagCalibrator(lags)
    on_time.add([first], whole, start_ns=T0)
    expected = on_time.add([second], whole, start_ns=T0 + 10 * S)
    late = LagCalibrator(lags)
    late.add([first], part, start_ns=T0)
    skewed = late.add([second], whole, start_ns=T0 + 10 * S)
    assert skewed != expected  # the missing rows moved the fit (or refused it)
    again = late.add([first], whole, start_ns=T0)
    assert again == expected and late.intervals == on_time.intervals


def test_a_late_timeline_is_learned_from_when_its_epoch_is_recomputed(db: sa.Engine, tmp_path) -> None:
    """Timelines of 6 s of traffic reach the database after their epochs were attributed and fed to the calibrator
    (a gateway replica journaled through an outage). The recompute that gives them their energy also pools those
    epochs again with them: the fit ends as it would have, had they come on time, not skewed by 6 s of a busy
    counter with no requests to explain it."""
    from meter.store import make_engine as db_engine
    from meter.store import upgrade

    traffic = _traffic(30, seed=13)
    classes = _classes(traffic)
    timelines = [timeline(f"r{i}", r, f, d, prompt=p) for i, (r, f, d, p) in enumerate(traffic)]
    samples = [("gpu0", r.t_ns, r.energy_mj, None) for r in _readings(classes, 30, 120 * MS)]
    knobs: dict[str, object] = {
        "epoch_ns": 1 * S,
        "lag_ns": 50 * MS,
        "calibrate": True,
        "calibration_refresh_ns": 1 * S,  # every epoch is pooled
        "idle_power": IDLE_W,
    }
    late = {t.request_id for t in timelines if T0 + 12 * S <= t.released_ns < T0 + 18 * S}

    ref_url = f"sqlite:///{tmp_path / 'on_time.db'}"
    upgrade(ref_url)
    ref_db = db_engine(ref_url)
    write(ref_db, timelines=timelines, samples=samples, ingested_ns=T0 + 31 * S)
    ref = make_engine(ref_db, **knobs)
    ref.run_once(now_ns=T0 + 40 * S)
    expected = ref.stats.calibration["b1"]
    ref_db.dispose()
    assert expected is not None and expected.lag_ns == 120 * MS

    write(db, timelines=[t for t in timelines if t.request_id not in late], samples=samples, ingested_ns=T0 + 31 * S)
    eng = make_engine(db, **knobs)
    eng.run_once(now_ns=T0 + 40 * S)
    assert eng.stats.calibration["b1"] != expected  # skewed by the missing rows
    write(db, timelines=[t for t in timelines if t.request_id in late], ingested_ns=T0 + 41 * S)
    for k in range(3):
        eng.run_once(now_ns=T0 + (45 + k) * S)
    assert eng.stats.epochs_recomputed > 0
    got = eng.stats.calibration["b1"]
    assert got is not None and got.lag_ns == expected.lag_ns
    assert got.prefill_w == pytest.approx(expected.prefill_w, rel=1e-9)
    assert got.active_w == pytest.approx(expected.active_w, rel=1e-9)


def test_a_refused_refit_keeps_the_last_fit_not_the_guess(db: sa.Engine) -> None:
    """After 20 s that fit (lag 120 ms), 40 s of long decodes with hardly any prefill: the refits over the recent
    epochs are refused (too little prefill time to measure), so the calibrator itself holds no fit. The engine keeps
    attributing with the last settled fit, not the configured 50 ms guess."""
    traffic = _traffic(20, seed=11)
    decodes = [(T0 + (21 + 5 * k) * S, T0 + (21 + 5 * k) * S + 6 * MS, T0 + (25 + 5 * k) * S, 1) for k in range(8)]
    classes = _classes(traffic + decodes)
    timelines = [timeline(f"r{i}", r, f, d, prompt=p) for i, (r, f, d, p) in enumerate(traffic + decodes)]
    readings = [("gpu0", r.t_ns, r.energy_mj, None) for r in _readings(classes, 62, 120 * MS)]
    early = timelines[: len(traffic)]
    write(db, timelines=early, samples=[x for x in readings if x[1] < T0 + 21 * S], ingested_ns=T0 + 21 * S)
    eng = make_engine(db, epoch_ns=1 * S, lag_ns=50 * MS, calibrate=True, calibration_refresh_ns=1 * S)
    for k in range(3):
        eng.run_once(now_ns=T0 + (25 + k) * S)
    fitted = eng.stats.calibration["b1"]
    assert fitted is not None and fitted.lag_ns == 120 * MS
    later = timelines[len(traffic) :]
    write(db, timelines=later, samples=[x for x in readings if x[1] >= T0 + 21 * S], ingested_ns=T0 + 62 * S)
    for k in range(6):
        eng.run_once(now_ns=T0 + (70 + k) * S)
    learning = eng._backends["b1"].learning  # what the calibrator itself holds
    assert learning.fitted is None  # the refits over the decode-only epochs were refused
    model = eng.stats.calibration["b1"]
    assert model is not None and model is learning.last_fit and model.lag_ns == 120 * MS  # the last one that settled


def test_a_fit_refused_past_the_warmup_is_retried_every_epoch(db: sa.Engine) -> None:
    """Eight seconds of long decodes and no prefill (more than the 50 intervals a fit needs, but nothing to measure the
    prefill power by: refused), then 12 s of traffic that fits. The refused fit is retried with each new epoch, not
    once per ``calibration_refresh_ns`` (30 s): it settles within the traffic, so seals do not wait the whole
    ``uncalibrated_seal_hold_ns`` (a loaded CI host once left a fit unsettled for 30 s of traffic this way)."""
    decodes = [(T0 + k * S, None, T0 + k * S + 900 * MS, 0) for k in range(8)]
    traffic = [t for t in _traffic(20, seed=11) if t[0] >= T0 + 8 * S]
    classes = _classes(decodes + traffic)
    timelines = [timeline(f"r{i}", r, f, d, prompt=p) for i, (r, f, d, p) in enumerate(decodes + traffic)]
    readings = [("gpu0", r.t_ns, r.energy_mj, None) for r in _readings(classes, 20, 120 * MS)]
    eng = make_engine(db, epoch_ns=1 * S, lag_ns=50 * MS, calibrate=True, **NO_TAIL)
    write(db, timelines=timelines[: len(decodes)], samples=[x for x in readings if x[1] < T0 + 8 * S],
          ingested_ns=T0 + 8 * S)  # fmt: skip
    eng.run_once(now_ns=T0 + 10 * S)
    learning = eng._backends["b1"].learning
    assert learning.calibrator is not None and not learning.calibrator.warming  # enough intervals...
    assert eng.stats.calibration["b1"] is None  # ...but no prefill to fit
    write(db, timelines=timelines[len(decodes) :], samples=[x for x in readings if x[1] >= T0 + 8 * S],
          ingested_ns=T0 + 20 * S)  # fmt: skip
    eng.run_once(now_ns=T0 + 25 * S)
    model = eng.stats.calibration["b1"]
    assert model is not None and model.lag_ns == 120 * MS
