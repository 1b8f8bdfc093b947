"""The simulated GPU: board power that follows the engine's work, an NVML-like energy counter, and the true split.

``SimGPU`` puts the wall clock (``time.time_ns()``), the cost model's power and a lock around the pure
``EnergyLedger``. The engine tells it what it is doing (idle, a prefill step over some requests, a decode step over
a batch); readers (``/sim/energy``, ``/sim/truth``, or an in-process sampler on another thread) ask it what the
counter shows and what every request truly cost.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sim import costmodel
from sim.config import SimConfig
from sim.ledger import PJ_PER_MJ, EnergyAccount, EnergyLedger, Phase, TruthSnapshot


def context_tokens(accounts: Sequence[EnergyAccount]) -> int:
    """Tokens in the KV cache of a decode batch: every sequence's prompt and the tokens it generated so far."""
    return sum(a.prompt_tokens + a.generated_tokens for a in accounts)


@dataclass(frozen=True, slots=True)
class CounterReading:
    """One read of the simulated counter, shaped like ``GET /sim/energy``."""

    device: str
    energy_mj: int
    t_ns: int
    update_period_ms: int
    lag_ms: int

    def to_json(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "energy_mj": self.energy_mj,
            "t_ns": self.t_ns,
            "update_period_ms": self.update_period_ms,
            "lag_ms": self.lag_ms,
        }


class SimGPU:
    """One simulated H100: thread-safe; every method takes the wall clock itself unless given ``t_ns``."""

    def __init__(self, config: SimConfig, device: str, t0_ns: int | None = None) -> None:
        """``t0_ns``: when the board powered on. By default a little before now (the counter's lag plus two
        updates): a real GPU has been drawing idle power long before a server starts, so its counter moves from
        the first read on, lag or not. That idle energy is in the truth's ``idle_mj`` like any other."""
        self.config = config
        self.device = device
        self._lock = threading.Lock()
        self._idle_mw = costmodel.idle_power_mw(config)
        self._period_ns = config.counter_update_period_ms * costmodel.NS_PER_MS
        self._lag_ns = config.counter_lag_ms * costmodel.NS_PER_MS
        self._ledger = EnergyLedger(
            t0_ns=time.time_ns() - self._lag_ns - 2 * self._period_ns if t0_ns is None else t0_ns,
            idle_power_mw=self._idle_mw,
            update_period_ns=self._period_ns,
            boundaries_kept=max(64, 4 * (self._lag_ns // self._period_ns + 2)),
        )

    # --- what the engine does ---

    def open_account(self, request_id: str, prompt_tokens: int) -> EnergyAccount:
        with self._lock:
            return self._ledger.open_account(request_id, prompt_tokens)

    def close(self, account: EnergyAccount) -> None:
        """The request is over (finished, failed or cancelled): its energy becomes final once its step ends."""
        with self._lock:
            self._ledger.close_account(account)

    def idle(self, t_ns: int | None = None) -> None:
        with self._lock:
            self._ledger.set_state(time.time_ns() if t_ns is None else t_ns, Phase.IDLE, self._idle_mw)

    def prefill(
        self, accounts: Sequence[EnergyAccount], t_ns: int | None = None, weights: Sequence[int] | None = None
    ) -> None:
        """A prefill step over ``accounts`` starts: ~650 W (``sim.costmodel``), shared in proportion to the prompt
        tokens each has in the step (``weights``; default: their whole prompts)."""
        if not accounts:
            self.idle(t_ns)
            return
        if weights is None:
            weights = [a.prompt_tokens for a in accounts]
        power = costmodel.prefill_power_mw(self.config, sum(weights))
        with self._lock:
            self._ledger.set_state(time.time_ns() if t_ns is None else t_ns, Phase.PREFILL, power, accounts, weights)

    def decode(self, accounts: Sequence[EnergyAccount], t_ns: int | None = None) -> None:
        """A decode step over a batch of ``accounts`` starts (or the batch changed mid-step): shared equally."""
        if not accounts:
            self.idle(t_ns)
            return
        power = costmodel.decode_power_mw(self.config, len(accounts), context_tokens(accounts))
        with self._lock:
            self._ledger.set_state(time.time_ns() if t_ns is None else t_ns, Phase.DECODE, power, accounts)

    def drop(self, account: EnergyAccount, t_ns: int | None = None) -> bool:
        """``account`` leaves the step in progress now (its client went away): the rest of the step is not its.

        Returns whether it was in the step. The step's power follows the smaller batch; a step left empty turns the
        board idle.
        """
        with self._lock:
            owners = self._ledger.owners
            if account not in owners:
                return False
            phase = self._ledger.phase
            weights = self._ledger.weights or (1,) * len(owners)
            kept = [(a, w) for a, w in zip(owners, weights, strict=True) if a is not account]
            rest = [a for a, _ in kept]
            t = time.time_ns() if t_ns is None else t_ns
            if not rest:
                self._ledger.set_state(t, Phase.IDLE, self._idle_mw)
            elif phase is Phase.PREFILL:
                rest_weights = [w for _, w in kept]
                power = costmodel.prefill_power_mw(self.config, sum(rest_weights))
                self._ledger.set_state(t, Phase.PREFILL, power, rest, rest_weights)
            else:
                power = costmodel.decode_power_mw(self.config, len(rest), context_tokens(rest))
                self._ledger.set_state(t, Phase.DECODE, power, rest)
            return True

    # --- readings ---

    @property
    def phase(self) -> Phase:
        return self._ledger.phase

    @property
    def power_w(self) -> float:
        return self._ledger.power_mw / 1000

    @property
    def t0_ns(self) -> int:
        return self._ledger.t0_ns

    def energy_pj(self, t_ns: int | None = None) -> int:
        """The exact integral since the GPU started, up to now (or ``t_ns``, not before the last transition)."""
        with self._lock:
            return self._ledger.energy_pj(time.time_ns() if t_ns is None else t_ns)

    def counter(self, t_ns: int | None = None) -> CounterReading:
        """What NVML's total-energy counter would show now: whole mJ up to the last 100 ms boundary >= lag old."""
        with self._lock:
            t = time.time_ns() if t_ns is None else t_ns
            energy_pj = self._ledger.counter_pj(t, self._lag_ns)
        return CounterReading(
            device=self.device,
            energy_mj=self.config.counter_offset_mj + energy_pj // PJ_PER_MJ,
            t_ns=t,
            update_period_ms=self.config.counter_update_period_ms,
            lag_ms=self.config.counter_lag_ms,
        )

    def counter_boundary_ns(self, t_ns: int) -> int:
        """The boundary whose integral the counter shows at ``t_ns``."""
        return self._ledger.boundary_ns(t_ns, self._lag_ns)

    def truth(self, request_id: str | None = None, t_ns: int | None = None) -> TruthSnapshot:
        """The true split of all energy so far (optionally only one request id's entry)."""
        with self._lock:
            return self._ledger.snapshot(time.time_ns() if t_ns is None else t_ns, request_id)
