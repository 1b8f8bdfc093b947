"""How many tokens a tenant's prompts really count per four characters, learned from the backends' own counts.

Why. Before a backend has counted a prompt the gateway estimates it at four characters a token (no tokenizer on the
request path), and that estimate weighs a call wherever the gateway must decide before the count: the shaping
queue's fair shares and token bounds, the backend pool's token balance, the rate limits' admission, the budgets'
reservations. Four characters a token holds for English prose; punctuation, CJK text and emoji count one token a
character or more, so a tenant writing them weighed a quarter of what it costs, in every one of those decisions.
The count each call ends with is known (TGI's ``input_length``, the OpenAI routes' ``usage``, or ``/tokenize``): the
ratio of counted to estimated tokens, per tenant and model, decayed so that it follows a tenant that changes what it
sends, scales the tenant's next estimates.

The scale is never below 1 (``lo``): prompts that count fewer tokens than four characters a token (runs of
whitespace) would otherwise teach a scale that a burst of prompts counting many tokens is then estimated at, deeper
under than the plain estimate ever was. What a tenant can still do: switch from prose to prompts that count many
tokens; the calls sent before the ratio catches up (about ``1 / (1 - decay)`` calls' worth of tokens) are estimated
at the old ratio, as without this. The rate limits and budgets settle each call's own count afterwards; the queue's
fairness does not.
"""

from __future__ import annotations

from dataclasses import dataclass

CHARS_PER_TOKEN = 4


@dataclass(slots=True)
class _Sums:
    counted: float = 0.0
    estimated: float = 0.0


class PromptScale:
    """Per (tenant, model): counted / estimated prompt tokens, token-weighted, with older calls decayed."""

    def __init__(self, *, decay: float = 0.8, lo: float = 1.0, hi: float = 16.0, max_keys: int = 100_000) -> None:
        self.decay = decay
        self.lo, self.hi = lo, hi
        self.max_keys = max_keys
        self._sums: dict[tuple[str, str], _Sums] = {}

    def scale(self, tenant: str, model_id: str) -> float:
        """What to multiply the four-characters estimate by for this tenant's next call to ``model_id`` (1.0 before
        any count)."""
        sums = self._sums.get((tenant, model_id))
        if sums is None or sums.estimated <= 0:
            return 1.0
        return min(self.hi, max(self.lo, sums.counted / sums.estimated))

    def observe(self, tenant: str, model_id: str, chars: int, counted: int) -> None:
        """A call of ``chars`` prompt characters that the backend counted as ``counted`` tokens."""
        if chars <= 0 or counted <= 0:
            return
        key = (tenant, model_id)
        sums = self._sums.get(key)
        if sums is None:
            if len(self._sums) >= self.max_keys:  # tenants come from keys, models from the configuration: bounded
                self._sums.clear()
            sums = self._sums[key] = _Sums()
        sums.counted = sums.counted * self.decay + counted
        sums.estimated = sums.estimated * self.decay + chars / CHARS_PER_TOKEN
