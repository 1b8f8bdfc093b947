"""The shaping core — classes, release, placement, priorities, fairness, admission, deadlines, drain — with a
fake clock and a fake set of backend slots (no event loop)."""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass, field

import pytest

from common.errors import DeadlineExceeded, InvalidArgument, Overloaded, Unavailable
from common.shaping_config import ShapingConfig
from proxy.metrics import REGISTRY
from proxy.shaping.core import Entry, Outcome, ShapingCore, Stage


@dataclass
class Slots:
    """Backends as the core sees them: ``per_backend`` free slots on each of ``backends`` servers."""

    per_backend: list[int]
    up: bool = True
    placed: list[list[Entry]] = field(default_factory=list)  # one list per placement (one backend)
    failed: list[tuple[Entry, Exception]] = field(default_factory=list)

    def healthy(self) -> bool:
        return self.up

    def free_slots(self) -> int:
        return sum(self.per_backend) if self.up else 0

    def alive(self, entry: Entry) -> bool:
        return True

    def place(self, entries: list[Entry]) -> int:
        i = max(range(len(self.per_backend)), key=lambda b: self.per_backend[b])
        n = min(len(entries), self.per_backend[i])
        self.per_backend[i] -= n
        if n:
            self.placed.append(entries[:n])
        return n

    def fail(self, entry: Entry, error: Exception) -> None:
        self.failed.append((entry, error))

    def free(self, backend: int = 0, n: int = 1) -> None:
        self.per_backend[backend] += n

    @property
    def all_placed(self) -> list[Entry]:
        return [e for batch in self.placed for e in batch]


_n = 0


def entry(tenant: str = "t", cls: str = "default", *, at: float = 0.0, cost: int = 100, prompt: int = 50,
          deadline: float | None = None) -> Entry:  # fmt: skip
    global _n
    _n += 1
    return Entry(tenant=tenant, traffic_class=cls, cost_tokens=cost, prompt_tokens=prompt, enqueued_s=at,
                 deadline=deadline, job=_n)  # fmt: skip


def core(model: str, **shaping: object) -> ShapingCore:
    return ShapingCore(model, ShapingConfig.model_validate(shaping))


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# -- defaults and classes ---------------------------------------------------------------------------------------
def test_default_config_is_passthrough_bounded_by_free_slots() -> None:
    c = core("m-default")
    slots = Slots([2])
    es = [entry() for _ in range(3)]
    for e in es:
        c.admit(e, 0.0)
        assert c.step(0.0, slots) is None
    assert slots.all_placed == es[:2] and c.requests == 1
    assert c.waiting_for_capacity
    slots.free()
    c.step(0.1, slots)
    assert slots.all_placed == es and c.requests == 0 and not c.waiting_for_capacity


def test_unknown_class_is_invalid_and_default_maps_to_the_default_class() -> None:
    c = core("m-cls", default_class="interactive", classes={"interactive": {}, "batch": {"policy": "batch"}})
    with pytest.raises(InvalidArgument, match=r"x-traffic-class: unknown class 'bulk' \(known: interactive, batch\)"):
        c.admit(entry(cls="bulk"), 0.0)
    e = entry(cls="default")
    c.admit(e, 0.0)
    assert e.traffic_class == "interactive"
    e2 = entry(cls="")
    c.admit(e2, 0.0)
    assert e2.traffic_class == "interactive"


# -- release and placement --------------------------------------------------------------------------------------
def test_batch_release_goes_to_one_backend_within_its_free_slots_rest_waits_in_order() -> None:
    c = core("m-cap", classes={"default": {"policy": "batch", "max_batch": 8, "hold_ms": 1000}})
    slots = Slots([5, 3])
    es = [entry(at=0.01 * i) for i in range(8)]
    for e in es[:7]:
        c.admit(e, e.enqueued_s)
        wake = c.step(e.enqueued_s, slots)
        assert wake == pytest.approx(1.0)  # held until the oldest waited 1 s or 8 are there
    assert slots.placed == []
    c.admit(es[7], 0.07)
    c.step(0.07, slots)
    # 5 on the emptiest backend at once, then the other backend's 3: never past a backend's free slots
    assert [len(b) for b in slots.placed] == [5, 3]
    assert slots.all_placed == es
    assert slots.per_backend == [0, 0]


def test_what_does_not_fit_goes_first_when_capacity_frees() -> None:
    c = core("m-head", classes={"default": {"policy": "batch", "max_batch": 4, "hold_ms": 100}})
    slots = Slots([1])
    first = [entry(at=0.0) for _ in range(4)]
    for e in first:
        c.admit(e, 0.0)
    c.step(0.0, slots)
    assert slots.all_placed == first[:1]
    later = [entry(at=0.05) for _ in range(4)]
    for e in later:
        c.admit(e, 0.05)
    c.step(0.05, slots)  # the second batch is released but queues behind the first one's rest
    slots.free(n=10)
    c.step(0.06, slots)
    assert slots.all_placed == first + later
    assert len(slots.placed[1]) == 7  # the whole backlog as one placement once there is room


def test_window_releases_every_class_member_at_the_boundary() -> None:
    c = core("m-win", classes={"default": {"policy": "window", "window_ms": 100}})
    slots = Slots([64])
    t0 = 1_700_000_000.0
    arrivals = [t0 + 0.003, t0 + 0.040, t0 + 0.099]
    for t in arrivals:
        c.admit(entry(at=t), t)
        assert c.step(t, slots) == pytest.approx(t0 + 0.1)
    assert slots.placed == []
    c.step(t0 + 0.1, slots)
    assert [len(b) for b in slots.placed] == [3]
    c.admit(entry(at=t0 + 0.1001), t0 + 0.1001)
    assert c.step(t0 + 0.1001, slots) == pytest.approx(t0 + 0.2)


def test_tokens_policy_fills_one_prefill_budget() -> None:
    c = core("m-tok", classes={"default": {"policy": "tokens", "max_batch_prefill_tokens": 1000, "hold_ms": 500}})
    slots = Slots([64])
    es = [entry(at=0.0, prompt=300) for _ in range(4)]
    for e in es[:3]:
        c.admit(e, 0.0)
        c.step(0.0, slots)
    assert slots.placed == []  # 900 < 1000
    c.admit(es[3], 0.0)
    c.step(0.0, slots)  # 1200 held: release what fits one prefill (3 x 300), keep the 4th for the next
    assert [len(b) for b in slots.placed] == [3]
    assert c.step(0.1, slots) == pytest.approx(0.5)
    c.step(0.5, slots)
    assert slots.all_placed == es


def test_priorities_give_free_slots_to_the_higher_class_first() -> None:
    c = core("m-prio", classes={
        "bulk": {"policy": "batch", "max_batch": 4, "hold_ms": 10, "priority": 0},
        "live": {"policy": "passthrough", "priority": 10},
    }, default_class="live")  # fmt: skip
    slots = Slots([0])
    bulk = [entry(cls="bulk") for _ in range(4)]
    for e in bulk:
        c.admit(e, 0.0)
    c.step(0.0, slots)  # bulk released, waiting for a slot
    live = [entry(cls="live", at=0.5) for _ in range(3)]
    for e in live:
        c.admit(e, 0.5)
    c.step(0.5, slots)
    slots.free(n=4)
    c.step(0.6, slots)
    assert slots.all_placed == [*live, bulk[0]]
    slots.free(n=10)
    c.step(0.7, slots)
    assert slots.all_placed == [*live, *bulk]


# -- fairness through the core ----------------------------------------------------------------------------------
def run_two_tenants(weights: dict[str, float]) -> tuple[dict[str, int], dict[str, list[float]]]:
    """A flood tenant sends 2000 requests at t=0, a light one 1 request every 50 ms; 4 slots, 40 ms per request.

    Returns requests served per tenant within the first 10 s and each tenant's waits.
    """
    c = core("m-fair", classes={"default": {}}, tenant_weights=weights)
    slots = Slots([4])
    events: list[tuple[float, int, str, Entry | None]] = []  # (time, seq, kind, entry)
    seq = 0

    def push(t: float, kind: str, e: Entry | None = None) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(events, (t, seq, kind, e))

    for _ in range(2000):
        push(0.0, "arrive", entry("flood", at=0.0))
    for i in range(200):
        push(0.05 * i + 0.001, "arrive", entry("light", at=0.05 * i + 0.001))
    served = {"flood": 0, "light": 0}
    waits: dict[str, list[float]] = {"flood": [], "light": []}
    while events:
        t, _s, kind, e = heapq.heappop(events)
        if kind == "arrive":
            assert e is not None
            c.admit(e, t)
        else:
            slots.free()
        before = len(slots.all_placed)
        c.step(t, slots)
        for p in slots.all_placed[before:]:
            waits[p.tenant].append(t - p.enqueued_s)
            if t < 10:
                served[p.tenant] += 1
            push(t + 0.04, "done")
    return served, waits


def test_a_flood_cannot_starve_a_light_tenant_at_the_slots() -> None:
    served, waits = run_two_tenants({})
    # the light tenant asks for 20/s and gets it all; the flood gets the rest of the 100/s the slots serve
    assert served["light"] == pytest.approx(200, abs=2)
    assert max(waits["light"]) < 0.05  # never waits behind the flood's backlog (it would wait seconds FIFO)
    assert served["flood"] == pytest.approx(1000 - served["light"], abs=8)  # the slots never idle meanwhile


def test_fair_shares_between_backlogged_tenants_follow_weights() -> None:
    c = core("m-weights", tenant_weights={"acme": 3.0})
    slots = Slots([0])
    for i in range(300):
        c.admit(entry("acme", at=0.0), 0.0)
        c.admit(entry("beta", at=0.0), 0.0)
        assert i >= 0
    served = {"acme": 0, "beta": 0}
    for step in range(200):
        slots.free()
        before = len(slots.all_placed)
        c.step(0.01 * step, slots)
        for p in slots.all_placed[before:]:
            served[p.tenant] += 1
    assert served["acme"] == pytest.approx(150, abs=2)  # 3 : 1


# -- admission --------------------------------------------------------------------------------------------------
def test_queue_limits_refuse_with_a_retry_hint() -> None:
    c = core("m-adm", max_queued_requests=5, max_queued_requests_per_tenant=3, max_queued_tokens=10_000,
             classes={"default": {"policy": "batch", "max_batch": 100, "hold_ms": 60_000}})  # fmt: skip
    for _ in range(3):
        c.admit(entry("a"), 0.0)
    with pytest.raises(Overloaded, match="tenant 'a'") as exc:
        c.admit(entry("a"), 0.0)
    assert 0.1 <= exc.value.retry_after_s <= 30
    c.admit(entry("b"), 0.0)
    with pytest.raises(Overloaded, match="max_queued_tokens = 10000"):
        c.admit(entry("b", cost=9_999), 0.0)
    c.admit(entry("b"), 0.0)
    with pytest.raises(Overloaded, match=r"the model: 5 requests waiting.*max_queued_requests = 5"):
        c.admit(entry("c"), 0.0)
    assert c.requests == 5
    rejected = metric("joulegate_shaping_rejected_total", model="m-adm", traffic_class="default", tenant="c",
                      limit="max_queued_requests")  # fmt: skip
    assert rejected == 1


def test_class_limits_apply_to_their_class_only() -> None:
    c = core("m-cadm", classes={"a": {"max_queued_requests": 1}, "b": {}}, default_class="a")
    slots = Slots([0])
    c.admit(entry(cls="a"), 0.0)
    with pytest.raises(Overloaded, match="class 'a'"):
        c.admit(entry(cls="a"), 0.0)
    c.admit(entry(cls="b"), 0.0)
    c.step(0.0, slots)
    assert c.requests == 2


def test_retry_hint_follows_the_drain_rate_and_is_bounded() -> None:
    c = core("m-hint", max_queued_requests=50)
    slots = Slots([1])
    t = 0.0
    for _ in range(200):  # 10 requests/s drain for 20 s
        c.admit(entry(at=t), t)
        c.step(t, slots)
        t += 0.1
        slots.free()
    for _ in range(50):
        c.admit(entry(at=t), t)
        slots.per_backend[0] = 0
        c.step(t, slots)
    with pytest.raises(Overloaded) as exc:
        c.admit(entry(at=t), t)
    assert exc.value.retry_after_s == pytest.approx(50 / 10, rel=0.25)
    assert c.retry_hint_s(10**9, in_tokens=False, now_s=t) == 30.0
    assert c.retry_hint_s(0, in_tokens=False, now_s=t) == 0.1


# -- deadlines, cancellation, drain, health ---------------------------------------------------------------------
def test_expired_request_is_failed_at_placement_and_never_placed() -> None:
    c = core("m-exp", classes={"default": {"policy": "batch", "max_batch": 3, "hold_ms": 1000}})
    slots = Slots([8])
    keep, late = entry(deadline=100.0), entry(deadline=5.0)
    c.admit(keep, 0.0)
    c.admit(late, 0.0)
    c.step(1.0, slots, deadline_now=6.0)
    assert slots.all_placed == [keep]
    assert [(e, type(err)) for e, err in slots.failed] == [(late, DeadlineExceeded)]
    assert late.outcome is Outcome.EXPIRED and c.requests == 0
    assert metric("joulegate_shaping_expired_total", model="m-exp", traffic_class="default") == 1


def test_removed_request_leaves_the_queue_and_its_batch() -> None:
    c = core("m-rm", classes={"default": {"policy": "batch", "max_batch": 3, "hold_ms": 1000}})
    slots = Slots([8])
    a, b, d = entry(), entry(), entry()
    c.admit(a, 0.0)
    c.admit(b, 0.0)
    assert c.remove(b, Outcome.CANCELLED) and not c.remove(b, Outcome.CANCELLED)
    assert c.requests == 1 and c.tokens == a.cost_tokens and b.stage is Stage.DONE
    c.admit(d, 0.0)
    c.step(0.0, slots)
    assert slots.placed == []  # two held, not three: the cancelled one does not count towards the batch
    c.step(1.0, slots)
    assert slots.all_placed == [a, d]
    assert metric("joulegate_shaping_cancelled_total", model="m-rm", traffic_class="default") == 1


def test_drain_places_what_fits_and_fails_the_rest() -> None:
    c = core("m-drain", classes={"default": {"policy": "batch", "max_batch": 100, "hold_ms": 60_000}})
    slots = Slots([3])
    es = [entry() for _ in range(5)]
    for e in es:
        c.admit(e, 0.0)
    c.step(0.0, slots)
    c.drain(0.1, slots)
    assert slots.all_placed == es[:3]
    assert [e for e, _ in slots.failed] == es[3:]
    assert all(isinstance(err, Unavailable) and "shutting down" in str(err) for _, err in slots.failed)
    assert c.requests == 0
    with pytest.raises(Unavailable, match="shutting down"):
        c.admit(entry(), 0.2)


def test_no_healthy_backend_fails_released_requests_but_keeps_holding_the_rest() -> None:
    c = core("m-down", classes={"live": {}, "bulk": {"policy": "batch", "hold_ms": 500}}, default_class="live")
    slots = Slots([4], up=False)
    live, bulk = entry(cls="live"), entry(cls="bulk")
    c.admit(live, 0.0)
    c.admit(bulk, 0.0)
    c.step(0.0, slots)
    assert [e for e, _ in slots.failed] == [live]
    assert isinstance(slots.failed[0][1], Unavailable)
    slots.up = True
    c.step(0.5, slots)
    assert slots.all_placed == [bulk]


# -- adaptive end to end on the core ----------------------------------------------------------------------------
def simulate_adaptive(rate_per_s: float, seed: int = 5) -> tuple[list[float], list[int]]:
    """Poisson arrivals into an adaptive class with unlimited slots; returns waits and release sizes."""
    c = core(f"m-ad-{rate_per_s}", classes={"default": {
        "policy": "adaptive", "ttft_bound_ms": 500, "service_ttft_ms": 100, "target_batch": 8, "rate_window_s": 2,
    }})  # fmt: skip
    slots = Slots([10**9])
    rng = random.Random(seed)
    t, wake = 0.0, None
    waits: list[float] = []
    sizes: list[int] = []
    arrivals = []
    while t < 30:
        t += rng.expovariate(rate_per_s)
        arrivals.append(t)
    i = 0
    while i < len(arrivals) or wake is not None:
        if wake is not None and (i >= len(arrivals) or wake <= arrivals[i]):
            now = wake
        else:
            now = arrivals[i]
            c.admit(entry(at=now), now)
            i += 1
        before = len(slots.placed)
        wake = c.step(now, slots)
        for batch in slots.placed[before:]:
            sizes.append(len(batch))
            waits.extend(now - e.enqueued_s for e in batch)
    assert len(waits) == len(arrivals)
    return waits, sizes


def test_adaptive_waits_stay_within_the_bound_batches_fill_and_waits_shrink_with_load() -> None:
    results = {rate: simulate_adaptive(rate) for rate in (1.0, 10.0, 200.0)}
    for waits, _sizes in results.values():
        assert max(waits) <= 0.4 + 1e-6  # ttft_bound - service_ttft
    mean_wait = {r: sum(w) / len(w) for r, (w, _s) in results.items()}
    mean_size = {r: sum(s) / len(s) for r, (_w, s) in results.items()}
    assert mean_size[1.0] > 1.2  # companions collected even at 1 request/s
    assert mean_size[10.0] > 3
    assert mean_size[200.0] > 0.8 * 8  # heavy load: (about) full target batches
    assert mean_wait[200.0] < 0.1 * mean_wait[1.0]  # ... released almost at once
