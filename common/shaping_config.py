"""Shaping configuration (``[models.shaping]``): traffic classes, their release policies, queue limits, weights.

Validated once at start like the rest of the config, so a mistake fails with its key path, e.g.
``models.0.shaping.classes.batch.hold_ms: Input should be greater than or equal to 0``. A policy's parameters that
are left out get the policy's defaults (below) during validation, so the validated config shows the values in use;
a parameter that the chosen policy does not read is an error rather than silently ignored.

It imports nothing of joulegate's: the request path (``proxy.shaping``) reads it, ``app.config`` assembles it into the
whole file, and the meter daemon validates it without loading the request path.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

DEFAULT_CLASS = "default"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class Policy(StrEnum):
    PASSTHROUGH = "passthrough"  # no hold
    WINDOW = "window"  # release every window_ms, epochs aligned to the Unix epoch
    BATCH = "batch"  # release at max_batch requests or when the oldest waited hold_ms
    TOKENS = "tokens"  # release at max_batch_prefill_tokens queued prompt tokens or when the oldest waited hold_ms
    ADAPTIVE = "adaptive"  # hold chosen from the measured arrival rate under ttft_bound_ms


# Which policy reads which parameter, and its default there.
POLICY_PARAMS: dict[Policy, dict[str, Any]] = {
    Policy.PASSTHROUGH: {},
    Policy.WINDOW: {"window_ms": 100.0},
    Policy.BATCH: {"max_batch": 16, "hold_ms": 250.0},
    Policy.TOKENS: {"max_batch_prefill_tokens": 4096, "hold_ms": 250.0, "max_batch": None},
    Policy.ADAPTIVE: {
        "ttft_bound_ms": 1000.0,
        "service_ttft_ms": 100.0,
        "target_batch": 16,
        "rate_window_s": 10.0,
        "max_batch": None,
    },
}
_ALL_PARAMS = sorted({p for params in POLICY_PARAMS.values() for p in params})


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ClassConfig(_Section):
    """One traffic class: how its requests are held and released, and its place among the classes."""

    policy: Policy = Policy.PASSTHROUGH
    priority: int = Field(default=0, description="higher first: its released requests take free slots first")
    # policy parameters (see POLICY_PARAMS for which policy reads which)
    window_ms: float | None = Field(default=None, gt=0, le=600_000)
    hold_ms: float | None = Field(default=None, ge=0, le=600_000)
    max_batch: int | None = Field(default=None, ge=1, le=100_000)
    max_batch_prefill_tokens: int | None = Field(default=None, ge=1)
    ttft_bound_ms: float | None = Field(default=None, gt=0, le=600_000)
    service_ttft_ms: float | None = Field(default=None, ge=0, le=600_000)
    target_batch: int | None = Field(default=None, ge=1, le=100_000)
    rate_window_s: float | None = Field(default=None, gt=0, le=3600)
    # limits of this class alone (the model's limits apply as well)
    max_queued_requests: int | None = Field(default=None, ge=0)
    max_queued_tokens: int | None = Field(default=None, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _policy_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        try:
            policy = Policy(data.get("policy", Policy.PASSTHROUGH))
        except ValueError:
            return data  # the field validation names the bad policy
        return {**{k: v for k, v in POLICY_PARAMS[policy].items() if v is not None}, **data}

    @field_validator(*_ALL_PARAMS)
    @classmethod
    def _read_by_policy(cls, v: Any, info: ValidationInfo) -> Any:
        policy = info.data.get("policy")
        if v is not None and policy is not None and info.field_name not in POLICY_PARAMS[policy]:
            readers = sorted(p.value for p, params in POLICY_PARAMS.items() if info.field_name in params)
            raise ValueError(f"not used by policy {policy.value!r} (read by: {', '.join(readers)})")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.policy is Policy.ADAPTIVE:
            assert self.ttft_bound_ms is not None and self.service_ttft_ms is not None
            if self.service_ttft_ms >= self.ttft_bound_ms:
                raise ValueError(
                    f"service_ttft_ms ({self.service_ttft_ms}) must be below ttft_bound_ms ({self.ttft_bound_ms}): "
                    "no time would be left to hold"
                )
        return self

    @property
    def max_hold_ms(self) -> float:
        """The longest this class holds a request before releasing it (capacity permitting)."""
        match self.policy:
            case Policy.WINDOW:
                return self.window_ms or 0.0
            case Policy.BATCH | Policy.TOKENS:
                return self.hold_ms or 0.0
            case Policy.ADAPTIVE:
                return (self.ttft_bound_ms or 0.0) - (self.service_ttft_ms or 0.0)
            case _:
                return 0.0


def _default_classes() -> dict[str, ClassConfig]:
    return {DEFAULT_CLASS: ClassConfig()}


class ShapingConfig(_Section):
    """Arrival shaping of one model. The defaults are plain passthrough with one class, ``default``."""

    default_class: str = Field(
        default=DEFAULT_CLASS, description="class of a request that names none (and whose API key names none)"
    )
    classes: dict[str, ClassConfig] = Field(default_factory=_default_classes)
    max_queued_requests: int = Field(default=10_000, ge=0, description="requests waiting in the shaper, per model")
    max_queued_tokens: int | None = Field(
        default=None, ge=0, description="prompt + max new tokens of the waiting requests, per model"
    )
    max_queued_requests_per_tenant: int | None = Field(default=None, ge=0)
    max_queued_tokens_per_tenant: int | None = Field(default=None, ge=0)
    tenant_weights: dict[str, float] = Field(default_factory=dict, description="fair-share weights, default 1")
    default_tenant_weight: float = Field(default=1.0, gt=0)

    @field_validator("classes")
    @classmethod
    def _class_names(cls, v: dict[str, ClassConfig]) -> dict[str, ClassConfig]:
        if not v:
            raise ValueError("at least one class is needed")
        for name in v:
            if not _NAME_RE.match(name):
                raise ValueError(f"class name {name!r}: use letters, digits, '_', '.', '-' (at most 64)")
        return v

    @field_validator("tenant_weights")
    @classmethod
    def _weights(cls, v: dict[str, float]) -> dict[str, float]:
        for tenant, w in v.items():
            if not w > 0:
                raise ValueError(f"weight of tenant {tenant!r} must be > 0, got {w}")
        return v

    @model_validator(mode="after")
    def _default_known(self) -> Self:
        if self.default_class not in self.classes:
            raise ValueError(
                f"default_class {self.default_class!r} is not a configured class (known: {', '.join(self.classes)})"
            )
        return self

    def weight(self, tenant: str) -> float:
        return self.tenant_weights.get(tenant, self.default_tenant_weight)
