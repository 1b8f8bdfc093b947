"""What the request path tells the meter about one request: when it was on the GPU and how many tokens it moved.

A ``Timeline`` is the only thing the proxy hands to the meter. Times are wall-clock nanoseconds
(``time.time_ns()``), the same clock the sampler stamps counter readings with, so timelines from gateway replicas
and samples from meter daemons on other hosts can be joined when the hosts' clocks are synchronised.

A request is announced twice: once when it is released to a TGI backend (``RequestStart``: from then on the
meter must not attribute that backend's energy past its release without it), and once when it ends
(``Timeline``). Both are idempotent on ``request_id``; a ``Timeline`` supersedes its ``RequestStart``.

Who made the GPU work (the billing rule, ``Timeline.did_gpu_work``). A request owns energy when it was released to a
backend and that backend ran at least its prefill for it. The gateway knows this from how the request ended:

- it got a first token: it was prefilled (and decoded from then on);
- it ended without one, with a status that means the backend had *accepted* it: cancelled by its client,
  past its deadline, a generation failure (``INTERNAL``: TGI's ``generation``/``incomplete_generation`` errors,
  which come at or after a prefill), or any status not listed below. The backend ran (part of) a prefill step for
  it, which ``meter.attribution`` bills to it;
- it ended without one with a status in ``REFUSED_STATUSES``: the backend refused it before any GPU work (TGI's
  validation error ``INVALID_ARGUMENT``, overload ``RESOURCE_EXHAUSTED``, connection refused or no healthy backend
  ``UNAVAILABLE``...). It owns 0 J and takes no part in attribution, but keeps its row, id and status.

``UNAVAILABLE`` is a refusal even for a stream that broke (a dropped connection, the gateway's drain past its grace)
before its first token: the gateway cannot tell how far the backend got, the tenant received nothing, and no tenant
can cause it; the prefill the backend may have run then goes to its neighbours in the step, or to idle.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

# Statuses with which a request that got no token was refused before the backend did any work for it. Every other
# status of a released request without a first token means the backend had begun (a prefill) for it.
REFUSED_STATUSES = frozenset(
    {
        "INVALID_ARGUMENT",
        "RESOURCE_EXHAUSTED",
        "UNAVAILABLE",
        "NOT_FOUND",
        "FAILED_PRECONDITION",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "PERMISSION_DENIED",
        "UNAUTHENTICATED",
        "ALREADY_EXISTS",
    }
)


# Statuses with which a request that got no token ended because its client left (a cancel, a deadline, a TGIS time
# limit) rather than because its step ended: its prefill step was cut where it left, at an unknown point of the step.
ABANDONED_STATUSES = frozenset({"CANCELLED", "DEADLINE_EXCEEDED", "OK"})


def did_gpu_work(backend: str | None, released_ns: int | None, first_token_ns: int | None, status: str | None) -> bool:
    """The billing rule (see the module docstring): whether a request made its backend's GPU work."""
    if backend is None or released_ns is None:
        return False
    return first_token_ns is not None or status not in REFUSED_STATUSES


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
    for HTTP requests too: what the client saw. ``released_ns`` is None for a request that never reached a backend
    (rejected, expired or cancelled in the queue): it used no GPU time and gets no energy. ``first_token_ns`` is None
    when no token came back. ``prompt_tokens`` is the prompt's length in tokens after truncation, as the backend
    computed it (TGI's ``input_length``, or its ``/tokenize`` asked after the fact when the stream did not say); 0
    for a request that did no GPU work. ``prompt_tokens_estimated`` is True when the true count could not be had
    (the backend could not be asked): ``prompt_tokens`` is then the gateway's estimate, and reports say so.
    ``cached_tokens`` is the part of ``prompt_tokens`` the engine found in its prefix cache, as it reported it (vLLM's
    ``prompt_tokens_details.cached_tokens``, SGLang's ``meta_info.cached_tokens``; 0 where the engine does not say):
    its prefill computed only ``computed_tokens``, and that is what the request's prefill share is weighed by.
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
    prompt_tokens_estimated: bool = False
    cached_tokens: int = 0

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
        if not 0 <= self.cached_tokens <= self.prompt_tokens:
            raise ValueError(f"{self.request_id}: cached_tokens outside 0..prompt_tokens")

    @property
    def computed_tokens(self) -> int:
        """The prompt tokens its prefill computed: all but the prefix-cache hit."""
        return self.prompt_tokens - self.cached_tokens

    @property
    def on_gpu(self) -> bool:
        """Whether the request made its backend's GPU work (``did_gpu_work``), so that it owns energy."""
        return did_gpu_work(self.backend, self.released_ns, self.first_token_ns, self.status)

    @property
    def abandoned_prefill(self) -> bool:
        """It did GPU work, got no token, and ended because its client left (``ABANDONED_STATUSES``): its step was
        cut short. A generation failure (``INTERNAL``) instead ends where its step ended, like a first token."""
        return self.first_token_ns is None and self.status in ABANDONED_STATUSES and self.on_gpu

    @property
    def prefill_end_ns(self) -> int | None:
        """Where the request's prefill step ended: its first token, or for a request that did GPU work but got no
        token (failed at prefill, cancelled, past its deadline) the moment it ended; None if it did no GPU work."""
        if self.first_token_ns is not None:
            return self.first_token_ns
        return self.done_ns if self.on_gpu else None

    @property
    def queued_ns(self) -> int | None:
        return None if self.released_ns is None else self.released_ns - self.received_ns
