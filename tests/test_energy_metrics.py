"""The energy metric keeps tenant labels bounded without losing a joule."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from proxy import energy_metrics
from proxy.energy_metrics import _bounded

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
