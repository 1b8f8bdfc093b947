"""The energy metric keeps tenant labels bounded without losing a joule; the calibration gauges say which backends
are billed with a fitted model."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from meter.engine import PowerModel
from proxy import energy_metrics
from proxy.energy_metrics import _bounded, _calibration_families, _writer_families

rows = st.lists(
    st.tuples(
        st.sampled_from([f"t{i}" for i in range(12)]),
        st.sampled_from(["m1", "m2"]),
        st.integers(0, 10**9),
        st.integers(0, 10**9),
    ),
    max_size=40,
)


@given(rows)
def test_folding_keeps_the_biggest_tenants_and_every_millijoule(rows_in) -> None:
    old = energy_metrics.MAX_TENANT_LABELS
    energy_metrics.MAX_TENANT_LABELS = 5
    try:
        out = _bounded(rows_in)
    finally:
        energy_metrics.MAX_TENANT_LABELS = old
    assert sum(p + d for _, _, p, d in out) == sum(p + d for _, _, p, d in rows_in)
    named = {t for t, *_ in out} - {"other"}
    assert len(named) <= 5
    totals: dict[str, int] = {}
    for t, _, p, d in rows_in:
        totals[t] = totals.get(t, 0) + p + d
    folded = set(totals) - named
    if folded and named:
        assert min(totals[t] for t in named) >= max(totals[t] for t in folded)
    assert len({(t, m) for t, m, *_ in out}) == len(out)


def test_calibration_gauges_say_which_backends_are_billed_with_a_fitted_model() -> None:
    fitted = PowerModel(lag_ns=120_000_000, prefill_w=650.0, active_w=260.0, idle_w=80.0, intervals=60, residual_w=1.5)
    families = {
        f.name: {s.labels["backend"]: s.value for s in f.samples}
        for f in _calibration_families({"gpu-a": fitted, "gpu-b": None})
    }
    assert families == {
        "joulegate_backend_calibrated": {"gpu-a": 1.0, "gpu-b": 0.0},
        "joulegate_backend_counter_lag_seconds": {"gpu-a": 0.12},
        "joulegate_backend_prefill_power_ratio": {"gpu-a": 2.5},
    }


def test_writer_gauges_say_how_far_behind_the_seals_wait_and_who_is_no_longer_waited_for() -> None:
    s = 1_000_000_000
    now = 1_000 * s
    ms = 1_000_000
    got = {f.name: {tuple(x.labels.values()): x.value for x in f.samples} for f in _writer_families(
        [(now - 1 * s, 3 * ms), (now - 45 * s, -40 * ms), (now - 500 * s, 9 * s), (now - 2 * s, None)],
        now, 120 * s)}  # fmt: skip
    assert got == {
        "joulegate_ledger_writers": {("live",): 3, ("silent",): 1},
        "joulegate_ledger_writers_behind_seconds": {(): 45.0},  # the replica cut off 45 s ago holds the seals
        "joulegate_ledger_writers_clock_spread_seconds": {(): 0.043},  # the silent writer's 9 s no longer counts
    }
    only_silent = {f.name for f in _writer_families([(now - 500 * s, 0)], now, 120 * s)}
    assert only_silent == {"joulegate_ledger_writers"}  # nothing is waited for: no lag to report
    on_sqlite = {f.name for f in _writer_families([(now - 1 * s, None)], now, 120 * s)}
    assert "joulegate_ledger_writers_clock_spread_seconds" not in on_sqlite  # no server clock to measure against
