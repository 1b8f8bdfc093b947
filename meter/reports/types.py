"""The report's vocabulary: settings, result rows (small frozen dataclasses) and the errors a query can raise.

Energies are carried as integer millijoules, sums of the ledger's rows (idle shares included: the engine stores them
as integers); the ``*_j`` properties turn them into joules.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

from common.errors import JoulegateError

if TYPE_CHECKING:
    from meter.reports.settings import BillingSettings as BillingSettingsLike
    from meter.reports.settings import SettingsHistory

MJ_PER_J = 1000.0
J_PER_KWH = 3.6e6
J_PER_WH = 3600.0
NS_PER_MS = 1_000_000
NS_PER_HOUR = 3_600_000_000_000
NS_PER_DAY = 24 * NS_PER_HOUR
NO_BACKEND = "(none)"  # the BACKEND group of requests that never reached a backend


class IdlePolicy(StrEnum):
    """How idle energy (no request on the GPU) is shared with requests. Same values as ``[meter] idle_policy``."""

    NONE = "none"
    TIME = "time"
    TOKENS = "tokens"


class GroupBy(StrEnum):
    TENANT = "tenant"
    MODEL = "model"
    BACKEND = "backend"
    HOUR = "hour"
    DAY = "day"


class ReportError(JoulegateError):
    """A report cannot be produced as asked. ``message`` is safe to show to the caller."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidQuery(ReportError):
    """The caller's query is malformed: the message starts with the offending field's name."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


@dataclass(frozen=True, slots=True)
class ReportOptions:
    """What a reader may choose: another idle policy than the stored one (``None``: the stored one, the bill).
    ``fallback`` bills only while the database holds no settings yet (``meter.reports.settings``)."""

    idle_policy: IdlePolicy | None = None
    fallback: BillingSettingsLike | None = None


class _Joules:
    """Joules read off the millijoule fields (``prefill_mj``, ``decode_mj``, ``idle_mj``) of a report row."""

    __slots__ = ()
    prefill_mj: int
    decode_mj: int
    idle_mj: int

    @property
    def prefill_j(self) -> float:
        return self.prefill_mj / MJ_PER_J

    @property
    def decode_j(self) -> float:
        return self.decode_mj / MJ_PER_J

    @property
    def idle_j(self) -> float:
        return self.idle_mj / MJ_PER_J

    @property
    def total_j(self) -> float:
        return (self.prefill_mj + self.decode_mj + self.idle_mj) / MJ_PER_J


@dataclass(frozen=True, slots=True)
class RequestReport(_Joules):
    """One request with its energy. ``idle_mj`` is its stored share under ``idle_policy`` (0 under NONE): the policy
    in force when it was received, unless the reader asked for another (``idle_policy_asked``). ``final``: the
    figures never change again (``meter.engine.finality``)."""

    request_id: str
    tenant: str
    model_id: str
    backend: str | None
    traffic_class: str | None
    status: str | None
    correlation_id: str | None
    api: str | None
    prompt_tokens: int
    prompt_tokens_estimated: bool
    generated_tokens: int
    received_ns: int
    released_ns: int | None
    first_token_ns: int | None
    done_ns: int | None
    prefill_mj: int
    decode_mj: int
    idle_mj: int
    final: bool
    idle_policy: IdlePolicy
    idle_policy_asked: bool  # the reader asked for idle_policy instead of the stored one
    co2e_g: float  # total x PUE x grid intensity in force when it was received

    @property
    def queued_ms(self) -> float | None:
        return None if self.released_ns is None else (self.released_ns - self.received_ns) / NS_PER_MS


@dataclass(frozen=True, slots=True)
class RequestPage:
    requests: tuple[RequestReport, ...]
    next_page_token: str  # "" on the last page


@dataclass(frozen=True, slots=True)
class UsageRow(_Joules):
    """One group of a usage report (or the total): requests received in the range and their whole energy."""

    key: str
    requests: int
    prompt_tokens: int
    generated_tokens: int
    prefill_mj: int
    decode_mj: int
    idle_mj: int
    provisional_requests: int
    co2e_g: float  # each request's total under the settings in force when it was received
    estimated_prompt_requests: int  # requests whose prompt_tokens are the gateway's estimate

    @property
    def total_wh(self) -> float:
        return self.total_j / J_PER_WH

    @property
    def j_per_generated_token(self) -> float:
        return self.total_j / self.generated_tokens if self.generated_tokens else 0.0

    @property
    def idle_share(self) -> float:
        total = self.total_j
        return self.idle_j / total if total > 0 else 0.0


@dataclass(frozen=True, slots=True)
class UsageReport:
    rows: tuple[UsageRow, ...]
    total: UsageRow
    group_by: GroupBy
    start_ns: int | None  # None: from the beginning of records
    end_ns: int
    settings: SettingsHistory  # the stored history (or the reader's fallback when none is stored)
    idle_policy_asked: IdlePolicy | None  # set when the reader asked for another idle policy than the stored one

    @property
    def periods(self) -> tuple[BillingSettingsLike, ...]:
        """The settings periods that apply to requests received in the range."""
        return self.settings.overlapping(self.start_ns, self.end_ns)


@dataclass(frozen=True, slots=True)
class BackendReport:
    """One backend over the epochs that start in the range.

    ``counter_mj``, ``idle_mj``, ``adjustment_mj``, ``samples`` and ``gaps`` come from the epochs
    (``backend_epochs``); ``prefill_mj`` and ``decode_mj`` are the sums of the per-request ledger
    (``request_energy``) over the same epochs, so ``conservation_error_mj = counter - (prefill + decode) - idle -
    adjustment`` checks that the requests' joules, the idle bucket and the adjustment booked for sealed requests add
    up to what the counter measured. It is 0 unless something is wrong. ``adjustment_mj`` is the energy recomputes
    would have moved to (+) or from (-) requests whose figures were already final (late timelines, calibration
    changes): + is measured energy billed to no one, - is energy billed twice.
    """

    backend: str
    counter_mj: int
    prefill_mj: int
    decode_mj: int
    idle_mj: int
    adjustment_mj: int
    adjusted_epochs: int
    requests: int
    samples: int
    gaps: int
    epochs: int
    attributed_until_ns: int | None  # end of the backend's last attributed epoch (over all time)

    @property
    def attributed_mj(self) -> int:
        return self.prefill_mj + self.decode_mj

    @property
    def conservation_error_mj(self) -> int:
        return self.counter_mj - self.attributed_mj - self.idle_mj - self.adjustment_mj
