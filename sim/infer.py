"""TGI's ``Infer`` (router/src/infer/mod.rs): the concurrency limit, validation and scheduling behind every route.

- A semaphore of ``max_concurrent_requests`` permits is tried (never awaited) before validation: past the limit
  the answer is "Model is overloaded" at once. A permit is held until the request's answer is complete.
- ``generate`` waits for the whole answer; ``generate_stream`` yields tokens as the engine makes them. Both raise
  ``InferError``; the routes turn it into a status code (non-streamed) or an SSE error event (streamed, HTTP 200).
- A caller that goes away (its task cancelled, or it stops iterating) cancels the request in the engine at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from dataclasses import dataclass

from common.errors import JoulegateError
from sim.config import SimConfig
from sim.metrics import SimMetrics
from sim.scheduler import Scheduler, SimRequest
from sim.tokenizer import VOCAB
from sim.validation import GenerateRequest, ValidationError, ValidRequest, validate, validate_best_of

_STATUS = {
    "generation": 424,
    "overloaded": 429,
    "validation": 422,
    "incomplete_generation": 500,
    "incomplete_generation_stream": 500,
}


class InferError(JoulegateError):
    """TGI's ``InferError``: ``message`` is the full text TGI sends (prefix included)."""

    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.message = message

    @property
    def status(self) -> int:
        return _STATUS.get(self.error_type, 500)

    @classmethod
    def validation(cls, message: str) -> InferError:
        return cls("validation", f"Input validation error: {message}")


OVERLOADED = "Model is overloaded"


@dataclass(slots=True)
class StreamBatch:
    """Tokens generated since the caller last looked: ``first_index`` is the stream index of ``tokens[0]`` (TGI's
    stream indices start at 1); ``end`` says the last of them ends the generation."""

    request: SimRequest
    first_index: int
    tokens: list[int]
    end: bool


class Infer:
    """Admission, validation and the engine, as the HTTP routes see them."""

    def __init__(self, config: SimConfig, scheduler: Scheduler, metrics: SimMetrics) -> None:
        self.config = config
        self.scheduler = scheduler
        self.metrics = metrics
        self.in_flight = 0

    def _acquire(self) -> None:
        # vLLM and SGLang queue what their batch cannot take yet: only TGI answers "overloaded" past its limit
        if self.config.engine == "tgi" and self.in_flight >= self.config.max_concurrent_requests:
            self.metrics.failure("overloaded")
            raise InferError("overloaded", OVERLOADED)
        self.in_flight += 1

    def _release(self) -> None:
        self.in_flight -= 1

    def _validate(self, request: GenerateRequest) -> ValidRequest:
        try:
            return validate(request, self.config)
        except ValidationError as e:
            self.metrics.failure("validation")
            raise InferError.validation(e.message) from None

    async def generate(self, request: GenerateRequest, request_id: str) -> SimRequest:
        """Run one request to its end and return it (tokens, finish reason, timings)."""
        self._acquire()
        try:
            valid = self._validate(request)
            sim = self.scheduler.submit(valid, request_id, stream=False)
            try:
                while not sim.done:
                    await sim.wait()
            finally:
                if not sim.done:  # our caller went away
                    self.scheduler.cancel(sim)
                    self.metrics.failure("dropped")
            if sim.error is not None:
                self.metrics.failure("generation")
                raise InferError("generation", sim.error)
            return sim
        finally:
            self._release()

    async def generate_best_of(
        self, request: GenerateRequest, request_id: str, best_of: int
    ) -> tuple[SimRequest, list[SimRequest]]:
        """``best_of`` sampled sequences at once; the one with the best mean token logprob wins."""
        try:
            validate_best_of(best_of, self.config)
        except ValidationError as e:
            self.metrics.failure("validation")
            raise InferError.validation(e.message) from None
        tasks = [asyncio.ensure_future(self.generate(request, request_id)) for _ in range(best_of)]
        try:
            results = list(await asyncio.gather(*tasks))
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

        def mean_logprob(sim: SimRequest) -> float:
            return sum(VOCAB[i].logprob for i in sim.tokens) / max(len(sim.tokens), 1)

        best = max(range(len(results)), key=lambda i: (mean_logprob(results[i]), -i))
        return results[best], results[:best] + results[best + 1 :]

    async def generate_stream(self, request: GenerateRequest, request_id: str) -> AsyncGenerator[StreamBatch, None]:
        """Yield tokens as they come; raise ``InferError`` in-stream. Close the iterator to cancel the request."""
        parameters = request.parameters
        if (1 if parameters.best_of is None else parameters.best_of) != 1:
            self.metrics.failure("validation")
            raise InferError.validation("`best_of` != 1 is not supported when streaming tokens")
        if parameters.decoder_input_details:
            self.metrics.failure("validation")
            raise InferError.validation("`decoder_input_details` == true is not supported when streaming tokens")
        self._acquire()
        try:
            valid = self._validate(request)
            sim = self.scheduler.submit(valid, request_id, stream=True)
            index = 1
            try:
                while True:
                    await sim.wait()
                    tokens = sim.take()
                    done = sim.done
                    if tokens or not done:  # no tokens: a nudge, the caller may send a keep-alive
                        yield StreamBatch(sim, index, tokens, end=done and sim.finish_reason is not None)
                        index += len(tokens)
                    if done and not sim.outbox:
                        if sim.error is not None:
                            self.metrics.failure("generation")
                            raise InferError("generation", sim.error)
                        return
            finally:
                if not sim.done:
                    self.scheduler.cancel(sim)
                    self.metrics.failure("dropped")
        finally:
            self._release()
