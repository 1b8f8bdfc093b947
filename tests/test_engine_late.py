"""meter.engine over real databases: late rows recompute their epochs, never double count, never move a final
figure; concurrent engines."""

from __future__ import annotations

import threading

import pytest
import sqlalchemy as sa
import structlog

from meter.engine import expected_usage, usage_table
from tests.engine_helpers import MS, T0, Gpu, S, make_engine, rows, samples_for, timeline, write


def _check_books(db: sa.Engine) -> None:
    """Per epoch counter = attributed + idle + adjustment, attributed = its rows; seals = their rows; usage_hourly is
    what a rebuild gives."""
    for e in rows(db, "SELECT * FROM backend_epochs"):
        got = rows(
            db,
            "SELECT COALESCE(SUM(prefill_mj), 0), COALESCE(SUM(decode_mj), 0) FROM request_energy "
            "WHERE backend = :b AND epoch_start_ns = :s",
            {"b": e.backend, "s": e.epoch_start_ns},
        )[0]
        assert (got[0], got[1]) == (e.prefill_mj, e.decode_mj)
        assert e.counter_mj == e.prefill_mj + e.decode_mj + e.idle_mj + e.adjustment_mj
    for seal in rows(db, "SELECT * FROM request_seals"):
        got = rows(
            db,
            "SELECT SUM(prefill_mj), SUM(decode_mj), SUM(idle_time_mj), SUM(idle_tokens_mj) FROM request_energy "
            "WHERE request_id = :r",
            {"r": seal.request_id},
        )[0]
        assert tuple(got) == (seal.prefill_mj, seal.decode_mj, seal.idle_time_mj, seal.idle_tokens_mj)
    with db.connect() as conn:
        assert usage_table(conn) == expected_usage(conn)


def _energy(db: sa.Engine) -> dict[str, int]:
    q = "SELECT request_id, SUM(prefill_mj + decode_mj) AS e FROM request_energy GROUP BY request_id"
    return {r.request_id: int(r.e) for r in rows(db, q)}


def _finals(db: sa.Engine) -> dict[str, tuple[int, ...]]:
    """Every sealed request's figures, from its seal and from its rows (they must agree)."""
    q = (
        "SELECT s.request_id, s.prefill_mj, s.decode_mj, s.idle_time_mj, s.idle_tokens_mj, SUM(e.prefill_mj), "
        "SUM(e.decode_mj), SUM(e.idle_time_mj), SUM(e.idle_tokens_mj) FROM request_seals s "
        "JOIN request_energy e ON e.request_id = s.request_id GROUP BY s.request_id, s.prefill_mj, s.decode_mj, "
        "s.idle_time_mj, s.idle_tokens_mj"
    )
    out = {}
    for r in rows(db, q):
        assert tuple(r[1:5]) == tuple(r[5:9]), r
        out[r.request_id] = tuple(r[1:5])
    return out


def _world() -> tuple[Gpu, list, list]:
    gpu = Gpu()
    on_time = [
        timeline(f"r{i}", T0 + i * S, T0 + i * S + 40 * MS, T0 + i * S + 500 * MS)
        for i in range(1, 29)
        if i not in (10, 11)
    ]
    late = [
        timeline("late-1", T0 + 4200 * MS, T0 + 4260 * MS, T0 + 4800 * MS, tenant="zeta"),  # overlaps r4
        timeline("late-2", T0 + 9600 * MS, T0 + 9650 * MS, T0 + 11_900 * MS, tenant="zeta"),  # alone, over 2 epochs
    ]
    gpu.requests += on_time + late
    return gpu, on_time, late


def test_late_rows_recompute_their_epochs_without_double_counting_or_moving_a_final_figure(db: sa.Engine) -> None:
    gpu, on_time, late = _world()
    write(db, timelines=on_time, samples=samples_for(gpu, "gpu0", T0, T0 + 31 * S), ingested_ns=T0 + 31 * S)
    # A fixed idle floor: the only thing a late row changes is who shares the time it overlaps.
    eng = make_engine(db, idle_power=80.0)
    first = eng.run_once(now_ns=T0 + 33 * S)
    assert [s for _b, s in first.attributed] == [T0, T0 + 10 * S, T0 + 20 * S]
    counters = {r.epoch_start_ns: r.counter_mj for r in rows(db, "SELECT * FROM backend_epochs")}
    before = _energy(db)
    finals = _finals(db)
    assert "r4" in finals and "r28" not in finals  # sealed once attributed until done + settle; r28 ends at 28.5 s
    _check_books(db)

    # A gateway replica replays its journal: two timelines the meter never saw arrive now.
    write(db, timelines=late, ingested_ns=T0 + 40 * S)
    report = eng.run_once(now_ns=T0 + 41 * S)
    assert report.attributed == []
    assert sorted(s for _b, s in report.recomputed) == [T0, T0 + 10 * S]
    after = _energy(db)
    _check_books(db)
    assert {r.epoch_start_ns: r.counter_mj for r in rows(db, "SELECT * FROM backend_epochs")} == counters
    # Final means final: every figure sealed before the replay is exactly what it was.
    now_final = _finals(db)
    assert {k: now_final[k] for k in finals} == finals
    assert after["late-1"] > 0 and after["late-2"] > 0
    assert after["late-2"] == pytest.approx(gpu.request_mj(late[1]), rel=0.02)  # alone in its window
    assert after["r4"] == before["r4"]  # sealed: it does not give late-1 its share back...
    epoch0 = rows(db, "SELECT * FROM backend_epochs WHERE epoch_start_ns = :s", {"s": T0})[0]
    # ...the epoch books it instead, visibly: r4's fresh share (what it would now get) minus its final one.
    assert epoch0.adjustment_mj < 0
    r4_fresh = after["r4"] + epoch0.adjustment_mj
    together = gpu.energy_mj(T0 + 4800 * MS) - gpu.energy_mj(T0 + 4000 * MS)  # the board while either ran
    assert r4_fresh + after["late-1"] == pytest.approx(together, rel=0.01)
    assert report.adjustment_mj == epoch0.adjustment_mj == eng.stats.adjustment_mj
    assert rows(db, "SELECT adjustment_mj FROM backend_epochs WHERE epoch_start_ns = :s", {"s": T0 + 10 * S})[0][0] == 0
    assert after["r25"] == before["r25"]  # epoch [20 s, 30 s) untouched
    # Each request is counted once, including the late ones, and they are final too once redone.
    with db.connect() as conn:
        table = usage_table(conn)
    assert sum(v[0] for v in table.values()) == len(on_time) + len(late)
    assert sum(v[0] for k, v in table.items() if k[1] == "zeta") == 2
    assert {"late-1", "late-2"} <= set(now_final)

    # Nothing left to do, and an identical replay (the ledger keeps ingested_ns) changes nothing either.
    assert eng.run_once(now_ns=T0 + 45 * S).recomputed == []
    write(db, timelines=late + on_time[:3], ingested_ns=T0 + 50 * S)
    assert eng.run_once(now_ns=T0 + 51 * S).recomputed == []
    assert _energy(db) == after


def _mark(db: sa.Engine, writer: str, through_ns: int, clock_offset_ns: int | None = None) -> None:
    """A ledger's how-far mark (``ledger_writers``), as its writer thread upserts it."""
    with db.begin() as conn:
        conn.execute(sa.text("DELETE FROM ledger_writers WHERE writer_id = :w"), {"w": writer})
        conn.execute(
            sa.text(
                "INSERT INTO ledger_writers (writer_id, name, through_ns, clock_offset_ns) VALUES (:w, 'test', :t, :o)"
            ),
            {"w": writer, "t": through_ns, "o": clock_offset_ns},
        )


def test_a_writer_silent_for_a_week_loses_its_row(db: sa.Engine) -> None:
    """A pod killed and never restarted on its journal left its mark: silent past writer_timeout it holds nothing,
    and past writer_forget (7 days) its row goes, so that fleets with pod churn do not keep them for ever."""
    gpu, on_time, _late = _world()
    write(db, timelines=on_time, samples=samples_for(gpu, "gpu0", T0, T0 + 31 * S), ingested_ns=T0 + 31 * S)
    week = 7 * 86_400 * S
    _mark(db, "gone-long-ago", T0 + 33 * S - week - S)
    _mark(db, "gone-lately", T0 + 33 * S - week + S)  # silent too, not yet for a week
    _mark(db, "live", T0 + 32 * S)
    with structlog.testing.capture_logs() as logs:
        make_engine(db, idle_power=80.0).run_once(now_ns=T0 + 33 * S)
    assert {r[0] for r in rows(db, "SELECT writer_id FROM ledger_writers")} == {"gone-lately", "live"}
    assert [e["writers"] for e in logs if e["event"] == "engine_writers_forgotten"] == [["gone-long-ago"]]


def test_a_live_writer_whose_clock_is_off_the_meters_is_logged_once(db: sa.Engine) -> None:
    """Offsets against the PostgreSQL server's clock (the meter measures its own, ~0 on this host); SQLite has no
    server clock, so nothing is compared there."""
    gpu, on_time, _late = _world()
    write(db, timelines=on_time, samples=samples_for(gpu, "gpu0", T0, T0 + 31 * S), ingested_ns=T0 + 31 * S)
    ms = 1_000_000
    _mark(db, "skewed", T0 + 40 * S, clock_offset_ns=3 * S)  # a host whose clock runs 3 s ahead
    _mark(db, "behind", T0 + 40 * S, clock_offset_ns=-900 * ms)
    _mark(db, "fine", T0 + 40 * S, clock_offset_ns=4 * ms)  # within the 10 ms bound
    _mark(db, "on-sqlite", T0 + 40 * S, clock_offset_ns=None)
    _mark(db, "gone", T0 - 200 * S, clock_offset_ns=60 * S)  # silent past the timeout: not waited for, not judged
    eng = make_engine(db, idle_power=80.0)
    with structlog.testing.capture_logs() as logs:
        eng.run_once(now_ns=T0 + 33 * S)
        eng.run_once(now_ns=T0 + 34 * S)
    skewed = sorted(
        (e["writer"], round(e["skew_ms"] / 100)) for e in logs if e["event"] == "engine_writer_clock_skewed"
    )
    if db.dialect.name == "sqlite":
        assert skewed == []
        return
    assert skewed == [("behind", -9), ("skewed", 30)]  # once each, though two passes saw them
    _mark(db, "skewed", T0 + 40 * S, clock_offset_ns=2 * ms)  # its clock fixed, then off again: said again
    with structlog.testing.capture_logs() as logs:
        eng.run_once(now_ns=T0 + 35 * S)
        _mark(db, "skewed", T0 + 40 * S, clock_offset_ns=-S)
        eng.run_once(now_ns=T0 + 36 * S)
    assert [e["writer"] for e in logs if e["event"] == "engine_writer_clock_skewed"] == ["skewed"]


def test_no_request_is_sealed_past_a_writer_that_has_not_written_that_far(db: sa.Engine) -> None:
    """A gateway replica lost the database at 4 s and journals its timelines: the meter attributes without them, but
    seals nothing whose epochs end past the replica's mark. When the journal lands, the epochs are redone with the
    late requests in them and only then sealed: r4 gives late-1 its share, and no adjustment is booked (the test
    above shows the adjustment when nothing held the seals back)."""
    gpu, on_time, late = _world()
    write(db, timelines=on_time, samples=samples_for(gpu, "gpu0", T0, T0 + 31 * S), ingested_ns=T0 + 31 * S)
    _mark(db, "meter", T0 + 33 * S)
    _mark(db, "replica", T0 + 4 * S)
    eng = make_engine(db, idle_power=80.0, writer_timeout_ns=60 * S)
    first = eng.run_once(now_ns=T0 + 33 * S)
    assert [s for _b, s in first.attributed] == [T0, T0 + 10 * S, T0 + 20 * S]
    assert first.sealed == 0 and _finals(db) == {}  # r1 ended at 1.5 s, but its epoch runs past the replica's 4 s
    before = _energy(db)

    write(db, timelines=late, ingested_ns=T0 + 40 * S)  # the replica's journal replayed
    _mark(db, "replica", T0 + 40 * S)
    _mark(db, "meter", T0 + 40 * S)
    report = eng.run_once(now_ns=T0 + 41 * S)
    assert sorted(s for _b, s in report.recomputed) == [T0, T0 + 10 * S]
    assert report.adjustment_mj == 0 and eng.stats.adjustment_mj == 0
    after, finals = _energy(db), _finals(db)
    assert {"r4", "late-1", "late-2"} <= set(finals)
    assert after["r4"] < before["r4"]  # it had late-1's share while late-1 was unknown, and gave it back
    together = gpu.energy_mj(T0 + 4800 * MS) - gpu.energy_mj(T0 + 4000 * MS)
    assert after["r4"] + after["late-1"] == pytest.approx(together, rel=0.01)
    _check_books(db)


@pytest.mark.parametrize("timeout_s", [20, 60])
def test_a_writer_silent_past_the_timeout_holds_no_seal(db: sa.Engine, timeout_s: int) -> None:
    """A writer whose last mark (4 s) is older than ``writer_timeout_ns`` (a replica that died, or lost the database
    for longer) holds nothing back; within the timeout the same mark holds every seal past it (the control)."""
    gpu, on_time, _late = _world()
    write(db, timelines=on_time, samples=samples_for(gpu, "gpu0", T0, T0 + 31 * S), ingested_ns=T0 + 31 * S)
    _mark(db, "gone", T0 + 4 * S)
    eng = make_engine(db, idle_power=80.0, writer_timeout_ns=timeout_s * S)
    with structlog.testing.capture_logs() as logs:
        report = eng.run_once(now_ns=T0 + 33 * S)
        eng.run_once(now_ns=T0 + 34 * S)
    silent = [e for e in logs if e["event"] == "engine_writer_silent"]
    if timeout_s < 29:  # silent for 29 s at the pass
        assert report.sealed > 0 and "r4" in _finals(db)
        assert [(e["writer"], e["silent_s"]) for e in silent] == [("gone", 29)]  # said once, for the operator
    else:
        assert report.sealed == 0 and _finals(db) == {} and silent == []


def test_a_restarted_engine_finds_rows_that_arrived_while_it_was_away(db: sa.Engine) -> None:
    gpu, on_time, late = _world()
    write(db, timelines=on_time, samples=samples_for(gpu, "gpu0", T0, T0 + 31 * S), ingested_ns=T0 + 31 * S)
    make_engine(db).run_once(now_ns=T0 + 33 * S)
    write(db, timelines=late[:1], ingested_ns=T0 + 100 * S)
    write(db, timelines=[timeline("rejected", None, None, T0 + 5 * S, backend=None)], ingested_ns=T0 + 100 * S)
    report = make_engine(db).run_once(now_ns=T0 + 200 * S)
    assert [s for _b, s in report.recomputed] == [T0]
    assert report.unrouted_counted == 1
    _check_books(db)
    # Rescans within the margin do not count the unrouted request twice.
    eng = make_engine(db)
    assert eng.run_once(now_ns=T0 + 201 * S).unrouted_counted == 0
    assert rows(db, "SELECT COUNT(*) FROM request_energy WHERE request_id = 'rejected'")[0][0] == 1


def test_rows_that_arrive_before_their_epoch_is_attributed_are_no_recompute(db: sa.Engine) -> None:
    gpu, on_time, late = _world()
    write(db, timelines=on_time, samples=samples_for(gpu, "gpu0", T0, T0 + 31 * S), ingested_ns=T0 + 31 * S)
    eng = make_engine(db, max_epochs_per_pass=1)
    assert [s for _b, s in eng.run_once(now_ns=T0 + 33 * S).attributed] == [T0]
    write(db, timelines=late[1:], ingested_ns=T0 + 34 * S)  # ends in [10 s, 20 s), starts in [0, 10 s)
    report = eng.run_once(now_ns=T0 + 35 * S)
    assert [s for _b, s in report.recomputed] == [T0]  # it overlaps the attributed epoch: that one is redone
    assert [s for _b, s in report.attributed] == [T0 + 10 * S]  # the next one sees it first time round
    _check_books(db)


def test_two_engines_on_one_backend_never_double_count(db: sa.Engine) -> None:
    gpu, on_time, late = _world()
    write(db, timelines=on_time + late, samples=samples_for(gpu, "gpu0", T0, T0 + 31 * S), ingested_ns=T0 + 31 * S)
    engines = [make_engine(db), make_engine(db)]
    errors: list[BaseException] = []

    def run(e) -> None:
        try:
            for k in range(3):
                e.run_once(now_ns=T0 + (33 + k) * S)
        except BaseException as exc:  # an IntegrityError when both insert the same new epoch is fine: retried
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(e,)) for e in engines]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for e in engines:  # whoever lost a race catches up
        e.run_once(now_ns=T0 + 40 * S)
    assert all(isinstance(e, sa.exc.IntegrityError) for e in errors), errors
    assert len(rows(db, "SELECT * FROM backend_epochs")) == 3
    _check_books(db)
    with db.connect() as conn:
        assert sum(v[0] for v in usage_table(conn).values()) == len(on_time) + len(late)
