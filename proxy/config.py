"""Gateway configuration: one TOML file, then ``JOULEGATE_*`` environment overrides, validated once at start.

Precedence, lowest first: defaults < TOML file < environment < command-line flags. Environment variables name a
path through the sections with ``__``: ``JOULEGATE_DB__URL``, ``JOULEGATE_SERVER__GRPC_LISTEN``,
``JOULEGATE_METER__SOURCE``. Values are parsed as TOML scalars when they parse (``30``, ``true``, ``"x"``) and
taken as strings otherwise. Every error names the offending key, e.g. ``models.0.backends.1.url: ...``.
"""

from __future__ import annotations

import hashlib
import os
import tomllib
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal, Self
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from proxy.shaping.config import ShapingConfig

ENV_PREFIX = "JOULEGATE_"


class ConfigError(ValueError):
    """The configuration is invalid; the message says which key and why."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_listen(value: str) -> str:
    _host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return value


class ServerConfig(_Section):
    grpc_listen: str = "0.0.0.0:8033"
    http_listen: str | None = "0.0.0.0:8080"  # None or "" disables the HTTP facade
    drain_grace_s: float = Field(default=30.0, ge=0)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["json", "console"] = "json"
    max_batch_requests: int = Field(default=64, ge=1, description="most texts in one Generate call")
    grpc_max_concurrent_streams: int = Field(default=4096, ge=1)

    @field_validator("grpc_listen")
    @classmethod
    def _v_grpc(cls, v: str) -> str:
        return _check_listen(v)

    @field_validator("http_listen")
    @classmethod
    def _v_http(cls, v: str | None) -> str | None:
        return _check_listen(v) if v else None


class BackendConfig(_Section):
    url: str
    name: str = ""  # default: host:port of the url
    gpus: tuple[int, ...] = ()  # NVML indices of the GPUs serving it (tensor parallelism: several)
    node: str = ""  # host whose meter attributes this backend's energy (fleets); "" = any/this one

    @field_validator("url")
    @classmethod
    def _v_url(cls, v: str) -> str:
        parsed = urlparse(v)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"expected an http(s) URL, got {v!r}")
        return v.rstrip("/")

    @model_validator(mode="after")
    def _default_name(self) -> Self:
        if not self.name:
            object.__setattr__(self, "name", urlparse(self.url).netloc)
        return self


class BackendPoolConfig(_Section):
    health_interval_s: float = Field(default=2.0, gt=0)
    connect_timeout_s: float = Field(default=2.0, gt=0)
    request_timeout_s: float = Field(default=600.0, gt=0, description="upper bound on one generation")
    retries: int = Field(default=2, ge=0, description="extra attempts on another backend, before the first byte")
    max_connections: int = Field(default=1024, ge=1, description="per backend")
    max_concurrent_requests: int | None = Field(
        default=None, ge=1, description="cap on in-flight requests per backend; default: TGI's /info value"
    )


class ModelConfig(_Section):
    model_id: str
    backends: tuple[BackendConfig, ...] = Field(min_length=1)
    max_new_tokens: int = Field(default=1024, ge=1, description="the most new tokens one request may ask for")
    include_stop_sequence: bool = Field(default=True, description="TGIS default when a request does not say")
    shaping: ShapingConfig = Field(default_factory=ShapingConfig, description="arrival shaping (proxy/shaping)")


class IdlePolicy(StrEnum):
    NONE = "none"
    TIME = "time"
    TOKENS = "tokens"


class MeterConfig(_Section):
    """The meter: sampler, ledger journal, and the metering engine (meter/engine) that turns samples and timelines
    into per-request joules. See meter.engine.core for what each engine knob means."""

    # auto: NVML when this host's driver exposes the GPUs' energy counters, else no meter (logged); the default, so a
    # single GPU box meters with no configuration
    source: Literal["auto", "nvml", "sim", "none"] = "auto"
    interval_ms: int = Field(default=100, ge=10, le=10_000)
    lag_ms: int = Field(default=100, ge=0, le=2_000, description="counter lag behind the work it measures")
    idle_policy: IdlePolicy = IdlePolicy.NONE
    sample_retention_days: float = Field(default=7.0, gt=0)
    # the ledger's write-ahead journal (meter.journal: <path>.<n> segments, <path>.rejected, <path>.lock); "": beside
    # a SQLite file given by an absolute path, else $XDG_STATE_HOME/joulegate/journal-<hash of the database>.jsonl
    journal_path: str = ""
    node: str = ""  # this host's name, matched against backends' `node` (default: the hostname)
    # -- the metering engine --
    epoch_s: float = Field(default=10.0, ge=0.1, le=3600, description="attribution epoch (wall-clock window)")
    settle_s: float = Field(default=2.0, ge=0, le=600, description="wait past an epoch's end for late timelines")
    open_request_timeout_s: float = Field(
        default=600.0, gt=0, description="an open request older than this no longer holds attribution back"
    )
    engine_interval_s: float = Field(default=1.0, gt=0, le=60, description="how often the engine runs a pass")
    prefill_tokens_per_s: float = Field(default=20_000.0, gt=0, description="to estimate a prefill step's length")
    prefill_overhead_ms: float = Field(default=5.0, ge=0, le=10_000)
    prefill_power_ratio: float = Field(
        default=2.5, gt=0, le=100, description="prefill power / decode power (H100: ~650-700 W vs ~250-300 W)"
    )
    batch_tolerance_ms: float = Field(default=2.0, ge=0, le=1_000, description="first tokens this close: one prefill")
    idle_power_w: float | Literal["auto", "time"] = Field(
        default="auto", description="idle floor: 'auto' (measured), 'time' (split partly idle intervals by time), W"
    )
    max_interval_s: float = Field(default=5.0, gt=0, le=3600, description="a longer reading interval is a gap")
    count_unrouted: bool = Field(default=True, description="count requests that never reached a backend in usage")
    calibrate: bool = Field(
        default=True,
        description="fit the lag and the prefill/decode power ratio to the counter (meter.engine.calibrate)",
    )

    @field_validator("idle_power_w")
    @classmethod
    def _v_idle_power(cls, v: float | str) -> float | str:
        if not isinstance(v, str) and not 0 <= v < 100_000:
            raise ValueError(f"expected 'auto', 'time' or watts >= 0, got {v!r}")
        return v


class DbConfig(_Section):
    url: str = "sqlite:///joulegate.db"


class AuthConfig(_Section):
    required: bool = True  # False: requests without a key run as `anonymous_tenant`
    anonymous_tenant: str = "anonymous"
    cache_ttl_s: float = Field(default=30.0, ge=0)


class CarbonConfig(_Section):
    grid_g_co2e_per_kwh: float = Field(default=400.0, ge=0)
    pue: float = Field(default=1.2, ge=1.0)


class Config(_Section):
    server: ServerConfig = ServerConfig()
    db: DbConfig = DbConfig()
    auth: AuthConfig = AuthConfig()
    backend_pool: BackendPoolConfig = BackendPoolConfig()
    meter: MeterConfig = MeterConfig()
    carbon: CarbonConfig = CarbonConfig()
    models: tuple[ModelConfig, ...] = ()

    @model_validator(mode="after")
    def _unique_names(self) -> Self:
        seen_models: set[str] = set()
        seen_backends: set[str] = set()
        for m in self.models:
            if m.model_id in seen_models:
                raise ValueError(f"model_id {m.model_id!r} appears twice")
            seen_models.add(m.model_id)
            for b in m.backends:
                if b.name in seen_backends:
                    raise ValueError(f"backend name {b.name!r} appears twice (backends are named by host:port)")
                seen_backends.add(b.name)
        return self

    @model_validator(mode="after")
    def _default_journal(self) -> Self:
        if not self.meter.journal_path:
            meter = self.meter.model_copy(update={"journal_path": str(default_journal_path(self.db.url))})
            object.__setattr__(self, "meter", meter)
        return self

    def model(self, model_id: str) -> ModelConfig | None:
        return next((m for m in self.models if m.model_id == model_id), None)

    @property
    def backends(self) -> tuple[BackendConfig, ...]:
        return tuple(b for m in self.models for b in m.backends)


def default_journal_path(db_url: str, environ: Mapping[str, str] | None = None) -> Path:
    """Where the ledger's journal goes unless ``meter.journal_path`` says: beside a SQLite database file named by an
    absolute path (the journal belongs to that database), else under the XDG state directory, named after the
    database (a relative SQLite path by its absolute form, a server by its URL without the password), so that a
    journal is never replayed into a database it was not written for. Never the current directory."""
    from sqlalchemy.engine import make_url

    env = os.environ if environ is None else environ
    try:
        url = make_url(db_url)
    except Exception:  # an invalid URL is reported when the database is opened
        url = None
    identity = url.render_as_string(hide_password=True) if url is not None else db_url
    if url is not None and url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        db_file = Path(url.database).expanduser()
        if db_file.is_absolute():
            return db_file.with_name(db_file.name + ".journal.jsonl")
        identity = str(db_file.absolute())
    state = env.get("XDG_STATE_HOME") or (str(Path(env["HOME"]) / ".local" / "state") if env.get("HOME") else "")
    if not state:
        raise ValueError("meter.journal_path: set it (neither XDG_STATE_HOME nor HOME is set to put it under)")
    return Path(state) / "joulegate" / f"journal-{hashlib.sha256(identity.encode()).hexdigest()[:12]}.jsonl"


def _parse_env_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, raw in environ.items():
        if not key.startswith(ENV_PREFIX) or "__" not in key:
            continue
        path = key[len(ENV_PREFIX) :].lower().split("__")
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = _parse_env_value(raw)
    return out


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for k, v in over.items():
        merged[k] = _merge(merged[k], v) if isinstance(v, Mapping) and isinstance(merged.get(k), dict) else v
    return merged


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        lines.append(f"  {where}: {e['msg']}")
    return "\n".join(lines)


def load_config(
    path: str | Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Read ``path`` (TOML), apply environment and then ``overrides`` (from flags), validate, return."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        try:
            data = tomllib.loads(p.read_text())
        except FileNotFoundError as exc:
            raise ConfigError(f"config file not found: {p}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{p}: not valid TOML: {exc}") from exc
        source = str(p)
    data = _merge(data, _env_overrides(os.environ if environ is None else environ))
    if overrides:
        data = _merge(data, overrides)
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, source)) from None
