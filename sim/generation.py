"""What one simulated sequence generates, token by token, and when it stops: deterministic and cheap.

Tokens come from the small vocabulary in ``sim.tokenizer`` through a PRNG seeded from the request's seed when
sampling, or from a hash of its inputs when greedy, so the same request always yields the same text.

Stopping follows TGI's ``StoppingCriteria`` (server/text_generation_server/utils/tokens.py), in its order:
``max_new_tokens`` reached -> ``length``; the EOS token -> ``eos_token``; the output so far ends with a stop
sequence -> ``stop_sequence``. The token that triggers the stop is part of the output (and of the text, EOS aside).

Magic markers in ``inputs`` make the model misbehave on purpose, deterministically (see sim/README.md):
``[[sim:error_after=N]]`` fails the generation after N tokens; ``[[sim:eos_after=N]]`` makes the N-th generated token
the EOS token.
"""

from __future__ import annotations

import random
import re
import zlib
from dataclasses import dataclass

from common.errors import JoulegateError
from sim.tokenizer import EOS_INDEX, REGULAR_VOCAB_SIZE, VOCAB, VocabEntry

_MARKER = re.compile(r"\[\[sim:([a-z_]+)=(\d+)\]\]")
STOP_TAIL_CHARS = 300  # TGI keeps the last 300 (then 200) characters of output for stop-sequence matching


@dataclass(frozen=True, slots=True)
class Markers:
    """Misbehaviour requested through ``[[sim:...]]`` markers in the inputs (None: not requested)."""

    error_after: int | None = None
    eos_after: int | None = None


def parse_markers(inputs: str) -> Markers:
    """Read the ``[[sim:name=N]]`` markers of ``inputs``; unknown names are plain text. The last one of a name wins."""
    if "[[sim:" not in inputs:
        return Markers()
    found: dict[str, int] = {}
    for name, value in _MARKER.findall(inputs):
        if name in ("error_after", "eos_after"):
            found[name] = int(value)
    return Markers(**found)


class GenerationFailed(JoulegateError):
    """The simulated model failed mid-generation (an ``error_after`` marker was reached)."""


@dataclass(frozen=True, slots=True)
class SequencePlan:
    """Everything a sequence needs to know to generate: fixed at validation."""

    max_new_tokens: int
    stop: tuple[str, ...]
    rng_seed: int
    top_n_tokens: int
    markers: Markers


def rng_seed_for(inputs: str, seed: int, sampling: bool) -> int:
    """A sampling request follows its seed (and inputs); a greedy one depends on its inputs only, like a model."""
    inputs_hash = zlib.crc32(inputs.encode("utf-8"))
    return (seed << 32) ^ inputs_hash if sampling else inputs_hash


class Sequence:
    """The generation state of one request. ``step()`` yields the next token and, on the last, the finish reason."""

    __slots__ = ("_eos_after", "_error_after", "_max_new", "_random", "_stop", "_tail", "generated", "plan")

    def __init__(self, plan: SequencePlan) -> None:
        self.plan = plan
        self.generated = 0
        self._random = random.Random(plan.rng_seed).random
        self._max_new = plan.max_new_tokens
        self._stop = plan.stop
        self._tail = ""
        self._error_after = plan.markers.error_after
        self._eos_after = plan.markers.eos_after

    def step(self) -> tuple[int, str | None]:
        """Generate one token: (vocabulary index, finish reason or None). Raises ``GenerationFailed``."""
        n = self.generated + 1
        if self._error_after is not None and n > self._error_after:
            raise GenerationFailed(f"Server error: simulated failure after {self._error_after} tokens")
        index = EOS_INDEX if n == self._eos_after else int(self._random() * REGULAR_VOCAB_SIZE)
        self.generated = n
        if n >= self._max_new:
            return index, "length"
        if index == EOS_INDEX:
            return index, "eos_token"
        if self._stop:
            tail = self._tail + VOCAB[index].text
            if len(tail) > STOP_TAIL_CHARS:
                tail = tail[-200:]
            self._tail = tail
            for stop in self._stop:
                if tail.endswith(stop):
                    return index, "stop_sequence"
        return index, None


def top_tokens(index: int, n: int) -> list[VocabEntry]:
    """The ``n`` "most likely" tokens where ``index`` was chosen: the choice first, then a fixed spread."""
    if n <= 0:
        return []
    picks = [index]
    k = 1
    while len(picks) < n:
        candidate = (index + 7 * k) % REGULAR_VOCAB_SIZE
        if candidate not in picks:
            picks.append(candidate)
        k += 1
    return [VOCAB[i] for i in picks]


def generated_text(indices: list[int]) -> str:
    """The text of generated tokens, special tokens skipped (TGI decodes with ``skip_special_tokens``)."""
    return "".join(VOCAB[i].text for i in indices if not VOCAB[i].special)
