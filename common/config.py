"""Configuration sections that more than one side reads, and the rules every section follows.

``app.config`` assembles the whole file (``Config``, TOML + ``JOULEGATE_*`` environment + flags); the sections live
with what reads them: the backends and their pool here (the request path dials them, the meter attributes their
energy), shaping in ``common.shaping_config``, the meter's in ``meter.config``. Every section is a frozen pydantic
model that refuses unknown keys (``Section``). Listeners (``server.http_listen``, ``meter.grpc_listen``) take
``HOST:PORT``, or ``off`` (or an empty value) to turn them off: one rule for the TOML key, its environment variable
and its flag (``LISTEN_HELP``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Self
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

if TYPE_CHECKING:
    from common.tls import TlsFiles


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


LISTEN_OFF = "off"
LISTEN_HELP = "HOST:PORT, or 'off' (or an empty value) to turn it off"


def check_listen(value: str) -> str:
    """``value`` when it is ``HOST:PORT`` with a port in [0, 65535]; ValueError otherwise."""
    _host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return value


def listener(value: str | None) -> str | None:
    """A listener setting: ``HOST:PORT``, or None when it is turned off (``off``, an empty value, or None)."""
    if value is None or value.strip().lower() in ("", LISTEN_OFF):
        return None
    try:
        return check_listen(value.strip())
    except ValueError:
        raise ValueError(f"expected {LISTEN_HELP}, got {value!r}") from None


class BackendConfig(Section):
    url: str
    name: str = ""  # default: host:port of the url
    gpus: tuple[int, ...] = ()  # NVML indices of the GPUs serving it (tensor parallelism: several)
    node: str = ""  # host whose meter attributes this backend's energy (fleets); "" = any/this one
    engine: Literal["auto", "tgi", "vllm", "sglang"] = "auto"  # auto: found by probing the backend
    # The engine prefills long prompts in chunks of this many tokens (vLLM's max_num_batched_tokens, SGLang's
    # chunked_prefill_size, TGI 3 with chunking): a client that leaves mid-prefill is billed up to the end of the
    # chunk in flight, not the whole prompt's step. Unset: one step per prompt (TGI without chunking).
    prefill_chunk_tokens: int | None = Field(default=None, ge=1)

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


class BackendPoolConfig(Section):
    health_interval_s: float = Field(default=2.0, gt=0)
    connect_timeout_s: float = Field(default=2.0, gt=0)
    request_timeout_s: float = Field(default=600.0, gt=0, description="upper bound on one generation")
    retries: int = Field(default=2, ge=0, description="extra attempts on another backend, before the first byte")
    max_connections: int = Field(default=1024, ge=1, description="per backend")
    max_concurrent_requests: int | None = Field(
        default=None, ge=1, description="cap on in-flight requests per backend; default: TGI's /info value"
    )


class RoutingConfig(Section):
    """``[routing]``: which backend of a model takes a request (``common.placement``; README: Energy-aware
    orchestration)."""

    policy: Literal["spread", "pack"] = Field(
        default="spread",
        description="spread: fewest outstanding tokens; pack: fill one backend to pack_target before the next",
    )
    pack_target: int = Field(
        default=7, ge=1, description="pack: requests in flight on a backend before the next one is opened"
    )
    pack_spill_on_prefill: bool = Field(
        default=False,
        description="pack: pass over a backend whose latest request awaits its first token (TTFT over parking)",
    )
    scale_in_after_s: float = Field(
        default=300.0,
        ge=0,
        description="joulegate_backends_needed falls only after the load stayed lower this long (hysteresis)",
    )


class TenantRateLimits(Section):
    requests_per_minute: int | None = Field(default=None, ge=1, description="requests admitted per UTC minute")
    tokens_per_minute: int | None = Field(
        default=None, ge=1, description="prompt + max new tokens admitted per UTC minute (the prompt as estimated)"
    )


class RateLimitConfig(Section):
    """``[rate_limits]``: per tenant, enforced before the queue across every gateway on one database
    (``proxy.rate_limits``). The defaults apply to every tenant; ``[rate_limits.tenants.NAME]`` overrides them."""

    requests_per_minute: int | None = Field(default=None, ge=1, description="per tenant; none: no limit")
    tokens_per_minute: int | None = Field(default=None, ge=1, description="per tenant; none: no limit")
    tenants: dict[str, TenantRateLimits] = Field(default_factory=dict)

    def for_tenant(self, tenant: str) -> TenantRateLimits:
        own = self.tenants.get(tenant)
        return TenantRateLimits(
            requests_per_minute=own.requests_per_minute
            if own and own.requests_per_minute
            else self.requests_per_minute,
            tokens_per_minute=own.tokens_per_minute if own and own.tokens_per_minute else self.tokens_per_minute,
        )

    @property
    def enabled(self) -> bool:
        return any(x is not None for x in (self.requests_per_minute, self.tokens_per_minute)) or any(
            t.requests_per_minute or t.tokens_per_minute for t in self.tenants.values()
        )


class TenantBudget(Section):
    soft_wh: float | None = Field(
        default=None, ge=0, description="over it: served, moved to over_soft_class, x-joulegate-budget header"
    )
    hard_wh: float | None = Field(default=None, ge=0, description="over it: refused until the period ends")
    over_soft_class: str | None = Field(
        default=None, description="traffic class of a tenant over its soft budget (a class of every model)"
    )


class BudgetConfig(Section):
    """``[budgets]``: energy per tenant per UTC calendar period, from the ledger's attributed energy, checked before
    the rate limits and the queue (``proxy.budgets``). The defaults apply to every tenant;
    ``[budgets.tenants.NAME]`` overrides them key by key."""

    period: Literal["month", "day"] = Field(default="month", description="UTC calendar month or day")
    soft_wh: float | None = Field(default=None, ge=0, description="per tenant; none: no soft budget")
    hard_wh: float | None = Field(default=None, ge=0, description="per tenant; none: no hard budget")
    over_soft_class: str | None = Field(
        default=None, description="class a tenant over its soft budget is moved to; none: it keeps its class"
    )
    refresh_s: float = Field(
        default=10.0, gt=0, le=3600, description="how often each gateway reads the tenants' usage from the database"
    )
    tenants: dict[str, TenantBudget] = Field(default_factory=dict)

    def for_tenant(self, tenant: str) -> TenantBudget:
        own = self.tenants.get(tenant)

        def pick(key: str) -> Any:
            value = getattr(own, key) if own is not None else None
            return value if value is not None else getattr(self, key)

        return TenantBudget(soft_wh=pick("soft_wh"), hard_wh=pick("hard_wh"), over_soft_class=pick("over_soft_class"))

    @property
    def enabled(self) -> bool:
        limits = [(self.soft_wh, self.hard_wh), *((t.soft_wh, t.hard_wh) for t in self.tenants.values())]
        return any(x is not None for pair in limits for x in pair)

    @property
    def classes(self) -> set[str]:
        """Every over_soft_class named (each must be a class of every model)."""
        return {c for c in (self.over_soft_class, *(t.over_soft_class for t in self.tenants.values())) if c}

    @model_validator(mode="after")
    def _soft_below_hard(self) -> Self:
        pairs = [("the defaults", self.soft_wh, self.hard_wh)]
        pairs += [(f"tenants.{n}", b.soft_wh, b.hard_wh) for n, b in ((n, self.for_tenant(n)) for n in self.tenants)]
        for who, soft, hard in pairs:
            if soft is not None and hard is not None and soft > hard:
                raise ValueError(f"soft_wh ({soft}) is above hard_wh ({hard}) for {who}")
        return self


class TlsConfig(Section):
    """``[tls]``: serve the gateway's gRPC and HTTP listeners and the meter's report port over TLS (common.tls)."""

    cert_path: str | None = Field(default=None, description="PEM certificate chain; with key_path: TLS on")
    key_path: str | None = Field(default=None, description="PEM private key of cert_path")
    client_ca_cert_path: str | None = Field(
        default=None, description="PEM CA bundle: clients must present a certificate it signed (mutual TLS)"
    )
    reload_interval_s: float = Field(
        default=10.0,
        gt=0,
        le=3600,
        description="how often the HTTP listener looks for new files (gRPC: every handshake)",
    )

    @model_validator(mode="after")
    def _pair(self) -> Self:
        if (self.cert_path is None) != (self.key_path is None):
            raise ValueError("cert_path and key_path go together: give both or neither")
        if self.client_ca_cert_path is not None and self.cert_path is None:
            raise ValueError("client_ca_cert_path needs cert_path and key_path (mutual TLS is TLS first)")
        return self

    def files(self) -> TlsFiles | None:
        """The files, or None when TLS is off."""
        from common.tls import TlsFiles

        if self.cert_path is None or self.key_path is None:
            return None
        ca = Path(self.client_ca_cert_path) if self.client_ca_cert_path else None
        return TlsFiles(Path(self.cert_path), Path(self.key_path), ca)


class TracingConfig(Section):
    """``[tracing]``: OpenTelemetry spans of the request path (``proxy.tracing``), sent over OTLP/gRPC. Off unless
    ``endpoint`` is set."""

    endpoint: str | None = Field(
        default=None, description="OTLP/gRPC collector, e.g. http://otel-collector:4317; none: tracing off"
    )
    sample_ratio: float = Field(
        default=1.0, ge=0.0, le=1.0, description="share of new traces kept; a client's sampled flag is followed"
    )
    service_name: str = Field(default="joulegate", min_length=1, description="the resource's service.name")

    @field_validator("endpoint")
    @classmethod
    def _v_endpoint(cls, v: str | None) -> str | None:
        if v and urlparse(v).scheme not in ("http", "https"):
            raise ValueError(f"{v!r}: an http:// (plaintext) or https:// URL of an OTLP/gRPC collector")
        return v or None

    @property
    def enabled(self) -> bool:
        return bool(self.endpoint)
