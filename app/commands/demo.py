"""``joulegate demo``: the whole stack on one machine, with no GPU and nothing to configure.

Two simulated TGI servers (each with its simulated GPU and NVML-like energy counter) behind one gateway with the
in-process simulated meter, on SQLite. Two tenants send real gRPC traffic: ``acme`` streams interactive requests one
by one, ``globex`` sends bulk jobs in the ``batch`` traffic class, which the gateway holds and releases together.
The demo then reads the energy back through ``joulegate.v1.EnergyReports`` (as grpcurl would) and prints it per
tenant and phase, the conservation check per backend, and the simulator's ground truth beside the attribution.

This command imports ``sim`` (the simulator) as well as the gateway: it is the one place where both run together.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import grpc

from meter.pb.joulegate.v1 import energy_pb2 as epb
from meter.pb.joulegate.v1 import energy_pb2_grpc as epbg
from proxy.pb.fmaas import generation_pb2 as pb
from proxy.pb.fmaas import generation_pb2_grpc as pbg

PROMPTS = [
    "Summarise the causes of the 1929 stock market crash in three sentences.",
    "Write a haiku about a GPU that never sleeps.",
    "Explain continuous batching to a new engineer on the serving team.",
    "List five ways to cut the energy bill of an inference cluster.",
    "Translate 'energy per token' into French, German and Japanese.",
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dir", default=".demo", help="working directory for the SQLite database and journal")
    parser.add_argument("--seconds", type=float, default=12.0, help="how long the tenants send traffic")
    parser.add_argument("--seed", type=int, default=7)


def run(args: argparse.Namespace) -> int:
    from common.logs import configure_logging

    configure_logging("warning", "console")
    return asyncio.run(_demo(Path(args.dir), args.seconds, random.Random(args.seed)))


async def _demo(workdir: Path, seconds: float, rng: random.Random) -> int:
    from app.config import load_config
    from app.server import GatewayApp
    from meter.store.keys import create_key
    from meter.store.migrate import ensure_schema
    from sim.config import SimConfig
    from sim.server import SimTGI

    await asyncio.to_thread(shutil.rmtree, workdir, ignore_errors=True)
    await asyncio.to_thread(workdir.mkdir, parents=True)
    sims = [SimTGI(SimConfig(model_id="llama-3.1-8b", name=f"gpu{i}")) for i in range(2)]
    urls = [await s.start() for s in sims]
    config = load_config(
        environ={},
        overrides={
            "db": {"url": f"sqlite:///{workdir / 'joulegate.db'}"},
            "server": {"grpc_listen": "127.0.0.1:0", "http_listen": "", "drain_grace_s": 5},
            "meter": {
                "source": "sim",
                "journal_path": str(workdir / "journal.jsonl"),
                "epoch_s": 2.0,  # short epochs: the demo's energy is final seconds after its last request
                "settle_s": 0.5,
                "engine_interval_s": 0.5,
                # a short demo may end before the calibration settles (~5 s of traffic): then its figures are
                # sealed with the configured guess 5 s after the attribution passed them, not the 300 s default
                "uncalibrated_seal_hold_s": 5.0,
            },
            "models": [
                {
                    "model_id": "llama-3.1-8b",
                    "backends": [{"url": u, "name": f"tgi-{i}"} for i, u in enumerate(urls)],
                    "shaping": {
                        "default_class": "interactive",
                        "classes": {
                            "interactive": {"policy": "passthrough", "priority": 10},
                            "batch": {"policy": "batch", "max_batch": 16, "hold_ms": 1500},
                        },
                    },
                }
            ],
        },
    )
    app = GatewayApp(config)
    await asyncio.to_thread(ensure_schema, app.engine)
    keys = {t: create_key(app.engine, t).key for t in ("acme", "globex")}
    admin = create_key(app.engine, "ops", admin=True).key
    await app.start()
    target = f"127.0.0.1:{app.grpc_port}"
    print(f"joulegate demo: gateway on {target}, simulated TGI at {', '.join(urls)}, SQLite in {workdir}/")
    print(f"  tenants: acme (interactive streams), globex (bulk jobs in traffic class 'batch'); {seconds:.0f} s")
    try:
        async with grpc.aio.insecure_channel(target) as channel:
            stub = pbg.GenerationServiceStub(channel)
            stats = await _traffic(stub, keys, seconds, rng)
            _print_traffic(stats)
            reports = epbg.EnergyReportsStub(channel)
            return await _print_energy(reports, admin, stats, sims)
    finally:
        await app.stop(5)
        for s in sims:
            await s.stop()


async def _traffic(stub: pbg.GenerationServiceStub, keys: dict[str, str], seconds: float,
                   rng: random.Random) -> dict[str, Any]:  # fmt: skip
    stats: dict[str, Any] = {"acme": [], "globex": [], "ids": {"acme": [], "globex": []}}
    stop_at = time.monotonic() + seconds

    async def acme_stream(i: int) -> None:
        md = (("authorization", f"Bearer {keys['acme']}"), ("x-correlation-id", f"acme-{i}"))
        req = pb.SingleGenerationRequest(
            request=pb.GenerationRequest(text=rng.choice(PROMPTS)),
            params=pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=rng.randint(32, 96))),
        )
        t0 = time.perf_counter()
        ttft = None
        call = stub.GenerateStream(req, metadata=md)
        async for msg in call:
            if ttft is None and msg.generated_token_count:
                ttft = time.perf_counter() - t0
        stats["ids"]["acme"].append(dict(await call.initial_metadata())["x-request-id"])
        stats["acme"].append((ttft or 0.0, time.perf_counter() - t0, msg.generated_token_count))

    async def globex_job(i: int) -> None:
        md = (("authorization", f"Bearer {keys['globex']}"), ("x-traffic-class", "batch"))
        texts = [pb.GenerationRequest(text=f"Document {i}.{k}: " + rng.choice(PROMPTS) * 6) for k in range(4)]
        params = pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=64))
        req = pb.BatchedGenerationRequest(requests=texts, params=params)
        t0 = time.perf_counter()
        call = stub.Generate(req, metadata=md)
        resp = await call
        call_id = dict(await call.initial_metadata())["x-request-id"]
        stats["ids"]["globex"].extend(f"{call_id}-{k}" for k in range(len(texts)))
        stats["globex"].append((time.perf_counter() - t0, sum(r.generated_token_count for r in resp.responses)))

    tasks: list[asyncio.Task[None]] = []
    i = 0
    while time.monotonic() < stop_at:
        tasks.append(asyncio.create_task(acme_stream(i)))
        if i % 3 == 0:
            tasks.append(asyncio.create_task(globex_job(i)))
        i += 1
        await asyncio.sleep(rng.expovariate(4.0))  # Poisson arrivals, 4 per second
    await asyncio.gather(*tasks)
    return stats


def _print_traffic(stats: dict[str, Any]) -> None:
    acme, globex = stats["acme"], stats["globex"]
    print("\nwhat the gateway did")
    print(
        f"  acme    {len(acme):4d} streams, {sum(a[2] for a in acme):6d} tokens, "
        f"TTFT p50 {statistics.median(a[0] for a in acme) * 1000:6.1f} ms, latency p50 "
        f"{statistics.median(a[1] for a in acme) * 1000:6.0f} ms"
    )
    print(
        f"  globex  {len(globex):4d} jobs x 4 texts, {sum(g[1] for g in globex):6d} tokens, held and released "
        f"together (class 'batch'), job latency p50 {statistics.median(g[0] for g in globex) * 1000:6.0f} ms"
    )


async def _print_energy(reports: epbg.EnergyReportsStub, admin: str, stats: dict[str, Any],
                        sims: list[Any]) -> int:  # fmt: skip
    md = (("authorization", f"Bearer {admin}"),)
    print("\nwaiting until every request's energy is final (samples cover its end plus the counter lag) ...")
    last = [*stats["ids"]["acme"][-1:], *stats["ids"]["globex"][-1:]]
    for rid in last:
        await reports.GetRequestEnergy(
            epb.GetRequestEnergyRequest(request_id=rid, wait_final=True, wait_timeout_ms=30000), metadata=md
        )
    usage = await reports.GetUsage(epb.GetUsageRequest(group_by=epb.GetUsageRequest.TENANT), metadata=md)
    print(
        f"\nenergy per tenant (idle policy {epb.IdlePolicy.Name(usage.idle_policy)}, grid "
        f"{usage.grid_g_co2e_per_kwh:.0f} gCO2e/kWh, PUE {usage.pue:.2f})"
    )
    print(
        f"  {'tenant':8s} {'requests':>8s} {'tokens':>7s} {'prefill J':>10s} {'decode J':>9s} {'total J':>9s}"
        f" {'Wh':>7s} {'J/token':>8s} {'gCO2e':>7s}"
    )
    for row in [*usage.rows, usage.total]:
        print(
            f"  {row.key or 'total':8s} {row.requests:8d} {row.generated_tokens:7d} {row.prefill_j:10.1f}"
            f" {row.decode_j:9.1f} {row.total_j:9.1f} {row.total_wh:7.3f} {row.j_per_generated_token:8.3f}"
            f" {row.co2e_g:7.2f}"
        )
    backends = await reports.GetBackendEnergy(epb.GetBackendEnergyRequest(), metadata=md)
    print("\nconservation per backend: what the energy counter measured = attributed to requests + idle + adjustment")
    ok = True
    for b in backends.backends:
        print(
            f"  {b.backend:8s} counter {b.counter_j:9.1f} J = attributed {b.attributed_j:9.1f} J + idle"
            f" {b.idle_j:8.1f} J + adjustment {b.adjustment_mj / 1000:6.1f} J   error {b.conservation_error_mj} mJ"
            f"   ({b.samples} samples, {b.gaps} gaps)"
        )
        ok = ok and b.conservation_error_mj == 0
    # the simulator knows the true energy of its own work: compare per tenant
    truth = {}
    for s in sims:
        truth.update(s.truth().requests)
    print("\nattribution against the simulator's ground truth (same requests)")
    for tenant in ("acme", "globex"):
        ids = stats["ids"][tenant]
        true_j = sum((truth[i].prefill_mj + truth[i].decode_mj) / 1000 for i in ids if i in truth)
        row = next(r for r in usage.rows if r.key == tenant)
        err = (row.prefill_j + row.decode_j - true_j) / true_j * 100 if true_j else 0.0
        attributed_j = row.prefill_j + row.decode_j
        print(f"  {tenant:8s} attributed {attributed_j:9.1f} J, true {true_j:9.1f} J, error {err:+5.1f} %")
    print(
        "\ntry it yourself while a gateway runs (`joulegate serve ...`):\n"
        "  grpcurl -plaintext -H 'authorization: Bearer KEY' localhost:8033 list\n"
        "  grpcurl -plaintext -H 'authorization: Bearer KEY' -d '{\"group_by\": \"TENANT\"}' "
        "localhost:8033 joulegate.v1.EnergyReports/GetUsage"
    )
    print(f"\nconservation {'holds to the millijoule' if ok else 'FAILED'} on every backend")
    return 0 if ok else 1
