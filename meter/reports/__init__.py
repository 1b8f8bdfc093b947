"""Energy reports read from the metering tables: one request, lists of requests, usage, and backend energy.

Queries only (SQLAlchemy Core on a sync ``Connection``), returning small dataclasses; no gRPC here. The gRPC
service (``meter.reports_api``) and ``joulegate report`` are thin layers over these functions.

Semantics, shared by every report:

- A request's ``prefill``/``decode`` energy and its idle shares are the sums of its ``request_energy`` rows over all
  epochs (integer mJ), or its ``request_seals`` figures once sealed. The engine computed the idle shares, one per
  policy, from the request's own timeline when it wrote each epoch; reports never split idle themselves, so every
  report, page and subset shows the same figure for the same request. (``meter.reports.energy``)
- The settings that change a bill (idle policy, grid intensity, PUE) are those stored in the database
  (``meter.reports.settings``), in force when the request was *received*; the reader's config only stands in while
  none are stored. A reader may ask for another idle policy; the report then says so. Idle policies: NONE keeps idle
  energy in the backends' buckets (only ``get_backend_energy`` shows it); TIME gives each request its share of each
  epoch's idle in proportion to its active time there; TOKENS in proportion to its prompt + generated tokens times
  the part of its own window inside the epoch. ``total = prefill + decode + idle``.
- A request is *final* when its figures can never change again: it was sealed by the engine, or it ended having
  done no GPU work (0 J). Otherwise it is provisional. Usage rows count provisional requests.
  (``meter.engine.finality``)
- Ranges are half-open ``[start, end)`` in wall-clock ns. Usage and request lists select requests by the time the
  gateway *received* them (a request counts once, in full, in the hour/day it arrived); backend energy selects
  epochs by their start (``meter.reports.usage`` says how the two reconcile).
- CO2e: ``total_j x PUE x grid_g_co2e_per_kwh / 3.6e6``, per request, with the settings in force when it arrived.

Cost. Every query is bounded by an index range: a request by its primary key, a list page by ``(tenant,
received_ns)`` or ``received_ns`` (keyset), usage by ``received_ns`` plus ``request_energy (backend, epoch_start_ns)``
within the epochs the requests can touch, seals by their primary key. Usage reads whole hours whose requests are all
final from the engine's rollup of final figures (``usage_final_hourly``, ``meter.engine.rollup``) and raw rows only
for the rest (the range's edges, hours still provisional or just reached by a late row), with the same integers as
from raw rows alone; a month of a fleet costs ~720 rollup hours per group plus an hour or two of raw rows
(``bench/reports.py``). On PostgreSQL JIT is switched off for these queries (its compile time dwarfed them).
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
from meter.reports.settings import (
    BillingSettings,
    SettingsHistory,
    add_settings,
    load_settings,
    seed_settings,
    settings_history,
)
from meter.reports.types import (
    NO_BACKEND,
    BackendReport,
    GroupBy,
    IdlePolicy,
    InvalidQuery,
    ReportError,
    ReportOptions,
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
    "BillingSettings",
    "GroupBy",
    "IdlePolicy",
    "InvalidQuery",
    "ReportError",
    "ReportOptions",
    "RequestFilter",
    "RequestPage",
    "RequestReport",
    "SettingsHistory",
    "UsageReport",
    "UsageRow",
    "add_settings",
    "attributed_until",
    "backend_names",
    "fetch_reports",
    "get_backend_energy",
    "get_request_energy",
    "get_usage",
    "list_requests",
    "load_settings",
    "rfc3339",
    "seed_settings",
    "settings_history",
]
