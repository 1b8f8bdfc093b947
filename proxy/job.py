"""One generation request on its way through the gateway, whichever front door it came in by."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from meter.timeline import Api


@dataclass(slots=True)
class Job:
    request_id: str
    model_id: str
    tenant: str
    inputs: str
    body: dict[str, Any]  # the JSON body sent to TGI
    route: str = "/generate_stream"
    max_new_tokens: int = 20
    traffic_class: str = "default"
    api: Api = Api.GRPC
    correlation_id: str | None = None
    deadline: float | None = None  # event-loop time (loop.time()) after which the client no longer waits
    stop_at: float | None = None  # loop time at which the front door stops reading (TGIS time limit), set at creation
    clamp_to_token_limit: bool = False  # TGIS: shrink max_new_tokens to fit the model instead of failing
    received_ns: int = field(default_factory=time.time_ns)
    trace: Any = None  # the front door's span (proxy.tracing), when tracing is on
    rate_prompt_tokens: int | None = None  # the prompt tokens the rate limiter charged (settled once counted)
    prompt_scale: float = 1.0  # what the tenant's prompts counted per four characters (``proxy.prompt_scale``)

    @property
    def prompt_tokens_estimate(self) -> int:
        """About four characters a token, times what this tenant's prompts have counted per four characters: used
        before the backend has counted (queues, balance, limits, reservations), never billed."""
        return max(1, round(len(self.inputs) * self.prompt_scale) // 4)

    @property
    def token_estimate(self) -> int:
        return self.prompt_tokens_estimate + self.max_new_tokens
