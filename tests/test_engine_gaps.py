"""meter.engine over real databases: failed reads, counter resets, sampler pauses, multi-GPU backends, retention."""

from __future__ import annotations

import itertools

import pytest
import sqlalchemy as sa

from tests.engine_helpers import MS, T0, Gpu, S, make_engine, rows, samples_for, timeline, write


def _measured(samples: list[tuple], max_interval_ns: int = 5 * S) -> int:
    """Energy of the measured intervals of one device's samples: both ends valid, no reset, not too long."""
    total = 0
    for (_d, ta, ea, _), (_d2, tb, eb, _) in itertools.pairwise(samples):
        if ea is not None and eb is not None and eb >= ea and tb - ta <= max_interval_ns:
            total += eb - ea
    return total


def _conserves(db: sa.Engine, backend: str = "b1") -> list[sa.Row]:
    epochs = rows(db, "SELECT * FROM backend_epochs WHERE backend = :b ORDER BY epoch_start_ns", {"b": backend})
    for e in epochs:
        got = rows(
            db,
            "SELECT COALESCE(SUM(prefill_mj + decode_mj), 0) FROM request_energy WHERE backend = :b "
            "AND epoch_start_ns = :s",
            {"b": backend, "s": e.epoch_start_ns},
        )[0][0]
        assert e.counter_mj == e.attributed_mj + e.idle_mj and got == e.attributed_mj
    return epochs


def test_failed_reads_resets_and_pauses_are_gaps_with_no_energy_invented(db: sa.Engine) -> None:
    gpu = Gpu()
    reqs = [timeline(f"r{i}", T0 + i * S, T0 + i * S + 30 * MS, T0 + i * S + 600 * MS) for i in range(1, 29)]
    gpu.requests += reqs
    samples = samples_for(gpu, "gpu0", T0, T0 + 31 * S)
    samples[35] = (samples[35][0], samples[35][1], None, "NVMLError_Unknown")  # a failed read at ~3.5 s
    reset_at = 120  # at ~12 s the counter restarts from a small value (driver reload)
    shift = samples[reset_at][2] - 500
    samples[reset_at:] = [(d, t, None if e is None else e - shift, err) for d, t, e, err in samples[reset_at:]]
    del samples[205:275]  # the sampler is away for 7 s (20.5-27.5 s): longer than max_interval_ns
    write(db, timelines=reqs, samples=samples, ingested_ns=T0 + 32 * S)

    make_engine(db).run_once(now_ns=T0 + 40 * S)
    epochs = _conserves(db)
    assert [e.epoch_start_ns for e in epochs] == [T0, T0 + 10 * S, T0 + 20 * S]
    assert [e.gaps for e in epochs] == [1, 1, 1]
    last_used = max(e.last_reading_ns for e in epochs)
    used = [s for s in samples if s[1] <= last_used]
    assert sum(e.counter_mj for e in epochs) == _measured(used)
    assert sum(e.counter_mj for e in epochs) < samples[-1][2] + shift - samples[0][2]  # gaps are not counted

    # A request inside the failed read's 200 ms got only the measured part of its window.
    energy = {r.request_id: r.e for r in rows(db, "SELECT request_id, SUM(prefill_mj + decode_mj) AS e "
                                                  "FROM request_energy GROUP BY request_id")}  # fmt: skip
    assert 0 < energy["r3"] < gpu.request_mj(reqs[2]) * 0.9
    assert energy["r5"] == pytest.approx(gpu.request_mj(reqs[4]), rel=0.01)
    # Requests while the sampler was away have rows (they count) but no energy.
    assert energy["r22"] == 0 and energy["r25"] == 0


def test_multi_gpu_backend_sums_its_devices(db: sa.Engine) -> None:
    gpu0, gpu1 = Gpu(idle_w=60.0), Gpu(idle_w=70.0)
    reqs = [timeline(f"r{i}", T0 + i * S + 200 * MS, T0 + i * S + 260 * MS, T0 + i * S + 900 * MS) for i in range(12)]
    gpu0.requests += reqs
    gpu1.requests += reqs
    s0 = samples_for(gpu0, "nvml:GPU-0", T0, T0 + 13 * S, offset_ns=3 * MS, base_mj=5_000)
    s1 = samples_for(gpu1, "nvml:GPU-1", T0, T0 + 13 * S, offset_ns=9 * MS, base_mj=90_000_000)
    s1[40] = (s1[40][0], s1[40][1], None, "timeout")  # one device's failed read breaks the backend's tick
    write(db, timelines=reqs, samples=s0 + s1, ingested_ns=T0 + 13 * S)
    # The idle floor is given (there is too little idle time here to measure it).
    make_engine(db, {"b1": ("nvml:GPU-0", "nvml:GPU-1")}, idle_power=130.0).run_once(now_ns=T0 + 20 * S)

    (e,) = _conserves(db)
    assert e.gaps == 1
    sum_mj = {t1: e0 + e1 for (_a, _t0, e0, _), (_b, t1, e1, _) in zip(s0, s1, strict=True) if e0 and e1}
    assert e.first_reading_ns == s1[0][1] and e.last_reading_ns == s1[100][1]  # a tick is stamped by its last read
    measured = (sum_mj[s1[39][1]] - sum_mj[s1[0][1]]) + (sum_mj[s1[100][1]] - sum_mj[s1[41][1]])
    assert e.counter_mj == measured
    share = {r.request_id: r.e for r in rows(db, "SELECT request_id, prefill_mj + decode_mj AS e FROM request_energy")}
    for r in reqs[5:9]:  # away from the gap: each gets both boards' energy over its window
        assert share[r.request_id] == pytest.approx(gpu0.request_mj(r) + gpu1.request_mj(r), rel=0.01)


def test_retention_prunes_old_samples_but_not_those_unattributed_epochs_need(db: sa.Engine) -> None:
    gpu = Gpu()
    write(db, samples=samples_for(gpu, "gpu0", T0, T0 + 40 * S), ingested_ns=T0 + 40 * S)
    write(db, samples=samples_for(gpu, "other", T0, T0 + 40 * S), ingested_ns=T0 + 40 * S)
    eng = make_engine(db, sample_retention_ns=25 * S, prune_interval_ns=1 * S)
    # The engine has attributed up to 30 s: samples before 15 s (now - retention) go.
    report = eng.run_once(now_ns=T0 + 40 * S)
    assert report.attributed[-1] == ("b1", T0 + 20 * S)
    assert report.pruned_samples == 2 * 150
    assert rows(db, "SELECT MIN(t_ns) FROM samples")[0][0] >= T0 + 15 * S

    # An engine that is behind keeps what it still needs, whatever the retention says.
    write(db, samples=samples_for(gpu, "gpu1", T0 + 50 * S, T0 + 90 * S), ingested_ns=T0 + 90 * S)
    behind = make_engine(db, {"b2": ("gpu1",)}, sample_retention_ns=1 * S, prune_interval_ns=1 * S,
                         max_epochs_per_pass=1)  # fmt: skip
    behind.run_once(now_ns=T0 + 95 * S)  # attributes [50 s, 60 s) only
    assert rows(db, "SELECT MIN(t_ns) FROM samples WHERE device = 'gpu1'")[0][0] >= T0 + 59 * S
    assert rows(db, "SELECT MIN(t_ns) FROM samples WHERE device = 'gpu1'")[0][0] < T0 + 60 * S


@pytest.mark.parametrize("per_pass", [1, 60])  # one epoch a pass: the boundary lies past the samples first read
def test_a_sampler_pause_across_epochs_is_read_past_and_counted_once(db: sa.Engine, per_pass: int) -> None:
    gpu = Gpu()
    reqs = [timeline("early", T0 + 2 * S, T0 + 2 * S + 30 * MS, T0 + 3 * S),
            timeline("late", T0 + 21 * S, T0 + 21 * S + 30 * MS, T0 + 22 * S)]  # fmt: skip
    gpu.requests += reqs
    samples = samples_for(gpu, "gpu0", T0, T0 + 5 * S) + samples_for(gpu, "gpu0", T0 + 18 * S, T0 + 31 * S)
    write(db, timelines=reqs, samples=samples, ingested_ns=T0 + 31 * S)
    eng = make_engine(db, max_epochs_per_pass=per_pass)
    for k in range(3):
        eng.run_once(now_ns=T0 + (35 + k) * S)
    epochs = _conserves(db)
    assert [e.epoch_start_ns for e in epochs] == [T0, T0 + 10 * S, T0 + 20 * S]
    assert [e.gaps for e in epochs] == [1, 0, 0]  # the 13 s pause starts in the first epoch
    assert epochs[0].last_reading_ns < T0 + 5 * S and epochs[1].first_reading_ns > T0 + 18 * S
    assert sum(e.counter_mj for e in epochs) == _measured([s for s in samples if s[1] <= epochs[-1].last_reading_ns])
    energy = dict(rows(db, "SELECT request_id, SUM(prefill_mj + decode_mj) FROM request_energy GROUP BY request_id"))
    assert energy["early"] == pytest.approx(gpu.request_mj(reqs[0]), rel=0.01)
    assert energy["late"] == pytest.approx(gpu.request_mj(reqs[1]), rel=0.01)
