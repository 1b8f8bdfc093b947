"""Energy reports read from the metering tables: one request, lists of requests, usage, and backend energy.

Queries only (SQLAlchemy Core on a sync ``Connection``), returning small dataclasses; no gRPC here. The gRPC
service (``proxy.reports_api``) and ``joulegate report`` are thin layers over these functions.

Semantics, shared by every report:

- A request's ``prefill``/``decode`` energy is the sum of its ``request_energy`` rows over all epochs (integer mJ).
- Idle energy under the idle policy (named on every report): NONE keeps it in the backends' idle buckets (only
  ``get_backend_energy`` shows it); TIME shares each epoch's idle among that epoch's requests in proportion to
  their active time; TOKENS in proportion to tokens, a request's prompt + generated tokens being apportioned to
  its epochs by its active-time share. Epochs without requests keep their idle. Requests carry their share in
  ``idle``; ``total = prefill + decode + idle`` and ``idle_share = idle / total``. (``meter.reports.energy``)
- A request is *final* when it never reached a backend (zero energy), or it has ended, its backend is attributed
  until at least ``done + lag`` (``meter.engine.attributed_until``), and no epoch that may hold its energy was
  attributed before the request row was last written (the engine's own overlap rule, so such requests turn final at
  its next pass). Otherwise it is provisional: its figures may still change. Usage rows count provisional requests.
- Ranges are half-open ``[start, end)`` in wall-clock ns. Usage and request lists select requests by the time the
  gateway *received* them (a request counts once, in full, in the hour/day it arrived); backend energy selects
  epochs by their start (``meter.reports.usage`` says how the two reconcile).
- CO2e: ``total_j x PUE x grid_g_co2e_per_kwh / 3.6e6``.

Cost. Every query is bounded by an index range: a request by its primary key, a list page by ``(tenant,
received_ns)`` or ``received_ns`` (keyset), usage by ``received_ns`` plus ``request_energy (backend, epoch_start_ns)``
within the epochs the requests can touch, finality by one ``backend_epochs`` primary-key range per request. Usage
therefore costs O(requests in the range) and reads raw rows, not ``usage_hourly``: the rollup counts a request only
once its last epoch is attributed and cannot tell provisional requests or idle shares, so it is not exact for what
this report promises. On PostgreSQL JIT is switched off for these queries (its compile time dwarfed them).
"""

from meter.reports.backends import get_backend_energy
from meter.reports.energy import attributed_until, backend_names
from meter.reports.requests import (
    DEFAULT_PAGE_SIZE,
    MAX_PAGE_SIZE,
    RequestFilter,
    fetch_reports,
    get_request_energy,
    list_requests,
)
from meter.reports.types import (
    NO_BACKEND,
    BackendReport,
    GroupBy,
    IdlePolicy,
    InvalidQuery,
    ReportError,
    ReportSettings,
    RequestPage,
    RequestReport,
    UsageReport,
    UsageRow,
)
from meter.reports.usage import get_usage, rfc3339

__all__ = [
    "DEFAULT_PAGE_SIZE",
    "MAX_PAGE_SIZE",
    "NO_BACKEND",
    "BackendReport",
    "GroupBy",
    "IdlePolicy",
    "InvalidQuery",
    "ReportError",
    "ReportSettings",
    "RequestFilter",
    "RequestPage",
    "RequestReport",
    "UsageReport",
    "UsageRow",
    "attributed_until",
    "backend_names",
    "fetch_reports",
    "get_backend_energy",
    "get_request_energy",
    "get_usage",
    "list_requests",
    "rfc3339",
]
