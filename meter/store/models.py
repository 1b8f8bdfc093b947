"""joulegate's SQL schema (SQLAlchemy 2 declarative models). Alembic migrations in ``meter/migrations`` create it.

Conventions for every table:

- Times are wall-clock nanoseconds since the Unix epoch (``time.time_ns()``), stored as BIGINT, in columns named
  ``*_ns``. Durations are nanoseconds too (``active_ns``).
- Energies are integer millijoules (BIGINT) in columns named ``*_mj``; NVML's counter is in mJ, so no precision is
  lost and sums are exact.
- Tenants, models and backends appear in the metering tables by *name* (strings), not by foreign key: timelines
  from gateway replicas and samples from meter daemons arrive independently and must never be rejected for a name
  that is not (yet) registered. Only ``api_keys`` references ``tenants`` by id.
- A backend is named as in the gateway config (``BackendConfig.name``, default ``host:port``); a device as the
  energy source names it (``Sample.device``, e.g. ``nvml:GPU-<uuid>``).
"""

from __future__ import annotations

from typing import ClassVar

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Deterministic constraint and index names, so later migrations (and SQLite batch mode) can address them.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)
    __table__: ClassVar[sa.Table]  # every model here maps one table (the default type is any FromClause)


def table_of(model: type[Base]) -> sa.Table:
    """A model's table, typed as the ``Table`` it is (``__table__`` is typed as any ``FromClause``)."""
    table = model.__table__
    assert isinstance(table, sa.Table)
    return table


class Tenant(Base):
    """A billing party. Requests, keys and reports are scoped to one tenant.

    ``name`` is what timelines and reports carry (``requests.tenant``, ``usage_hourly.tenant``); a tenant row
    exists for every tenant that owns an API key, and may be missing for names that only appear in timelines
    (e.g. the anonymous tenant when auth is off).
    """

    __tablename__ = "tenants"

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, comment="surrogate key")
    name: Mapped[str] = mapped_column(sa.String, unique=True, comment="the tenant's name, as in requests.tenant")
    created_ns: Mapped[int] = mapped_column(sa.BigInteger, comment="when the tenant row was created (ns)")


class ApiKey(Base):
    """An API key: ``jg_<key_id>_<secret>``, stored only as the SHA-256 of the whole key string.

    The secret is 256 random bits, so a fast hash is the right choice: slow password hashes (bcrypt, argon2)
    exist to make guessing *low-entropy* secrets expensive, and nobody can enumerate 2^256 candidates however
    fast the hash is. A fast hash keeps the per-request auth lookup at microseconds.
    """

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, comment="surrogate key")
    key_id: Mapped[str] = mapped_column(
        sa.String, unique=True, comment="public short id (12 hex chars), shown in listings and logs; not a secret"
    )
    key_hash: Mapped[str] = mapped_column(
        sa.String, unique=True, comment="lowercase hex SHA-256 of the whole key string (jg_<key_id>_<secret>)"
    )
    tenant_id: Mapped[int] = mapped_column(
        sa.ForeignKey("tenants.id", ondelete="CASCADE"), index=True, comment="the tenant this key acts as"
    )
    admin: Mapped[bool] = mapped_column(sa.Boolean, comment="true: may read every tenant's energy")
    default_class: Mapped[str | None] = mapped_column(
        sa.String, comment="traffic class for requests that name none; NULL: the gateway's default"
    )
    label: Mapped[str | None] = mapped_column(sa.String, comment="free text for humans (who holds the key)")
    created_ns: Mapped[int] = mapped_column(sa.BigInteger, comment="when the key was created (ns)")
    revoked_ns: Mapped[int | None] = mapped_column(
        sa.BigInteger, comment="when the key was revoked (ns); NULL while it is valid"
    )
    expires_ns: Mapped[int | None] = mapped_column(
        sa.BigInteger, comment="when the key stops working (ns); NULL: never (rotation sets it on the old key)"
    )
    scopes: Mapped[str] = mapped_column(
        sa.String,
        server_default="generate,reports",
        comment="what it may call, comma-separated: generate (the generation APIs), reports (its tenant's energy)",
    )
    last_used_ns: Mapped[int | None] = mapped_column(
        sa.BigInteger, comment="last time a gateway or meter looked it up (ns; to within a minute); NULL: never"
    )
    rotated_from: Mapped[str | None] = mapped_column(
        sa.String, comment="key_id of the key this one replaced (keys rotate); NULL for a key created afresh"
    )


class RateWindow(Base):
    """How much of a tenant's per-minute limit the gateways have leased (``proxy.rate_limits``)."""

    __tablename__ = "rate_windows"

    scope: Mapped[str] = mapped_column(sa.String, primary_key=True, comment="<tenant>/requests or <tenant>/tokens")
    window_start_ns: Mapped[int] = mapped_column(sa.BigInteger, primary_key=True, comment="start of the UTC minute")
    used: Mapped[int] = mapped_column(sa.BigInteger, comment="leased to gateways so far in the window (<= the limit)")


class AuditEvent(Base):
    """Who did what to keys and billing settings, and which admin reads ran: appended, never changed."""

    __tablename__ = "audit_events"
    __table_args__ = (sa.Index(None, "at_ns"),)

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, comment="surrogate key, in order of recording")
    at_ns: Mapped[int] = mapped_column(sa.BigInteger, comment="when (ns since the epoch)")
    actor: Mapped[str] = mapped_column(
        sa.String, comment="who: key:<key_id> (an API call), cli:<user>@<host> (a command on a database)"
    )
    action: Mapped[str] = mapped_column(
        sa.String, comment="key.create, key.revoke, key.rotate, settings.set, report.read"
    )
    target: Mapped[str] = mapped_column(sa.String, comment="what: a key_id, a tenant, a report method")
    detail: Mapped[str] = mapped_column(sa.Text, comment="JSON object with the facts of the action")


class Request(Base):
    """One generation request as the gateway saw it: the input to attribution and to per-request energy.

    Written by the ledger, idempotently on ``request_id``: first as *open* when the request is released to a
    backend (from a ``RequestStart``: ``done_ns``, ``status``, ``first_token_ns``, ``traffic_class`` and ``api``
    are NULL and token counts 0), then in full when it ends (from a ``Timeline``). A request rejected or expired
    in the gateway's queue gets only the full row, with ``released_ns`` and ``backend`` NULL: it used no GPU.

    ``ingested_ns`` is when the ledger last wrote the row *with changed content* (a replayed, identical row leaves
    it alone). A backend epoch whose ``attributed_at_ns`` is older than the ``ingested_ns`` of a row of that backend
    whose [released_ns, done_ns] overlaps the epoch (or that is still open) must be recomputed: the row arrived late,
    e.g. from a gateway replica that journaled through a database outage.
    """

    __tablename__ = "requests"
    __table_args__ = (
        sa.Index(None, "backend", "released_ns"),
        sa.Index(None, "backend", "done_ns"),
        sa.Index(None, "tenant", "received_ns"),
        sa.Index(None, "received_ns"),
        sa.Index(None, "ingested_ns"),
    )

    request_id: Mapped[str] = mapped_column(
        sa.String, primary_key=True, comment="gateway-assigned id (the x-request-id a client sees)"
    )
    tenant: Mapped[str] = mapped_column(sa.String, comment="tenant name (from the API key)")
    model_id: Mapped[str] = mapped_column(sa.String, comment="model id the request asked for")
    backend: Mapped[str | None] = mapped_column(
        sa.String, comment="backend name that served it; NULL if it never left the gateway's queue"
    )
    traffic_class: Mapped[str | None] = mapped_column(
        sa.String, comment="shaping class (interactive, batch, ...); NULL while open (RequestStart lacks it)"
    )
    api: Mapped[str | None] = mapped_column(sa.String, comment="'grpc' or 'http'; NULL while open")
    status: Mapped[str | None] = mapped_column(
        sa.String, comment="gRPC status code name (OK, CANCELLED, ...), for HTTP requests too; NULL while open"
    )
    correlation_id: Mapped[str | None] = mapped_column(sa.String, comment="client's x-correlation-id, if it sent one")
    received_ns: Mapped[int] = mapped_column(sa.BigInteger, comment="when the gateway received the request")
    released_ns: Mapped[int | None] = mapped_column(
        sa.BigInteger, comment="when the gateway sent it to the backend; NULL if it never was"
    )
    first_token_ns: Mapped[int | None] = mapped_column(
        sa.BigInteger, comment="when the first generated token arrived (end of prefill); NULL if none did"
    )
    done_ns: Mapped[int | None] = mapped_column(
        sa.BigInteger, comment="when the request ended (last token, error or cancel); NULL: still open on a backend"
    )
    prompt_tokens: Mapped[int] = mapped_column(
        sa.Integer,
        comment="prompt length in tokens after truncation, as the backend counted it (TGI's input_length, or its "
        "/tokenize asked after the fact); 0 while open and for a request that did no GPU work",
    )
    prompt_tokens_estimated: Mapped[bool] = mapped_column(
        sa.Boolean,
        server_default=sa.false(),
        comment="true: the backend could not be asked, prompt_tokens is the gateway's estimate (reports say so)",
    )
    generated_tokens: Mapped[int] = mapped_column(sa.Integer, comment="tokens generated; 0 while open")
    cached_tokens: Mapped[int] = mapped_column(
        sa.Integer,
        server_default=sa.text("0"),
        comment="of prompt_tokens, those the engine found in its prefix cache (vLLM, SGLang report it; 0 where the "
        "engine does not say): the prefill share is weighed by the rest",
    )
    ingested_ns: Mapped[int] = mapped_column(
        sa.BigInteger,
        comment="when this row was last written with changed content (finds attribution epochs to recompute)",
    )


class Sample(Base):
    """One raw reading of one device's cumulative energy counter, kept for audit (pruned by ``prune_samples``).

    ``energy_mj`` is the counter as read (mJ since the counter's origin, e.g. driver load for NVML): NULL when the
    read failed (a gap, with ``error`` saying why). A value lower than the previous one is a counter reset; it is
    stored as read and the attribution flags it.
    """

    __tablename__ = "samples"
    __table_args__ = (sa.Index(None, "t_ns"),)

    device: Mapped[str] = mapped_column(sa.String, primary_key=True, comment="device name, e.g. nvml:GPU-<uuid>")
    t_ns: Mapped[int] = mapped_column(sa.BigInteger, primary_key=True, comment="wall clock just after the read")
    energy_mj: Mapped[int | None] = mapped_column(
        sa.BigInteger, comment="cumulative counter (mJ); NULL when the read failed"
    )
    error: Mapped[str | None] = mapped_column(sa.String, comment="why the read failed; NULL for a good read")


class RequestEnergy(Base):
    """The energy one request was attributed inside one attribution epoch of its backend.

    A request's energy is the sum of its rows over all epochs; a request spanning three epochs has three rows.
    Rows of one (backend, epoch) are replaced as a whole whenever that epoch is recomputed, in the same
    transaction as its ``backend_epochs`` row, except the rows of sealed requests (``request_seals``): those are
    written back exactly as they were. Idle shares are computed by the engine when it writes the epoch, from each
    request's own timeline, and stored: reports only add them up.
    """

    __tablename__ = "request_energy"
    __table_args__ = (sa.Index(None, "backend", "epoch_start_ns"),)

    request_id: Mapped[str] = mapped_column(sa.String, primary_key=True, comment="requests.request_id")
    epoch_start_ns: Mapped[int] = mapped_column(
        sa.BigInteger, primary_key=True, comment="start of the epoch (backend_epochs.epoch_start_ns)"
    )
    backend: Mapped[str] = mapped_column(sa.String, comment="backend whose energy this is")
    prefill_mj: Mapped[int] = mapped_column(
        sa.BigInteger, comment="energy of the request's prefill (released_ns to first_token_ns) within the epoch"
    )
    decode_mj: Mapped[int] = mapped_column(
        sa.BigInteger, comment="energy of the request's decode (first_token_ns to done_ns) within the epoch"
    )
    active_ns: Mapped[int] = mapped_column(
        sa.BigInteger,
        comment="time the request was on the backend (released_ns to done_ns) within the epoch; 0 if it did no GPU "
        "work",
    )
    idle_time_mj: Mapped[int] = mapped_column(
        sa.BigInteger,
        server_default=sa.text("0"),
        comment="its share of the epoch's idle_mj in proportion to active_ns (idle policy 'time')",
    )
    idle_tokens_mj: Mapped[int] = mapped_column(
        sa.BigInteger,
        server_default=sa.text("0"),
        comment="its share of the epoch's idle_mj in proportion to its prompt + generated tokens times the part of "
        "its own window (released_ns to done_ns) inside the epoch (idle policy 'tokens')",
    )


class BackendEpoch(Base):
    """One backend's attribution of one epoch (a fixed wall-clock window), recomputed as a whole.

    Conservation, to the millijoule: ``counter_mj == attributed_mj + idle_mj + adjustment_mj`` and
    ``attributed_mj == prefill_mj + decode_mj`` (the sums of this epoch's ``request_energy`` rows).
    ``adjustment_mj`` is 0 unless a recompute (a late row, a calibration change) would have changed the energy of a
    request that was already sealed: its rows were kept and the difference booked here.
    """

    __tablename__ = "backend_epochs"

    backend: Mapped[str] = mapped_column(sa.String, primary_key=True, comment="backend name")
    epoch_start_ns: Mapped[int] = mapped_column(sa.BigInteger, primary_key=True, comment="epoch start (inclusive)")
    epoch_end_ns: Mapped[int] = mapped_column(sa.BigInteger, comment="epoch end (exclusive)")
    first_reading_ns: Mapped[int | None] = mapped_column(
        sa.BigInteger, comment="t_ns of the first good sample used; NULL when the epoch had none"
    )
    last_reading_ns: Mapped[int | None] = mapped_column(
        sa.BigInteger, comment="t_ns of the last good sample used; NULL when the epoch had none"
    )
    counter_mj: Mapped[int] = mapped_column(
        sa.BigInteger, comment="energy the backend's device counters measured over the epoch (all its GPUs)"
    )
    attributed_mj: Mapped[int] = mapped_column(sa.BigInteger, comment="energy given to requests (prefill + decode)")
    prefill_mj: Mapped[int] = mapped_column(sa.BigInteger, comment="part of attributed_mj that was prefill")
    decode_mj: Mapped[int] = mapped_column(sa.BigInteger, comment="part of attributed_mj that was decode")
    idle_mj: Mapped[int] = mapped_column(
        sa.BigInteger, comment="energy with no request on the backend (the idle bucket): counter_mj - attributed_mj"
    )
    samples: Mapped[int] = mapped_column(sa.Integer, comment="good counter readings used")
    gaps: Mapped[int] = mapped_column(sa.Integer, comment="failed reads and counter resets inside the epoch")
    active_ns_total: Mapped[int] = mapped_column(
        sa.BigInteger, comment="sum over requests of their active_ns in this epoch"
    )
    attributed_at_ns: Mapped[int] = mapped_column(
        sa.BigInteger, comment="when this attribution was computed (compare with requests.ingested_ns)"
    )
    adjustment_mj: Mapped[int] = mapped_column(
        sa.BigInteger,
        server_default=sa.text("0"),
        comment="counter_mj - attributed_mj - idle_mj: what a recompute would have given sealed requests (+) or "
        "taken from them (-) but did not (their figures are final); 0 when none was affected",
    )


class RequestSeal(Base):
    """A request whose energy is final: the engine seals it once its backend is attributed until its end plus the
    counter lag, the calibration reach and the settle time, with no epoch of it pending a recompute. The figures
    here are the sums of its ``request_energy`` rows at that moment, which no recompute changes afterwards.
    """

    __tablename__ = "request_seals"
    __table_args__ = (sa.Index(None, "backend", "done_ns"),)

    request_id: Mapped[str] = mapped_column(sa.String, primary_key=True, comment="requests.request_id")
    backend: Mapped[str] = mapped_column(sa.String, comment="its backend (as requests.backend)")
    done_ns: Mapped[int] = mapped_column(sa.BigInteger, comment="its requests.done_ns (the engine's seal cursor)")
    sealed_ns: Mapped[int] = mapped_column(sa.BigInteger, comment="when the engine sealed it")
    prefill_mj: Mapped[int] = mapped_column(sa.BigInteger, comment="final prefill energy")
    decode_mj: Mapped[int] = mapped_column(sa.BigInteger, comment="final decode energy")
    idle_time_mj: Mapped[int] = mapped_column(sa.BigInteger, comment="final idle share under the 'time' policy")
    idle_tokens_mj: Mapped[int] = mapped_column(sa.BigInteger, comment="final idle share under the 'tokens' policy")


class BackendCalibration(Base):
    """A backend's latest fitted power model (``meter.engine.calibrate.PowerModel``), so that a meter that restarts, or
    takes the backend over from another, attributes and seals with it from its first pass instead of the configured
    guess; its own fit replaces it once settled. One row per backend, overwritten by each new fit. A fit is reused only
    on the devices it was made on (``devices``): a backend name that now points at other GPUs starts afresh."""

    __tablename__ = "backend_calibrations"

    backend: Mapped[str] = mapped_column(sa.String, primary_key=True, comment="the backend (as requests.backend)")
    devices: Mapped[str | None] = mapped_column(
        sa.String,
        comment="the devices the fit was made on, as a sorted JSON array of names (nvml:<GPU UUID>); a meter reuses "
        "the fit only on the same devices. NULL: stored before 0008, never reused",
    )
    lag_ns: Mapped[int] = mapped_column(sa.BigInteger, comment="the counter's fitted lag behind the wall clock (ns)")
    prefill_w: Mapped[float] = mapped_column(sa.Float, comment="prefill power of a step of the mean size (W)")
    active_w: Mapped[float] = mapped_column(sa.Float, comment="decode (or waiting-request) power (W)")
    idle_w: Mapped[float | None] = mapped_column(sa.Float, comment="idle power (W); NULL when too little idle was seen")
    prefill_w_per_1k_tokens: Mapped[float] = mapped_column(sa.Float, comment="prefill power rise per 1,000 step tokens")
    prefill_mean_tokens: Mapped[float] = mapped_column(sa.Float, comment="the steps' mean size the prefill_w is of")
    intervals: Mapped[int] = mapped_column(sa.Integer, comment="reading intervals the fit used")
    residual_w: Mapped[float] = mapped_column(sa.Float, comment="root-mean-square misfit, as average power (W)")
    fitted_ns: Mapped[int] = mapped_column(sa.BigInteger, comment="when the meter that fitted it wrote it")


class LedgerWriter(Base):
    """A ledger that writes to this database (a gateway's, or a meter's for its samples) and how far it has written:
    every record it was handed before ``through_ns`` is in the database. A meter seals no request whose epochs end
    after the lowest ``through_ns`` of the writers heard from within ``writer_timeout_s``: a replica cut off from the
    database keeps its timelines in its journal, and bills sealed meanwhile would keep energy that is theirs. A ledger
    that stops cleanly deletes its row; one that dies leaves it, and the next process to own its journal goes on under
    the same id (kept beside the journal). ``clock_offset_ns`` (``meter.store.clock``) lets the meter see a writer
    whose clock disagrees with its own: attribution lines up the gateways' stamps with the meter's samples."""

    __tablename__ = "ledger_writers"

    writer_id: Mapped[str] = mapped_column(sa.String, primary_key=True, comment="the ledger's id (its journal's)")
    name: Mapped[str] = mapped_column(sa.String, comment="host:pid of the process that wrote the row last")
    through_ns: Mapped[int] = mapped_column(
        sa.BigInteger, comment="every record handed to the ledger before this time (ns) is in the database"
    )
    clock_offset_ns: Mapped[int | None] = mapped_column(
        sa.BigInteger,
        comment="this writer's clock minus the database server's at its last mark (ns, +- half a round trip); "
        "NULL on SQLite (no server clock)",
    )


class SchemaCompat(Base):
    """One row: the oldest schema revision whose code may still write to this database. A joulegate that finds a
    revision it does not know (a newer one migrated it) starts if its own newest revision is at least this one (a
    rolling upgrade's old pods), and refuses otherwise. Each migration raises it when older writers must stop."""

    __tablename__ = "schema_compat"

    oldest_writer: Mapped[str] = mapped_column(
        sa.String,
        primary_key=True,
        comment="the oldest schema revision whose code may still write to this database (its newest revision "
        "at least this): later migrations raise it when older writers must stop",
    )


class BillingSettings(Base):
    """The settings that change a bill, stored with the data so that every reader prints the same bill.

    Each row applies to the requests *received* from ``effective_ns`` until the next row's ``effective_ns``. Rows
    are only ever added, effective from when they are added or later (never retroactive); the first is written from
    the configuration of the first gateway or meter that finds the table empty, effective from the beginning.
    """

    __tablename__ = "billing_settings"

    effective_ns: Mapped[int] = mapped_column(
        sa.BigInteger, primary_key=True, comment="applies to requests received at or after this time (ns)"
    )
    idle_policy: Mapped[str] = mapped_column(sa.String, comment="how idle energy is shared: none, time or tokens")
    grid_g_co2e_per_kwh: Mapped[float] = mapped_column(sa.Float, comment="grid carbon intensity, gCO2e per kWh")
    pue: Mapped[float] = mapped_column(sa.Float, comment="power usage effectiveness: facility energy / GPU energy")
    recorded_ns: Mapped[int] = mapped_column(sa.BigInteger, comment="when the row was written")
    source: Mapped[str] = mapped_column(sa.String, comment="who wrote it (a process's config, or an operator)")


class UsageHourly(Base):
    """Hourly rollup per (tenant, model, backend) for reports; rebuilt from ``requests`` and ``request_energy``.

    A request counts in the hour of its ``received_ns``; its energy is the sum over all its epochs.
    """

    __tablename__ = "usage_hourly"

    hour_start_ns: Mapped[int] = mapped_column(
        sa.BigInteger, primary_key=True, comment="start of the UTC hour (a multiple of 3600e9 ns)"
    )
    tenant: Mapped[str] = mapped_column(sa.String, primary_key=True, comment="tenant name")
    model_id: Mapped[str] = mapped_column(sa.String, primary_key=True, comment="model id")
    backend: Mapped[str] = mapped_column(
        sa.String, primary_key=True, comment="backend name; '' for requests that never reached one"
    )
    requests: Mapped[int] = mapped_column(sa.BigInteger, comment="requests received in the hour")
    prompt_tokens: Mapped[int] = mapped_column(sa.BigInteger, comment="sum of prompt_tokens")
    generated_tokens: Mapped[int] = mapped_column(sa.BigInteger, comment="sum of generated_tokens")
    prefill_mj: Mapped[int] = mapped_column(sa.BigInteger, comment="sum of the requests' prefill energy")
    decode_mj: Mapped[int] = mapped_column(sa.BigInteger, comment="sum of the requests' decode energy")
    active_ns: Mapped[int] = mapped_column(sa.BigInteger, comment="sum of the requests' time on a backend")


class UsageFinalHourly(Base):
    """Hourly rollup of *final* figures per (tenant, model, backend) (``meter.engine.rollup``): written once for an
    hour every request of which is final (``usage_rollup_hours`` says which hours), so its totals never change;
    usage reports read it for whole hours and raw rows for the rest."""

    __tablename__ = "usage_final_hourly"

    hour_start_ns: Mapped[int] = mapped_column(
        sa.BigInteger, primary_key=True, comment="start of the UTC hour the requests were received in"
    )
    tenant: Mapped[str] = mapped_column(sa.String, primary_key=True, comment="tenant name")
    model_id: Mapped[str] = mapped_column(sa.String, primary_key=True, comment="model id")
    backend: Mapped[str] = mapped_column(
        sa.String, primary_key=True, comment="backend name; '' for requests that never reached one"
    )
    requests: Mapped[int] = mapped_column(sa.BigInteger, comment="requests received in the hour")
    prompt_tokens: Mapped[int] = mapped_column(sa.BigInteger, comment="sum of prompt_tokens")
    generated_tokens: Mapped[int] = mapped_column(sa.BigInteger, comment="sum of generated_tokens")
    estimated_prompt_requests: Mapped[int] = mapped_column(
        sa.BigInteger, comment="requests whose prompt count is an estimate"
    )
    prefill_mj: Mapped[int] = mapped_column(sa.BigInteger, comment="sum of the requests' final prefill energy")
    decode_mj: Mapped[int] = mapped_column(sa.BigInteger, comment="sum of the requests' final decode energy")
    idle_time_mj: Mapped[int] = mapped_column(sa.BigInteger, comment="sum of their idle shares under 'time'")
    idle_tokens_mj: Mapped[int] = mapped_column(sa.BigInteger, comment="sum of their idle shares under 'tokens'")


class UsageRollupHour(Base):
    """An hour rolled into ``usage_final_hourly`` (also when it held no request)."""

    __tablename__ = "usage_rollup_hours"

    hour_start_ns: Mapped[int] = mapped_column(sa.BigInteger, primary_key=True, comment="start of the UTC hour")
    rolled_at_ns: Mapped[int] = mapped_column(sa.BigInteger, comment="rows ingested up to this time are in it")
    requests: Mapped[int] = mapped_column(sa.BigInteger, comment="requests rolled up")


class UsageRollupState(Base):
    """One row: how far request rows were checked for late arrivals into rolled hours, and a version that every
    change to the rollup bumps (readers retry when it moved under them)."""

    __tablename__ = "usage_rollup_state"

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=False, comment="always 1")
    checked_ns: Mapped[int] = mapped_column(
        sa.BigInteger, comment="rows ingested after this may fall in a rolled hour: those hours read raw rows"
    )
    version: Mapped[int] = mapped_column(sa.BigInteger, comment="bumped by every change to the rollup")


metadata = Base.metadata
