"""Configuration sections that more than one side reads, and the rules every section follows.

``app.config`` assembles the whole file (``Config``, TOML + ``JOULEGATE_*`` environment + flags); the sections live
with what reads them: the backends and their pool here (the request path dials them, the meter attributes their
energy), shaping in ``common.shaping_config``, the meter's in ``meter.config``. Every section is a frozen pydantic
model that refuses unknown keys (``Section``). Listeners (``server.http_listen``, ``meter.grpc_listen``) take
``HOST:PORT``, or ``off`` (or an empty value) to turn them off: one rule for the TOML key, its environment variable
and its flag (``LISTEN_HELP``).
"""

from __future__ import annotations

from typing import Self
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


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
