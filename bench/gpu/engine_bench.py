"""Decode speed and power of the reference engines, batch by batch: is the engine GPU-bound?

    python3 -m bench.gpu.engine_bench --out $OUT                         # on a GPU: graph and cb engines, bf16
    python3 -m bench.gpu.engine_bench --out /tmp/eb --tiny --device cpu  # dry run (no energy)

Each engine spec (``ENGINE:DTYPE:B1,B2,...``, e.g. ``graph:bf16:1,8,32,64``) runs in its own process (so one
engine's GPU memory is gone before the next is built), in-process behind the ``Engine`` interface with no HTTP:
for each batch size B, B distinct ``--prompt-tokens`` prompts are submitted at once, each generating exactly N new
tokens (``--new-tokens`` for the graph engine, ``--cb-new-tokens`` for transformers' slower manager). Measured:

- **ms/token**: the decode step time while all B requests decode (from the last first token to the first last
  token; the B requests' prefills come before, interleaved with the steps of those already prefilled);
- **W**: the GPU's power over that same span, from the energy counter polled every 20 ms and interpolated between
  its updates (``energy_poll.py``), and J/token = W x step time / B;
- **floor**: the step time if it only read the weights (and the KV cache it attends to) once at the device's copy
  bandwidth, measured at start (a device-to-device copy, bytes read + written); ms/token over it says how far from
  memory-bound the engine is;
- the idle power (model loaded, engine waiting, 1.5 s) and the prefill time of the B prompts.

Writes ``engine_bench.json`` under ``--out``, prints a table and one line
``RESULT graph_ms_per_token_b1=… graph_w_b1=… graph_floor_ratio_b1=… cb_ms_per_token_b1=… cb_w_b1=… …``
(every measured engine, dtype and batch; keys carry the dtype when it is not bf16).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.gpu.energy_poll import EnergyPoller
from bench.gpu.reference_engine import LLAMA3_8B, TINY, EngineOutput, ModelShape


@dataclass(frozen=True, slots=True)
class BatchResult:
    engine: str
    dtype: str
    batch: int
    prompt_tokens: int
    new_tokens: int
    prefill_s: float  # first submit -> the last request's first token
    ms_per_token: float  # decode step time with all B decoding
    steps: int  # decode steps in that span
    span_s: float
    power_w: float
    j_per_token: float  # per generated token: W x step / B
    floor_ms: float
    floor_ratio: float


@dataclass(frozen=True, slots=True)
class EngineResult:
    engine: str
    dtype: str
    build_s: float
    start_s: float
    idle_w: float
    weight_gb: float
    copy_tb_s: float
    batches: list[BatchResult]


def copy_bandwidth_tb_s(device: str) -> float:
    """Device-to-device copy of 2 GiB, bytes read + written per second, median of 5 (NaN on a CPU)."""
    import torch

    if not device.startswith("cuda"):
        return math.nan
    src = torch.empty(1 << 30, dtype=torch.float16, device=device).uniform_()
    dst = torch.empty_like(src)
    times = []
    for _ in range(6):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * (1 << 31) / statistics.median(times[1:]) / 1e12


def _weight_bytes(shape: ModelShape, dtype: str) -> int:
    h, i, v = shape.hidden_size, shape.intermediate_size, shape.vocab_size
    hd = h // shape.num_attention_heads
    layer = h * (h + 2 * shape.num_key_value_heads * hd) + h * h + 3 * h * i
    act = 4 if dtype == "fp32" else 2
    per = 1 if dtype == "fp8" else act
    return shape.num_hidden_layers * layer * per + 2 * v * h * act


def _kv_bytes_per_token(shape: ModelShape, dtype: str) -> int:
    hd = shape.hidden_size // shape.num_attention_heads
    return 2 * shape.num_hidden_layers * shape.num_key_value_heads * hd * (4 if dtype == "fp32" else 2)


async def _one_batch(engine: Any, poller: EnergyPoller, name: str, dtype: str, shape: ModelShape, batch: int,
                     prompt_tokens: int, new_tokens: int, copy_tb_s: float, salt: int) -> BatchResult:  # fmt: skip
    loop = asyncio.get_running_loop()
    times: dict[str, list[int]] = {}
    ended: dict[str, asyncio.Future[None]] = {}
    regular = shape.vocab_size - 256

    def callback(rid: str) -> Any:
        times[rid] = []
        ended[rid] = loop.create_future()

        def on_output(out: EngineOutput) -> None:
            now = time.perf_counter_ns()
            times[rid].extend([now] * (len(out.tokens) - len(times[rid])))
            if out.error is not None and not ended[rid].done():
                ended[rid].set_exception(RuntimeError(out.error))
            elif out.finished and not ended[rid].done():
                ended[rid].set_result(None)

        return on_output

    t0 = time.perf_counter_ns()
    for k in range(batch):
        prompt = [(salt * 7919 + k * 104_729 + j * 31) % regular for j in range(prompt_tokens)]
        rid = f"b{batch}-{salt}-{k}"
        engine.submit(rid, prompt, new_tokens, None, callback(rid))
    await asyncio.wait_for(asyncio.gather(*ended.values()), 900)
    last_first = max(t[0] for t in times.values())
    first_last = min(t[-1] for t in times.values())
    late = max(times.values(), key=lambda t: t[0])
    steps = sum(1 for t in late[1:] if t <= first_last)
    span_ns = first_last - last_first
    ms = span_ns / 1e6 / steps if steps else math.nan
    energy = poller.energy_j(last_first, first_last)
    power = energy / (span_ns / 1e9) if span_ns > 0 else math.nan
    mean_len = prompt_tokens + new_tokens / 2
    floor_ms = (_weight_bytes(shape, dtype) + batch * mean_len * _kv_bytes_per_token(shape, dtype)) / (copy_tb_s * 1e9)
    return BatchResult(
        engine=name,
        dtype=dtype,
        batch=batch,
        prompt_tokens=prompt_tokens,
        new_tokens=new_tokens,
        prefill_s=(last_first - t0) / 1e9,
        ms_per_token=ms,
        steps=steps,
        span_s=span_ns / 1e9,
        power_w=power,
        j_per_token=power * ms / 1000 / batch,
        floor_ms=floor_ms,
        floor_ratio=ms / floor_ms,
    )


def run_child(spec: str, args: argparse.Namespace) -> EngineResult:
    """Build one engine, measure every batch of its spec."""
    name, dtype, sizes = spec.split(":")
    batches = [int(b) for b in sizes.split(",")]
    shape = TINY if args.tiny else LLAMA3_8B
    copy_tb_s = copy_bandwidth_tb_s(args.device)
    new = args.new_tokens if name.startswith("graph") else args.cb_new_tokens
    max_len = args.prompt_tokens + new
    if name in ("graph", "graph-eager"):
        from bench.gpu.graph_engine import GraphEngine, GraphEngineConfig

        config = GraphEngineConfig(
            shape=shape,
            device=args.device,
            dtype=dtype,
            max_batch_size=max(batches),
            max_len=max_len,
            cuda_graphs=name == "graph",
        )
        engine: Any = GraphEngine(config)
    elif name == "cb":
        from bench.gpu.reference_engine import CBEngine, EngineConfig

        engine = CBEngine(
            EngineConfig(shape=shape, device=args.device, dtype=dtype, num_blocks=None if args.device != "cpu" else 64)
        )
    else:
        raise ValueError(f"unknown engine {name!r} (graph | graph-eager | cb)")
    poller = EnergyPoller().start()

    async def main() -> tuple[float, list[BatchResult]]:
        t_idle = time.perf_counter_ns()
        await asyncio.sleep(1.5)
        idle_w = poller.energy_j(t_idle + 100_000_000, time.perf_counter_ns()) / 1.4
        await _one_batch(engine, poller, name, dtype, shape, 1, 16, 4, copy_tb_s, salt=999)  # warm the path
        out = []
        for i, b in enumerate(batches):
            r = await _one_batch(engine, poller, name, dtype, shape, b, args.prompt_tokens, new, copy_tb_s, salt=i)
            print(f"  {name} {dtype} batch {b}: {r.ms_per_token:.2f} ms/token, {r.power_w:.0f} W", flush=True)
            out.append(r)
            await asyncio.sleep(0.3)
        return idle_w, out

    try:
        idle_w, results = asyncio.run(main())
    finally:
        poller.stop()
        engine.stop()
    return EngineResult(
        engine=name,
        dtype=dtype,
        build_s=engine.build_s,
        start_s=engine.start_s,
        idle_w=idle_w,
        weight_gb=_weight_bytes(shape, dtype) / 1e9,
        copy_tb_s=copy_tb_s,
        batches=results,
    )


def result_key(r: BatchResult, what: str) -> str:
    dtype = "" if r.dtype == "bf16" else f"_{r.dtype}"
    return f"{r.engine.replace('-', '_')}{dtype}_{what}_b{r.batch}"


def result_line(results: list[EngineResult]) -> str:
    parts = []
    for e in results:
        for r in e.batches:
            parts.append(f"{result_key(r, 'ms_per_token')}={r.ms_per_token:.2f}")
            parts.append(f"{result_key(r, 'w')}={r.power_w:.0f}")
            parts.append(f"{result_key(r, 'floor_ratio')}={r.floor_ratio:.2f}")
    return "RESULT " + " ".join(parts)


def table(results: list[EngineResult]) -> str:
    head = "engine       dtype batch  ms/token  floor ms  x floor     W  J/token  prefill s  steps  idle W"
    lines = [head]
    for e in results:
        for r in e.batches:
            lines.append(
                f"{r.engine:12s} {r.dtype:5s} {r.batch:5d} {r.ms_per_token:9.2f} {r.floor_ms:9.2f} {r.floor_ratio:8.2f}"
                f" {r.power_w:5.0f} {r.j_per_token:8.3f} {r.prefill_s:10.2f} {r.steps:6d} {e.idle_w:7.0f}"
            )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--engines", default="graph:bf16:1,8,32,64;cb:bf16:1,8,32,64", help="ENGINE:DTYPE:B,B,...;...")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=256, help="graph engine")
    ap.add_argument("--cb-new-tokens", type=int, default=48, help="cb engine (~75 ms a step on an H100)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.child is not None:
        result = run_child(args.child, args)
        (args.out / f"child-{os.getpid()}.json").write_text(json.dumps(asdict(result)))
        return
    results: list[EngineResult] = []
    for spec in args.engines.split(";"):
        print(f"engine {spec}", flush=True)
        before = set(args.out.glob("child-*.json"))
        cmd = [sys.executable, "-m", "bench.gpu.engine_bench", "--child", spec, *sys.argv[1:]]
        done = subprocess.run(cmd, check=False)
        new = sorted(set(args.out.glob("child-*.json")) - before)
        if done.returncode != 0 or not new:
            print(f"engine {spec} failed (exit {done.returncode})", flush=True)
            continue
        doc = json.loads(new[0].read_text())
        new[0].unlink()
        results.append(EngineResult(**{**doc, "batches": [BatchResult(**b) for b in doc["batches"]]}))
    (args.out / "engine_bench.json").write_text(json.dumps([asdict(r) for r in results], indent=1))
    print(table(results))
    for e in results:
        print(
            f"{e.engine} {e.dtype}: weights {e.weight_gb:.1f} GB, copy {e.copy_tb_s:.2f} TB/s, "
            f"build {e.build_s:.1f} s, start {e.start_s:.1f} s, idle {e.idle_w:.0f} W"
        )
    print(result_line(results), flush=True)


if __name__ == "__main__":
    main()
