"""The simulated engine's automatic prefix cache (vLLM's ``enable_prefix_caching``, on by default in its V1 engine;
SGLang's radix cache): a prompt whose leading tokens an earlier prompt already computed reuses their KV cache, and
its prefill computes only the rest.

As vLLM does it: the cache holds whole blocks (``block_tokens``, vLLM's default 16), each identified by the hash of
every token up to its end; a hit is the longest run of leading blocks found, and at least the prompt's last token is
computed again (vLLM recomputes it when a whole prompt hits). Blocks are remembered when the request is queued (vLLM
remembers them once computed: two identical prompts in the same step both compute here too — a simplification), and
the least recently used are forgotten past ``capacity_blocks``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence


class PrefixCache:
    def __init__(self, block_tokens: int = 16, capacity_blocks: int = 16_384) -> None:
        self.block_tokens = block_tokens
        self.capacity_blocks = capacity_blocks
        self._blocks: OrderedDict[int, None] = OrderedDict()

    def admit(self, token_ids: Sequence[int]) -> int:
        """The prompt's tokens found in the cache (a multiple of the block size, less than the prompt); remembers
        the prompt's whole blocks."""
        bs = self.block_tokens
        hits = 0
        missed = False
        h = 0
        for end in range(bs, len(token_ids) + 1, bs):
            h = hash((h, tuple(token_ids[end - bs : end])))
            if not missed and h in self._blocks:
                self._blocks.move_to_end(h)
                hits = end
                continue
            missed = True
            self._blocks[h] = None
            if len(self._blocks) > self.capacity_blocks:
                self._blocks.popitem(last=False)
        return min(hits, max(len(token_ids) - 1, 0))
