"""Weighted fair sharing between tenants inside one traffic class: self-clocked fair queueing by tokens.

Every request gets a virtual finish tag when it joins, ``F = max(v, F_last(tenant)) + cost / weight(tenant)``,
where ``cost`` is its token estimate (prompt + max new tokens: the work it asks for), ``F_last`` the tag of the
tenant's previous request and ``v`` the tag of the request picked last. Requests leave in tag order. A tenant that
floods the queue pushes only its *own* tags forward, so a light tenant's request is tagged close to ``v`` and goes
next; while several tenants are backlogged they receive tokens in proportion to their weights. An idle tenant
banks no credit (``max(v, ...)``), so it cannot burst ahead of everyone on its return.

Removal (cancellation, deadline) is O(1) with lazy deletion from the heaps, which are rebuilt when most of their
nodes are dead.
"""

from __future__ import annotations

import heapq
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T", bound=Hashable)


@dataclass(eq=False, slots=True)
class _Node(Generic[T]):
    item: T
    tenant: str
    tag: float
    seq: int
    arrived_s: float
    live: bool = field(default=True)


class FairQueue(Generic[T]):
    """Items of several tenants, picked in weighted-fair order (see the module docstring)."""

    def __init__(self) -> None:
        self._by_tag: list[tuple[float, int, _Node[T]]] = []
        self._by_age: list[tuple[float, int, _Node[T]]] = []
        self._nodes: dict[T, _Node[T]] = {}
        self._last_tag: dict[str, float] = {}
        self._virtual = 0.0
        self._seq = 0

    def __len__(self) -> int:
        return len(self._nodes)

    def __contains__(self, item: T) -> bool:
        return item in self._nodes

    def push(self, item: T, *, tenant: str, cost: float, weight: float, arrived_s: float) -> float:
        """Add ``item``; returns its finish tag."""
        if item in self._nodes:
            raise ValueError("item already queued")
        start = max(self._virtual, self._last_tag.get(tenant, 0.0))
        tag = start + max(cost, 1e-9) / weight
        self._last_tag[tenant] = tag
        self._seq += 1
        node = _Node(item, tenant, tag, self._seq, arrived_s)
        self._nodes[item] = node
        heapq.heappush(self._by_tag, (tag, node.seq, node))
        heapq.heappush(self._by_age, (arrived_s, node.seq, node))
        return tag

    def peek(self) -> T | None:
        self._skip_dead(self._by_tag)
        return self._by_tag[0][2].item if self._by_tag else None

    def pop(self) -> T:
        self._skip_dead(self._by_tag)
        if not self._by_tag:
            raise IndexError("pop from an empty FairQueue")
        tag, _seq, node = heapq.heappop(self._by_tag)
        node.live = False
        del self._nodes[node.item]
        self._virtual = max(self._virtual, tag)
        if not self._nodes:
            self._reset_heaps()
        return node.item

    def remove(self, item: T) -> bool:
        """Take ``item`` out wherever it is; False when it was not queued."""
        node = self._nodes.pop(item, None)
        if node is None:
            return False
        node.live = False
        if not self._nodes:
            self._reset_heaps()
        elif len(self._by_tag) > 64 and len(self._by_tag) > 3 * len(self._nodes):
            self._compact()
        return True

    def oldest_s(self) -> float | None:
        """Arrival time of the longest-waiting item."""
        self._skip_dead(self._by_age)
        return self._by_age[0][0] if self._by_age else None

    # -- internals -------------------------------------------------------------------------------------------
    @staticmethod
    def _skip_dead(heap: list[tuple[float, int, _Node[T]]]) -> None:
        while heap and not heap[0][2].live:
            heapq.heappop(heap)

    def _reset_heaps(self) -> None:
        self._by_tag.clear()
        self._by_age.clear()
        # tags at or below v no longer matter (max(v, tag) = v): forget them so the map stays small
        self._last_tag = {t: tag for t, tag in self._last_tag.items() if tag > self._virtual}

    def _compact(self) -> None:
        self._by_tag = [e for e in self._by_tag if e[2].live]
        self._by_age = [e for e in self._by_age if e[2].live]
        heapq.heapify(self._by_tag)
        heapq.heapify(self._by_age)
        self._last_tag = {t: tag for t, tag in self._last_tag.items() if tag > self._virtual}
