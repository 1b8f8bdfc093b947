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
from typing import TYPE_CHECKING, Literal, Self
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
