"""Multi-tenant traces for the Shapley checks: four tenants of distinct shapes, in scenes the GPU idles between.

Tenants (per scene; counts and sizes drawn from a seeded PRNG):

- ``long-prompt``: 1-2 requests, 600-1000 prompt tokens, 4-16 new tokens (summaries, classification);
- ``long-gen``: 1-2 requests, 16-64 prompt tokens, 150-320 new tokens (writing);
- ``burst``: 3 requests at the same instant, 100-400 prompt tokens, 20-80 new tokens (a batch job);
- ``tiny``: 2 requests at random instants, 4-24 prompt tokens, 1-6 new tokens (autocomplete, health probes).

Why scenes. The exact request-level Shapley values (``sim.shapley``) take 2^k replays for a group of k requests that
share the GPU, so the trace is a sequence of *scenes* of at most ``max_scene`` requests, each starting once every
coalition of the previous one is done (the gap is checked again, coalition by coalition, when the values are
computed). Within a scene the tenants overlap as they would under load; between scenes the GPU idles, which is also
what lets the meter measure the idle floor.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import replace

from sim.config import SimConfig
from sim.replay import TraceRequest, replay

NS_PER_MS = 1_000_000
NS_PER_S = 1_000_000_000
TENANTS = ("long-prompt", "long-gen", "burst", "tiny")
SHAPES = {
    "long-prompt": "1-2 x (600-1000 prompt, 4-16 new)",
    "long-gen": "1-2 x (16-64 prompt, 150-320 new)",
    "burst": "3 at once x (100-400 prompt, 20-80 new)",
    "tiny": "2 x (4-24 prompt, 1-6 new)",
}


def scene(rng: random.Random, index: int, tenants: Sequence[str] = TENANTS) -> list[TraceRequest]:
    """One scene's requests, arrival offsets from the scene's start (within its first 1.5 s)."""
    out: list[TraceRequest] = []

    def add(tenant: str, arrival_ms: float, prompt: int, new: int) -> None:
        out.append(
            TraceRequest(
                request_id=f"s{index:03d}-{tenant}-{len([r for r in out if r.tenant == tenant])}",
                tenant=tenant,
                arrival_ns=round(arrival_ms * NS_PER_MS),
                prompt_tokens=prompt,
                new_tokens=new,
            )
        )

    if "long-prompt" in tenants:
        for _ in range(rng.randint(1, 2)):
            add("long-prompt", rng.uniform(0, 1200), rng.randint(600, 1000), rng.randint(4, 16))
    if "long-gen" in tenants:
        for _ in range(rng.randint(1, 2)):
            add("long-gen", rng.uniform(0, 600), rng.randint(16, 64), rng.randint(150, 320))
    if "burst" in tenants:
        at = rng.uniform(0, 1500)
        for _ in range(3):
            add("burst", at, rng.randint(100, 400), rng.randint(20, 80))
    if "tiny" in tenants:
        for _ in range(2):
            add("tiny", rng.uniform(0, 1500), rng.randint(4, 24), rng.randint(1, 6))
    return out


def make_trace(
    seed: int,
    scenes: int,
    configs: Sequence[SimConfig],
    *,
    lead_ns: int = 2 * NS_PER_S,
    gap_ns: int = 1500 * NS_PER_MS,
    tenants: Sequence[str] = TENANTS,
) -> list[TraceRequest]:
    """``scenes`` scenes one after the other: each starts ``gap_ns`` after the previous one's last step under the
    slowest of ``configs`` (so one trace serves every cost model), the first ``lead_ns`` after the origin."""
    rng = random.Random(seed)
    out: list[TraceRequest] = []
    offset = lead_ns
    for index in range(scenes):
        requests = scene(rng, index, tenants)
        end = max(replay(requests, config, start_ns=0, tail_ns=0).last_activity_ns for config in configs)
        out += [replace(r, arrival_ns=r.arrival_ns + offset) for r in requests]
        offset += end + gap_ns
    return out
