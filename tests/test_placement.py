"""Placement policies (common.placement): spread and pack as pure functions, and the pool that applies them."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from common.config import BackendConfig, BackendPoolConfig, RoutingConfig
from common.placement import Load, choose
from proxy.backends import Backend, BackendPool

loads_st = st.lists(
    st.builds(
        Load,
        in_flight=st.integers(0, 20),
        outstanding_tokens=st.integers(0, 5000),
        free_slots=st.integers(0, 4),
        available=st.booleans(),
        starting=st.integers(0, 2),
    ),
    max_size=6,
)


@given(
    loads=loads_st,
    policy=st.sampled_from(["spread", "pack"]),
    target=st.integers(1, 10),
    need=st.integers(1, 3),
    spill=st.booleans(),
)
def test_never_an_unavailable_or_full_backend(
    loads: list[Load], policy: str, target: int, need: int, spill: bool
) -> None:
    i = choose(policy, loads, pack_target=target, need=need, spill_on_prefill=spill)  # type: ignore[arg-type]
    fits = [b.available and b.free_slots >= need for b in loads]
    if i is None:
        assert not any(fits)
    else:
        assert fits[i]


@given(loads=loads_st, target=st.integers(1, 10))
def test_pack_fills_the_busiest_below_target_else_spreads(loads: list[Load], target: int) -> None:
    i = choose("pack", loads, pack_target=target)
    ok = [j for j, b in enumerate(loads) if b.available and b.free_slots >= 1]
    if not ok:
        assert i is None
        return
    assert i is not None
    below = [j for j in ok if loads[j].in_flight < target]
    if below:
        assert loads[i].in_flight == max(loads[j].in_flight for j in below)
        assert i == min(j for j in below if loads[j].in_flight == loads[i].in_flight)  # ties: first in order
    else:
        assert loads[i].outstanding_tokens == min(loads[j].outstanding_tokens for j in ok)


@given(loads=loads_st, target=st.integers(1, 10))
def test_pack_spilling_passes_over_a_pending_prefill_only_when_another_backend_has_none(
    loads: list[Load], target: int
) -> None:
    i = choose("pack", loads, pack_target=target, spill_on_prefill=True)
    below = [j for j, b in enumerate(loads) if b.available and b.free_slots >= 1 and b.in_flight < target]
    if not below:
        assert i == choose("pack", loads, pack_target=target)  # at the target everywhere: as without spilling
        return
    assert i in below
    quiet = [j for j in below if loads[j].starting == 0]
    pool = quiet or below
    assert i in pool and loads[i].in_flight == max(loads[j].in_flight for j in pool)


@given(loads=loads_st)
def test_spread_takes_the_fewest_outstanding_tokens(loads: list[Load]) -> None:
    i = choose("spread", loads)
    ok = [j for j, b in enumerate(loads) if b.available and b.free_slots >= 1]
    assert (i is None) == (not ok)
    if i is not None:
        assert loads[i].outstanding_tokens == min(loads[j].outstanding_tokens for j in ok)


def test_pack_at_low_load_keeps_to_one_backend_and_spread_does_not() -> None:
    def place(policy: str, n: int) -> list[int]:
        state = [Load(0, 0, 4) for _ in range(3)]
        out = []
        for _ in range(n):
            i = choose(policy, state, pack_target=2)  # type: ignore[arg-type]
            assert i is not None
            out.append(i)
            b = state[i]
            state[i] = Load(b.in_flight + 1, b.outstanding_tokens + 100, b.free_slots - 1)
        return out

    assert place("pack", 2) == [0, 0]
    assert place("pack", 5) == [0, 0, 1, 1, 2]
    assert place("spread", 3) == [0, 1, 2]


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="pack_target"):
        choose("pack", [Load(0, 0, 1)], pack_target=0)
    with pytest.raises(ValueError, match="unknown placement policy"):
        choose("random", [Load(0, 0, 1)])  # type: ignore[arg-type]


def _pool(policy: str, n: int = 3, spill: bool = False, hold_s: float = 300.0, model: str = "m") -> BackendPool:
    pool_cfg = BackendPoolConfig(max_concurrent_requests=4)
    backends = [
        Backend(BackendConfig(url=f"http://127.0.0.1:{9100 + i}", name=f"pl-{policy}-{i}"), "m", pool_cfg)
        for i in range(n)
    ]
    for b in backends:
        b.healthy = True  # as a passed /health check leaves it
    routing = RoutingConfig(
        policy=policy,  # type: ignore[arg-type]
        pack_target=2,
        pack_spill_on_prefill=spill,
        scale_in_after_s=hold_s,
    )
    return BackendPool(model, backends, routing)


async def test_the_pool_packs_then_opens_the_next_backend() -> None:
    pool = _pool("pack")
    leases = [pool.try_acquire(100) for _ in range(3)]
    assert [lease.backend.name for lease in leases if lease] == ["pl-pack-0", "pl-pack-0", "pl-pack-1"]
    assert leases[0] is not None
    leases[0].release()  # backend 0 is below its target again: it takes the next one
    nxt = pool.try_acquire(100)
    assert nxt is not None and nxt.backend.name == "pl-pack-0"
    batch = pool.try_acquire_batch([10, 10])  # a released batch joins the busiest below target (backend 1)
    assert {lease.backend.name for lease in batch} == {"pl-pack-1"}
    again = pool.try_acquire(100, exclude=frozenset({"pl-pack-0", "pl-pack-1"}))
    assert again is not None and again.backend.name == "pl-pack-2"


async def test_the_pool_spreads_by_default() -> None:
    pool = _pool("spread")
    names = [lease.backend.name for lease in (pool.try_acquire(100) for _ in range(3)) if lease]
    assert sorted(names) == ["pl-spread-0", "pl-spread-1", "pl-spread-2"]


async def test_the_pool_counts_pending_prefills_and_spills_past_them() -> None:
    pool = _pool("pack", spill=True)
    first = pool.try_acquire(100)
    assert first is not None and first.backend.name == "pl-pack-0" and first.backend.starting == 1
    second = pool.try_acquire(100)  # backend 0 still waits for its first token: the next takes a quiet backend
    assert second is not None and second.backend.name == "pl-pack-1"
    first.consume(1)  # a token came back: backend 0 is quiet again
    assert first.backend.starting == 0
    third = pool.try_acquire(100)
    assert third is not None and third.backend.name == "pl-pack-0"
    third.release()  # given back before any token: no longer pending
    second.consume(0)
    assert third.backend.starting == 0 and second.backend.starting == 1
    second.release()
    assert second.backend.starting == 0


@pytest.mark.parametrize("hold_s", [0.0, 300.0])
async def test_the_parking_signal_rises_with_the_load_and_falls_after_the_hold(hold_s: float) -> None:
    from proxy.metrics import REGISTRY

    model = f"park-{hold_s:g}"
    pool = _pool("spread", hold_s=hold_s, model=model)

    def scraped() -> float | None:
        return REGISTRY.get_sample_value("joulegate_backends_needed", {"model": model})

    assert pool.backends_needed == 1 and scraped() == 1.0  # idle: one backend keeps the model served
    leases = [pool.try_acquire(10) for _ in range(5)]
    assert pool.backends_needed == 3 and scraped() == 3.0  # 5 in flight at 2 per backend
    for lease in leases:
        assert lease is not None
        lease.release()
    assert pool.backends_needed == (1 if hold_s == 0 else 3)  # the peak is held for scale_in_after_s
