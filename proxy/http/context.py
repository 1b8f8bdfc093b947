"""What every HTTP call carries through the front door: who is calling, its ids, when it arrived."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from meter.auth import Authenticator, Principal
from meter.timeline import Api
from proxy.budgets import HEADER as BUDGET_HEADER
from proxy.gateway import Gateway
from proxy.job import Job
from proxy.params import ModelLimits


@dataclass(slots=True)
class Call:
    request_id: str
    received_ns: int
    correlation_id: str | None = None
    principal: Principal | None = None  # None on the public routes
    traffic_class: str = "default"  # as asked for (header or key): a configured class only once ``job`` resolved it
    model_id: str = ""  # the model the call named, once read (recorded for a refused call)
    handed: bool = False  # a job of this call went to the gateway, which records it
    budget: str | None = None  # x-joulegate-budget: the tenant's energy budget state when the call was authenticated
    span: Any = None  # the call's span (proxy.tracing), when tracing is on

    @property
    def tenant(self) -> str:
        return self.principal.tenant if self.principal is not None else "anonymous"

    def headers(self) -> dict[str, str]:
        """``x-request-id`` (the key to look the call's energy up later) and the echoed ``x-correlation-id``."""
        out = {"x-request-id": self.request_id}
        if self.correlation_id:
            out["x-correlation-id"] = self.correlation_id
        if self.budget:
            out[BUDGET_HEADER] = self.budget
        return out

    def job(
        self,
        gateway: Gateway,
        *,
        model_id: str,
        inputs: str,
        body: dict[str, Any],
        route: str,
        max_new_tokens: int,
        request_id: str | None = None,
    ) -> Job:
        """The gateway's Job for this call; the traffic class resolved to one of ``model_id``'s configured classes
        (InvalidArgument otherwise), so that no other name ever reaches a metric label or a ledger row."""
        traffic_class = gateway.resolve_class(model_id, self.traffic_class)
        self.handed = True
        return Job(
            request_id=request_id or self.request_id,
            model_id=model_id,
            tenant=self.tenant,
            inputs=inputs,
            body=body,
            route=route,
            max_new_tokens=max_new_tokens,
            traffic_class=traffic_class,
            api=Api.HTTP,
            correlation_id=self.correlation_id,
            received_ns=self.received_ns,
            trace=self.span,
        )


CALL_KEY = web.RequestKey("joulegate_call", Call)


@dataclass(slots=True)
class Services:
    """What the route handlers share."""

    gateway: Gateway
    auth: Authenticator
    limits: Mapping[str, ModelLimits]  # of every model the gateway serves (``Gateway.resolve_model``'s answers)
    max_batch_requests: int

    def limit(self, model_id: str) -> ModelLimits:
        return self.limits[model_id]


def call_of(request: web.Request) -> Call:
    return request[CALL_KEY]
