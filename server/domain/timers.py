"""Realtime timers: for each person with realtime state, the next instant their memberships change by time alone.

A window that lapses or a session that ends flips a condition with no new
event. The evaluator says when (``next_change``); this index keeps one
deadline per slot in a heap with lazy deletion: rescheduling a slot pushes
a new entry and the superseded one is skipped when it reaches the top, so
every operation is O(log n) and nothing is searched.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable


class Timers:
    def __init__(self, on_earlier: Callable[[], None]) -> None:
        self.at: list[int | None] = []  # slot -> its deadline (None: none)
        self._heap: list[tuple[int, int]] = []
        self.on_earlier = on_earlier  # called when a deadline earlier than all others appears

    def add_slot(self) -> None:
        self.at.append(None)

    def set(self, slot: int, t: int | None) -> None:
        if t == self.at[slot]:
            return
        self.at[slot] = t
        if t is not None:
            earliest = not self._heap or t < self._heap[0][0]
            heapq.heappush(self._heap, (t, slot))
            if earliest:
                self.on_earlier()

    def next(self) -> int | None:
        """The earliest deadline, or None."""
        heap = self._heap
        while heap and heap[0][0] != self.at[heap[0][1]]:
            heapq.heappop(heap)  # superseded
        return heap[0][0] if heap else None

    def pop(self) -> tuple[int, int]:
        """Removes the earliest deadline (call ``next`` first): (instant, slot)."""
        t, slot = heapq.heappop(self._heap)
        self.at[slot] = None
        return t, slot
