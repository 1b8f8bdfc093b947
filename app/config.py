"""joulegate's configuration, assembled: one TOML file, then ``JOULEGATE_*`` environment overrides, validated
once at start.

Precedence, lowest first: defaults < TOML file < environment < command-line flags. Environment variables name a
path through the sections with ``__``: ``JOULEGATE_DB__URL``, ``JOULEGATE_SERVER__GRPC_LISTEN``,
``JOULEGATE_METER__SOURCE``. Values are parsed as TOML scalars when they parse (``30``, ``true``, ``"x"``) and
taken as strings otherwise. Every error names the offending key, e.g. ``models.0.backends.1.url: ...``, and where
the value came from (the file, ``JOULEGATE_X__Y=...``, or the command line).

Every ``JOULEGATE_`` variable is checked, because a mistyped one would be silently ignored and the process would
run on a default (``JOULEGATE_DB_URL`` instead of ``JOULEGATE_DB__URL``: the bills go to a local SQLite file). One
that names no setting is an *error* when it looks like a setting — it has the ``__`` separator, or it is a typo
away from one, and the error names the setting it resembles — and a *warning* otherwise (other tools' variables
such as ``JOULEGATE_TEST_POSTGRES`` are ignored). ``[[models]]`` are set in the file only.

The sections live with what reads them (``common.config``: backends and listeners; ``common.shaping_config``;
``meter.config``: the meter and its engine); the ones only a process's wiring reads are here. Every process reads the
same file and validates all of it, the meter daemon included, without loading the request path.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import sys
import tomllib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal, Self, get_args, get_origin

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from common.config import (
    LISTEN_HELP,
    BackendConfig,
    BackendPoolConfig,
    BudgetConfig,
    RateLimitConfig,
    RoutingConfig,
    Section,
    TlsConfig,
    TracingConfig,
    check_listen,
    listener,
)
from common.errors import ConfigError
from common.shaping_config import ShapingConfig
from meter.config import MeterConfig
from meter.reports.settings import BillingSettings

ENV_PREFIX = "JOULEGATE_"
_BILLING = BillingSettings()  # the defaults of what bills: grid intensity, PUE (and the idle policy: meter.config)


class ServerConfig(Section):
    grpc_listen: str = "0.0.0.0:8033"
    http_listen: str | None = Field(default="0.0.0.0:8080", description=f"the HTTP API: {LISTEN_HELP}")
    drain_grace_s: float = Field(default=30.0, ge=0)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    event_loop: Literal["asyncio", "uvloop"] = Field(
        default="asyncio",
        description="the gateway processes' event loop: asyncio's own, or uvloop (~7 % less CPU per gRPC request, "
        "none on HTTP: bench/event_loop.py)",
    )
    log_format: Literal["json", "console"] = "json"
    request_log: Literal["all", "errors", "off"] = Field(
        default="all", description="one `request_finished` line per request: all, only those not OK, or none"
    )
    max_batch_requests: int = Field(default=64, ge=1, description="most texts in one Generate call")
    grpc_max_concurrent_streams: int = Field(default=4096, ge=1)
    workers: int = Field(
        default=1,
        ge=1,
        le=256,
        description="gateway processes on this host, sharing the listeners (SO_REUSEPORT); >1 needs PostgreSQL",
    )
    worker_metrics_listen: str | None = Field(
        default=None,
        description="with workers > 1: worker i serves its own /metrics on HOST:PORT+i (unset: none; the shared "
        "/metrics answers from whichever worker takes the connection)",
    )

    @field_validator("grpc_listen")
    @classmethod
    def _v_grpc(cls, v: str) -> str:
        if listener(v) is None:
            raise ValueError("the gateway's gRPC listener cannot be turned off (it serves health and reports)")
        return check_listen(v.strip())

    @field_validator("http_listen")
    @classmethod
    def _v_http(cls, v: str | None) -> str | None:
        return listener(v)

    @field_validator("worker_metrics_listen")
    @classmethod
    def _v_worker_metrics(cls, v: str | None) -> str | None:
        v = listener(v)
        if v is not None and v.rpartition(":")[2] == "0":
            raise ValueError("give a port: worker i listens on PORT+i, which port 0 cannot say")
        return v


class ModelConfig(Section):
    model_id: str
    backends: tuple[BackendConfig, ...] = Field(min_length=1)
    max_new_tokens: int = Field(default=1024, ge=1, description="the most new tokens one request may ask for")
    include_stop_sequence: bool = Field(default=True, description="TGIS default when a request does not say")
    tokenizer_file: Path | None = Field(
        default=None,
        description="the tokenizer.json the backends load: input token counts for TGIS without a /tokenize call",
    )
    shaping: ShapingConfig = Field(default_factory=ShapingConfig, description="arrival shaping (proxy/shaping)")


class DbConfig(Section):
    url: str = "sqlite:///joulegate.db"


class AuthConfig(Section):
    required: bool = True  # False: requests without a key run as `anonymous_tenant`
    anonymous_tenant: str = "anonymous"
    cache_ttl_s: float = Field(default=30.0, ge=0)


class CarbonConfig(Section):
    grid_g_co2e_per_kwh: float = Field(default=_BILLING.grid_g_co2e_per_kwh, ge=0)
    pue: float = Field(default=_BILLING.pue, ge=1.0)


class Config(Section):
    server: ServerConfig = ServerConfig()
    db: DbConfig = DbConfig()
    auth: AuthConfig = AuthConfig()
    backend_pool: BackendPoolConfig = BackendPoolConfig()
    meter: MeterConfig = MeterConfig()
    carbon: CarbonConfig = CarbonConfig()
    tls: TlsConfig = TlsConfig()
    rate_limits: RateLimitConfig = RateLimitConfig()
    routing: RoutingConfig = RoutingConfig()
    budgets: BudgetConfig = BudgetConfig()
    tracing: TracingConfig = TracingConfig()
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
    def _budget_classes_exist(self) -> Self:
        for name in sorted(self.budgets.classes):
            for m in self.models:
                if name not in m.shaping.classes:
                    raise ValueError(
                        f"budgets: over_soft_class {name!r} is not a traffic class of model {m.model_id!r} "
                        f"(its classes: {', '.join(m.shaping.classes)})"
                    )
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


def _parse_env_value(raw: str, *, text: bool) -> Any:
    """A TOML scalar when it parses as one; a text setting takes anything else (``8080``, ``042``) as a string."""
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw
    return raw if text and not isinstance(value, str) else value


def _is_text(annotation: Any) -> bool:
    """A setting whose values are strings (``str``, ``str | None``, a ``Literal`` of strings, a ``StrEnum``)."""
    if annotation in (str, str | None) or (isinstance(annotation, type) and issubclass(annotation, StrEnum)):
        return True
    return get_origin(annotation) is Literal and all(isinstance(a, str) for a in get_args(annotation))


def _leaf_paths(model: type[BaseModel], prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], bool]]:
    """The settings a plain value sets, as paths through the sections (``("meter", "source")``), each with whether
    it is a text setting."""
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from _leaf_paths(ann, (*prefix, name))
        elif not prefix and name == "models":
            continue  # a list of tables: the file only
        else:
            yield (*prefix, name), _is_text(ann)


def env_name(path: tuple[str, ...]) -> str:
    return ENV_PREFIX + "__".join(p.upper() for p in path)


ENV_SETTINGS: dict[str, tuple[str, ...]] = {env_name(p): p for p, _text in _leaf_paths(Config)}
_TEXT_SETTINGS = {p for p, text in _leaf_paths(Config) if text}


def _closest_setting(name: str) -> tuple[str | None, float]:
    """The known variable ``name`` most resembles (compared without the prefix and the separators), and how much."""

    def bare(v: str) -> str:
        return v[len(ENV_PREFIX) :].replace("__", "_").lower()

    best, score = None, 0.0
    for known in ENV_SETTINGS:
        ratio = difflib.SequenceMatcher(None, bare(name), bare(known)).ratio()
        if ratio > score:
            best, score = known, ratio
    return best, score


_TYPO_RATIO = 0.85  # within a character or two of a setting's name


@dataclass(frozen=True)
class _EnvOverrides:
    values: dict[str, Any]
    origins: dict[tuple[str, ...], str]  # setting path -> "JOULEGATE_X__Y='raw'"
    errors: list[str]
    warnings: list[str]


def _env_overrides(environ: Mapping[str, str]) -> _EnvOverrides:
    out = _EnvOverrides({}, {}, [], [])
    for key, raw in sorted(environ.items()):
        if not key.startswith(ENV_PREFIX):
            continue
        path = ENV_SETTINGS.get(key.upper())
        if path is None:
            closest, score = _closest_setting(key)
            hint = f"; did you mean {closest}?" if closest and score >= 0.6 else ""
            if "__" in key or score >= _TYPO_RATIO:
                form = "JOULEGATE_<SECTION>__<KEY>, e.g. JOULEGATE_DB__URL"
                where = (
                    "; [[models]] are set in the config file only" if key.upper().startswith("JOULEGATE_MODELS") else ""
                )
                out.errors.append(f"{key}: not a joulegate setting{hint} (settings are {form}{where})")
            else:
                out.warnings.append(f"{key} is not a joulegate setting; ignored{hint}")
            continue
        node = out.values
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = _parse_env_value(raw, text=path in _TEXT_SETTINGS)
        out.origins[path] = f"{key}={raw!r}"
    return out


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for k, v in over.items():
        merged[k] = _merge(merged[k], v) if isinstance(v, Mapping) and isinstance(merged.get(k), dict) else v
    return merged


def _paths(data: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    for k, v in data.items():
        if isinstance(v, Mapping) and v:
            yield from _paths(v, (*prefix, k))
        else:
            yield (*prefix, k)


def _format_errors(
    err: ValidationError, file: str | None, env: Mapping[tuple[str, ...], str], flags: set[tuple[str, ...]]
) -> str:
    """One line per error: the key, what is wrong, and where the value came from."""
    lines = []
    for e in err.errors():
        loc = tuple(str(p) for p in e["loc"])
        where = ".".join(loc) or "(top level)"
        origin = next((o for path, o in env.items() if loc[: len(path)] == path), None)
        if origin is None and any(loc[: len(path)] == path for path in flags):
            origin = "the command line"
        origin = origin or file or "the defaults"
        lines.append(f"{where}: {e['msg']} (from {origin})")
    if len(lines) == 1:
        return f"invalid configuration: {lines[0]}"
    return "\n".join(["invalid configuration:", *(f"  {line}" for line in lines)])


def _warn_stderr(message: str) -> None:
    print(f"joulegate: warning: {message}", file=sys.stderr)


def load_config(
    path: str | Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    warn: Callable[[str], None] = _warn_stderr,
) -> Config:
    """Read ``path`` (TOML), apply environment and then ``overrides`` (from flags), validate, return.

    Unknown ``JOULEGATE_*`` variables that look like settings raise ``ConfigError``; others go to ``warn``."""
    data: dict[str, Any] = {}
    file = None
    if path is not None:
        p = Path(path)
        try:
            data = tomllib.loads(p.read_text())
        except FileNotFoundError as exc:
            raise ConfigError(f"config file not found: {p}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{p}: not valid TOML: {exc}") from exc
        file = str(p)
    env = _env_overrides(os.environ if environ is None else environ)
    if env.errors:
        raise ConfigError("; ".join(env.errors) if len(env.errors) == 1 else "\n".join(env.errors))
    for message in env.warnings:
        warn(message)
    data = _merge(data, env.values)
    if overrides:
        data = _merge(data, overrides)
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        env_origins = {p: o for p, o in env.origins.items() if not overrides or p not in set(_paths(overrides))}
        raise ConfigError(_format_errors(exc, file, env_origins, set(_paths(overrides or {})))) from None
