"""``fmaas.GenerationService`` over grpc.aio: thin translation between TGIS messages and the shared ``Gateway``.

Every call: authenticate, send ``x-request-id`` (and echo ``x-correlation-id``) as initial metadata, map the TGIS
parameters once, then run one ``Job`` per text through ``Gateway.stream``. A ``GatewayError`` becomes a gRPC
status with a clear message and ``x-request-id`` in the trailing metadata too; overload carries a retry hint both
as ``google.rpc.RetryInfo`` in the status details and as ``retry-after-ms`` trailing metadata. An authenticated
generation call the gateway refuses before any text reaches a backend (unknown model, bad parameters...) is recorded
all the same (0 J, its status), so that its id answers ``GetRequestEnergy`` at once; an unauthenticated one gets an
id but no row.

Batched ``Generate`` calls get one request id per text: the call's id when it has one text, else ``<id>-<i>``.

Metadata the gateway reads (``authorization``, ``x-api-key``, ``x-correlation-id``, ``x-traffic-class``) must be
printable ASCII, as gRPC requires of ASCII metadata: anything else is INVALID_ARGUMENT naming the key, before the
correlation id is echoed or anything is stored (``common.inputs``). The traffic class must be one the model has
configured. An exception that is not a ``GatewayError`` is a bug of ours: INTERNAL with the request id, never
UNKNOWN with a Python message.

A time limit (``time_limit_millis``) ends a call as TGIS ends it: ``TIME_LIMIT``, the text and token count generated
so far, and on a unary call the input token count (counted with the backend's tokenizer when TGI's own count never
came). A stream carries the input token count in its first message only, as TGIS streams do (its last message, like
every other after the first, leaves it 0).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
import structlog

from common.errors import GatewayError, InvalidArgument
from common.grpc_calls import abort_with, as_status_error, metadata_dict
from common.ids import new_request_id, text_request_ids
from meter.auth import Authenticator, Principal
from meter.timeline import Api
from proxy import tracing
from proxy.budgets import HEADER as BUDGET_HEADER
from proxy.gateway import Gateway, GenerationStream
from proxy.input_counts import InputCounts
from proxy.job import Job
from proxy.params import GenerationOptions, ModelLimits, ResponseOptions, to_tgi
from proxy.pb.fmaas import generation_pb2 as pb
from proxy.pb.fmaas import generation_pb2_grpc as pb_grpc
from proxy.tgis import StopTextHolder, input_token_infos, matched_stop_sequence, stop_reason, token_info
from proxy.traffic_class import requested_class

log = structlog.get_logger(__name__)
T = TypeVar("T")

# The metadata the gateway reads (and may echo or store): printable ASCII only
READ_METADATA = ("authorization", "x-api-key", "x-correlation-id", "x-traffic-class")
GENERATE_METHOD = "fmaas.GenerationService/Generate"  # span names: the gRPC method, as OpenTelemetry names them
GENERATE_STREAM_METHOD = "fmaas.GenerationService/GenerateStream"


class CallContext:
    """What every call needs: who is calling, its ids and deadline."""

    __slots__ = (
        "correlation_id", "deadline", "handed", "metadata_sent", "principal", "request_id", "span", "traffic_class",
    )  # fmt: skip

    def __init__(self, principal: Principal, request_id: str, correlation_id: str | None, traffic_class: str,
                 deadline: float | None, metadata_sent: asyncio.Future[None] | None = None) -> None:  # fmt: skip
        self.handed = False  # a job of this call went to the gateway (which then records it)
        self.principal = principal
        self.request_id = request_id
        self.correlation_id = correlation_id
        self.traffic_class = traffic_class
        self.deadline = deadline
        self.metadata_sent = metadata_sent  # the initial metadata, on its way while the call's work starts
        self.span: Any = None  # the call's span (proxy.tracing), when tracing is on


async def _settle(sending: asyncio.Future[None] | None) -> None:
    """Wait for the initial metadata to be out (a client that left makes it fail: nothing to do then)."""
    if sending is not None:
        with contextlib.suppress(Exception):
            await sending


class GenerationServicer(pb_grpc.GenerationServiceServicer):
    def __init__(
        self,
        gateway: Gateway,
        auth: Authenticator,
        limits: dict[str, ModelLimits],
        *,
        max_batch_requests: int,
        input_counts: InputCounts | None = None,
    ) -> None:
        self.gateway = gateway
        self.auth = auth
        self.limits = limits
        self.max_batch_requests = max_batch_requests
        self._counts = input_counts or InputCounts()

    # -- plumbing --------------------------------------------------------------------------------------------
    async def _begin(self, context: grpc.aio.ServicerContext, request_id: str, span: Any = None) -> CallContext:
        """Authentication, then initial metadata with the call's ids (sent in the background: the caller awaits
        ``metadata_sent`` before answering), deadline, traffic class.

        The ids go out only once the caller is known, so that a call with an ``x-request-id`` in its initial
        metadata always has a row (a caller that gives up before that gets none, like a stranger; a refused one
        finds its id in the trailing metadata)."""
        md = metadata_dict(context, READ_METADATA)  # checked before anything is echoed or kept
        correlation_id = md.get("x-correlation-id")
        with self.gateway.tracing.auth(span):
            principal = await self.auth.authenticate(md)
            principal.require_scope("generate")
        initial = [("x-request-id", request_id)]
        if correlation_id:
            initial.append(("x-correlation-id", correlation_id))
        if budget := self.gateway.budget_note(principal.tenant):
            initial.append((BUDGET_HEADER, budget))
        sending = asyncio.ensure_future(context.send_initial_metadata(initial))
        remaining = context.time_remaining()
        deadline = asyncio.get_running_loop().time() + remaining if remaining is not None else None
        traffic_class = requested_class(md.get("x-traffic-class"), principal)
        structlog.contextvars.bind_contextvars(
            request_id=request_id, tenant=principal.tenant, correlation_id=correlation_id
        )
        tracing.set_call(span, request_id=request_id, tenant=principal.tenant, traffic_class=traffic_class)
        call = CallContext(principal, request_id, correlation_id, traffic_class, deadline, sending)
        call.span = span
        return call

    async def _guard(
        self,
        context: grpc.aio.ServicerContext,
        work: Callable[[CallContext], Awaitable[T]],
        *,
        model_id: str | None = None,
        received_ns: int = 0,
        method: str | None = None,
    ) -> T:
        """Run a unary call's work; map a GatewayError to its status. The response waits for the metadata.
        ``model_id``: a generation call, recorded when it is refused before any job reaches the gateway; ``method``:
        traced under this name (when tracing is on)."""
        call: CallContext | None = None
        request_id = new_request_id()
        span = self.gateway.tracing.server_span(method, context.invocation_metadata() or ()) if method else None
        status = "CANCELLED"  # unless it ends otherwise: a call cancelled while it ran
        try:
            call = await self._begin(context, request_id, span)
            result = await work(call)
            await _settle(call.metadata_sent)
            status = "OK"
            return result
        except Exception as caught:
            exc = as_status_error(caught, "unary", request_id)
            status = exc.grpc_code.name
            if call is not None:
                if model_id is not None:
                    self._record_refused(call, model_id, received_ns, exc.grpc_code.name)
                await _settle(call.metadata_sent)
            log.info("request_failed", code=exc.grpc_code.name, error=exc.message)
            await abort_with(context, exc, request_id)
            raise AssertionError("unreachable") from None  # abort raises
        finally:
            tracing.set_call(span, request_id=request_id)
            tracing.end(span, status=status)
            structlog.contextvars.clear_contextvars()

    def _record_refused(self, call: CallContext, model_id: str, received_ns: int, status: str) -> None:
        """A generation call refused before any of its texts reached the gateway's stream: one row, 0 J."""
        if call.handed:
            return
        call.handed = True
        self.gateway.record_refused(
            request_id=call.request_id,
            tenant=call.principal.tenant,
            model_id=model_id,
            api=Api.GRPC,
            status=status,
            received_ns=received_ns,
            traffic_class=call.traffic_class,
            correlation_id=call.correlation_id,
        )

    def _options(self, model_id: str, params: Any, adapter_id: str | None) -> GenerationOptions:
        return to_tgi(params, self.limits[model_id], adapter_id=adapter_id)

    def _job(self, call: CallContext, request_id: str, model_id: str, text: str, options: GenerationOptions,
             received_ns: int, traffic_class: str) -> Job:  # fmt: skip
        call.handed = True
        return Job(
            request_id=request_id,
            model_id=model_id,
            tenant=call.principal.tenant,
            inputs=text,
            body={"inputs": text, "parameters": options.tgi_parameters},
            max_new_tokens=options.max_new_tokens,
            traffic_class=traffic_class,
            api=Api.GRPC,
            correlation_id=call.correlation_id,
            deadline=call.deadline,
            clamp_to_token_limit=True,
            received_ns=received_ns,
            stop_at=_stop_at(options.time_limit_ms, received_ns),
            trace=call.span,
        )

    async def _input_tokens(self, model_id: str, text: str, truncate: int) -> list[dict[str, Any]]:
        tokens = await self.gateway.tokenize(model_id, text)
        self._counts.put(model_id, text, len(tokens))
        return tokens[-truncate:] if truncate and len(tokens) > truncate else tokens

    # -- Generate --------------------------------------------------------------------------------------------
    async def Generate(
        self, request: pb.BatchedGenerationRequest, context: grpc.aio.ServicerContext
    ) -> pb.BatchedGenerationResponse:
        received_ns = time.time_ns()

        async def work(call: CallContext) -> pb.BatchedGenerationResponse:
            model_id = self.gateway.resolve_model(request.model_id)
            if not request.requests:
                return pb.BatchedGenerationResponse()
            if len(request.requests) > self.max_batch_requests:
                raise InvalidArgument(
                    f"requests: at most {self.max_batch_requests} texts per call, got {len(request.requests)}"
                )
            adapter = request.adapter_id if request.HasField("adapter_id") else request.prefix_id or None
            options = self._options(model_id, request.params, adapter)
            traffic_class = self.gateway.resolve_class(model_id, call.traffic_class)
            n = len(request.requests)
            ids = text_request_ids(call.request_id, n)
            streams = [
                self.gateway.generation(self._job(call, rid, model_id, r.text, options, received_ns, traffic_class))
                for rid, r in zip(ids, request.requests, strict=True)
            ]
            with self.gateway.recording(streams):  # a text whose task was cancelled before it started
                try:
                    async with asyncio.TaskGroup() as tg:
                        tasks = [tg.create_task(self._generate_one(stream, options)) for stream in streams]
                except* GatewayError as group:
                    raise group.exceptions[0] from None
            return pb.BatchedGenerationResponse(responses=[t.result() for t in tasks])

        return await self._guard(
            context, work, model_id=request.model_id, received_ns=received_ns, method=GENERATE_METHOD
        )

    async def _generate_one(self, stream: GenerationStream, options: GenerationOptions) -> pb.GenerationResponse:
        job = stream.job
        resp = pb.GenerationResponse()
        r = options.response
        input_task = (
            asyncio.create_task(self._input_tokens(job.model_id, job.inputs, options.tgi_parameters.get("truncate", 0)))
            if r.input_tokens
            else None
        )
        final: dict[str, Any] | None = None
        time_limited = False
        deltas: list[str] = []  # the text so far, for a call that its time limit ends before TGI's last event
        try:
            async with (
                contextlib.aclosing(stream.events()) as events,
                _time_limit(job),
            ):
                async for event in events:
                    token = event.get("token")
                    if token is not None:
                        deltas.append("" if token.get("special") else token.get("text", ""))
                        if r.generated_tokens:
                            resp.tokens.append(token_info(token, event.get("top_tokens"), r))
                    if event.get("details"):
                        final = event
        except TimeoutError:
            time_limited = True
        except BaseException:
            if input_task is not None:
                input_task.cancel()
            raise
        text = (final.get("generated_text") or "") if final else "".join(deltas)
        if final is not None:
            details = final["details"]
            resp.stop_reason = stop_reason(details.get("finish_reason"), token_limited=stream.token_limited)
            if resp.stop_reason == pb.STOP_SEQUENCE:
                resp.stop_sequence = matched_stop_sequence(text, options.tgi_parameters.get("stop", ()))
                if not options.include_stop_sequence and resp.stop_sequence:
                    text = text[: -len(resp.stop_sequence)]
            if options.sampling and details.get("seed") is not None:
                resp.seed = int(details["seed"])
        elif time_limited:
            resp.stop_reason = pb.TIME_LIMIT
        resp.generated_token_count = stream.generated_tokens
        resp.text = (job.inputs + text) if r.input_text else text
        input_tokens = await input_task if input_task is not None else None
        if input_tokens is not None:
            resp.input_tokens.extend(input_token_infos(input_tokens))
        if stream.prompt_tokens is not None:
            resp.input_token_count = stream.prompt_tokens
        elif input_tokens is not None:
            resp.input_token_count = len(input_tokens)
        elif time_limited:  # TGI's count comes with its last event, which never came: count as TGIS would have
            resp.input_token_count = await self._input_count(job, options)
        return resp

    async def _input_count(self, job: Job, options: GenerationOptions) -> int:
        """The prompt's token count from the backend's tokenizer (0 if it cannot be had: it is informative)."""
        truncate = options.tgi_parameters.get("truncate", 0)
        known = self._counts.get(job.model_id, job.inputs, truncate)
        if known is not None:
            return known
        try:
            return len(await self._input_tokens(job.model_id, job.inputs, truncate))
        except GatewayError:
            return 0

    # -- GenerateStream --------------------------------------------------------------------------------------
    async def GenerateStream(
        self, request: pb.SingleGenerationRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerationResponse]:
        received_ns = time.time_ns()
        call: CallContext | None = None
        request_id = new_request_id()
        span = self.gateway.tracing.server_span(GENERATE_STREAM_METHOD, context.invocation_metadata() or ())
        status = "CANCELLED"  # unless it ends otherwise: a stream closed by its client's leaving
        try:
            call = await self._begin(context, request_id, span)
            model_id = self.gateway.resolve_model(request.model_id)
            if not request.HasField("request"):
                raise InvalidArgument("request: missing")
            adapter = request.adapter_id if request.HasField("adapter_id") else request.prefix_id or None
            options = self._options(model_id, request.params, adapter)
            traffic_class = self.gateway.resolve_class(model_id, call.traffic_class)
            job = self._job(call, call.request_id, model_id, request.request.text, options, received_ns, traffic_class)
            first = True
            # Closed with the call (a client that leaves while a message is being written): the stream then ends,
            # and records how, at once rather than whenever the garbage collector finalises it.
            async with contextlib.aclosing(self._stream(job, options)) as messages:
                async for message in messages:
                    if first:
                        first = False
                        await _settle(call.metadata_sent)
                    yield message
            status = "OK"
        except Exception as caught:
            exc = as_status_error(caught, "stream", request_id)
            status = exc.grpc_code.name
            if call is not None:
                self._record_refused(call, request.model_id, received_ns, exc.grpc_code.name)
                await _settle(call.metadata_sent)
            log.info("request_failed", code=exc.grpc_code.name, error=exc.message)
            await abort_with(context, exc, request_id)
        finally:
            tracing.set_call(span, request_id=request_id)
            tracing.end(span, status=status)
            structlog.contextvars.clear_contextvars()

    async def _stream(self, job: Job, options: GenerationOptions) -> AsyncGenerator[pb.GenerationResponse, None]:
        """TGIS stream messages: the input token count first, then one message per batch of tokens."""
        r = options.response
        stops = options.tgi_parameters.get("stop", ())
        truncate = options.tgi_parameters.get("truncate", 0)
        # TGI reports input_length only at the end of a stream; TGIS sends it first. Count it alongside, unless the
        # model's tokenizer file or a recent /tokenize answer gives it here (and the call wants the count, not the
        # tokens): proxy.input_counts.
        known: int | _Later | None = None
        if not r.input_tokens:
            if self._counts.tokenizes(job.model_id, job.inputs):
                # counted at the loop's next turn: once the request is on its way to the backend, not before it
                known = _Later(functools.partial(self._counts.count, job.model_id, job.inputs, truncate))
            else:
                known = self._counts.cached(job.model_id, job.inputs, truncate)
        count_task = None
        if known is None:
            count_task = asyncio.create_task(self._input_tokens(job.model_id, job.inputs, truncate))
            _keep_until_done(count_task)
        holder = StopTextHolder(stops) if not options.include_stop_sequence else None
        stream = self.gateway.generation(job)
        sent_first = False
        generated = 0
        deltas: list[str] = []
        try:
            async with (
                contextlib.aclosing(stream.batches()) as batches,
                _time_limit(job),
            ):
                async for batch in batches:
                    if not sent_first:
                        sent_first = True
                        final_details = batch[-1].get("details")
                        yield await self._first_message(job, r, count_task, known, final_details)
                    msg = pb.GenerationResponse()
                    text: list[str] = []
                    for event in batch:
                        token = event.get("token")
                        if token is not None:
                            generated += 1
                            delta = "" if token.get("special") else token.get("text", "")
                            deltas.append(delta)
                            text.append(holder.feed(delta) if holder else delta)
                            if r.generated_tokens:
                                msg.tokens.append(token_info(token, event.get("top_tokens"), r))
                        details = event.get("details")
                        if details:
                            reason = details.get("finish_reason")
                            msg.stop_reason = stop_reason(reason, token_limited=stream.token_limited)
                            generated = details.get("generated_tokens", generated)
                            if msg.stop_reason == pb.STOP_SEQUENCE:
                                full = event.get("generated_text") or "".join(deltas)
                                msg.stop_sequence = matched_stop_sequence(full, stops)
                            if holder:
                                text.append(holder.finish(msg.stop_sequence))
                            if options.sampling and details.get("seed") is not None:
                                msg.seed = int(details["seed"])
                    msg.text = "".join(text)
                    msg.generated_token_count = generated
                    yield msg
        except TimeoutError:
            if not sent_first:
                yield await self._first_message(job, r, count_task, known, None)
            yield pb.GenerationResponse(
                generated_token_count=generated, stop_reason=pb.TIME_LIMIT, text=holder.finish("") if holder else ""
            )
        except BaseException:
            if count_task is not None:
                count_task.cancel()  # the call failed or the client left: nobody needs the count
            if isinstance(known, _Later):
                known.cancel()
            raise

    async def _first_message(
        self,
        job: Job,
        r: ResponseOptions,
        count_task: asyncio.Task[list[dict[str, Any]]] | None,
        known: int | _Later | None,
        details: dict[str, Any] | None,
    ) -> pb.GenerationResponse:
        """TGIS's first stream message: the input token count (and input text/tokens when asked for); ``known``: the
        count when the tokenizer or the cache has it (then there is no ``count_task``)."""
        if details is not None and not r.input_tokens:
            if isinstance(known, _Later):
                known.cancel()  # TGI's own count is here: the tokenizer need not run
            # The stream already ended and TGI told us the count. The /tokenize call finishes in the background:
            # cancelling it would close its pooled connection to the backend.
            return pb.GenerationResponse(
                input_token_count=details.get("input_length", 0), text=job.inputs if r.input_text else ""
            )
        if count_task is None:
            assert known is not None
            count = known.value() if isinstance(known, _Later) else known
            return pb.GenerationResponse(input_token_count=count, text=job.inputs if r.input_text else "")
        try:
            tokens = await count_task
        except GatewayError:
            tokens = []  # the count is informative; failing to get it must not fail the stream
        first = pb.GenerationResponse(input_token_count=len(tokens))
        if r.input_text:
            first.text = job.inputs
        if r.input_tokens:
            first.input_tokens.extend(input_token_infos(tokens))
        return first

    # -- Tokenize and ModelInfo ------------------------------------------------------------------------------
    async def Tokenize(
        self, request: pb.BatchedTokenizeRequest, context: grpc.aio.ServicerContext
    ) -> pb.BatchedTokenizeResponse:
        async def work(call: CallContext) -> pb.BatchedTokenizeResponse:
            model_id = self.gateway.resolve_model(request.model_id)
            if len(request.requests) > self.max_batch_requests:
                raise InvalidArgument(f"requests: at most {self.max_batch_requests} texts per call")
            truncate = request.truncate_input_tokens
            out = pb.BatchedTokenizeResponse()
            if not request.return_tokens and not request.return_offsets:
                known = [self._counts.get(model_id, r.text, truncate) for r in request.requests]
                if None not in known:  # counts only, every one known here: no round trip
                    for n in known:
                        out.responses.add(token_count=n)
                    return out
            results = await asyncio.gather(*(self._input_tokens(model_id, r.text, truncate) for r in request.requests))
            for tokens in results:
                item = out.responses.add(token_count=len(tokens))
                if request.return_tokens:
                    item.tokens.extend(t.get("text", "") for t in tokens)
                if request.return_offsets:
                    for t in tokens:
                        item.offsets.add(start=t.get("start", 0), end=t.get("stop", 0))
            return out

        return await self._guard(context, work)

    async def ModelInfo(self, request: pb.ModelInfoRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfoResponse:
        async def work(call: CallContext) -> pb.ModelInfoResponse:
            model_id = self.gateway.resolve_model(request.model_id)
            info = await self.gateway.model_info(model_id)
            limits = self.limits[model_id]
            max_total = int(info.get("max_total_tokens", 0))
            return pb.ModelInfoResponse(
                model_kind=pb.ModelInfoResponse.DECODER_ONLY,
                max_sequence_length=max_total,
                max_new_tokens=min(limits.max_new_tokens, max(0, max_total - 1)) if max_total else 0,
            )

        return await self._guard(context, work)


_background: set[asyncio.Task[Any]] = set()


class _Later:
    """An input count computed at the event loop's next turn (the stream's request is then on its way, and the
    tokenizer's tens of microseconds overlap the backend's work), or when asked for first. It is informative: a
    tokenizer that failed (``InputCounts.count`` gives None) counts 0, as a failed ``/tokenize`` does."""

    __slots__ = ("_fn", "_handle", "_value")

    def __init__(self, fn: Callable[[], int | None]) -> None:
        self._fn: Callable[[], int | None] | None = fn
        self._value = 0
        self._handle = asyncio.get_running_loop().call_soon(self._run)

    def _run(self) -> None:
        fn, self._fn = self._fn, None
        if fn is not None:
            self._value = fn() or 0

    def value(self) -> int:
        self._handle.cancel()
        self._run()
        return self._value

    def cancel(self) -> None:
        self._handle.cancel()
        self._fn = None


def _keep_until_done(task: asyncio.Task[Any]) -> None:
    """Hold a reference to a side task until it ends, and consume its exception if nobody awaits it."""
    _background.add(task)

    def done(t: asyncio.Task[Any]) -> None:
        _background.discard(t)
        if not t.cancelled():
            t.exception()

    task.add_done_callback(done)


def _stop_at(limit_ms: int, received_ns: int) -> float | None:
    """The event-loop time at which TGIS's ``time_limit_millis`` ends a call, counted from when the gateway received
    it; None without a limit."""
    if not limit_ms:
        return None
    elapsed_s = (time.time_ns() - received_ns) / 1e9
    return asyncio.get_running_loop().time() + limit_ms / 1000 - elapsed_s


@contextlib.asynccontextmanager
async def _time_limit(job: Job) -> AsyncIterator[None]:
    """Stop reading ``job``'s stream at its ``stop_at`` (TimeoutError), when it has one."""
    if job.stop_at is None:
        yield
        return
    async with asyncio.timeout_at(job.stop_at):
        yield
