"""The request path's log: one ``request_finished`` line per finished request, at INFO.

``server.request_log`` chooses ``all`` (default), ``errors`` (only requests that did not end OK) or ``off``. It is not
sampled: the operator who has to explain one tenant's bill needs that tenant's every request, and a line costs
microseconds next to a generation. Set-up of the log itself (JSON or console, level): ``common.logs``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import structlog

if TYPE_CHECKING:
    from proxy.gateway import GenerationStream
    from proxy.job import Job

RequestLog = Literal["all", "errors", "off"]

_request_log: RequestLog = "all"
_request_logger = structlog.get_logger("joulegate.requests")


def set_request_log(mode: RequestLog) -> None:
    """Which requests get their ``request_finished`` line, from now on."""
    global _request_log
    _request_log = mode


def _ms(later_ns: int | None, earlier_ns: int) -> float | None:
    return None if later_ns is None else round((later_ns - earlier_ns) / 1e6, 3)


def log_request(job: Job, result: GenerationStream, status: str, done_ns: int) -> None:
    """The ``request_finished`` line of one request (see the module docstring): who, what, where, how it ended,
    and its times from arrival: ``queue_ms`` (until handed to the backend), ``ttft_ms``, ``total_ms``."""
    if _request_log == "off" or (_request_log == "errors" and status == "OK"):
        return
    _request_logger.info(
        "request_finished",
        request_id=job.request_id,
        correlation_id=job.correlation_id,
        tenant=job.tenant,
        model=job.model_id,
        backend=result.backend if result.released_ns is not None else None,
        api=job.api.value,
        traffic_class=job.traffic_class,
        status=status,
        prompt_tokens=result.prompt_tokens,
        generated_tokens=result.generated_tokens,
        queue_ms=_ms(result.released_ns, job.received_ns),
        ttft_ms=_ms(result.first_token_ns, job.received_ns),
        total_ms=_ms(done_ns, job.received_ns),
    )
