"""Exact energy bookkeeping of the simulated GPU: a pure, clock-free core (callers pass every time).

Board power is piecewise constant: it changes only when the engine starts a step or goes idle (``set_state``).
Energy is integrated in integer picojoules (power in mW x time in ns), so nothing is ever rounded on the way:

- the *total* is the exact integral since ``t0``;
- every segment's energy is split, to the picojoule, among the requests that own it: a prefill step's among the
  requests it prefills in proportion to their prompt tokens, a decode step's equally among the requests in it;
  a segment with no owner is *idle*. Hence sum(requests) + idle == total, exactly, at all times;
- the *counter* (NVML's ``nvmlDeviceGetTotalEnergyConsumption`` twin) is the exact integral up to a 100 ms boundary
  of the wall clock; the ledger remembers the integral at each boundary it passes.

Millijoules appear only at the edge: a snapshot apportions the total's whole millijoules over (each request's prefill,
each request's decode, idle) by largest remainder, so the reported parts add up to the reported total exactly and
each part is within 1 mJ of its exact value.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import Any

PJ_PER_MJ = 1_000_000_000  # 1 mJ = 1e9 pJ; mW x ns = 1e-12 J = 1 pJ


class Phase(StrEnum):
    IDLE = "idle"
    PREFILL = "prefill"
    DECODE = "decode"


@dataclass(slots=True, eq=False)
class EnergyAccount:
    """The true energy and tokens of one request on the GPU. Mutable: the ledger and the scheduler add to it."""

    request_id: str
    prompt_tokens: int
    generated_tokens: int = 0
    finish_reason: str | None = None
    prefill_pj: int = 0
    decode_pj: int = 0


@dataclass(frozen=True, slots=True)
class RequestTruth:
    """What one request id truly cost (summed over every request that carried that id)."""

    prefill_mj: int
    decode_mj: int
    prompt_tokens: int
    generated_tokens: int
    finish_reason: str | None

    @property
    def total_mj(self) -> int:
        return self.prefill_mj + self.decode_mj

    def to_json(self) -> dict[str, Any]:
        return {
            "prefill_mj": self.prefill_mj,
            "decode_mj": self.decode_mj,
            "prompt_tokens": self.prompt_tokens,
            "generated_tokens": self.generated_tokens,
            "finish_reason": self.finish_reason,
        }


@dataclass(frozen=True, slots=True)
class TruthSnapshot:
    """The true split of all energy since the GPU started, at ``t_ns``: sum(requests) + idle_mj == total_mj."""

    requests: Mapping[str, RequestTruth]
    idle_mj: int
    total_mj: int
    t_ns: int
    total_pj: int = field(default=0, compare=False)  # the exact integral behind total_mj

    def to_json(self) -> dict[str, Any]:
        return {
            "requests": {rid: truth.to_json() for rid, truth in self.requests.items()},
            "idle_mj": self.idle_mj,
            "total_mj": self.total_mj,
            "t_ns": self.t_ns,
        }


def apportion_mj(values_pj: Sequence[int]) -> list[int]:
    """Whole millijoules for each value such that they sum to floor(sum(values_pj) / 1e9) exactly.

    Largest remainder (Hamilton): every part gets its floor, then the parts with the largest remainders get one more
    until the total is reached; ties go to the earlier part. Each part ends within 1 mJ of its exact value.
    """
    total_mj = sum(values_pj) // PJ_PER_MJ
    floors = [v // PJ_PER_MJ for v in values_pj]
    deficit = total_mj - sum(floors)
    if deficit:
        order = sorted(range(len(values_pj)), key=lambda i: (-(values_pj[i] % PJ_PER_MJ), i))
        for i in order[:deficit]:
            floors[i] += 1
    return floors


class EnergyLedger:
    """Integrates piecewise-constant power exactly and attributes every picojoule to a request or to idle.

    Not thread-safe by itself (``SimGPU`` adds the lock). Times must not go backwards; a time earlier than the last
    transition is treated as the last transition's time (the wall clock may step back under NTP).
    """

    def __init__(
        self,
        t0_ns: int,
        idle_power_mw: int,
        update_period_ns: int = 100_000_000,
        boundaries_kept: int = 128,
    ) -> None:
        if update_period_ns <= 0:
            raise ValueError("update_period_ns must be > 0")
        self.t0_ns = t0_ns
        self.update_period_ns = update_period_ns
        self._last_t = t0_ns
        self._power_mw = idle_power_mw
        self._phase = Phase.IDLE
        self._owners: tuple[EnergyAccount, ...] = ()
        self._weights: tuple[int, ...] | None = None
        self._cum_pj = 0  # exact integral over [t0, _last_t]
        self.idle_pj = 0
        self._accounts: list[EnergyAccount] = []
        # Integral at each update boundary passed so far (the counter's possible values), oldest first.
        self._boundaries: deque[tuple[int, int]] = deque(maxlen=boundaries_kept)
        self._next_boundary = (t0_ns // update_period_ns + 1) * update_period_ns

    # --- state ---

    @property
    def phase(self) -> Phase:
        return self._phase

    @property
    def power_mw(self) -> int:
        return self._power_mw

    @property
    def owners(self) -> tuple[EnergyAccount, ...]:
        return self._owners

    @property
    def last_transition_ns(self) -> int:
        return self._last_t

    @property
    def accounts(self) -> Sequence[EnergyAccount]:
        return self._accounts

    def open_account(self, request_id: str, prompt_tokens: int) -> EnergyAccount:
        account = EnergyAccount(request_id=request_id, prompt_tokens=prompt_tokens)
        self._accounts.append(account)
        return account

    def set_state(
        self,
        t_ns: int,
        phase: Phase,
        power_mw: int,
        owners: Sequence[EnergyAccount] = (),
        weights: Sequence[int] | None = None,
    ) -> None:
        """From ``t_ns`` on, the board draws ``power_mw`` for ``owners`` (idle when there are none).

        ``weights`` (prefill: prompt tokens) split the energy in proportion; None splits it equally.
        """
        if power_mw < 0:
            raise ValueError("power must be >= 0")
        if weights is not None and len(weights) != len(owners):
            raise ValueError("one weight per owner")
        self._close_segment(t_ns)
        self._phase = phase if owners else Phase.IDLE
        self._power_mw = power_mw
        self._owners = tuple(owners)
        self._weights = None if weights is None else tuple(weights)

    def _close_segment(self, t_ns: int) -> None:
        t = t_ns if t_ns > self._last_t else self._last_t
        if t == self._last_t:
            return
        if self._next_boundary <= t:
            self._record_boundaries(t)
        seg_pj = self._power_mw * (t - self._last_t)
        self._cum_pj += seg_pj
        self._last_t = t
        if seg_pj:
            _split(seg_pj, self._phase, self._owners, self._weights, self)

    def _record_boundaries(self, t: int) -> None:
        period = self.update_period_ns
        keep = self._boundaries.maxlen or 1
        # After a long quiet spell only the last `keep` boundaries matter.
        first_useful = (t // period - keep + 1) * period
        if self._next_boundary < first_useful:
            self._next_boundary = first_useful
        while self._next_boundary <= t:
            b = self._next_boundary
            self._boundaries.append((b, self._cum_pj + self._power_mw * (b - self._last_t)))
            self._next_boundary = b + period

    # --- readings ---

    def energy_pj(self, t_ns: int) -> int:
        """Exact integral over [t0, t_ns]; t_ns must be at or after the last transition (the present)."""
        t = t_ns if t_ns > self._last_t else self._last_t
        return self._cum_pj + self._power_mw * (t - self._last_t)

    def boundary_ns(self, t_ns: int, lag_ns: int) -> int:
        """The last update boundary that is at least ``lag_ns`` old at ``t_ns``."""
        return ((t_ns - lag_ns) // self.update_period_ns) * self.update_period_ns

    def counter_pj(self, t_ns: int, lag_ns: int = 0) -> int:
        """What an NVML-like counter shows at ``t_ns``: the exact integral up to ``boundary_ns(t_ns, lag_ns)``."""
        b = self.boundary_ns(t_ns, lag_ns)
        if b <= self.t0_ns:
            return 0
        if b >= self._last_t:
            return self._cum_pj + self._power_mw * (b - self._last_t)
        if not self._boundaries or b < self._boundaries[0][0]:
            raise LookupError(f"boundary {b} is older than the ledger's history")
        index = (b - self._boundaries[0][0]) // self.update_period_ns
        boundary, energy = self._boundaries[index]
        assert boundary == b, "boundaries are contiguous"
        return energy

    def snapshot(self, t_ns: int, request_id: str | None = None) -> TruthSnapshot:
        """Everything's true energy up to ``t_ns`` (at or after the last transition), in apportioned millijoules."""
        t = t_ns if t_ns > self._last_t else self._last_t
        # Settle the open segment on a scratch copy of the current owners' shares.
        pending = _PendingShares()
        seg_pj = self._power_mw * (t - self._last_t)
        if seg_pj:
            _split(seg_pj, self._phase, self._owners, self._weights, pending)
        keys: dict[str, int] = {}
        prefill: list[int] = []
        decode: list[int] = []
        meta: list[list[Any]] = []  # prompt_tokens, generated_tokens, finish_reason
        for account in self._accounts:
            extra_prefill, extra_decode = pending.of(account)
            k = keys.get(account.request_id)
            if k is None:
                k = keys[account.request_id] = len(prefill)
                prefill.append(0)
                decode.append(0)
                meta.append([0, 0, None])
            prefill[k] += account.prefill_pj + extra_prefill
            decode[k] += account.decode_pj + extra_decode
            meta[k][0] += account.prompt_tokens
            meta[k][1] += account.generated_tokens
            if account.finish_reason is not None:
                meta[k][2] = account.finish_reason
        idle_pj = self.idle_pj + pending.idle_pj
        values = [idle_pj]
        for k in range(len(prefill)):
            values.append(prefill[k])
            values.append(decode[k])
        total_pj = self._cum_pj + seg_pj
        assert sum(values) == total_pj, "energy conservation"
        mj = apportion_mj(values)
        requests: dict[str, RequestTruth] = {}
        for rid, k in keys.items():
            if request_id is not None and rid != request_id:
                continue
            prompt_tokens, generated_tokens, finish_reason = meta[k]
            requests[rid] = RequestTruth(
                prefill_mj=mj[1 + 2 * k],
                decode_mj=mj[2 + 2 * k],
                prompt_tokens=prompt_tokens,
                generated_tokens=generated_tokens,
                finish_reason=finish_reason,
            )
        return TruthSnapshot(
            requests=MappingProxyType(requests),
            idle_mj=mj[0],
            total_mj=total_pj // PJ_PER_MJ,
            t_ns=t,
            total_pj=total_pj,
        )


class _PendingShares:
    """Where ``_split`` puts an open segment's shares during a snapshot, leaving the accounts untouched."""

    def __init__(self) -> None:
        self.idle_pj = 0
        self._by_account: dict[int, list[int]] = {}

    def add(self, account: EnergyAccount, phase: Phase, pj: int) -> None:
        slot = self._by_account.setdefault(id(account), [0, 0])
        slot[0 if phase is Phase.PREFILL else 1] += pj

    def of(self, account: EnergyAccount) -> tuple[int, int]:
        slot = self._by_account.get(id(account))
        return (0, 0) if slot is None else (slot[0], slot[1])


def _split(
    seg_pj: int,
    phase: Phase,
    owners: Sequence[EnergyAccount],
    weights: Sequence[int] | None,
    sink: EnergyLedger | _PendingShares,
) -> None:
    """Split ``seg_pj`` exactly among ``owners`` (or to idle) into ``sink``: the ledger's accounts or a scratch pad."""
    if phase is Phase.IDLE or not owners:
        sink.idle_pj += seg_pj
        return
    n = len(owners)
    total_weight = sum(weights) if weights is not None else 0
    if total_weight > 0:
        assert weights is not None
        shares = [seg_pj * w // total_weight for w in weights]
    else:
        shares = [seg_pj // n] * n
    remainder = seg_pj - sum(shares)  # < n: one more picojoule each for the first `remainder` owners
    for i in range(remainder):
        shares[i] += 1
    if isinstance(sink, _PendingShares):
        for account, pj in zip(owners, shares, strict=True):
            sink.add(account, phase, pj)
    elif phase is Phase.PREFILL:
        for account, pj in zip(owners, shares, strict=True):
            account.prefill_pj += pj
    else:
        for account, pj in zip(owners, shares, strict=True):
            account.decode_pj += pj
