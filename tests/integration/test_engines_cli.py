"""The commands as an operator types them: ``joulegate sim --engine vllm|sglang --port P`` in one process and
``joulegate serve --backend http://127.0.0.1:P`` in another, with no engine setting: the gateway finds the engine,
the unchanged TGIS client and ``text_generation.Client`` work, every request gets its energy and the books balance."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import grpc
import pytest
from text_generation import Client

from meter.store import create_key, ensure_schema, make_engine
from proxy.pb.fmaas import generation_pb2 as pb
from proxy.pb.fmaas import generation_pb2_grpc as pbg
from sim.throughput import SimProcess
from tests.conftest import REPO_ROOT, free_port
from tests.waiting import wait_until_async

from .metering_support import check_books, query, wait_attributed
from .test_ops_logs import LogLines


@pytest.mark.parametrize(("engine", "event_loop"), [("vllm", "asyncio"), ("sglang", "uvloop")])
async def test_sim_engine_and_serve_with_only_the_backend_url(tmp_path: Path, engine: str, event_loop: str) -> None:
    """...on either event loop (``server.event_loop``): uvloop's transports are no ``asyncio.Transport``
    subclasses, which the streams' client once asserted."""
    sim = SimProcess("--engine", engine, "--time-scale", "0.1")
    sim.args[3] = "sim"  # `joulegate sim`, not `sim-tgi`
    db_url = f"sqlite:///{tmp_path / 'jg.db'}"
    db = make_engine(db_url)
    ensure_schema(db)
    key = create_key(db, "acme").key
    grpc_port, http_port = free_port(), free_port()
    with sim:
        assert any(f"sim-{engine} listening" in line for line in sim.output)
        backend = f"http://127.0.0.1:{sim.port}"
        proc = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "app.cli", "serve", "--backend", backend, "--db", db_url, "--meter", "sim"),
            *("--grpc-listen", f"127.0.0.1:{grpc_port}", "--http-listen", f"127.0.0.1:{http_port}"),
            env={
                "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                "PYTHONPATH": str(REPO_ROOT),
                "JOULEGATE_METER__JOURNAL_PATH": str(tmp_path / "journal.jsonl"),
                "JOULEGATE_METER__EPOCH_S": "1",
                "JOULEGATE_METER__SETTLE_S": "0.5",
                "JOULEGATE_SERVER__DRAIN_GRACE_S": "1",
                "JOULEGATE_SERVER__EVENT_LOOP": event_loop,
            },
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        assert proc.stderr is not None
        logs = LogLines(proc.stderr)
        try:
            found = await logs.event("backend_engine", engine=engine, configured=False)
            assert found["url"] == backend
            assert (await logs.event("gateway_started"))["event_loop"] == event_loop
            md = (("authorization", f"Bearer {key}"),)
            params = pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=6))
            async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
                stub = pbg.GenerationServiceStub(channel)
                texts = [pb.GenerationRequest(text="one two three"), pb.GenerationRequest(text="four five")]
                answer = await stub.Generate(pb.BatchedGenerationRequest(requests=texts, params=params), metadata=md)
                assert [r.generated_token_count for r in answer.responses] == [6, 6]
                messages = [
                    m
                    async for m in stub.GenerateStream(
                        pb.SingleGenerationRequest(request=pb.GenerationRequest(text="one two three"), params=params),
                        metadata=md,
                    )
                ]
                assert messages[0].input_token_count > 0 and messages[-1].stop_reason == pb.MAX_TOKENS
                assert "".join(m.text for m in messages) == answer.responses[0].text
            client = Client(f"http://127.0.0.1:{http_port}", headers={"authorization": f"Bearer {key}"})
            resp = await asyncio.to_thread(client.generate, "one two three", max_new_tokens=6)
            assert resp.generated_text == answer.responses[0].text
            events = await asyncio.to_thread(lambda: list(client.generate_stream("one two three", max_new_tokens=6)))
            assert "".join(e.token.text for e in events) == resp.generated_text

            five = "the gateway's ledger to write the 5 requests"
            await wait_until_async(lambda: query(db, "SELECT COUNT(*) FROM requests")[0][0] == 5, 30.0, what=five)
            await wait_attributed(db, timeout_s=30.0)
            rows = query(db, "SELECT request_id, status, prompt_tokens FROM requests")
            assert len(rows) == 5 and all(r[1] == "OK" and r[2] > 0 for r in rows), rows
            energy = dict(query(db, "SELECT request_id, SUM(prefill_mj + decode_mj) FROM request_energy GROUP BY 1"))
            assert set(energy) == {r[0] for r in rows} and all(mj > 0 for mj in energy.values()), energy
            check_books(db)
            proc.send_signal(signal.SIGTERM)
            await logs.event("gateway_stopped")
            async with asyncio.timeout(30):
                await proc.stderr.read()
                assert await proc.wait() == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            db.dispose()
