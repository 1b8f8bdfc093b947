"""The GPU-bound reference engine (bench/gpu/static_llama.py, bench/gpu/graph_engine.py) on a tiny model.

What has to hold for its energy figures to mean anything: it computes a real Llama forward (the tokens transformers'
``LlamaForCausalLM`` picks greedily, when transformers is importable), its KV cache and batching change nothing (a
request's tokens are the same alone, in a batch with others of other lengths, and as a full recompute of the prompt
plus what it generated), and as an ``Engine`` it keeps the contract the HTTP layer relies on (cumulative outputs,
nothing after cancel, slots reused, requests beyond the slots wait, a dead thread fails what it held).

They need torch (the CPU wheel: not a joulegate dependency) and are skipped without it; the one marked ``gpu`` needs
CUDA and compares graph replays with eager steps.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
from typing import Any

import pytest

from bench.gpu.graph_engine import GraphEngineConfig, bucket_for, buckets
from bench.gpu.reference_engine import TINY, EngineOutput
from tests.waiting import wait_until_async

torch = pytest.importorskip("torch")

from bench.gpu.graph_engine import GraphEngine  # noqa: E402
from bench.gpu.static_llama import StaticLlama, linear, quantize_fp8  # noqa: E402

VOCAB_REGULAR = TINY.vocab_size - 256


def _prompts(lengths: list[int], seed: int = 5) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB_REGULAR, (n,), generator=g).tolist() for n in lengths]


def _greedy(model: StaticLlama, prompts: list[list[int]], slots: list[int], new: int, length: int) -> list[list[int]]:
    """Prefill the prompts together, then decode them together with eager steps over rows [0, max slot]."""
    first, _ = model.prefill(prompts, slots)
    out = [[t] for t in first]
    batch = max(slots) + 1
    for step in range(new - 1):
        for i, slot in enumerate(slots):
            model.in_tokens[slot] = out[i][-1]
            model.in_positions[slot] = len(prompts[i]) + step
        model.decode_step(batch, length)
        for i, slot in enumerate(slots):
            out[i].append(int(model.out_tokens[slot]))
    return out


# --- pure ---


def test_buckets_cover_every_size_with_the_smallest_bucket() -> None:
    assert buckets(64) == [1, 2, 4, 8, 16, 32, 64]
    assert buckets(48) == [1, 2, 4, 8, 16, 32, 48]
    assert buckets(1152, 128) == [128, 256, 512, 1024, 1152]
    assert buckets(1) == [1]
    sizes = buckets(48)
    assert [bucket_for(n, sizes) for n in (1, 2, 3, 33, 48)] == [1, 2, 4, 48, 48]
    with pytest.raises(ValueError, match="exceeds"):
        bucket_for(49, sizes)


# --- the model ---


@pytest.fixture(scope="module")
def model() -> StaticLlama:
    with torch.inference_mode():
        return StaticLlama(TINY, dtype="fp32", device="cpu", slots=8, max_len=256, seed=1)


@torch.inference_mode()
def test_batching_and_the_cache_change_no_token(model: StaticLlama) -> None:
    prompts = _prompts([7, 30, 1, 19])
    together = _greedy(model, prompts, [5, 0, 3, 1], new=16, length=128)
    for i, p in enumerate(prompts):
        alone = _greedy(model, [p], [2], new=16, length=64)[0]
        assert alone == together[i], f"prompt {i}: alone {alone} vs batched {together[i]}"
    # a full recompute of prompt + generated prefix picks the same next token as the cached decode step
    p, gen = prompts[1], together[1]
    for k in (1, 5, 15):
        assert model.prefill([p + gen[:k]], [7])[0] == [gen[k]]


@torch.inference_mode()
def test_greedy_tokens_are_transformers_llamas(model: StaticLlama) -> None:
    if importlib.util.find_spec("transformers") is None:
        pytest.skip("transformers is not importable here (JOULEGATE_REFERENCE_PYTHON runs it)")
    from transformers import LlamaConfig, LlamaForCausalLM

    s = TINY
    hf = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=s.hidden_size,
            intermediate_size=s.intermediate_size,
            num_hidden_layers=s.num_hidden_layers,
            num_attention_heads=s.num_attention_heads,
            num_key_value_heads=s.num_key_value_heads,
            vocab_size=s.vocab_size,
            max_position_embeddings=s.max_position_embeddings,
            rope_theta=s.rope_theta,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
            attn_implementation="sdpa",
        )
    ).eval()
    hf.load_state_dict(model.state_dict_hf(), strict=True)
    prompts = _prompts([9, 40], seed=11)
    ours = _greedy(model, prompts, [0, 1], new=12, length=128)
    for p, mine in zip(prompts, ours, strict=True):
        ref = hf.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert ref[0, len(p) :].tolist() == mine


@torch.inference_mode()
def test_fp8_weights_and_products_stay_close_to_bf16() -> None:
    g = torch.Generator().manual_seed(3)
    w = torch.randn(128, 64, generator=g) * 0.02
    x = torch.randn(5, 64, generator=g)
    q = quantize_fp8(w)
    assert q.data.dtype == torch.float8_e4m3fn and q.scale.dtype == torch.float32
    ref = x @ w.T
    got = linear(x.bfloat16(), q).float()
    assert ((got - ref).norm() / ref.norm()).item() < 0.1
    fp8 = StaticLlama(TINY, dtype="fp8", device="cpu", slots=2, max_len=64, seed=1)
    bf16 = StaticLlama(TINY, dtype="bf16", device="cpu", slots=2, max_len=64, seed=1)
    matrices = sum(getattr(layer, f).numel() for layer in bf16.layers for f in ("qkv", "o", "gate_up", "down"))
    assert bf16.weight_bytes() - fp8.weight_bytes() == matrices  # one byte instead of two per layer weight
    assert fp8.parameters() == bf16.parameters()
    tokens = _greedy(fp8, _prompts([12]), [0], new=6, length=64)[0]
    assert len(tokens) == 6 and all(0 <= t < TINY.vocab_size for t in tokens)


def test_model_refuses_what_does_not_fit() -> None:
    with pytest.raises(ValueError, match="max_position_embeddings"):
        StaticLlama(TINY, dtype="fp32", device="cpu", slots=1, max_len=TINY.max_position_embeddings + 1)
    with pytest.raises(ValueError, match="dtype"):
        StaticLlama(TINY, dtype="int3", device="cpu", slots=1, max_len=16)
    m = StaticLlama(TINY, dtype="fp32", device="cpu", slots=1, max_len=16)
    with pytest.raises(ValueError, match="prompt lengths"):
        m.prefill([[1] * 17], [0])


# --- the engine ---


CONFIG = GraphEngineConfig(shape=TINY, device="cpu", dtype="fp32", seed=1, max_batch_size=3, max_len=96,
                           max_batch_tokens=128)  # fmt: skip


class Collector:
    """Outputs per request, and a future that resolves when the request ends."""

    def __init__(self) -> None:
        self.outputs: dict[str, list[EngineOutput]] = {}
        self.ended: dict[str, asyncio.Future[EngineOutput]] = {}

    def callback(self, request_id: str) -> Any:
        loop = asyncio.get_running_loop()
        self.outputs[request_id] = []
        self.ended[request_id] = loop.create_future()

        def on_output(out: EngineOutput) -> None:
            self.outputs[request_id].append(out)
            if (out.finished or out.error is not None) and not self.ended[request_id].done():
                self.ended[request_id].set_result(out)

        return on_output


@pytest.fixture
async def engine() -> Any:
    e = GraphEngine(CONFIG)
    yield e
    e.stop()


async def test_engine_streams_cumulative_outputs_and_more_requests_than_slots_all_finish(engine: GraphEngine) -> None:
    col = Collector()
    prompts = _prompts([5, 40, 17, 3, 60, 9])
    news = [8, 3, 1, 12, 5, 7]
    for i, (p, n) in enumerate(zip(prompts, news, strict=True)):
        engine.submit(f"r{i}", p, n, None, col.callback(f"r{i}"))
    finals = await asyncio.wait_for(asyncio.gather(*col.ended.values()), 30)
    with torch.inference_mode():
        for i, (p, n) in enumerate(zip(prompts, news, strict=True)):
            outs = col.outputs[f"r{i}"]
            assert [len(o.tokens) for o in outs] == list(range(1, n + 1))  # one output per token, cumulative
            assert [o.finished for o in outs] == [False] * (n - 1) + [True]
            assert all(o.tokens == finals[i].tokens[: len(o.tokens)] for o in outs)
            assert all(lp <= 0 for lp in finals[i].logprobs) and len(finals[i].logprobs) == n
            # the same tokens as the model alone, though 6 requests shared 3 slots
            assert finals[i].tokens == _greedy(engine.model, [p], [0], new=n, length=96)[0]
    stats = engine.stats()
    assert (stats["finished"], stats["failed"], stats["waiting_for_output"]) == (6, 0, 0)
    assert stats["engine_active"] == stats["engine_waiting"] == 0
    assert stats["prefill_tokens"] == sum(len(p) for p in prompts) and stats["prefill_s"] > 0
    assert stats["decode_tokens"] == sum(n - 1 for n in news)


async def test_cancel_stops_outputs_and_frees_the_slot(engine: GraphEngine) -> None:
    col = Collector()
    engine.submit("long", _prompts([10])[0], 80, None, col.callback("long"))
    await wait_until_async(lambda: len(col.outputs["long"]) >= 3)
    engine.cancel("long")
    seen = len(col.outputs["long"])
    await wait_until_async(lambda: engine.stats()["engine_active"] == 0)
    assert engine.stats()["cancelled"] == 1 and engine.stats()["waiting_for_output"] == 0
    # all three slots are free again: three requests run at once, and nothing more reached the cancelled one
    for i in range(3):
        engine.submit(f"s{i}", _prompts([4], seed=i)[0], 4, None, col.callback(f"s{i}"))
    await asyncio.wait_for(asyncio.gather(*(col.ended[f"s{i}"] for i in range(3))), 30)
    assert len(col.outputs["long"]) == seen
    engine.cancel("long")  # again, or after the end: nothing happens
    engine.cancel("s0")
    assert engine.stats()["cancelled"] == 1


async def test_eos_ends_a_request_and_one_token_requests_end_at_prefill(engine: GraphEngine) -> None:
    col = Collector()
    prompt = _prompts([6], seed=9)[0]
    engine.submit("free", prompt, 6, None, col.callback("free"))
    tokens = (await asyncio.wait_for(col.ended["free"], 30)).tokens
    engine.submit("eos", prompt, 6, tokens[2], col.callback("eos"))
    engine.submit("one", prompt, 1, None, col.callback("one"))
    assert (await asyncio.wait_for(col.ended["eos"], 30)).tokens == tokens[: tokens.index(tokens[2]) + 1]
    assert (await asyncio.wait_for(col.ended["one"], 30)).tokens == tokens[:1]


async def test_requests_that_cannot_fit_are_refused_at_submit(engine: GraphEngine) -> None:
    col = Collector()
    with pytest.raises(RuntimeError, match="exceed the cache"):
        engine.submit("big", [1] * 90, 8, None, col.callback("big"))
    with pytest.raises(RuntimeError, match="at least one"):
        engine.submit("empty", [], 8, None, col.callback("empty"))
    engine.submit("exact", [1] * 90, 7, None, col.callback("exact"))  # 90 + 7 - 1 = 96 positions: fits
    assert len((await asyncio.wait_for(col.ended["exact"], 30)).tokens) == 7


async def test_a_dead_generation_thread_fails_what_it_held(engine: GraphEngine, monkeypatch) -> None:
    col = Collector()

    def broken(batch: int, length: int) -> None:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(engine.model, "decode_step", broken)
    engine.submit("a", _prompts([5])[0], 4, None, col.callback("a"))
    engine.submit("b", _prompts([7])[0], 4, None, col.callback("b"))
    a, b = await asyncio.wait_for(asyncio.gather(col.ended["a"], col.ended["b"]), 30)
    assert a.error is not None and "illegal memory access" in a.error and b.error == a.error
    assert "illegal memory access" in (engine.fatal_error() or "")
    with pytest.raises(RuntimeError, match="illegal memory access"):
        engine.submit("c", [1], 1, None, col.callback("c"))
    assert engine.stats()["failed"] == 2


# --- CUDA graphs ---


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
async def test_graph_replays_give_the_eager_tokens() -> None:
    config = dataclasses.replace(
        CONFIG, device="cuda", dtype="bf16", max_batch_size=8, max_len=300, max_batch_tokens=512
    )
    graphs = GraphEngine(config)
    eager = GraphEngine(dataclasses.replace(config, cuda_graphs=False))
    try:
        assert graphs.stats()["cuda_graphs"] == len(graphs.batch_buckets) * len(graphs.length_buckets) > 1
        assert eager.stats()["cuda_graphs"] == 0
        results = []
        for e in (graphs, eager):
            col = Collector()
            prompts = _prompts([5, 140, 17, 3, 60, 9, 33, 2, 100])
            for i, p in enumerate(prompts):
                e.submit(f"r{i}", p, 150, None, col.callback(f"r{i}"))
            results.append([o.tokens for o in await asyncio.wait_for(asyncio.gather(*col.ended.values()), 60)])
        assert results[0] == results[1]
    finally:
        graphs.stop()
        eager.stop()


@pytest.mark.parametrize("dtype", ["bf16", "fp32", "fp8"])
def test_engine_bench_floor_counts_the_bytes_the_model_holds(dtype: str) -> None:
    from bench.gpu.engine_bench import _kv_bytes_per_token, _weight_bytes

    m = StaticLlama(TINY, dtype=dtype, device="cpu", slots=1, max_len=16)
    norms = (2 * len(m.layers) + 1) * TINY.hidden_size * m.final_norm.element_size()  # the floor leaves norms out
    assert _weight_bytes(TINY, dtype) == m.weight_bytes() - norms
    assert _kv_bytes_per_token(TINY, dtype) == m.kv_bytes_per_token()
