"""Whatever a client sends, the gateway answers with a clean status: never INTERNAL, UNKNOWN or a crash."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.pb.fmaas import generation_pb2 as pb
from proxy.pb.fmaas import generation_pb2_grpc as pbg
from sim.config import SimConfig

from ..test_params import parameters
from .threaded import stack_in_thread

CLEAN = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}


@pytest.fixture(scope="module")
def wire(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[grpc.Channel, tuple]]:
    sim = SimConfig(time_scale=0.0, max_input_tokens=200, max_total_tokens=300)
    with stack_in_thread(tmp_path_factory.mktemp("wire"), sim_config=sim) as s:
        channel = grpc.insecure_channel(f"127.0.0.1:{s.app.grpc_port}")
        yield channel, s.auth
        channel.close()


texts = st.one_of(st.text(max_size=40), st.just("w " * 400), st.just("x [[sim:eos_after=2]]"))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    model_id=st.sampled_from(["", "sim-model", "other"]),
    texts=st.lists(texts, max_size=3),
    params=parameters,
    stream=st.booleans(),
)
def test_any_generation_request_gets_a_clean_answer(wire, model_id, texts, params, stream) -> None:
    channel, auth = wire
    stub = pbg.GenerationServiceStub(channel)
    try:
        if stream:
            req = pb.SingleGenerationRequest(model_id=model_id, params=params)
            if texts:
                req.request.text = texts[0]
            list(stub.GenerateStream(req, metadata=auth, timeout=20))
        else:
            req = pb.BatchedGenerationRequest(
                model_id=model_id, params=params, requests=[pb.GenerationRequest(text=t) for t in texts]
            )
            stub.Generate(req, metadata=auth, timeout=20)
    except grpc.RpcError as exc:
        assert exc.code() in CLEAN, (exc.code(), exc.details())
        assert exc.details()


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=64), method=st.sampled_from(["Generate", "GenerateStream", "Tokenize", "ModelInfo"]))
def test_malformed_bytes_are_invalid_argument(wire, raw: bytes, method: str) -> None:
    channel, auth = wire
    path = f"/fmaas.GenerationService/{method}"
    call = (channel.unary_stream if method == "GenerateStream" else channel.unary_unary)(path)
    try:
        result = call(raw, metadata=auth, timeout=20)
        if method == "GenerateStream":
            list(result)
    except grpc.RpcError as exc:
        assert exc.code() in CLEAN, (exc.code(), exc.details())
