"""The report's vocabulary: settings, result rows (small frozen dataclasses) and the errors a query can raise.

Energies are carried as integer millijoules where they are sums of ledger rows (exact), and as float millijoules
where they are idle shares (a proportional split is not an integer); the ``*_j`` properties turn them into joules.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

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


class ReportError(Exception):
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
class ReportSettings:
    """What every report needs besides the database: the idle policy, the counter lag (finality) and carbon."""

    idle_policy: IdlePolicy = IdlePolicy.NONE
    lag_ns: int = 100 * NS_PER_MS
    grid_g_co2e_per_kwh: float = 400.0
    pue: float = 1.2

    def co2e_g(self, total_j: float) -> float:
        """Grams CO2e of ``total_j`` joules measured at the GPUs: scaled by PUE to facility energy, then by grid."""
        return total_j * self.pue * self.grid_g_co2e_per_kwh / J_PER_KWH


class _Joules:
    """Joules read off the millijoule fields (``prefill_mj``, ``decode_mj``, ``idle_mj``) of a report row."""

    __slots__ = ()
    prefill_mj: int
    decode_mj: int
    idle_mj: float

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
    """One request with its energy. ``idle_mj`` is its share under ``idle_policy`` (0 under NONE)."""

    request_id: str
    tenant: str
    model_id: str
    backend: str | None
    traffic_class: str | None
    status: str | None
    correlation_id: str | None
    api: str | None
    prompt_tokens: int
    generated_tokens: int
    received_ns: int
    released_ns: int | None
    first_token_ns: int | None
    done_ns: int | None
    prefill_mj: int
    decode_mj: int
    idle_mj: float
    final: bool
    idle_policy: IdlePolicy

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
    idle_mj: float
    provisional_requests: int

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
    settings: ReportSettings

    def co2e_g(self, row: UsageRow) -> float:
        return self.settings.co2e_g(row.total_j)


@dataclass(frozen=True, slots=True)
class BackendReport:
    """One backend over the epochs that start in the range.

    ``counter_mj``, ``idle_mj``, ``samples`` and ``gaps`` come from the epochs (``backend_epochs``); ``prefill_mj``
    and ``decode_mj`` are the sums of the per-request ledger (``request_energy``) over the same epochs, so
    ``conservation_error_mj = counter - (prefill + decode) - idle`` checks that the requests' joules and the idle
    bucket add up to what the counter measured. It is 0 unless something is wrong.
    """

    backend: str
    counter_mj: int
    prefill_mj: int
    decode_mj: int
    idle_mj: int
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
        return self.counter_mj - self.attributed_mj - self.idle_mj
