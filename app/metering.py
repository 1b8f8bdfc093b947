"""The meter of this node, assembled from the configuration: the node's backends, the service, the billing settings.

Used by ``joulegate serve --meter nvml|sim`` (in the gateway process), by the ``joulegate meter`` daemon and by
``joulegate report``.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Collection
from typing import TYPE_CHECKING

import structlog

from app.config import Config
from common.errors import ConfigError
from meter.config import MeterConfig, engine_settings
from meter.reports import BillingSettings, seed_settings

log = structlog.get_logger(__name__)

RATE_HOURS = 6  # the budgets' energy per token: over the requests of the last hours (and the current one)

if TYPE_CHECKING:
    import sqlalchemy as sa

    from meter.auth import Authenticator
    from meter.service import BackendSpec, MeterService, SampleSink
    from proxy.budgets import UsageReader


def node_name(meter: MeterConfig) -> str:
    return meter.node or socket.gethostname()


def local_backends(config: Config) -> list[BackendSpec]:
    """The backends whose energy this node's meter attributes: ``node`` empty or this node's name."""
    from meter.service import BackendSpec

    node = node_name(config.meter)
    return [BackendSpec(b.name, b.url, b.gpus, b.prefill_chunk_tokens) for b in config.backends if b.node in ("", node)]


def build_meter_service(config: Config, db: sa.Engine, ledger: SampleSink) -> MeterService | None:
    """The meter service of this node for ``config`` (not started), or None when ``meter.source = "auto"`` finds no
    NVML energy counter here. Blocking: it opens the source and reads it."""
    from meter.sources.nvml import NvmlSource, NvmlUnavailableError

    source = config.meter.source
    if source == "none":
        raise ConfigError("meter.source is 'none': nothing to meter")
    if source == "auto":
        try:
            NvmlSource().close()  # is there a driver with energy counters here at all?
        except NvmlUnavailableError as exc:
            log.info("meter_off", reason=f"meter.source is auto and NVML is not usable here: {exc}")
            return None
        source = "nvml"  # a GPU host: configuration errors from here on are reported, not skipped
    from meter.service import build_meter_service as build

    return build(
        source,
        local_backends(config),
        db,
        ledger,
        engine_settings(config.meter),
        interval_ms=config.meter.interval_ms,
        engine_interval_s=config.meter.engine_interval_s,
        counter_every=config.meter.counter_every,
    )


def authenticator(config: Config, db: sa.Engine) -> Authenticator:
    """The API-key authenticator of a process, its keys looked up in ``db`` (the gateway's and the reports')."""
    from meter.auth import Authenticator
    from meter.store.keys import lookup_key

    return Authenticator(
        lambda key: lookup_key(db, key),
        required=config.auth.required,
        anonymous_tenant=config.auth.anonymous_tenant,
        cache_ttl_s=config.auth.cache_ttl_s,
    )


def settings_from_config(config: Config) -> BillingSettings:
    """The billing settings of ``config``: they seed an empty database and stand in while none are stored."""
    return BillingSettings(
        idle_policy=config.meter.idle_policy,
        grid_g_co2e_per_kwh=config.carbon.grid_g_co2e_per_kwh,
        pue=config.carbon.pue,
    )


def seed_billing_settings(config: Config, engine: sa.Engine, process: str) -> None:
    """Store ``config``'s billing settings if the database holds none yet (blocking: run it on a thread)."""
    seed_settings(engine, settings_from_config(config), source=f"config of {process}")


def budget_usage_reader(config: Config, engine: sa.Engine) -> UsageReader:
    """What ``proxy.budgets`` reads every ``[budgets] refresh_s``: per tenant, the total attributed energy (mJ: prefill
    + decode + idle share under the stored billing settings, final and provisional) of the requests received in
    ``[start_ns, end_ns)``, as ``GetUsage`` grouped by TENANT reports it; per model, the energy per prompt and per
    generated token of every tenant's requests received in the last ``RATE_HOURS`` hours and attributed
    (``usage_hourly``: a request's tokens count there once the epoch it ended in is attributed), what a call in
    flight is reserved at; and, read first, where the attribution of each backend asked for ends (an ended call's
    reservation is in the usage once its end is before it). Blocking."""
    import sqlalchemy as sa

    from meter.engine import attributed_until
    from meter.engine.usage import HOUR_NS, hour_of
    from meter.reports import GroupBy, ReportOptions, get_usage
    from proxy.budgets import LedgerFigures  # (here: the meter daemon loads no request-path module)

    options = ReportOptions(fallback=settings_from_config(config))

    def read(start_ns: int, end_ns: int, backends: Collection[str]) -> LedgerFigures:
        with engine.connect() as conn:
            frontier = {b: until for b in backends if (until := attributed_until(conn, b)) is not None}
            conn.commit()  # the usage in a later snapshot than the frontier (PostgreSQL: a statement's own)
            report = get_usage(conn, options, start_ns=start_ns, end_ns=end_ns, group_by=GroupBy.TENANT)
            since = hour_of(time.time_ns()) - RATE_HOURS * HOUR_NS
            rates = {
                model: (float(prefill) / float(prompt), float(decode) / float(generated))  # (PostgreSQL: Decimal sums)
                for model, prompt, generated, prefill, decode in conn.execute(
                    sa.text(
                        "SELECT model_id, SUM(prompt_tokens), SUM(generated_tokens), SUM(prefill_mj), SUM(decode_mj) "
                        "FROM usage_hourly WHERE hour_start_ns >= :since AND backend <> '' GROUP BY model_id"
                    ),
                    {"since": since},
                )
                if prompt and generated and prefill and decode
            }
        return LedgerFigures(
            used_mj={row.key: row.prefill_mj + row.decode_mj + row.idle_mj for row in report.rows},
            attributed_until_ns=frontier,
            mj_per_token=rates,
        )

    return read
