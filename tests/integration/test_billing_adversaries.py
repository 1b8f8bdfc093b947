"""Adversarial tenants through the real gateway, meter and simulator, billed against the simulator's truth.

Issue 8's findings, rerun: requests that fail at prefill, and requests abandoned during their prefill (client
deadlines of 40-120 ms on 2,000-3,000-token prompts, or cancels) while another tenant decodes. The failing tenant's
bill must stay within 10 % of what it truly cost the GPU, its neighbour's within 5 % over and 10 % under (whether
abandoned prefills' steps run on after the leaving, as an engine's do, or stop: ``ABANDON_RULES``), both read from the
bill itself (``GetUsage`` by tenant, once every request is final). Every recorded status is what the client saw, and
the prompt sizes of failed and cancelled requests are the backend's own counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
import sqlalchemy as sa

from meter.engine import request_finality
from meter.pb.joulegate.v1 import energy_pb2 as epb
from meter.pb.joulegate.v1 import energy_pb2_grpc as epb_grpc
from meter.store.keys import create_key
from proxy.pb.fmaas import generation_pb2 as pb
from sim.config import SimConfig
from sim.ledger import RequestTruth
from sim.throughput import SimProcess

from .harness import Stack, running_stack
from .metering_support import check_books, failed_reads, query, sampler_phase_ms

# Short epochs and settle so finality comes quickly; the simulator at real speed (an H100's step times), prompts of
# up to 3,000 tokens as in the report. The counter updates every 20 ms (read every 100 ms, lag <= 20 ms):
# these tests hold the billing rules (who owns which step), so the counter's own 100 ms quantisation, which blurs
# every short step alike and is held to its bounds by test_metering_accuracy, is kept out of their figures.
# The simulator runs in a process of its own, as TGI does: on a loaded machine, one event loop for the gateway and
# the simulator would delay the simulator's noticing a client's leaving, and the truth with it.
METER = {"source": "sim", "epoch_s": 1.0, "settle_s": 0.5, "engine_interval_s": 0.2, "lag_ms": 10}
SIM_ARGS = ("--time-scale", "1", "--max-input-tokens", "3500", "--max-total-tokens", "4096",
            "--counter-update-period-ms", "20")  # fmt: skip


@contextlib.asynccontextmanager
async def stack_with_own_sim(
    tmp_path: Path, sim_args: tuple[str, ...] = SIM_ARGS, meter: dict[str, Any] = METER
) -> AsyncIterator[tuple[Stack, str]]:
    """The gateway and its meter in this process; the simulator in a child process: (stack, simulator URL)."""
    with SimProcess(*sim_args) as sim:
        url = f"http://127.0.0.1:{sim.port}"
        async with running_stack(tmp_path, overrides={"meter": meter}, backend_urls=[url]) as s:
            yield s, url


async def sim_truth(url: str) -> dict[str, RequestTruth]:
    async with aiohttp.ClientSession() as http, http.get(f"{url}/sim/truth") as r:
        doc = await r.json()
    return {rid: RequestTruth(**t) for rid, t in doc["requests"].items()}


def md(key: str, correlation_id: str | None = None) -> tuple[tuple[str, str], ...]:
    out = [("authorization", f"Bearer {key}")]
    if correlation_id:
        out.append(("x-correlation-id", correlation_id))
    return tuple(out)


def params(max_new_tokens: int) -> pb.Parameters:
    return pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=max_new_tokens))


async def neighbour(s: Stack, key: str, stop_at: float, seed: int) -> int:
    """A tenant that keeps a stream decoding: long generations of short prompts, back to back."""
    rnd = random.Random(seed)
    calls = 0
    while time.monotonic() < stop_at:
        call = s.stub.GenerateStream(
            pb.SingleGenerationRequest(
                request=pb.GenerationRequest(text="w " * rnd.randint(20, 200)), params=params(rnd.randint(60, 200))
            ),
            metadata=md(key),
        )
        async for _ in call:
            pass
        calls += 1
    return calls


async def ended_rows(s: Stack, correlation_ids: set[str], timeout_s: float = 20.0) -> dict[str, str]:
    """correlation id -> recorded status, once every one of ``correlation_ids`` has ended in the database (the
    gateway notices a client's leaving, and records it, a moment after the client has left)."""
    deadline = time.monotonic() + timeout_s
    while True:
        await s.app.gateway.flush_records()
        assert await asyncio.to_thread(s.app.ledger.flush, 10.0)
        rows = query(s.app.engine, "SELECT correlation_id, status FROM requests WHERE status IS NOT NULL")
        recorded = {cid: status for cid, status in rows if cid is not None}
        if correlation_ids <= set(recorded) or time.monotonic() > deadline:
            return recorded
        await asyncio.sleep(0.05)


async def run_until_final(s: Stack, timeout_s: float = 60.0) -> None:
    """Flush the gateway and the ledger, then nudge the engine until every request of the database is final."""
    await s.app.gateway.flush_records()
    assert await asyncio.to_thread(s.app.ledger.flush, 10.0)
    db = s.app.engine
    deadline = time.monotonic() + timeout_s
    while True:
        ids = [r[0] for r in query(db, "SELECT request_id FROM requests")]
        with db.connect() as conn:
            pending = [rid for rid, final in request_finality(conn, ids).items() if not final]
        if not pending:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(pending)} requests still provisional after {timeout_s} s: {pending[:5]}")
        s.app.meter.run_soon()  # type: ignore[union-attr]
        await asyncio.sleep(0.2)


async def bills_vs_truth(s: Stack, truth: dict[str, RequestTruth]) -> dict[str, tuple[float, float, int]]:
    """Per tenant: (billed J from GetUsage, true J from /sim/truth, requests), idle excluded on both sides."""
    reports = epb_grpc.EnergyReportsStub(s.channel)
    usage = await reports.GetUsage(
        epb.GetUsageRequest(group_by=epb.GetUsageRequest.TENANT, idle_policy=epb.IDLE_POLICY_NONE),
        metadata=md(s.admin_key),
    )
    assert usage.total.provisional_requests == 0
    by_tenant: dict[str, list[str]] = {}
    for tenant, rid in query(s.app.engine, "SELECT tenant, request_id FROM requests"):
        by_tenant.setdefault(tenant, []).append(rid)
    out = {}
    for row in usage.rows:
        true_mj = sum(truth[r].total_mj for r in by_tenant[row.key] if r in truth)
        out[row.key] = (row.prefill_j + row.decode_j, true_mj / 1000, row.requests)
    return out


def rel_error(billed_j: float, true_j: float) -> float:
    return billed_j / true_j - 1


def conditions(s: Stack, url: str) -> str:
    """What limits the comparison on this run: failed counter reads, the sampler's phase against the counter's
    updates, and the calibrated model."""
    stats = s.app.meter.stats.engine  # type: ignore[union-attr]
    models = ", ".join(
        f"lag {m.lag_ns / 1e6:.0f} ms ratio {m.prefill_power_ratio:.2f} ({m.prefill_ratio_at_no_tokens:.2f} + "
        f"{m.prefill_ratio_per_1k_tokens:.2f} per 1k step tokens)"
        for m in stats.calibration.values()
        if m
    )
    phase = sampler_phase_ms(s.app.engine, f"sim:{url}")
    return f"failed reads {failed_reads(s.app.engine)}, sampler phase {phase:.1f} ms, calibration: {models or 'none'}"


@pytest.mark.slow
async def test_requests_failing_at_prefill_pay_their_prefill_and_their_neighbour_does_not(tmp_path: Path) -> None:
    async with stack_with_own_sim(tmp_path) as (s, url):
        adversary = create_key(s.app.engine, "tenant-b").key
        stop_at = time.monotonic() + 7.0
        streams = [asyncio.create_task(neighbour(s, s.key, stop_at, seed)) for seed in range(3)]
        codes: list[grpc.StatusCode] = []
        rnd = random.Random(5)
        await asyncio.sleep(0.5)

        async def fail_at_prefill(n: int) -> None:
            for _ in range(n):
                text = "[[sim:error_after=0]] " + "w " * rnd.randint(600, 1000)
                try:
                    await s.stub.Generate(
                        pb.BatchedGenerationRequest(requests=[pb.GenerationRequest(text=text)], params=params(20)),
                        metadata=md(adversary),
                    )
                except grpc.aio.AioRpcError as err:
                    codes.append(err.code())
                await asyncio.sleep(rnd.uniform(0.0, 0.08))

        await asyncio.gather(fail_at_prefill(48), fail_at_prefill(48))
        await asyncio.gather(*streams)
        assert codes == [grpc.StatusCode.INTERNAL] * 96
        await run_until_final(s)
        check_books(s.app.engine)
        truth = await sim_truth(url)
        got = await bills_vs_truth(s, truth)
        failing, decoding = got["tenant-b"], got["tenant-a"]
        print(f"\nfailing at prefill: billed {failing[0]:.2f} J vs true {failing[1]:.2f} J "
              f"({rel_error(*failing[:2]):+.2%}); decoding neighbour {decoding[0]:.2f} J vs {decoding[1]:.2f} J "
              f"({rel_error(*decoding[:2]):+.2%}); {conditions(s, url)}")  # fmt: skip
        assert failing[2] == 96 and failing[1] > 0
        assert abs(rel_error(*failing[:2])) < 0.10, failing
        assert abs(rel_error(*decoding[:2])) < 0.05, decoding

        # Their prompt sizes are the backend's own counts (TGI reported none: the gateway asked /tokenize after).
        rows = query(s.app.engine, "SELECT request_id, prompt_tokens, prompt_tokens_estimated, status, "
                                   "first_token_ns FROM requests WHERE tenant = 'tenant-b'")  # fmt: skip
        assert len(rows) == 96
        for rid, prompt, estimated, status, first in rows:
            assert (status, first, estimated) == ("INTERNAL", None, False)
            assert prompt == truth[rid].prompt_tokens, rid


# How an abandoned prefill's step ends. "completes": as an engine runs it (a forward pass is not stopped; the
# simulator's default since 2026-12-07), and as the meter assumes by default: the step runs to its end and is the
# abandoning request's; the old model, which cut the step at the leaving, billed the abandoning tenant 33 % under its
# cost and its decoding neighbour 72-77 % over (three runs). "cut": the simulator's old rule, the request leaving its
# step at once, with the meter told so. Under "completes" the abandoning tenant was -2.3 to -5.3 % under and the
# neighbour +3.5 to +9.9 % over (eight runs; bound 15 %) while an epoch picked requests by their recorded end: the
# tail of a step past a boundary (these epochs are 1 s) went to the next epoch's requests. Billed to its own request:
# -0.2 to -1.6 % and -0.7 to +2.2 % (nine runs, before the chance rule for prefills abandoned within the queue
# waits). (With the abandoned windows left out of the power-ratio fit, as they must be under "cut", the fit never
# settled in ten seconds and the configured guess, 2.0 against the simulator's 2.48, gave +7.3 to +13.6 % over six
# runs.) On 2026-12-08, on this code and on the code of the day before alike, the abandoning tenant was +0.7 to
# +3.0 % over and its neighbour -3.4 to -7.2 % under ("completes", seven runs), +3.3 to +7.8 % and -2.4 to -4.6 %
# ("cut", six): a 5 % bound failed a clean-clone CI run at -5.0002 %. The direction is the neighbour's favour (the
# abandoner pays for it); the neighbour alone is billed within 0.1 %, and beside the same long prompts sent whole
# (20 new tokens) -2.3 %: the simulator artefact the README measures (it tokenizes a 3,000-token prompt on the loop
# that times its steps, stretching the decode step in progress), not the abandoning. Bounds on the neighbour's bill:
# 5 % over (what the abandoner could put on it), 10 % under (the modelling error in its favour).
ABANDON_RULES = {
    "completes": (SIM_ARGS, METER, (-0.10, 0.05)),
    "cut": ((*SIM_ARGS, "--no-finish-step-on-cancel"), {**METER, "abandoned_step_completes": False}, (-0.10, 0.05)),
}


@pytest.mark.slow
@pytest.mark.parametrize("rule", sorted(ABANDON_RULES))
async def test_prefills_abandoned_by_deadline_or_cancel_are_paid_by_who_abandoned_them(
    tmp_path: Path, rule: str
) -> None:
    sim_args, meter, neighbour_bound = ABANDON_RULES[rule]
    async with stack_with_own_sim(tmp_path, sim_args, meter) as (s, url):
        adversary = create_key(s.app.engine, "tenant-b").key
        stop_at = time.monotonic() + 10.0
        streams = [asyncio.create_task(neighbour(s, s.key, stop_at, seed)) for seed in range(3)]
        seen: dict[str, grpc.StatusCode] = {}  # correlation id -> what the client saw
        rnd = random.Random(11)
        await asyncio.sleep(0.5)

        async def abandon(n: int) -> None:
            for k in range(n):
                cid = uuid.uuid4().hex
                request = pb.SingleGenerationRequest(
                    request=pb.GenerationRequest(text="w " * rnd.randint(2000, 3000)), params=params(20)
                )
                after_s = rnd.uniform(0.04, 0.12)
                if k % 3:  # a client deadline
                    call = s.stub.GenerateStream(request, metadata=md(adversary, cid), timeout=after_s)
                    try:
                        async for _ in call:
                            pass
                        seen[cid] = grpc.StatusCode.OK
                    except grpc.aio.AioRpcError as err:
                        seen[cid] = err.code()
                else:  # a client that cancels
                    call = s.stub.GenerateStream(request, metadata=md(adversary, cid))
                    await asyncio.sleep(after_s)
                    call.cancel()
                    seen[cid] = grpc.StatusCode.CANCELLED
                if "x-request-id" in dict(await call.initial_metadata() or ()):
                    given_id.add(cid)
                await asyncio.sleep(rnd.uniform(0.05, 0.2))

        given_id: set[str] = set()
        await abandon(40)
        await asyncio.gather(*streams)
        await ended_rows(s, given_id)
        await run_until_final(s)
        check_books(s.app.engine)
        truth = await sim_truth(url)
        got = await bills_vs_truth(s, truth)
        abandoning, decoding = got["tenant-b"], got["tenant-a"]
        print(f"\nabandoned prefills: billed {abandoning[0]:.2f} J vs true {abandoning[1]:.2f} J "
              f"({rel_error(*abandoning[:2]):+.2%}); decoding neighbour {decoding[0]:.2f} J vs {decoding[1]:.2f} J "
              f"({rel_error(*decoding[:2]):+.2%}); {conditions(s, url)}")  # fmt: skip
        assert abandoning[2] >= len(given_id) >= 30 and abandoning[1] > 0
        assert abs(rel_error(*abandoning[:2])) < 0.10, abandoning
        under, over = neighbour_bound
        assert under < rel_error(*decoding[:2]) < over, decoding

        # Each row says what its client saw, and its prompt size is the backend's count.
        rows = query(s.app.engine, "SELECT request_id, correlation_id, status, prompt_tokens, prompt_tokens_estimated "
                                   "FROM requests WHERE tenant = 'tenant-b'")  # fmt: skip
        recorded = {cid: grpc.StatusCode[status] for _rid, cid, status, _p, _e in rows}
        assert given_id <= set(recorded) and recorded == {cid: seen[cid] for cid in recorded}
        assert set(seen.values()) == {grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED}
        for rid, _cid, _status, prompt, estimated in rows:
            assert not estimated and prompt == truth[rid].prompt_tokens, rid
        await lists_and_lookups_agree(s)


async def lists_and_lookups_agree(s: Stack) -> None:
    """Issue 8: under idle_policy = tokens, ListRequests and GetRequestEnergy disagreed on 93 rows (idle shares were
    recomputed from whichever neighbours a query happened to read). Every row, every policy: one figure."""
    reports = epb_grpc.EnergyReportsStub(s.channel)
    for policy in (epb.IDLE_POLICY_NONE, epb.IDLE_POLICY_TIME, epb.IDLE_POLICY_TOKENS):
        listed: dict[str, epb.RequestEnergy] = {}
        token = ""
        while True:
            page = await reports.ListRequests(
                epb.ListRequestsRequest(page_size=7, page_token=token, idle_policy=policy), metadata=md(s.admin_key)
            )
            listed.update((r.request_id, r) for r in page.requests)
            token = page.next_page_token
            if not token:
                break
        assert len(listed) == len(query(s.app.engine, "SELECT request_id FROM requests"))
        idle = 0.0
        for rid, row in listed.items():
            one = await reports.GetRequestEnergy(
                epb.GetRequestEnergyRequest(request_id=rid, idle_policy=policy), metadata=md(s.admin_key)
            )
            assert one == row, rid
            idle += row.idle_j
        if policy != epb.IDLE_POLICY_NONE:
            assert idle > 0  # there was idle to share, and it was shared


async def test_streams_a_client_cancels_mid_decode_are_cancelled_and_deadlines_are_deadlines(tmp_path: Path) -> None:
    """Issue 8: 2 of 63 client-cancelled streams were recorded OK (the servicer was writing a message when the client
    left, and the stream was closed rather than cancelled); 8 of 90 expired deadlines were recorded CANCELLED (the
    client's deadline reaches the server as a cancel just before the server's copy of it expires)."""
    async with running_stack(tmp_path, sim_config=SimConfig(time_scale=0.2)) as s:
        seen: dict[str, grpc.StatusCode] = {}
        given_id: set[str] = set()  # calls whose client got an x-request-id
        rnd = random.Random(3)

        async def one(k: int) -> None:
            cid = f"c{k}"
            request = pb.SingleGenerationRequest(request=pb.GenerationRequest(text="w " * 50), params=params(400))
            if k % 2:
                call = s.stub.GenerateStream(request, metadata=md(s.key, cid))
                leave_after = rnd.randint(2, 20)
                got = 0
                async for _ in call:
                    got += 1
                    if got == leave_after:
                        break
                assert got == leave_after  # it left mid-stream (400 tokens take far longer)
                call.cancel()
                seen[cid] = grpc.StatusCode.CANCELLED
            else:
                call = s.stub.GenerateStream(request, metadata=md(s.key, cid), timeout=rnd.uniform(0.1, 0.4))
                try:
                    async for _ in call:
                        pass
                except grpc.aio.AioRpcError as err:
                    seen[cid] = err.code()
            if "x-request-id" in dict(await call.initial_metadata() or ()):
                given_id.add(cid)

        for batch in range(6):
            await asyncio.gather(*(one(batch * 20 + k) for k in range(20)))
        recorded = await ended_rows(s, given_id)
        # Every call whose client got an id has a row saying what the client saw. (A deadline that passed before the
        # gateway had even authenticated the call leaves neither an id nor a row: nobody is known to bill.)
        assert given_id <= set(recorded) and len(given_id) >= 100
        assert {cid: grpc.StatusCode[recorded[cid]] for cid in recorded} == {cid: seen[cid] for cid in recorded}
        assert set(seen.values()) == {grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED}


async def test_a_drain_past_its_grace_records_what_the_client_saw(tmp_path: Path) -> None:
    sim = SimConfig(time_scale=1.0)
    async with running_stack(tmp_path, sim_config=sim) as s:
        call = s.stub.GenerateStream(
            pb.SingleGenerationRequest(request=pb.GenerationRequest(text="w " * 20), params=params(1000)),
            metadata=md(s.key, "long"),
        )
        first = await call.read()
        assert first is not grpc.aio.EOF
        stopping = asyncio.create_task(s.app.stop(0.3))
        try:
            while await call.read() is not grpc.aio.EOF:
                pass
            code = grpc.StatusCode.OK
        except grpc.aio.AioRpcError as err:
            code = err.code()
        await stopping
        engine = sa.create_engine(s.db_url)
        try:
            with engine.connect() as conn:
                (status,) = conn.execute(sa.text("SELECT status FROM requests WHERE correlation_id = 'long'")).one()
        finally:
            engine.dispose()
        print(f"\nthe client of a stream cut by the drain saw {code.name}; its row says {status}")
        assert code is not grpc.StatusCode.OK
        assert status == code.name, (status, code)


async def test_refused_requests_cost_nothing_and_answer_at_once(tmp_path: Path) -> None:
    """TGI's validation refusals are 0 J on an idle GPU (they were charged 18-319 mJ); every authenticated call has
    an x-request-id and a row, so GetRequestEnergy(wait_final) answers at once; a stranger gets an id but no row."""
    overrides = {"meter": METER, "server": {"max_batch_requests": 4}}
    async with running_stack(tmp_path, overrides=overrides, http=True) as s:
        reports = epb_grpc.EnergyReportsStub(s.channel)

        async def refused(send: Callable[[], Any]) -> tuple[grpc.StatusCode, str]:
            call = send()
            try:
                if hasattr(call, "__aiter__"):
                    async for _ in call:
                        pass
                else:
                    await call
            except grpc.aio.AioRpcError as err:
                ids = dict(err.trailing_metadata() or ())
                initial = dict(await call.initial_metadata() or ())  # type: ignore[attr-defined]
                rid = str(ids.get("x-request-id") or initial.get("x-request-id"))
                assert rid and rid != "None"
                return err.code(), rid
            raise AssertionError("not refused")

        too_long = pb.GenerationRequest(text="w " * 1500)  # over the simulator's max_input_tokens: TGI refuses it
        gen = s.stub.Generate
        cases = {
            "validation": lambda: gen(pb.BatchedGenerationRequest(requests=[too_long], params=params(5)),
                                      metadata=md(s.key)),
            "stream validation": lambda: s.stub.GenerateStream(
                pb.SingleGenerationRequest(request=too_long, params=params(5)), metadata=md(s.key)),
            "unknown model": lambda: gen(pb.BatchedGenerationRequest(model_id="nope", requests=[too_long]),
                                         metadata=md(s.key)),
            "bad parameter": lambda: gen(pb.BatchedGenerationRequest(
                requests=[pb.GenerationRequest(text="x")],
                params=pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=5, min_new_tokens=9))),
                metadata=md(s.key)),
            "too many texts": lambda: gen(pb.BatchedGenerationRequest(requests=[too_long] * 5), metadata=md(s.key)),
        }  # fmt: skip
        got = {name: await refused(send) for name, send in cases.items()}
        assert got["validation"][0] == got["stream validation"][0] == grpc.StatusCode.INVALID_ARGUMENT
        assert got["unknown model"][0] == grpc.StatusCode.NOT_FOUND

        # HTTP: a validation refusal inside TGI's stream, and the gateway's own refusal of a body that is not JSON
        headers = {"authorization": f"Bearer {s.key}"}
        async with aiohttp.ClientSession(headers=headers) as http:
            async with http.post(f"{s.http_url}/generate", json={"inputs": "w " * 1500}) as r:
                assert r.status == 422
                got["http validation"] = (grpc.StatusCode.INVALID_ARGUMENT, r.headers["x-request-id"])
            async with http.post(f"{s.http_url}/generate", data=b"{nope") as r:
                assert r.status == 400
                got["http bad body"] = (grpc.StatusCode.INVALID_ARGUMENT, r.headers["x-request-id"])
        async with aiohttp.ClientSession() as stranger, stranger.post(f"{s.http_url}/generate", json={}) as r:
            assert r.status == 401
            stranger_id = r.headers["x-request-id"]

        for name, (code, rid) in got.items():
            t0 = time.monotonic()
            r = await reports.GetRequestEnergy(
                epb.GetRequestEnergyRequest(request_id=rid, wait_final=True, wait_timeout_ms=20_000),
                metadata=md(s.key),
            )
            waited = time.monotonic() - t0
            assert r.final and r.total_j == 0 and r.status == code.name, name
            assert waited < 2.0, (name, waited)  # the ledger's flush, not the wait's timeout
        validated = await reports.GetRequestEnergy(
            epb.GetRequestEnergyRequest(request_id=got["validation"][1]), metadata=md(s.key)
        )
        assert validated.backend and validated.HasField("released")  # TGI saw it, and refused it: 0 J all the same
        try:
            await reports.GetRequestEnergy(epb.GetRequestEnergyRequest(request_id=stranger_id), metadata=md(s.key))
            raise AssertionError("a stranger's call has a row")
        except grpc.aio.AioRpcError as err:
            assert err.code() == grpc.StatusCode.NOT_FOUND

        # On an idle GPU nothing else is there to take the energy of their window: still 0 J, once attributed.
        await run_until_final(s)
        billed = query(s.app.engine, "SELECT COALESCE(SUM(prefill_mj + decode_mj + idle_time_mj + idle_tokens_mj), 0) "
                                     "FROM request_energy")  # fmt: skip
        assert billed[0][0] == 0
        check_books(s.app.engine)
