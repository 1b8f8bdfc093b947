"""What the request path tells the meter about one request: when it was on the GPU and how many tokens it moved.

A ``Timeline`` is the only thing the proxy hands to the meter. Times are wall-clock nanoseconds
(``time.time_ns()``), the same clock the sampler stamps counter readings with, so timelines from gateway replicas
and samples from meter daemons on other hosts can be joined when the hosts' clocks are synchronised.

A request is announced twice: once when it is released to a TGI backend (``RequestStart``: from then on the
meter must not attribute that backend's energy past its release without it), and once when it ends
(``Timeline``). Both are idempotent on ``request_id``; a ``Timeline`` supersedes its ``RequestStart``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Api(StrEnum):
    GRPC = "grpc"
    HTTP = "http"


@dataclass(frozen=True, slots=True)
class RequestStart:
    """A request was just handed to a backend; its energy is now owed."""

    request_id: str
    tenant: str
    model_id: str
    backend: str
    received_ns: int
    released_ns: int


@dataclass(frozen=True, slots=True)
class Timeline:
    """One finished request as the gateway saw it.

    ``status`` is a gRPC status code name (``OK``, ``CANCELLED``, ``DEADLINE_EXCEEDED``, ``INVALID_ARGUMENT``...),
    for HTTP requests too. ``released_ns`` is None for a request that never reached a backend (rejected, expired or
    cancelled in the queue): it used no GPU time and gets no energy. ``first_token_ns`` is None when no token came
    back. ``prompt_tokens`` is TGI's ``input_length`` (after truncation), 0 if unknown.
    """

    request_id: str
    tenant: str
    model_id: str
    backend: str | None
    received_ns: int
    released_ns: int | None
    first_token_ns: int | None
    done_ns: int
    prompt_tokens: int
    generated_tokens: int
    status: str = "OK"
    traffic_class: str = "default"
    api: Api = Api.GRPC
    correlation_id: str | None = None

    def __post_init__(self) -> None:
        if self.released_ns is not None and self.released_ns < self.received_ns:
            raise ValueError(f"{self.request_id}: released_ns before received_ns")
        if self.first_token_ns is not None:
            if self.released_ns is None:
                raise ValueError(f"{self.request_id}: first_token_ns without released_ns")
            if self.first_token_ns < self.released_ns:
                raise ValueError(f"{self.request_id}: first_token_ns before released_ns")
        if self.done_ns < (self.first_token_ns or self.released_ns or self.received_ns):
            raise ValueError(f"{self.request_id}: done_ns before an earlier event")
        if self.prompt_tokens < 0 or self.generated_tokens < 0:
            raise ValueError(f"{self.request_id}: negative token count")

    @property
    def on_gpu(self) -> bool:
        """Whether the request reached a backend, so that it may own energy."""
        return self.released_ns is not None and self.backend is not None

    @property
    def queued_ns(self) -> int | None:
        return None if self.released_ns is None else self.released_ns - self.received_ns
