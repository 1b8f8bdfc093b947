"""An unchanged TGIS client, generated from the reference proto, works against the gateway.

The client runs in a subprocess with stubs compiled now from tests/reference/tgis_generation.proto (the same
message names as ours, so they cannot share a process's descriptor pool), over a real socket.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from grpc_tools import protoc

from ..conftest import REFERENCE_DIR
from .threaded import stack_in_thread

CLIENT = textwrap.dedent(
    """
    import json, sys
    import grpc
    import tgis_generation_pb2 as pb
    import tgis_generation_pb2_grpc as pbg

    port, key = sys.argv[1], sys.argv[2]
    md = (("authorization", "Bearer " + key),)
    stub = pbg.GenerationServiceStub(grpc.insecure_channel("127.0.0.1:" + port))
    out = {}
    params = pb.Parameters(method=pb.GREEDY, stopping=pb.StoppingCriteria(max_new_tokens=6))
    r = stub.Generate(pb.BatchedGenerationRequest(model_id="sim-model", params=params,
        requests=[pb.GenerationRequest(text="first prompt"), pb.GenerationRequest(text="second")]), metadata=md)
    out["generate"] = [[x.generated_token_count, x.stop_reason, bool(x.text), x.input_token_count] for x in r.responses]
    msgs = list(stub.GenerateStream(pb.SingleGenerationRequest(model_id="sim-model", params=params,
        request=pb.GenerationRequest(text="stream")), metadata=md))
    out["stream"] = [[m.input_token_count, m.generated_token_count, m.stop_reason] for m in msgs]
    info = stub.ModelInfo(pb.ModelInfoRequest(model_id="sim-model"), metadata=md)
    out["info"] = [info.model_kind, info.max_sequence_length, info.max_new_tokens]
    errors = {}
    bad = pb.Parameters(method=pb.SAMPLE, sampling=pb.SamplingParameters(temperature=0.01))
    for name, call in {
        "bad_temperature": lambda: stub.Generate(pb.BatchedGenerationRequest(model_id="sim-model", params=bad,
            requests=[pb.GenerationRequest(text="x")]), metadata=md),
        "unknown_model": lambda: stub.ModelInfo(pb.ModelInfoRequest(model_id="nope"), metadata=md),
        "no_key": lambda: stub.ModelInfo(pb.ModelInfoRequest(model_id="sim-model")),
        "stream_missing_request": lambda: list(stub.GenerateStream(pb.SingleGenerationRequest(model_id="sim-model"),
            metadata=md)),
    }.items():
        try:
            call()
            errors[name] = "OK"
        except grpc.RpcError as e:
            errors[name] = e.code().name
    out["errors"] = errors
    print(json.dumps(out))
    """
)


def test_reference_tgis_client_works_unchanged(tmp_path: Path) -> None:
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    rc = protoc.main(
        ["protoc", f"-I{REFERENCE_DIR}", f"--python_out={stubs}", f"--grpc_python_out={stubs}", "tgis_generation.proto"]
    )
    assert rc == 0
    (stubs / "client.py").write_text(CLIENT)
    with stack_in_thread(tmp_path) as s:
        done = subprocess.run(
            [sys.executable, str(stubs / "client.py"), str(s.app.grpc_port), s.key],
            cwd=stubs,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    max_tokens = 1  # StopReason.MAX_TOKENS in the reference enum
    assert [g[:3] for g in out["generate"]] == [[6, max_tokens, True], [6, max_tokens, True]]
    assert all(g[3] > 0 for g in out["generate"])
    stream = out["stream"]
    counts = [m[1] for m in stream[1:]]  # cumulative; one message per batch of tokens that arrived together
    assert stream[0][0] > 0 and counts == sorted(set(counts)) and counts[-1] == 6 and stream[-1][2] == max_tokens
    assert out["info"][0] == 0 and out["info"][1] == 2048 and out["info"][2] > 0
    assert out["errors"] == {
        "bad_temperature": "INVALID_ARGUMENT",
        "unknown_model": "NOT_FOUND",
        "no_key": "UNAUTHENTICATED",
        "stream_missing_request": "INVALID_ARGUMENT",
    }
