"""Which backend a request goes to: the placement policies, as pure functions over a snapshot of the backends.

Both the gateway's pool (``proxy.backends.BackendPool``) and the offline fleet replay (``sim.fleet``, behind
``joulegate whatif`` and ``bench/orchestration.py``) call ``choose``, so what the what-if predicts is what the
gateway does.

- ``spread`` (the default): the backend with the fewest outstanding tokens (prompt plus tokens still to generate),
  the best cheap proxy for how long its queue is. At low load every request gets a GPU of its own.
- ``pack``: fill one backend up to ``pack_target`` requests in flight before opening the next: among the backends
  below the target, the *busiest* (most in flight; ties to the first in configuration order), so that at low load
  the same few GPUs take every request and the others sit at their idle floor (and could be parked). When every
  backend is at or past the target, the least loaded by outstanding tokens, as ``spread``. Never past a backend's
  free slots. With ``spill_on_prefill``, a backend whose latest request is still waiting for its first token is
  passed over while another below the target is not (trades some of the saving for TTFT; see ``choose``).

Why pack can save energy: a decode step reads all the weights whatever the batch (memory-bound), so a GPU decoding
a batch of two draws barely more than one decoding a batch of one (the simulator: 250 W + 4 W per sequence, steps
of 10 ms + 0.15 ms per sequence); two GPUs each decoding one sequence pay the floor twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

Policy = Literal["spread", "pack"]
POLICIES: tuple[Policy, ...] = ("spread", "pack")


@dataclass(frozen=True, slots=True)
class Load:
    """One backend as the policy sees it."""

    in_flight: int  # requests leased to it and not yet given back
    outstanding_tokens: int  # prompt plus tokens still to generate, over those requests
    free_slots: int  # how many more it may take now (0: full)
    available: bool = True  # healthy and not excluded (a retry's tried backends, a drained one)
    starting: int = 0  # of in_flight, those whose first token has not come back (their prefill is pending)


def choose(
    policy: Policy, loads: Sequence[Load], *, pack_target: int = 7, need: int = 1, spill_on_prefill: bool = False
) -> int | None:
    """The index into ``loads`` of the backend to use, or None when none is available with ``need`` free slots.

    ``spill_on_prefill`` (pack): pass over a backend whose last request still waits for its first token when another
    below the target has none: a request queued behind another's prefill waits for it (the TTFT tail), at the cost
    of waking a second backend more often (less to park)."""
    if pack_target < 1:
        raise ValueError(f"pack_target must be >= 1, got {pack_target}")
    candidates = [i for i, b in enumerate(loads) if b.available and b.free_slots >= need]
    if not candidates:
        return None
    if policy == "pack":
        below = [i for i in candidates if loads[i].in_flight < pack_target]
        if below:
            # the busiest below its target; ties to the first in order (min keeps the first)
            return min(below, key=lambda i: (spill_on_prefill and loads[i].starting > 0, -loads[i].in_flight))
    elif policy != "spread":
        raise ValueError(f"unknown placement policy {policy!r}; known: {', '.join(POLICIES)}")
    return min(candidates, key=lambda i: loads[i].outstanding_tokens)


def choose_batch(
    policy: Policy, loads: Sequence[Load], *, pack_target: int = 7, spill_on_prefill: bool = False
) -> int | None:
    """The backend for a batch the shaper released together (all of it goes to ONE backend, so TGI prefills it
    together, as many as fit its free slots): under ``spread`` the one with the most free slots (ties: fewest
    outstanding tokens, then the first), under ``pack`` the one a single request would get. None: none has room."""
    if policy == "pack":
        return choose(policy, loads, pack_target=pack_target, spill_on_prefill=spill_on_prefill)
    candidates = [i for i, b in enumerate(loads) if b.available and b.free_slots > 0]
    if not candidates:
        return None
    return min(candidates, key=lambda i: (-loads[i].free_slots, loads[i].outstanding_tokens))
