"""meter.engine over real databases (SQLite and PostgreSQL): partition, conservation, idempotence, usage, finality."""

from __future__ import annotations

import itertools

import pytest
import sqlalchemy as sa

from meter.engine import attributed_until, expected_usage, request_finality, usage_table
from meter.timeline import RequestStart, Timeline
from tests.engine_helpers import MS, T0, Gpu, S, make_engine, rows, samples_for, timeline, write


def _traffic(gpu: Gpu, n: int, *, start: int, spacing_ns: int, backend: str = "b1") -> list:
    out = []
    for i in range(n):
        rel = start + i * spacing_ns
        tl = timeline(f"{backend}-r{i}", rel, rel + 40 * MS, rel + (300 + 37 * (i % 7)) * MS, backend=backend,
                      tenant=("acme", "zeta")[i % 2], prompt=50 + 10 * i, generated=5 + i % 9)  # fmt: skip
        out.append(tl)
    gpu.requests += out
    return out


def _epochs(db: sa.Engine, backend: str = "b1") -> list[sa.Row]:
    return rows(db, "SELECT * FROM backend_epochs WHERE backend = :b ORDER BY epoch_start_ns", {"b": backend})


def _energy_by_epoch(db: sa.Engine, backend: str = "b1") -> dict[int, tuple[int, int, int]]:
    out = {}
    q = (
        "SELECT epoch_start_ns, SUM(prefill_mj), SUM(decode_mj), COUNT(*) FROM request_energy "
        "WHERE backend = :b GROUP BY epoch_start_ns"
    )
    for start, pre, dec, n in rows(db, q, {"b": backend}):
        out[int(start)] = (int(pre), int(dec), int(n))
    return out


def _snapshot(db: sa.Engine) -> tuple:
    re = rows(db, "SELECT * FROM request_energy ORDER BY request_id, epoch_start_ns")
    be = rows(db, "SELECT * FROM backend_epochs ORDER BY backend, epoch_start_ns")
    uh = rows(db, "SELECT * FROM usage_hourly ORDER BY hour_start_ns, tenant, model_id, backend")
    return [tuple(r) for r in re], [tuple(r)[:-1] for r in be], [tuple(r) for r in uh]  # attributed_at may differ


def test_epochs_partition_the_counter_and_conserve_energy(db: sa.Engine) -> None:
    gpu = Gpu()
    reqs = _traffic(gpu, 40, start=T0 + 1 * S, spacing_ns=830 * MS)  # ~34 s of traffic, crossing epoch boundaries
    samples = samples_for(gpu, "gpu0", T0, T0 + 45 * S)
    write(db, timelines=reqs, samples=samples, ingested_ns=T0 + 46 * S)

    eng = make_engine(db)
    report = eng.run_once(now_ns=T0 + 47 * S)
    assert [start for _b, start in report.attributed] == [T0, T0 + 10 * S, T0 + 20 * S, T0 + 30 * S]
    epochs = _epochs(db)
    assert len(epochs) == 4
    energy = _energy_by_epoch(db)
    by_t = {t: e for _d, t, e, _err in samples}
    for e in epochs:
        assert e.counter_mj == e.attributed_mj + e.idle_mj
        assert e.attributed_mj == e.prefill_mj + e.decode_mj
        pre, dec, _n = energy[e.epoch_start_ns]
        assert (pre, dec) == (e.prefill_mj, e.decode_mj)
        assert e.counter_mj == by_t[e.last_reading_ns] - by_t[e.first_reading_ns]
        assert e.gaps == 0 and (e.samples == 101 or e.epoch_start_ns == T0)  # 100 own readings + the boundary
    # Consecutive epochs share their boundary reading: together they are the counter over the whole span.
    for a, b in itertools.pairwise(epochs):
        assert a.last_reading_ns == b.first_reading_ns
    assert sum(e.counter_mj for e in epochs) == by_t[epochs[-1].last_reading_ns] - by_t[epochs[0].first_reading_ns]

    # Every request got energy, close to what the board drew while it ran.
    q = "SELECT request_id, SUM(prefill_mj) AS p, SUM(decode_mj) AS d FROM request_energy GROUP BY request_id"
    got = {r.request_id: (int(r.p), int(r.d)) for r in rows(db, q)}
    assert set(got) == {r.request_id for r in reqs}
    errors = sorted(abs(sum(got[r.request_id]) - gpu.request_mj(r)) / gpu.request_mj(r) for r in reqs)
    assert errors[-1] < 0.01, errors  # exact up to mJ rounding: lone requests, and the idle floor was measured
    assert all(p > 0 and d > 0 for p, d in got.values())
    # The engine measured the idle floor from the idle stretches between requests.
    assert eng.stats.idle_power_w["b1"] == pytest.approx(80.0, rel=0.02)


def test_rerun_and_restart_change_nothing(db: sa.Engine) -> None:
    gpu = Gpu()
    reqs = _traffic(gpu, 20, start=T0 + 2 * S, spacing_ns=900 * MS)
    reqs.append(timeline("q-rejected", None, None, T0 + 3 * S, backend=None))
    write(db, timelines=reqs, samples=samples_for(gpu, "gpu0", T0, T0 + 25 * S), ingested_ns=T0 + 25 * S)
    eng = make_engine(db)
    first = eng.run_once(now_ns=T0 + 30 * S)
    assert len(first.attributed) == 2 and first.unrouted_counted == 1
    before = _snapshot(db)
    again = eng.run_once(now_ns=T0 + 31 * S)
    assert again.attributed == [] and again.recomputed == [] and again.unrouted_counted == 0
    restarted = make_engine(db).run_once(now_ns=T0 + 32 * S)
    assert restarted.attributed == [] and restarted.recomputed == [] and restarted.unrouted_counted == 0
    assert _snapshot(db) == before


def test_usage_hourly_matches_a_rebuild_and_counts_every_request_once(db: sa.Engine) -> None:
    gpu = Gpu()
    hour = 3600 * S
    start = T0 - T0 % hour + hour - 12 * S  # traffic crosses an hour boundary
    reqs = _traffic(gpu, 30, start=start, spacing_ns=700 * MS)
    unrouted = [timeline(f"x{i}", None, None, start + i * S, backend=None, tenant="zeta") for i in range(3)]
    write(db, timelines=reqs + unrouted, samples=samples_for(gpu, "gpu0", start - 2 * S, start + 40 * S),
          ingested_ns=start + 40 * S)  # fmt: skip
    make_engine(db).run_once(now_ns=start + 45 * S)
    with db.connect() as conn:
        table = usage_table(conn)
        assert table == expected_usage(conn)
    assert sum(v[0] for v in table.values()) == len(reqs) + len(unrouted)
    assert {k[0] for k in table} == {start - start % hour, start - start % hour + hour}
    assert sum(v[1] for v in table.values()) == sum(r.prompt_tokens for r in reqs)
    assert sum(v[2] for v in table.values()) == sum(r.generated_tokens for r in reqs)
    total = rows(db, "SELECT SUM(prefill_mj) + SUM(decode_mj) FROM request_energy")[0][0]
    assert sum(v[3] + v[4] for v in table.values()) == total
    assert sum(v[0] for k, v in table.items() if k[3] == "") == 3


def test_open_request_holds_attribution_back_until_it_ends_or_times_out(db: sa.Engine) -> None:
    gpu = Gpu()
    long = timeline("long", T0 + 5 * S, T0 + 5 * S + 50 * MS, T0 + 32 * S)
    gpu.requests.append(long)
    write(db, samples=samples_for(gpu, "gpu0", T0, T0 + 60 * S), ingested_ns=T0 + 1 * S)
    write(db, starts=[RequestStart("long", "acme", "m", "b1", T0 + 5 * S - 5 * MS, T0 + 5 * S)],
          ingested_ns=T0 + 5 * S)  # fmt: skip
    eng = make_engine(db, open_request_timeout_ns=120 * S)
    report = eng.run_once(now_ns=T0 + 40 * S)
    assert [s for _b, s in report.attributed] == []  # epoch [T0, T0+10) holds its release
    with db.connect() as conn:
        assert attributed_until(conn, "b1") is None
    write(db, timelines=[long], ingested_ns=T0 + 40 * S)
    report = eng.run_once(now_ns=T0 + 45 * S)
    assert [s for _b, s in report.attributed] == [T0, T0 + 10 * S, T0 + 20 * S, T0 + 30 * S]
    got = rows(db, "SELECT SUM(prefill_mj + decode_mj) FROM request_energy WHERE request_id = 'long'")[0][0]
    assert got == pytest.approx(gpu.request_mj(long), rel=0.02)

    # Another open request, never finished: after the timeout the engine moves on without it.
    write(db, starts=[RequestStart("stuck", "acme", "m", "b1", T0 + 41 * S, T0 + 41 * S)], ingested_ns=T0 + 41 * S)
    assert eng.run_once(now_ns=T0 + 55 * S).attributed == []
    report = eng.run_once(now_ns=T0 + 41 * S + 121 * S)
    assert [s for _b, s in report.attributed] == [T0 + 40 * S]
    assert rows(db, "SELECT COUNT(*) FROM request_energy WHERE request_id = 'stuck'")[0][0] == 0


def test_finality_comes_with_the_seal_and_the_seal_never_moves(db: sa.Engine) -> None:
    gpu = Gpu()
    a = timeline("a", T0 + 2 * S, T0 + 2 * S + 30 * MS, T0 + 3 * S)
    b = timeline("b", T0 + 12 * S, T0 + 12 * S + 30 * MS, T0 + 14 * S)
    refused = Timeline("refused", "acme", "m", "b1", T0 + 4 * S, T0 + 4 * S, None, T0 + 4 * S + 2 * MS, 0, 0,
                       status="INVALID_ARGUMENT")  # fmt: skip
    gpu.requests += [a, b]
    write(db, timelines=[a, b, refused, timeline("c", None, None, T0 + 3 * S, backend=None)],
          samples=samples_for(gpu, "gpu0", T0, T0 + 15 * S), ingested_ns=T0 + 15 * S)  # fmt: skip
    write(db, starts=[RequestStart("d", "acme", "m", "b1", T0 + 13 * S, T0 + 13 * S)], ingested_ns=T0 + 15 * S)
    ids = ["a", "b", "c", "d", "refused", "nope"]
    with db.connect() as conn:  # no GPU work: final at 0 J as soon as they ended; the others wait for the engine
        assert request_finality(conn, ids) == {"a": False, "b": False, "c": True, "d": False, "refused": True}
    eng = make_engine(db)
    report = eng.run_once(now_ns=T0 + 20 * S)
    with db.connect() as conn:
        assert attributed_until(conn, "b1") == T0 + 10 * S
        # until (10 s) >= done + lag (0) + settle (2 s): `a` (done 3 s) is sealed, `b` (done 14 s) is not
        assert request_finality(conn, ids) == {"a": True, "b": False, "c": True, "d": False, "refused": True}
    assert report.sealed == 2  # a, and the refused one (0 J)
    seal = rows(db, "SELECT * FROM request_seals WHERE request_id = 'a'")[0]
    mine = rows(db, "SELECT SUM(prefill_mj), SUM(decode_mj), SUM(idle_time_mj), SUM(idle_tokens_mj) "
                    "FROM request_energy WHERE request_id = 'a'")[0]  # fmt: skip
    assert (seal.prefill_mj, seal.decode_mj, seal.idle_time_mj, seal.idle_tokens_mj) == tuple(mine)
    assert seal.prefill_mj > 0 and seal.decode_mj > 0
    assert (
        rows(db, "SELECT prefill_mj + decode_mj + active_ns FROM request_energy WHERE request_id = 'refused'")[0][0]
        == 0
    )  # it did no GPU work: no energy and no active time, only its home row

    # A late neighbour of `a` arrives: the epoch is redone, `a` stays as sealed, the difference is booked.
    late = timeline("late", T0 + 2 * S, T0 + 2 * S + 30 * MS, T0 + 4 * S)
    write(db, timelines=[late], ingested_ns=T0 + 21 * S)
    report = eng.run_once(now_ns=T0 + 22 * S)
    assert [st for _b, st in report.recomputed] == [T0]
    assert rows(db, "SELECT * FROM request_seals WHERE request_id = 'a'")[0] == seal
    again = rows(db, "SELECT SUM(prefill_mj), SUM(decode_mj), SUM(idle_time_mj), SUM(idle_tokens_mj) "
                     "FROM request_energy WHERE request_id = 'a'")[0]  # fmt: skip
    assert tuple(again) == tuple(mine)
    epoch = rows(db, "SELECT * FROM backend_epochs WHERE epoch_start_ns = :s", {"s": T0})[0]
    late_mj = rows(db, "SELECT SUM(prefill_mj + decode_mj) FROM request_energy WHERE request_id = 'late'")[0][0]
    assert late_mj > 0 and epoch.adjustment_mj < 0  # `late` got its share; `a` would have paid part of it
    assert epoch.counter_mj == epoch.prefill_mj + epoch.decode_mj + epoch.idle_mj + epoch.adjustment_mj
    assert eng.stats.adjustment_mj == epoch.adjustment_mj and eng.stats.adjusted_epochs == 1
    with db.connect() as conn:
        assert request_finality(conn, ["a", "late"]) == {"a": True, "late": True}
        assert usage_table(conn) == expected_usage(conn)
