"""The shaping queue of one model, as plain state and decisions: classes, fairness, admission, release, placement.

No event loop and no clock of its own: the asyncio layer (``proxy.shaping.shaper``) calls ``admit`` when a request
arrives, ``remove`` when its client goes away, and ``step(now_s, sink)`` whenever something may have changed (an
arrival, a timer it asked for, a freed backend slot). ``step`` lets each class's policy release requests and places
released requests through the ``Sink`` — the backends — so tests drive all of it with a fake clock and a fake sink.

Life of a request: *held* in its class's fair queue until the policy releases it, then *ready* (in release order)
until a backend slot takes it. Placement serves classes by priority (higher first); inside a class, released
requests keep their order, and a batch goes to one backend as far as its free slots reach, the rest waiting at
the head for the next free slot.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

from common.errors import DeadlineExceeded, InvalidArgument, Overloaded, Unavailable
from common.inputs import clip
from common.shaping_config import DEFAULT_CLASS, ClassConfig, Policy, ShapingConfig
from proxy.metrics import tenant_label
from proxy.shaping import metrics as m
from proxy.shaping.fairness import FairQueue
from proxy.shaping.policies import HeldState, RateEstimator, ReleasePolicy, make_policy

RETRY_MIN_S = 0.1
RETRY_MAX_S = 30.0
DRAIN_RATE_TAU_S = 5.0
EXPIRED_MESSAGE = "deadline exceeded while queued; the request never reached a backend"


class Stage(Enum):
    NEW = "new"
    HELD = "held"
    READY = "ready"
    DONE = "done"


class Outcome(Enum):
    PLACED = "placed"
    EXPIRED = "expired"
    CANCELLED = "cancelled"
    FAILED = "failed"


@dataclass(eq=False, slots=True)
class Entry:
    """One request in the queue. ``job`` and ``waiter`` belong to the asyncio layer; the core never reads them."""

    tenant: str
    traffic_class: str
    cost_tokens: int  # prompt + max new tokens: fairness and the token limits count these
    prompt_tokens: int  # what the `tokens` policy fills a prefill with
    enqueued_s: float  # wall clock
    deadline: float | None = None  # in the deadline clock the caller passes to step (event-loop time)
    job: Any = None
    waiter: Any = None
    stage: Stage = field(default=Stage.NEW)
    outcome: Outcome | None = None


class Sink(Protocol):
    """Where released requests go: the model's backends."""

    def healthy(self) -> bool: ...

    def free_slots(self) -> int: ...

    def alive(self, entry: Entry) -> bool:
        """False when the request's client has already gone (its entry is about to be removed)."""

    def place(self, entries: list[Entry]) -> int:
        """Give the first entries slots on ONE backend, as many as fit; return how many got one."""

    def fail(self, entry: Entry, error: Exception) -> None: ...


@dataclass(frozen=True, slots=True)
class Refusal:
    limit: str  # the config key that was hit
    message: str
    retry_after_s: float


class ClassQueue:
    """One traffic class: a fair queue of held requests, its policy, and the released ones waiting for a slot."""

    def __init__(self, name: str, cfg: ClassConfig, model_id: str) -> None:
        self.name = name
        self.cfg = cfg
        self.priority = cfg.priority
        self.policy: ReleasePolicy = make_policy(cfg)
        self.held: FairQueue[Entry] = FairQueue()
        self.held_prompt_tokens = 0
        self.ready: deque[Entry] = deque()
        self.ready_count = 0
        self.requests = 0  # held + ready
        self.tokens = 0
        self.wake_at_s: float | None = None
        self._g_requests = m.QUEUED_REQUESTS.labels(model_id, name)
        self._g_tokens = m.QUEUED_TOKENS.labels(model_id, name)
        self._g_hold = m.HOLD_TARGET.labels(model_id, name)
        self.h_hold = m.HOLD.labels(model_id, name)
        self.h_release = m.RELEASE_SIZE.labels(model_id, name)
        self.h_placed = m.PLACED_BATCH.labels(model_id, name)
        self.c_expired = m.EXPIRED.labels(model_id, name)
        self.c_cancelled = m.CANCELLED.labels(model_id, name)
        self._g_requests.set(0)
        self._g_tokens.set(0)

    @property
    def waits_for_capacity(self) -> bool:
        """Something here goes as soon as a slot frees (released requests, or passthrough's held ones)."""
        return self.ready_count > 0 or (len(self.held) > 0 and self.wake_at_s is None)

    def add(self, entry: Entry, weight: float) -> None:
        self.held.push(entry, tenant=entry.tenant, cost=entry.cost_tokens, weight=weight, arrived_s=entry.enqueued_s)
        entry.stage = Stage.HELD
        self.held_prompt_tokens += entry.prompt_tokens
        self.requests += 1
        self.tokens += entry.cost_tokens
        self.policy.on_arrival(entry.enqueued_s)
        self._gauges()

    def discard(self, entry: Entry) -> None:
        """Forget ``entry`` (held or ready); the caller has checked it is here."""
        if entry.stage is Stage.HELD:
            self.held.remove(entry)
            self.held_prompt_tokens -= entry.prompt_tokens
        elif entry.stage is Stage.READY:
            self.ready_count -= 1  # stays in the deque, skipped and dropped when it reaches the head
        entry.stage = Stage.DONE
        self.requests -= 1
        self.tokens -= entry.cost_tokens
        self._gauges()

    def release(self, now_s: float, capacity: int) -> list[list[Entry]]:
        """Ask the policy until it holds; move what it releases to the ready queue. Returns the released batches."""
        batches: list[list[Entry]] = []
        released = 0
        self.wake_at_s = None
        while len(self.held):
            state = HeldState(len(self.held), self.held_prompt_tokens, self.held.oldest_s(), capacity - released)
            decision = self.policy.decide(state, now_s)
            if decision.count <= 0:
                self.wake_at_s = decision.wake_at_s
                break
            batch = self._take(decision.count, decision.token_budget)
            released += len(batch)
            batches.append(batch)
            self.h_release.observe(len(batch))
        self._g_hold.set(self.policy.hold_s(now_s))
        return batches

    def release_all(self) -> None:
        if len(self.held):
            self.h_release.observe(len(self.held))
            self._take(len(self.held), None)
        self.wake_at_s = None

    def _take(self, count: int, token_budget: int | None) -> list[Entry]:
        batch: list[Entry] = []
        budget_used = 0
        while len(self.held) and len(batch) < count:
            head = self.held.peek()
            assert head is not None
            if token_budget is not None and batch and budget_used + head.prompt_tokens > token_budget:
                break
            self.held.pop()
            self.held_prompt_tokens -= head.prompt_tokens
            budget_used += head.prompt_tokens
            head.stage = Stage.READY
            self.ready.append(head)
            self.ready_count += 1
            batch.append(head)
        return batch

    def ready_entries(self) -> Iterator[Entry]:
        """Released requests still waiting, in order (drops finished ones from the head first)."""
        while self.ready and self.ready[0].stage is not Stage.READY:
            self.ready.popleft()
        return (e for e in self.ready if e.stage is Stage.READY)

    def _gauges(self) -> None:
        self._g_requests.set(self.requests)
        self._g_tokens.set(self.tokens)


class ShapingCore:
    """The shaping state of one model (see the module docstring)."""

    def __init__(self, model_id: str, cfg: ShapingConfig | None = None) -> None:
        self.model_id = model_id
        self.cfg = cfg if cfg is not None else ShapingConfig()
        self.classes = {name: ClassQueue(name, c, model_id) for name, c in self.cfg.classes.items()}
        # stable: equal priorities keep their config order
        self.by_priority = sorted(self.classes.values(), key=lambda c: -c.priority)
        self.requests = 0
        self.tokens = 0
        self.tenant_requests: dict[str, int] = {}
        self.tenant_tokens: dict[str, int] = {}
        self.open = True  # False once the gateway drains: no request is admitted again
        self.drained_requests = RateEstimator(DRAIN_RATE_TAU_S)
        self.drained_tokens = RateEstimator(DRAIN_RATE_TAU_S)
        self._fallback_retry_s = max(1.0, max(c.max_hold_ms for c in self.cfg.classes.values()) / 1000)

    # -- arrival and departure -------------------------------------------------------------------------------
    def resolve_class(self, name: str) -> ClassQueue:
        """The class a request asked for; no name or ``default`` means the configured default class."""
        cq = self.classes.get(name)
        if cq is not None:
            return cq
        if not name or name == DEFAULT_CLASS:
            return self.classes[self.cfg.default_class]
        origin = getattr(name, "origin", "x-traffic-class")  # proxy.traffic_class.RequestedClass: the header or the key
        raise InvalidArgument(f"{origin}: unknown class {clip(str(name))!r} (known: {', '.join(self.classes)})")

    def admit(self, entry: Entry, now_s: float) -> None:
        """Queue ``entry`` (held in its class) or raise Overloaded / Unavailable / InvalidArgument."""
        if self.draining:
            raise Unavailable("gateway is shutting down", retry_after_s=1.0)
        cq = self.resolve_class(entry.traffic_class)
        entry.traffic_class = cq.name
        refusal = self.check(cq, entry, now_s)
        if refusal is not None:
            m.REJECTED.labels(self.model_id, cq.name, tenant_label(entry.tenant), refusal.limit).inc()
            raise Overloaded(refusal.message, retry_after_s=refusal.retry_after_s)
        cq.add(entry, self.cfg.weight(entry.tenant))
        self.requests += 1
        self.tokens += entry.cost_tokens
        self.tenant_requests[entry.tenant] = self.tenant_requests.get(entry.tenant, 0) + 1
        self.tenant_tokens[entry.tenant] = self.tenant_tokens.get(entry.tenant, 0) + entry.cost_tokens

    def placed_directly(self, cq: ClassQueue, entry: Entry, now_s: float) -> None:
        """Account for a request that the caller placed without queueing (see ``can_skip_queue``)."""
        entry.stage = Stage.DONE
        entry.outcome = Outcome.PLACED
        cq.h_hold.observe(0.0)
        cq.h_release.observe(1)
        cq.h_placed.observe(1)
        self.drained_requests.observe(now_s)
        self.drained_tokens.observe(now_s, entry.cost_tokens)

    def can_skip_queue(self, cq: ClassQueue) -> bool:
        """A passthrough request may take a free slot at once when nobody at all waits: no one to be fair to."""
        return self.requests == 0 and cq.cfg.policy is Policy.PASSTHROUGH and not self.draining

    def check(self, cq: ClassQueue, entry: Entry, now_s: float) -> Refusal | None:
        """The first queue limit ``entry`` would break, or None."""
        cfg, cc, cost, tenant = self.cfg, cq.cfg, entry.cost_tokens, entry.tenant
        t_requests = self.tenant_requests.get(tenant, 0)
        t_tokens = self.tenant_tokens.get(tenant, 0)
        checks: list[tuple[str, int | None, int, int, bool, str]] = [
            # (config key, limit, queued now, added by this request, counted in tokens, whose queue)
            ("classes.max_queued_requests", cc.max_queued_requests, cq.requests, 1, False, f"class {cq.name!r}"),
            ("classes.max_queued_tokens", cc.max_queued_tokens, cq.tokens, cost, True, f"class {cq.name!r}"),
            ("max_queued_requests", cfg.max_queued_requests, self.requests, 1, False, "the model"),
            ("max_queued_tokens", cfg.max_queued_tokens, self.tokens, cost, True, "the model"),
            ("max_queued_requests_per_tenant", cfg.max_queued_requests_per_tenant, t_requests, 1, False,
             f"tenant {tenant!r}"),
            ("max_queued_tokens_per_tenant", cfg.max_queued_tokens_per_tenant, t_tokens, cost, True,
             f"tenant {tenant!r}"),
        ]  # fmt: skip
        for key, limit, queued, add, in_tokens, whose in checks:
            if limit is None or queued + add <= limit:
                continue
            unit = "tokens" if in_tokens else "requests"
            retry_s = self.retry_hint_s(queued, in_tokens=in_tokens, now_s=now_s)
            return Refusal(
                limit=key.rsplit(".", 1)[-1],
                message=(
                    f"shaping queue of model {self.model_id!r} is full for {whose}: {queued} {unit} waiting, "
                    f"this request adds {add} ({key} = {limit}); retry in {retry_s:.1f} s"
                ),
                retry_after_s=retry_s,
            )
        return None

    def retry_hint_s(self, queued: int, *, in_tokens: bool, now_s: float) -> float:
        """About how long the queue ahead takes to drain at the measured rate, within [0.1, 30] s."""
        rate = (self.drained_tokens if in_tokens else self.drained_requests).rate(now_s)
        estimate = queued / rate if rate > 0 else self._fallback_retry_s
        return min(RETRY_MAX_S, max(RETRY_MIN_S, estimate))

    def remove(self, entry: Entry, outcome: Outcome) -> bool:
        """Take ``entry`` out (its client went away, or its deadline passed); False if it was no longer queued."""
        if entry.stage not in (Stage.HELD, Stage.READY):
            return False
        self._finish(entry, outcome)
        return True

    def _finish(self, entry: Entry, outcome: Outcome, now_s: float | None = None) -> None:
        cq = self.classes[entry.traffic_class]
        cq.discard(entry)
        entry.outcome = outcome
        self.requests -= 1
        self.tokens -= entry.cost_tokens
        for counts, amount in ((self.tenant_requests, 1), (self.tenant_tokens, entry.cost_tokens)):
            left = counts[entry.tenant] - amount
            if left:
                counts[entry.tenant] = left
            else:
                del counts[entry.tenant]
        match outcome:
            case Outcome.PLACED:
                assert now_s is not None
                cq.h_hold.observe(max(0.0, now_s - entry.enqueued_s))
                self.drained_requests.observe(now_s)
                self.drained_tokens.observe(now_s, entry.cost_tokens)
            case Outcome.EXPIRED:
                cq.c_expired.inc()
            case Outcome.CANCELLED:
                cq.c_cancelled.inc()
            case Outcome.FAILED:
                pass

    # -- release and placement -------------------------------------------------------------------------------
    @property
    def waiting_for_capacity(self) -> bool:
        return any(c.waits_for_capacity for c in self.classes.values())

    def step(self, now_s: float, sink: Sink, deadline_now: float | None = None) -> float | None:
        """Release what the policies let go and place what fits; returns when to step again (None: on events)."""
        healthy = sink.healthy()
        wake_s: float | None = None
        for cq in self.by_priority:
            self._place(cq, sink, now_s, deadline_now)
            if not healthy:
                cq.release(now_s, capacity=len(cq.held))  # passthrough gives up waiting for a slot
                self._fail_ready(cq, sink, Unavailable(f"no healthy backend for model {self.model_id!r}"))
            elif cq.release(now_s, capacity=sink.free_slots()):
                self._place(cq, sink, now_s, deadline_now)
            if cq.wake_at_s is not None:
                wake_s = cq.wake_at_s if wake_s is None else min(wake_s, cq.wake_at_s)
        return wake_s

    @property
    def draining(self) -> bool:
        return not self.open

    def close(self) -> None:
        """Admit no request from now on (a drain); what is queued stays until ``drain`` releases or fails it."""
        self.open = False

    def drain(self, now_s: float, sink: Sink, deadline_now: float | None = None) -> None:
        """Shutdown: release everything now, place what fits, fail the rest with Unavailable."""
        self.close()
        for cq in self.by_priority:
            cq.release_all()
        if sink.healthy():
            for cq in self.by_priority:
                self._place(cq, sink, now_s, deadline_now)
        for cq in self.by_priority:
            self._fail_ready(cq, sink, Unavailable("gateway is shutting down", retry_after_s=1.0))

    def _fail_ready(self, cq: ClassQueue, sink: Sink, error: Exception) -> None:
        for entry in list(cq.ready_entries()):
            self._finish(entry, Outcome.FAILED)
            sink.fail(entry, error)

    def _place(self, cq: ClassQueue, sink: Sink, now_s: float, deadline_now: float | None) -> None:
        """Place ``cq``'s released requests, in order, while backends have free slots.

        Requests whose deadline has passed are failed on the way (the gateway's own timeout may not have fired
        yet): they never reach a backend.
        """
        while cq.ready_count:
            free = sink.free_slots()
            if free <= 0:
                return
            head: list[Entry] = []
            expired: list[Entry] = []
            for entry in cq.ready_entries():
                if not sink.alive(entry):
                    continue  # its task is being cancelled and removes it
                if deadline_now is not None and entry.deadline is not None and entry.deadline <= deadline_now:
                    expired.append(entry)
                    continue
                head.append(entry)
                if len(head) >= free:
                    break
            for entry in expired:
                self._finish(entry, Outcome.EXPIRED)
                sink.fail(entry, DeadlineExceeded(EXPIRED_MESSAGE))
            if not head:
                if expired:
                    continue
                return
            placed = sink.place(head)
            if placed:
                cq.h_placed.observe(placed)
            for entry in head[:placed]:
                self._finish(entry, Outcome.PLACED, now_s)
            if placed == 0:
                return

    # -- inspection ------------------------------------------------------------------------------------------
    def hold_s(self, class_name: str, now_s: float) -> float:
        return self.classes[class_name].policy.hold_s(now_s)
