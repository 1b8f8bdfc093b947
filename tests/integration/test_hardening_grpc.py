"""The gRPC front door against a client's mistakes: raw HTTP/2 metadata, parameters TGI cannot read, echoes, and
TGIS's time-limit semantics. Each test failed before the fix it names (see the findings in the module docstrings of
``common.inputs`` and ``proxy.grpc_api``).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa

from proxy.params import MAX_SCHEMA_DEPTH
from proxy.pb.fmaas import generation_pb2 as pb
from proxy.pb.fmaas import generation_pb2_grpc as pbg
from sim import tokenizer as sim_tokenizer
from sim.config import SimConfig

from .harness import Stack, running_stack
from .rawwire import grpc_raw
from .threaded import stack_in_thread

GENERATE = "/fmaas.GenerationService/Generate"
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]


def _request(text: str = "Hello", **params: object) -> pb.BatchedGenerationRequest:
    return pb.BatchedGenerationRequest(
        requests=[pb.GenerationRequest(text=text)],
        params=pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=3), **params),
    )


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with stack_in_thread(tmp_path_factory.mktemp("hard-grpc"), sim_config=SimConfig(time_scale=0.0)) as s:
        yield s


@pytest.fixture(scope="module")
def stub(stack: Stack) -> Iterator[pbg.GenerationServiceStub]:
    channel = grpc.insecure_channel(f"127.0.0.1:{stack.app.grpc_port}")
    yield pbg.GenerationServiceStub(channel)
    channel.close()


def _auth(stack: Stack) -> tuple[bytes, bytes]:
    return (b"authorization", b"Bearer " + stack.key.encode())


def _fails(call, *args, **kwargs) -> grpc.RpcError:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as err:
        call(*args, **kwargs)
    return err.value


# -- metadata bytes ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", [b"x-correlation-id", b"x-traffic-class", b"authorization", b"x-api-key"])
@pytest.mark.parametrize("value", [b"\xff", b"caf\xc3\xa9", b"a\x00b", b"\x1b[31m"])
def test_metadata_that_is_not_printable_ascii_is_invalid_argument_naming_the_key(
    stack: Stack, key: bytes, value: bytes
) -> None:
    """Before: INTERNAL ("Invalid metadata", when the correlation id was echoed), UNAUTHENTICATED, or the value
    reached the ledger and the metric labels."""
    metadata = [(key, value)] if key in (b"authorization", b"x-api-key") else [_auth(stack), (key, value)]
    answer = grpc_raw(stack.app.grpc_port, GENERATE, _request().SerializeToString(), metadata)
    assert answer.status == INVALID_ARGUMENT, (answer.status, answer.message)
    assert answer.message == f"{key.decode()}: the header value must be printable ASCII (0x20-0x7E)"


# -- parameters TGI cannot read ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("schema", "expected"),
    [
        ("[" * 100_000 + "]" * 100_000, f"nested deeper than {MAX_SCHEMA_DEPTH} arrays/objects"),
        ('{"a":' * (MAX_SCHEMA_DEPTH + 1) + "1" + "}" * (MAX_SCHEMA_DEPTH + 1), f"deeper than {MAX_SCHEMA_DEPTH}"),
        ('{"type":"object","maximum":NaN}', "json_schema.maximum: must be a finite number"),
        ('{"type":"object","minimum":-Infinity}', "json_schema.minimum: must be a finite number"),
    ],
)
def test_a_json_schema_that_tgi_cannot_read_is_invalid_argument(stub, stack: Stack, schema: str, expected: str) -> None:
    """Before: UNKNOWN (RecursionError) for 100k levels; forwarded otherwise."""
    decoding = pb.DecodingParameters(json_schema=schema)
    err = _fails(stub.Generate, _request(decoding=decoding), metadata=stack.auth, timeout=30)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith("params.decoding.json_schema") and expected in err.details()


def test_a_json_schema_up_to_the_depth_limit_is_accepted(stub, stack: Stack) -> None:
    schema = '{"a":' * (MAX_SCHEMA_DEPTH - 1) + "1" + "}" * (MAX_SCHEMA_DEPTH - 1)
    stub.Generate(_request(decoding=pb.DecodingParameters(json_schema=schema)), metadata=stack.auth, timeout=30)


def test_top_k_past_i32_is_invalid_argument(stub, stack: Stack) -> None:
    """Before: TGI's plain-text 422 came back as UNAVAILABLE, which clients retry."""
    sampling = pb.SamplingParameters(top_k=2**31)
    err = _fails(stub.Generate, _request(method=pb.SAMPLE, sampling=sampling), metadata=stack.auth, timeout=30)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details().startswith("params.sampling.top_k")
    stub.Generate(_request(method=pb.SAMPLE, sampling=pb.SamplingParameters(top_k=2**31 - 1)), metadata=stack.auth)


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"method": pb.SAMPLE, "sampling": pb.SamplingParameters(temperature=float("inf"))}, "sampling.temperature"),
        ({"decoding": pb.DecodingParameters(repetition_penalty=float("inf"))}, "decoding.repetition_penalty"),
    ],
)
def test_infinite_floats_are_invalid_argument(stub, stack: Stack, params: dict, field: str) -> None:
    """TGI's parser cannot read the ``Infinity`` they would be sent as."""
    err = _fails(stub.Generate, _request(**params), metadata=stack.auth, timeout=30)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details().startswith(f"params.{field}")


def test_errors_never_echo_megabytes(stub, stack: Stack) -> None:
    req = _request()
    req.model_id = "m" * 1_000_000
    err = _fails(stub.Generate, req, metadata=stack.auth, timeout=30)
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert len(err.details()) < 1100 and "(1000000 characters)" in err.details()


# -- TGIS's time limit -------------------------------------------------------------------------------------------------
async def test_a_unary_call_ended_by_its_time_limit_has_its_text_and_input_count(tmp_path: Path) -> None:
    """Before: TIME_LIMIT with 12 tokens counted, no text and no input_token_count (TGIS fills both)."""
    async with running_stack(tmp_path, sim_config=SimConfig(time_scale=1.0)) as s:
        params = pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=500, time_limit_millis=400))
        tokenized = await s.stub.Tokenize(
            pb.BatchedTokenizeRequest(requests=[pb.TokenizeRequest(text="a long story")]), metadata=s.auth
        )
        for with_tokens in (False, True):
            params.response.generated_tokens = with_tokens
            resp = await s.stub.Generate(
                pb.BatchedGenerationRequest(requests=[pb.GenerationRequest(text="a long story")], params=params),
                metadata=s.auth,
            )
            r = resp.responses[0]
            assert r.stop_reason == pb.TIME_LIMIT and 0 < r.generated_token_count < 500
            assert r.input_token_count == tokenized.responses[0].token_count > 0
            assert r.text and len(r.text.split()) >= 1
            if with_tokens:
                assert r.text == "".join(t.text for t in r.tokens) and len(r.tokens) == r.generated_token_count


async def test_streams_carry_the_input_count_in_their_first_message_only_as_tgis_does(tmp_path: Path) -> None:
    """TGIS (router batcher.rs): the count comes first; every later message, the last one included, leaves it 0.
    Before: the last message carried it when the stream ended normally and lacked it when a time limit ended it."""
    async with running_stack(tmp_path, sim_config=SimConfig(time_scale=1.0)) as s:
        for stopping in (
            pb.StoppingCriteria(max_new_tokens=4),
            pb.StoppingCriteria(max_new_tokens=500, time_limit_millis=400),
        ):
            req = pb.SingleGenerationRequest(request=pb.GenerationRequest(text="a long story"))
            req.params.stopping.CopyFrom(stopping)
            msgs = [m async for m in s.stub.GenerateStream(req, metadata=s.auth)]
            assert msgs[0].input_token_count > 0 and msgs[0].generated_token_count == 0
            assert all(m.input_token_count == 0 for m in msgs[1:])
            assert msgs[-1].stop_reason in (pb.MAX_TOKENS, pb.TIME_LIMIT)
            assert msgs[-1].generated_token_count > 0
            assert "".join(m.text for m in msgs[1:]).strip()


async def test_a_call_whose_time_limit_passes_while_queued_still_counts_its_input(tmp_path: Path) -> None:
    """TGIS's early timeout: TIME_LIMIT with the input count and no tokens, when nothing was generated in time."""
    shaping = {"classes": {"default": {"policy": "batch", "max_batch": 64, "hold_ms": 3000}}}
    async with running_stack(tmp_path, model={"shaping": shaping}) as s:
        t0 = time.monotonic()
        params = pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=5, time_limit_millis=300))
        resp = await s.stub.Generate(
            pb.BatchedGenerationRequest(requests=[pb.GenerationRequest(text="held back")], params=params),
            metadata=s.auth,
        )
        assert time.monotonic() - t0 < 2.5
        r = resp.responses[0]
        assert (r.stop_reason, r.generated_token_count, r.text) == (pb.TIME_LIMIT, 0, "")
        assert r.input_token_count > 0


async def test_a_prompt_streamed_again_has_the_same_first_count_from_the_cache(tmp_path: Path) -> None:
    """The first message's count of a prompt counted lately comes from the front door's cache (no /tokenize beside
    the stream): the same as the backend's, truncation applied as TGI applies it."""
    async with running_stack(tmp_path, sim_config=SimConfig(time_scale=1.0)) as s:
        text = "a story told twice, " * 8
        tokenized = await s.stub.Tokenize(
            pb.BatchedTokenizeRequest(requests=[pb.TokenizeRequest(text=text)]), metadata=s.auth
        )
        full = tokenized.responses[0].token_count
        assert full > 5
        for truncate in (0, 0, 5, full + 3):
            req = pb.SingleGenerationRequest(request=pb.GenerationRequest(text=text))
            req.params.stopping.max_new_tokens = 2
            req.params.truncate_input_tokens = truncate
            msgs = [m async for m in s.stub.GenerateStream(req, metadata=s.auth)]
            assert msgs[0].input_token_count == (min(full, truncate) if truncate else full)
            assert all(m.input_token_count == 0 for m in msgs[1:])


async def test_with_a_tokenizer_file_the_first_count_needs_no_tokenize_call(tmp_path: Path) -> None:
    """``tokenizer_file``: the first message's count (and a count-only Tokenize) comes from the model's tokenizer,
    not from a /tokenize round trip. The file here cuts every character into a token of its own, unlike the
    simulator, so a count that came from the backend would show; the bill still takes the backend's count."""
    spec = json.loads(sim_tokenizer.hf_tokenizer_json())
    spec["pre_tokenizer"]["pretokenizers"][1]["pattern"]["Regex"] = r"[\s\S]"
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(spec))
    text = "a prompt never sent before"
    # paced: the first batch is not also the last (whose details carry TGI's own count, which then goes first)
    async with running_stack(tmp_path, sim_config=SimConfig(time_scale=1.0), model={"tokenizer_file": str(path)}) as s:
        req = pb.SingleGenerationRequest(request=pb.GenerationRequest(text=text))
        req.params.stopping.max_new_tokens = 4
        msgs = [m async for m in s.stub.GenerateStream(req, metadata=s.auth)]
        assert msgs[0].input_token_count == len(text) + 1  # one per character, and BOS
        counted = await s.stub.Tokenize(
            pb.BatchedTokenizeRequest(requests=[pb.TokenizeRequest(text=text)], truncate_input_tokens=4),
            metadata=s.auth,
        )
        assert counted.responses[0].token_count == 4
        with_tokens = await s.stub.Tokenize(  # tokens asked for: the backend's own
            pb.BatchedTokenizeRequest(requests=[pb.TokenizeRequest(text=text)], return_tokens=True), metadata=s.auth
        )
        assert with_tokens.responses[0].token_count == sim_tokenizer.count_tokens(text) < len(text) + 1
        await s.app.gateway.flush_records()
        assert await asyncio.to_thread(s.app.ledger.flush, 10.0)
        with s.app.engine.connect() as conn:
            billed = conn.execute(sa.text("SELECT prompt_tokens FROM requests WHERE api = 'grpc'")).scalars().all()
        assert billed == [sim_tokenizer.count_tokens(text)]


def test_a_tokenizer_file_that_cannot_load_stops_the_gateway_naming_the_setting(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text("{}")
    cmd = [sys.executable, "-m", "app.cli", "serve", "--backend", "http://127.0.0.1:9", "--db",
           f"sqlite:///{tmp_path / 'x.db'}", "--tokenizer-file", str(tmp_path / "bad.json"), "--meter", "none",
           "--grpc-listen", "127.0.0.1:0", "--http-listen", "off"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "models.0.tokenizer_file: cannot load" in done.stderr
    assert "Traceback" not in done.stderr
