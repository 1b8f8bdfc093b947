"""Exact energy bookkeeping of the simulated GPU: a pure, clock-free core (callers pass every time).

Board power is piecewise constant: it changes only when the engine starts a step or goes idle (``set_state``).
Energy is integrated in integer picojoules (power in mW x time in ns), so nothing is ever rounded on the way:

- the *total* is the exact integral since ``t0``;
- every segment's energy is split, to the picojoule, among the requests that own it: a prefill step's among the
  requests it prefills in proportion to their prompt tokens, a decode step's equally among the requests in it;
  a segment with no owner is *idle*. Hence sum(requests) + idle == total, exactly, at all times;
- the *counter* (NVML's ``nvmlDeviceGetTotalEnergyConsumption`` twin) is the exact integral up to a 100 ms boundary
  of the wall clock; the ledger remembers the integral at each boundary it passes.

Millijoules appear only at the edge, by cumulative rounding over a fixed order: the requests that are over, in the
order they ended, then those still open, then idle; each part gets floor(prefix after it) - floor(prefix before it).
So the parts add up to floor(total) exactly, each part is within 1 mJ of its exact value, and a finished request's
millijoules never change afterwards (only open requests and idle can move by 1 mJ between snapshots).
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
        self._open: list[EnergyAccount] = []  # accounts whose energy may still change, oldest first
        self._closing: list[EnergyAccount] = []  # closed, but owners of the open segment: final at its end
        self._final_pj = 0  # energy of all final accounts, the head of every snapshot's prefix
        self._final_rows: dict[str, list[Any]] = {}  # request id -> frozen [prefill_mj, decode_mj, tokens..]
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
    def weights(self) -> tuple[int, ...] | None:
        return self._weights

    def open_account(self, request_id: str, prompt_tokens: int) -> EnergyAccount:
        account = EnergyAccount(request_id=request_id, prompt_tokens=prompt_tokens)
        self._open.append(account)
        return account

    def close_account(self, account: EnergyAccount) -> None:
        """The request is over: once no step it took part in is still running, its energy is final and frozen."""
        if account in self._closing or account not in self._open:
            return
        if any(owner is account for owner in self._owners):
            self._closing.append(account)
        else:
            self._finalize(account)

    def _finalize(self, account: EnergyAccount) -> None:
        """Freeze ``account``: its millijoules are cut right after all accounts finalized before it."""
        self._open.remove(account)
        prefill_mj, prefix = _cut(self._final_pj, account.prefill_pj)
        decode_mj, self._final_pj = _cut(prefix, account.decode_pj)
        _add_row(self._final_rows, account, prefill_mj, decode_mj)

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
        if self._closing:
            still_owners = [a for a in self._closing if any(a is o for o in self._owners)]
            for account in self._closing:
                if not any(account is o for o in still_owners):
                    self._finalize(account)
            self._closing = still_owners

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
        """Everything's true energy up to ``t_ns`` (at or after the last transition), in whole millijoules.

        Finished accounts come first (in the order they finished, values frozen), then the open ones, idle last;
        each part gets floor(prefix after it) - floor(prefix before it), so the parts add up to the total exactly.
        """
        t = t_ns if t_ns > self._last_t else self._last_t
        # Settle the open segment on a scratch copy of the current owners' shares.
        pending = _PendingShares()
        seg_pj = self._power_mw * (t - self._last_t)
        if seg_pj:
            _split(seg_pj, self._phase, self._owners, self._weights, pending)
        total_pj = self._cum_pj + seg_pj
        rows: dict[str, list[Any]] = {}  # request id -> [prefill_mj, decode_mj, prompt, generated, finish_reason]
        if request_id is None:
            for rid, row in self._final_rows.items():
                rows[rid] = list(row)
        elif request_id in self._final_rows:
            rows[request_id] = list(self._final_rows[request_id])
        prefix_pj = self._final_pj
        for account in self._open:
            extra_prefill, extra_decode = pending.of(account)
            prefill_mj, prefix_pj = _cut(prefix_pj, account.prefill_pj + extra_prefill)
            decode_mj, prefix_pj = _cut(prefix_pj, account.decode_pj + extra_decode)
            if request_id is not None and account.request_id != request_id:
                continue
            _add_row(rows, account, prefill_mj, decode_mj)
        idle_mj, prefix_pj = _cut(prefix_pj, self.idle_pj + pending.idle_pj)
        assert prefix_pj == total_pj, "energy conservation"
        requests = {
            rid: RequestTruth(
                prefill_mj=row[0],
                decode_mj=row[1],
                prompt_tokens=row[2],
                generated_tokens=row[3],
                finish_reason=row[4],
            )
            for rid, row in rows.items()
        }
        return TruthSnapshot(
            requests=MappingProxyType(requests),
            idle_mj=idle_mj,
            total_mj=total_pj // PJ_PER_MJ,
            t_ns=t,
            total_pj=total_pj,
        )


def _cut(prefix_pj: int, part_pj: int) -> tuple[int, int]:
    """Whole millijoules of the part that follows ``prefix_pj``: floor(after) - floor(before); and the new prefix."""
    after = prefix_pj + part_pj
    return after // PJ_PER_MJ - prefix_pj // PJ_PER_MJ, after


def _add_row(rows: dict[str, list[Any]], account: EnergyAccount, prefill_mj: int, decode_mj: int) -> None:
    row = rows.get(account.request_id)
    if row is None:
        row = rows[account.request_id] = [0, 0, 0, 0, None]
    row[0] += prefill_mj
    row[1] += decode_mj
    row[2] += account.prompt_tokens
    row[3] += account.generated_tokens
    if account.finish_reason is not None:
        row[4] = account.finish_reason


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
