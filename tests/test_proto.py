"""Our fmaas proto is wire-compatible with the TGIS reference, and the generated code is not stale."""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from grpc_tools import protoc

from proxy.pb.fmaas import generation_pb2 as ours

from .conftest import REFERENCE_DIR, REPO_ROOT


@pytest.fixture(scope="module")
def reference_pool(tmp_path_factory: pytest.TempPathFactory) -> descriptor_pool.DescriptorPool:
    """The TGIS reference proto compiled now, into its own pool (same names as ours, so not the default pool)."""
    out = tmp_path_factory.mktemp("ref") / "ref.pb"
    rc = protoc.main(["protoc", f"-I{REFERENCE_DIR}", f"--descriptor_set_out={out}", "tgis_generation.proto"])
    assert rc == 0
    fds = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    pool = descriptor_pool.DescriptorPool()
    for f in fds.file:
        pool.Add(f)
    return pool


def _fields(desc) -> dict[str, tuple[int, int, bool, bool]]:
    return {f.name: (f.number, f.type, f.is_repeated, f.has_presence) for f in desc.fields}


def test_every_reference_message_has_the_same_fields(reference_pool) -> None:
    ref_file = reference_pool.FindFileByName("tgis_generation.proto")
    ours_file = ours.DESCRIPTOR

    def walk(desc, prefix=""):
        yield prefix + desc.name, desc
        for nested in desc.nested_types:
            yield from walk(nested, prefix + desc.name + ".")

    ref_msgs = dict(m for d in ref_file.message_types_by_name.values() for m in walk(d))
    our_msgs = dict(m for d in ours_file.message_types_by_name.values() for m in walk(d))
    assert set(ref_msgs) == set(our_msgs)
    for name, ref_desc in ref_msgs.items():
        assert _fields(our_msgs[name]) == _fields(ref_desc), name
        assert [o.name for o in our_msgs[name].oneofs] == [o.name for o in ref_desc.oneofs], name
    for enum_name, ref_enum in ref_file.enum_types_by_name.items():
        ours_enum = ours_file.enum_types_by_name[enum_name]
        assert {v.name: v.number for v in ours_enum.values} == {v.name: v.number for v in ref_enum.values}


def test_service_methods_match(reference_pool) -> None:
    ref = reference_pool.FindServiceByName("fmaas.GenerationService")
    mine = ours.DESCRIPTOR.services_by_name["GenerationService"]
    assert ref.full_name == mine.full_name
    ref_methods = {m.name: (m.input_type.full_name, m.output_type.full_name, m.server_streaming) for m in ref.methods}
    my_methods = {m.name: (m.input_type.full_name, m.output_type.full_name, m.server_streaming) for m in mine.methods}
    assert my_methods == ref_methods


def test_messages_round_trip_between_reference_and_ours(reference_pool) -> None:
    ref_cls = message_factory.GetMessageClass(reference_pool.FindMessageTypeByName("fmaas.BatchedGenerationRequest"))
    ref_msg = ref_cls()
    ref_msg.model_id = "llama"
    ref_msg.adapter_id = "lora-1"
    ref_msg.requests.add(text="hello")
    ref_msg.requests.add(text="world")
    ref_msg.params.method = 1
    ref_msg.params.sampling.temperature = 0.7
    ref_msg.params.sampling.seed = 42
    ref_msg.params.stopping.max_new_tokens = 17
    ref_msg.params.stopping.stop_sequences.append("\n\n")
    ref_msg.params.decoding.regex = "[a-z]+"
    ref_msg.params.response.top_n_tokens = 3
    ref_msg.params.truncate_input_tokens = 100

    mine = ours.BatchedGenerationRequest.FromString(ref_msg.SerializeToString())
    assert [r.text for r in mine.requests] == ["hello", "world"]
    assert mine.params.method == ours.SAMPLE
    assert mine.params.sampling.HasField("temperature")
    assert mine.params.sampling.seed == 42
    assert mine.params.stopping.max_new_tokens == 17
    assert mine.params.decoding.WhichOneof("guided") == "regex"
    assert mine.HasField("adapter_id") and not mine.HasField("prefix_id")

    resp = ours.GenerationResponse(
        input_token_count=5, generated_token_count=2, text="hi", stop_reason=ours.STOP_SEQUENCE, stop_sequence="\n"
    )
    resp.tokens.add(text="h", logprob=-0.5, rank=1).top_tokens.add(text="x", logprob=-1.0)
    ref_resp_cls = message_factory.GetMessageClass(reference_pool.FindMessageTypeByName("fmaas.GenerationResponse"))
    back = ref_resp_cls.FromString(resp.SerializeToString())
    assert back.SerializeToString(deterministic=True) == resp.SerializeToString(deterministic=True)
    assert back.tokens[0].top_tokens[0].text == "x"


def test_generated_code_is_not_stale(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(REPO_ROOT / "proto" / "generate.py"), "--out", str(tmp_path)], check=True)
    for pkg in ("proxy/pb", "meter/pb"):
        fresh = sorted(p.relative_to(tmp_path) for p in (tmp_path / pkg).rglob("*") if p.is_file())
        committed = sorted(
            p.relative_to(REPO_ROOT)
            for p in (REPO_ROOT / pkg).rglob("*")
            if p.is_file() and "__pycache__" not in p.parts
        )
        assert fresh == committed, "run `make proto`"
        for rel in fresh:
            assert filecmp.cmp(tmp_path / rel, REPO_ROOT / rel, shallow=False), f"{rel} is stale: run `make proto`"
