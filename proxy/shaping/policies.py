"""Release policies: pure decisions on *when* a traffic class's held requests go, and how many at once.

A policy sees only a summary of what its class holds (``HeldState``) and the time, and answers with a ``Release``:
how many requests to release now (0: keep holding) and when to ask again if nothing else happens. It owns no
timers and touches no event loop, so every decision is testable with a fake clock. Times are wall-clock seconds
(``time.time()``), the clock that aligns ``window`` epochs across replicas.

Policies
--------
``passthrough``  No hold: releases as many requests as there are free backend slots, one fair pick at a time.
``window``       Releases everything held at each boundary ``k * window_ms`` since the Unix epoch. Replicas with
                 synchronised clocks therefore release together, and a backend fed by several replicas still sees
                 one burst per window.
``batch``        Releases ``max_batch`` requests as soon as that many are held, or whatever is held once the oldest
                 has waited ``hold_ms``.
``tokens``       Releases once the held prompt tokens reach ``max_batch_prefill_tokens`` (set it to TGI's
                 ``--max-batch-prefill-tokens`` so a release fills exactly one prefill), taking requests in fair
                 order while their prompts fit that budget; or whatever is held once the oldest waited ``hold_ms``.
``adaptive``     Chooses the hold from the measured arrival rate so that batches fill while the expected TTFT stays
                 under ``ttft_bound_ms``; see ``AdaptivePolicy``.

Holding only *releases* requests: the shaper then places them on one backend together, never past its free slots,
and whatever does not fit waits at the head of the class's queue for the next free slot.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

from common.shaping_config import ClassConfig, Policy

CLOCK_EPS_S = 1e-6


@dataclass(frozen=True, slots=True)
class HeldState:
    """What a class holds right now (requests not yet released)."""

    count: int
    prompt_tokens: int
    oldest_s: float | None  # when the oldest held request arrived (wall-clock s); None when nothing is held
    capacity: int  # backend slots free for this class right now (passthrough releases into them)


@dataclass(frozen=True, slots=True)
class Release:
    """A policy's answer: release ``count`` requests now (0: hold), taking prompts up to ``token_budget``.

    ``wake_at_s`` is when the policy wants to be asked again if nothing arrives meanwhile (None: only on the next
    arrival or capacity change).
    """

    count: int
    wake_at_s: float | None = None
    token_budget: int | None = None

    @staticmethod
    def hold(wake_at_s: float | None = None) -> Release:
        return Release(0, wake_at_s)


class ReleasePolicy(Protocol):
    def on_arrival(self, now_s: float) -> None:
        """A request joined the class (adaptive measures the arrival rate from these)."""

    def decide(self, state: HeldState, now_s: float) -> Release: ...

    def hold_s(self, now_s: float) -> float:
        """How long the oldest request would be held now, at most (for metrics and retry hints)."""


def _cap(n: int, max_batch: int | None) -> int:
    return n if max_batch is None else min(n, max_batch)


class PassthroughPolicy:
    def on_arrival(self, now_s: float) -> None:
        pass

    def decide(self, state: HeldState, now_s: float) -> Release:
        return Release(min(state.count, max(0, state.capacity)))

    def hold_s(self, now_s: float) -> float:
        return 0.0


class WindowPolicy:
    """Release at every multiple of ``window_s`` since the Unix epoch."""

    def __init__(self, window_s: float) -> None:
        if window_s <= 0:
            raise ValueError("window_s must be > 0")
        self.window_s = window_s

    def boundary_after(self, t_s: float) -> float:
        """The first epoch boundary strictly after ``t_s``."""
        return (math.floor(t_s / self.window_s) + 1) * self.window_s

    def on_arrival(self, now_s: float) -> None:
        pass

    def decide(self, state: HeldState, now_s: float) -> Release:
        if state.count == 0 or state.oldest_s is None:
            return Release.hold()
        due_s = self.boundary_after(state.oldest_s)
        if now_s + CLOCK_EPS_S >= due_s:  # k * window in floating point is not exactly the clock's reading
            return Release(state.count)
        return Release.hold(due_s)

    def hold_s(self, now_s: float) -> float:
        return self.boundary_after(now_s) - now_s


class BatchPolicy:
    """Release ``max_batch`` at once when that many are held, else all once the oldest waited ``hold_s``."""

    def __init__(self, max_batch: int, hold_s: float) -> None:
        self.max_batch = max_batch
        self.hold_limit_s = hold_s

    def on_arrival(self, now_s: float) -> None:
        pass

    def decide(self, state: HeldState, now_s: float) -> Release:
        if state.count == 0 or state.oldest_s is None:
            return Release.hold()
        if state.count >= self.max_batch:
            return Release(self.max_batch)
        due_s = state.oldest_s + self.hold_limit_s
        if now_s >= due_s:
            return Release(state.count)
        return Release.hold(due_s)

    def hold_s(self, now_s: float) -> float:
        return self.hold_limit_s


class TokensPolicy:
    """Release a prefill's worth of prompt tokens as soon as it is held, else all once the oldest waited."""

    def __init__(self, prefill_tokens: int, hold_s: float, max_batch: int | None = None) -> None:
        self.prefill_tokens = prefill_tokens
        self.hold_limit_s = hold_s
        self.max_batch = max_batch

    def on_arrival(self, now_s: float) -> None:
        pass

    def decide(self, state: HeldState, now_s: float) -> Release:
        if state.count == 0 or state.oldest_s is None:
            return Release.hold()
        if state.prompt_tokens >= self.prefill_tokens or (self.max_batch and state.count >= self.max_batch):
            return Release(_cap(state.count, self.max_batch), token_budget=self.prefill_tokens)
        due_s = state.oldest_s + self.hold_limit_s
        if now_s >= due_s:
            return Release(_cap(state.count, self.max_batch), token_budget=self.prefill_tokens)
        return Release.hold(due_s)

    def hold_s(self, now_s: float) -> float:
        return self.hold_limit_s


class RateEstimator:
    """Exponentially decayed event rate (events/s) with time constant ``tau_s``.

    Each event adds ``1/tau_s`` to a value that decays as ``exp(-dt/tau_s)``; for a steady Poisson stream of rate
    λ the value's mean is λ. It reacts to a change of rate within about ``tau_s``, and reads lower while no event
    comes, so a stream that stops decays towards 0 instead of keeping its last rate.
    """

    def __init__(self, tau_s: float) -> None:
        self.tau_s = tau_s
        self._value = 0.0
        self._at_s: float | None = None

    def observe(self, now_s: float, amount: float = 1.0) -> None:
        self._value = self.rate(now_s) + amount / self.tau_s
        self._at_s = now_s if self._at_s is None else max(self._at_s, now_s)

    def rate(self, now_s: float) -> float:
        if self._at_s is None:
            return 0.0
        return self._value * math.exp(-max(0.0, now_s - self._at_s) / self.tau_s)


class AdaptivePolicy:
    """Hold as long as it takes to collect a target batch, but never so long that TTFT would pass the bound.

    How it decides. It keeps λ, an exponentially decayed estimate of the class's arrival rate (time constant
    ``rate_window_s``, see ``RateEstimator``). The oldest held request may wait

        h = min(ttft_bound - service_ttft,  (target_batch - 1) / λ)

    — the TTFT budget left after the backend's own time to first token, or the expected time for the
    ``target_batch - 1`` companions to arrive, whichever is shorter. It releases everything held (up to
    ``max_batch``) when ``target_batch`` requests are held or when the oldest has waited ``h``. Under light load
    ``(n-1)/λ`` is long, so requests wait the whole budget and are released together with whatever came meanwhile
    (about ``1 + λh`` of them); under heavy load the batch fills in ``(n-1)/λ``, which shrinks towards zero, so
    shaping adds almost no latency where TGI's continuous batching already has company for every request.
    ``h`` is re-read on every decision, so a burst shortens the hold of requests already waiting.

    What it assumes. ``service_ttft_ms`` is a fixed estimate of the time from release to first token (TGI's queue
    plus one prefill); the bound holds for the *expected* TTFT only as long as that estimate does — a backend that
    is saturated queues released requests further, which no hold can undo. Arrivals are taken as roughly Poisson
    over ``rate_window_s``; the hold never exceeds the budget whatever the estimate, so a wrong λ costs batch fill,
    not the bound.
    """

    def __init__(
        self,
        ttft_bound_s: float,
        service_ttft_s: float,
        target_batch: int,
        rate_window_s: float,
        max_batch: int | None = None,
    ) -> None:
        if service_ttft_s >= ttft_bound_s:
            raise ValueError("service_ttft_s must be below ttft_bound_s")
        self.ttft_bound_s = ttft_bound_s
        self.service_ttft_s = service_ttft_s
        self.target_batch = target_batch
        self.max_batch = max_batch
        self.rate = RateEstimator(rate_window_s)

    @property
    def budget_s(self) -> float:
        return self.ttft_bound_s - self.service_ttft_s

    def on_arrival(self, now_s: float) -> None:
        self.rate.observe(now_s)

    def hold_s(self, now_s: float) -> float:
        lam = self.rate.rate(now_s)
        fill_s = (self.target_batch - 1) / lam if lam > 0 else math.inf
        return max(0.0, min(self.budget_s, fill_s))

    def decide(self, state: HeldState, now_s: float) -> Release:
        if state.count == 0 or state.oldest_s is None:
            return Release.hold()
        if state.count >= self.target_batch:
            return Release(_cap(state.count, self.max_batch))
        due_s = state.oldest_s + self.hold_s(now_s)
        if now_s >= due_s:
            return Release(_cap(state.count, self.max_batch))
        return Release.hold(due_s)


def make_policy(cfg: ClassConfig) -> ReleasePolicy:
    """The policy a validated class config describes (its parameters are filled in by validation)."""
    match cfg.policy:
        case Policy.PASSTHROUGH:
            return PassthroughPolicy()
        case Policy.WINDOW:
            assert cfg.window_ms is not None
            return WindowPolicy(cfg.window_ms / 1000)
        case Policy.BATCH:
            assert cfg.max_batch is not None and cfg.hold_ms is not None
            return BatchPolicy(cfg.max_batch, cfg.hold_ms / 1000)
        case Policy.TOKENS:
            assert cfg.max_batch_prefill_tokens is not None and cfg.hold_ms is not None
            return TokensPolicy(cfg.max_batch_prefill_tokens, cfg.hold_ms / 1000, cfg.max_batch)
        case Policy.ADAPTIVE:
            assert cfg.ttft_bound_ms is not None and cfg.service_ttft_ms is not None
            assert cfg.target_batch is not None and cfg.rate_window_s is not None
            return AdaptivePolicy(
                cfg.ttft_bound_ms / 1000,
                cfg.service_ttft_ms / 1000,
                cfg.target_batch,
                cfg.rate_window_s,
                cfg.max_batch,
            )
    raise AssertionError(f"unknown policy {cfg.policy}")
