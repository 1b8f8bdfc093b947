"""Arrival traces for the shaping benchmarks: Poisson and bursty (on/off Markov-modulated Poisson) open-loop arrivals.

A trace is fixed before any policy runs (one seed per scenario), so every policy serves exactly the same requests at
exactly the same offsets: prompt length, generation length and the prompt's text (a salt) included. Traces are
*open loop*: a request arrives when the trace says, whatever the server is doing, as users do; holding requests in the
gateway cannot move an arrival earlier, which is why idle power between sparse arrivals stays on the bill whatever
the policy.

The bursty trace alternates ON periods (Poisson at ``rate x (on_s + off_s) / on_s``) and silent OFF periods, both of
exponentially distributed length, so that its mean rate equals the Poisson trace's at the same load.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

TRACE_KINDS = ("poisson", "bursty")


@dataclass(frozen=True, slots=True)
class Arrival:
    """One request of a trace: when it arrives (s after the trace starts) and what it asks for."""

    offset_s: float
    prompt_tokens: int  # including the BOS token, as TGI counts input_length
    new_tokens: int  # max_new_tokens; the backends used here always generate exactly this many
    salt: int  # picks the prompt's text (distinct prompts, no shared prefixes)


@dataclass(frozen=True, slots=True)
class Lengths:
    """Uniform ranges (inclusive) of prompt and generation lengths in tokens."""

    prompt_min_tokens: int = 200
    prompt_max_tokens: int = 800
    new_min_tokens: int = 64
    new_max_tokens: int = 256

    @property
    def mean_prompt_tokens(self) -> float:
        return (self.prompt_min_tokens + self.prompt_max_tokens) / 2

    @property
    def mean_new_tokens(self) -> float:
        return (self.new_min_tokens + self.new_max_tokens) / 2

    def describe(self) -> str:
        return (
            f"prompts U[{self.prompt_min_tokens}, {self.prompt_max_tokens}] tokens, "
            f"new tokens U[{self.new_min_tokens}, {self.new_max_tokens}]"
        )


@dataclass(frozen=True, slots=True)
class Trace:
    kind: str  # "poisson" | "bursty"
    load: str  # a label: "low", "medium", "high"
    rate_per_s: float  # mean arrival rate
    duration_s: float  # arrivals fall in [0, duration_s)
    arrivals: tuple[Arrival, ...]

    @property
    def name(self) -> str:
        return f"{self.kind}-{self.load}"

    @property
    def last_offset_s(self) -> float:
        return self.arrivals[-1].offset_s if self.arrivals else 0.0


@dataclass(frozen=True, slots=True)
class Burstiness:
    """On/off modulation of the bursty trace: mean ON and OFF period lengths."""

    on_s: float = 2.0
    off_s: float = 6.0

    @property
    def peak_factor(self) -> float:
        """ON rate / mean rate."""
        return (self.on_s + self.off_s) / self.on_s


def _offsets_poisson(rng: random.Random, rate_per_s: float, duration_s: float) -> list[float]:
    out: list[float] = []
    t = rng.expovariate(rate_per_s)
    while t < duration_s:
        out.append(t)
        t += rng.expovariate(rate_per_s)
    return out


def _offsets_onoff(rng: random.Random, rate_per_s: float, duration_s: float, burst: Burstiness) -> list[float]:
    on_rate = rate_per_s * burst.peak_factor
    out: list[float] = []
    t = rng.expovariate(1 / burst.off_s) * rng.random()  # start somewhere in an OFF period
    while t < duration_s:
        on_end = min(duration_s, t + rng.expovariate(1 / burst.on_s))
        t += rng.expovariate(on_rate)
        while t < on_end:
            out.append(t)
            t += rng.expovariate(on_rate)
        t = on_end + rng.expovariate(1 / burst.off_s)
    return out


def make_trace(
    kind: str,
    load: str,
    rate_per_s: float,
    duration_s: float,
    seed: int,
    lengths: Lengths = Lengths(),
    burst: Burstiness = Burstiness(),
    min_requests: int = 2,
) -> Trace:
    """A trace of ``kind`` at mean ``rate_per_s`` over ``duration_s``; the same arguments give the same trace.

    A trace with fewer than ``min_requests`` arrivals (possible at low load over a short span) is redrawn with the next
    seed, so that every scenario has something to measure; the seed actually used is deterministic too.
    """
    if kind not in TRACE_KINDS:
        raise ValueError(f"unknown trace kind {kind!r} (known: {', '.join(TRACE_KINDS)})")
    if rate_per_s <= 0 or duration_s <= 0:
        raise ValueError("rate_per_s and duration_s must be > 0")
    for attempt in range(100):
        rng = random.Random(f"{seed + attempt}:{kind}:{load}")
        if kind == "poisson":
            offsets = _offsets_poisson(rng, rate_per_s, duration_s)
        else:
            offsets = _offsets_onoff(rng, rate_per_s, duration_s, burst)
        if len(offsets) >= min_requests:
            break
    arrivals = tuple(
        Arrival(
            offset_s=t,
            prompt_tokens=rng.randint(lengths.prompt_min_tokens, lengths.prompt_max_tokens),
            new_tokens=rng.randint(lengths.new_min_tokens, lengths.new_max_tokens),
            salt=rng.randrange(1 << 30),
        )
        for t in offsets
    )
    return Trace(kind, load, rate_per_s, duration_s, arrivals)
