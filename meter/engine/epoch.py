"""One epoch's attribution, computed: readings and request rows in, the rows to write out. Pure: no clock, no
database, no learning (the engine feeds calibration and idle history separately, ``meter.engine.learning``, and
keeps what they learned only once the epoch's write committed).

``compute_epoch`` splits the epoch's counter energy among its requests (``meter.attribution``) and its idle bucket
into integer shares per request row, one per idle policy (``meter.engine.idle.split_idle``): TIME by the row's
active time, TOKENS by the request's prompt + generated tokens times the part of its own window inside the epoch.
``EpochResult.finish`` turns the fresh attribution into the rows to write, keeping sealed requests' rows as they are
and booking the difference to the epoch's ``adjustment_mj``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import structlog

from meter.attribution import AttributionPolicy, attribute
from meter.engine import sql
from meter.engine.idle import split_idle
from meter.engine.readings import EpochReadings
from meter.engine.usage import UsageDeltas, UsageKey, hour_of
from meter.timeline import Timeline

log = structlog.get_logger(__name__)

__all__ = ["EpochResult", "Final", "Share", "compute_epoch", "epoch_timelines"]


class BooksDoNotBalanceError(AssertionError):
    """An epoch's figures do not add up to its counter: a bug, never written."""


@dataclass(frozen=True, slots=True)
class Share:
    """One request's energy in one epoch as a fresh attribution computes it, and what usage needs of it."""

    prefill_mj: int
    decode_mj: int
    active_ns: int
    idle_time_mj: int
    idle_tokens_mj: int
    usage_key: UsageKey
    is_home: bool
    prompt_tokens: int
    generated_tokens: int


@dataclass(frozen=True, slots=True)
class Final:
    """What one epoch's write puts in the database."""

    request_rows: list[sql.RequestEnergyRow]
    epoch_row: sql.BackendEpochRow
    usage: UsageDeltas
    adjustment_mj: int


@dataclass(frozen=True, slots=True)
class EpochResult:
    """A fresh attribution of one epoch. ``finish`` turns it into the rows to write, keeping sealed requests' rows
    as they are (pinned) and booking what the fresh attribution would have moved to or from them to the epoch's
    ``adjustment_mj``."""

    backend: str
    start: int
    end: int
    readings: EpochReadings
    attributed_at: int
    shares: dict[str, Share]
    idle_mj: int  # the fresh attribution's idle bucket

    @property
    def request_ids(self) -> list[str]:
        return list(self.shares)

    def finish(self, pinned: Sequence[sql.PinnedRow] = (), sealed: set[str] | frozenset[str] = frozenset()) -> Final:
        """``pinned``: the epoch's current rows of sealed requests (``sql.pinned_rows``); ``sealed``: ids of sealed
        requests (those in ``pinned`` and any other), whose fresh shares are dropped.

        Identity, exact to the mJ: ``counter_mj = prefill_mj + decode_mj + idle_mj + adjustment_mj``, where
        ``adjustment_mj = (fresh energy of sealed requests) - (their pinned energy)``: positive when the recompute
        would have given sealed requests more than they were billed (that energy is billed to no one), negative
        when it would have given them less (that much is billed twice: to them and to the requests it now goes to).
        """
        name, start, end = self.backend, self.start, self.end
        rows: list[sql.RequestEnergyRow] = []
        usage = UsageDeltas()
        fresh_sealed = 0
        for rid, sh in self.shares.items():
            if rid in sealed:
                fresh_sealed += sh.prefill_mj + sh.decode_mj
                continue
            rows.append(
                sql.RequestEnergyRow(
                    rid, start, name, sh.prefill_mj, sh.decode_mj, sh.active_ns, sh.idle_time_mj, sh.idle_tokens_mj
                )
            )
            usage.add(
                sh.usage_key,
                (int(sh.is_home), sh.prompt_tokens * sh.is_home, sh.generated_tokens * sh.is_home, sh.prefill_mj,
                 sh.decode_mj, sh.active_ns),
            )  # fmt: skip
        pinned_sum = 0
        for p in pinned:
            pinned_sum += p.prefill_mj + p.decode_mj
            rows.append(
                sql.RequestEnergyRow(
                    p.request_id, start, name, p.prefill_mj, p.decode_mj, p.active_ns, p.idle_time_mj, p.idle_tokens_mj
                )
            )
            home = p.done_ns is not None and start <= p.done_ns < end
            key = (hour_of(p.received_ns), p.tenant, p.model_id, name)
            usage.add(
                key,
                (int(home), p.prompt_tokens * home, p.generated_tokens * home, p.prefill_mj, p.decode_mj, p.active_ns),
            )
        prefill_sum = sum(r.prefill_mj for r in rows)
        decode_sum = sum(r.decode_mj for r in rows)
        readings = self.readings
        attributed = prefill_sum + decode_sum
        adjustment = fresh_sealed - pinned_sum
        if attributed + self.idle_mj + adjustment != readings.counter_mj:
            raise BooksDoNotBalanceError(f"{name} epoch {start}: the books do not balance")
        epoch_row = sql.BackendEpochRow(
            backend=name,
            epoch_start_ns=start,
            epoch_end_ns=end,
            first_reading_ns=readings.first_reading_ns,
            last_reading_ns=readings.last_reading_ns,
            counter_mj=readings.counter_mj,
            attributed_mj=attributed,
            prefill_mj=prefill_sum,
            decode_mj=decode_sum,
            idle_mj=self.idle_mj,
            samples=readings.samples,
            gaps=readings.gaps,
            active_ns_total=sum(r.active_ns for r in rows),
            attributed_at_ns=self.attributed_at,
            adjustment_mj=adjustment,
        )
        return Final(rows, epoch_row, usage, adjustment)


def epoch_timelines(
    backend: str, rows: Sequence[sql.RequestRow], memo: dict[str, Timeline | None] | None = None
) -> list[Timeline]:
    """The timelines of the rows that did GPU work (the billing rule: refused requests take no part). A row that
    is not a valid timeline is logged and left out. ``memo`` (request id -> its timeline, None if left out): shared
    by the epochs of one backend attributed from the same read of rows, so that a request spanning several of them
    is checked and built once."""
    working: list[Timeline] = []
    for r in rows:
        if memo is not None:
            known = memo.get(r.request_id, _UNSEEN)
            if known is not _UNSEEN:
                if known is not None:
                    working.append(known)  # type: ignore[arg-type]
                continue
        try:
            t = Timeline(
                r.request_id, r.tenant, r.model_id, backend, r.received_ns, r.released_ns, r.first_token_ns,
                r.done_ns, r.prompt_tokens, r.generated_tokens, status=r.status or "UNKNOWN",
                cached_tokens=min(r.cached_tokens or 0, r.prompt_tokens),
            )  # fmt: skip
        except ValueError as exc:
            log.error("engine_bad_request_row", backend=backend, request_id=r.request_id, error=str(exc))
            if memo is not None:
                memo[r.request_id] = None
            continue
        on_gpu = t.on_gpu
        if memo is not None:
            memo[r.request_id] = t if on_gpu else None
        if on_gpu:
            working.append(t)
    return working


_UNSEEN = object()


def compute_epoch(
    backend: str,
    start: int,
    end: int,
    readings: EpochReadings,
    rows: Sequence[sql.RequestRow],
    working: Sequence[Timeline],
    policy: AttributionPolicy,
    attributed_at: int,
) -> EpochResult:
    """The epoch's fresh attribution, from its readings, its request rows, the timelines of those that did GPU work
    (``epoch_timelines``) and the attribution policy (lag, prefill power ratio and idle floor in use)."""
    lag, past_done = policy.lag_ns, policy.past_done_ns
    works = {t.request_id for t in working}
    energy: dict[str, list[int]] = {}
    for segment in readings.segments:
        seg_lo, seg_hi = segment[0].t_ns - lag, segment[-1].t_ns - lag
        part = [
            t
            for t in working
            if t.released_ns < seg_hi  # type: ignore[operator]
            and (t.done_ns >= seg_lo or (t.abandoned_prefill and t.done_ns + past_done >= seg_lo))
        ]
        if not part:
            continue
        got = attribute(segment, part, policy)
        for rid, pe in got.requests.items():
            acc = energy.get(rid)
            if acc is None:
                energy[rid] = [pe.prefill_mj, pe.decode_mj]
            else:
                acc[0] += pe.prefill_mj
                acc[1] += pe.decode_mj

    kept: list[tuple[str, int, int, int, bool, UsageKey, int, int, float]] = []
    attributed = 0
    for r in rows:
        rid, released, done = r.request_id, r.released_ns, r.done_ns
        on_gpu = rid in works
        active = max(0, min(done, end) - max(released, start)) if on_gpu else 0
        is_home = start <= done < end
        e = energy.get(rid)
        if e is None and not active and not is_home:
            continue
        pre, dec = (e[0], e[1]) if e is not None else (0, 0)
        attributed += pre + dec
        window = done - released
        # TOKENS idle weight: the request's tokens, apportioned to this epoch by its own active time in it.
        token_w = (r.prompt_tokens + r.generated_tokens) * active / window if on_gpu and window > 0 else 0.0
        key = (hour_of(r.received_ns), r.tenant, r.model_id, backend)
        kept.append((rid, pre, dec, active, is_home, key, r.prompt_tokens, r.generated_tokens, token_w))
    if attributed > readings.counter_mj:
        raise BooksDoNotBalanceError(f"{backend} epoch {start}: attributed {attributed} mJ > {readings.counter_mj}")
    idle_mj = readings.counter_mj - attributed
    by_time = split_idle(idle_mj, {k[0]: float(k[3]) for k in kept})
    by_tokens = split_idle(idle_mj, {k[0]: k[8] for k in kept})
    shares = {
        rid: Share(pre, dec, active, by_time[rid], by_tokens[rid], key, is_home, prompt, generated)
        for rid, pre, dec, active, is_home, key, prompt, generated, _w in kept
    }
    return EpochResult(backend, start, end, readings, attributed_at, shares, idle_mj)
