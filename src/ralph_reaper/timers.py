"""A heap of timers for one thread: schedule, cancel, run what is due.

Cancelled entries stay in the heap (removing from the middle of a heap is
O(n)) and are skipped when they come up; once they make up half of a large
heap it is rebuilt, so thousands of cancelled deadlines cost no memory for
long.
"""

from __future__ import annotations

import heapq
import itertools
import time
from typing import Any, Callable, Optional

#: Rebuild once this many cancelled timers make up half the heap.
COMPACT_MIN = 64

Timer = list[Any]  # [when, seq, fn or None, arg]


class TimerHeap:
    def __init__(self) -> None:
        self._heap: list[Timer] = []
        self._seq = itertools.count()
        self._stale = 0

    def schedule(self, when: float, fn: Callable[[Any], None], arg: Any) -> Timer:
        entry: Timer = [when, next(self._seq), fn, arg]
        heapq.heappush(self._heap, entry)
        return entry

    def cancel(self, entry: Optional[Timer]) -> None:
        if entry is None or entry[2] is None:
            return
        entry[2] = entry[3] = None
        self._stale += 1
        if self._stale > COMPACT_MIN and self._stale * 2 > len(self._heap):
            self._heap = [e for e in self._heap if e[2] is not None]
            heapq.heapify(self._heap)
            self._stale = 0

    def __len__(self) -> int:
        """How many timers the heap holds (cancelled ones not yet dropped included)."""
        return len(self._heap)

    def next_due(self) -> Optional[float]:
        """When the earliest live timer is due; None when there is none."""
        heap = self._heap
        while heap and heap[0][2] is None:
            heapq.heappop(heap)
            self._stale -= 1
        return heap[0][0] if heap else None

    def due_args(self, limit: int) -> list[Any]:
        """The arguments of the (at most ``limit``) timers that :meth:`run_due` would run
        next, earliest first: what a driver prepares for before running them."""
        now = time.monotonic()
        return [
            e[3]
            for e in heapq.nsmallest(limit, (e for e in self._heap if e[2] is not None))
            if e[0] <= now
        ]

    def run_due(
        self,
        run: Callable[[Callable[[Any], None], Any], None],
        limit: Optional[int] = None,
        until: Optional[float] = None,
    ) -> bool:
        """Run the timers due now, in order, through ``run(fn, arg)``. Each is taken
        out just before it runs, so that one cancelled by an earlier one never runs
        (a stale deadline would escalate a stop early).

        At most ``limit`` of them, and none once the clock passes ``until``: a
        driver with other work (exits to report) takes turns. Returns whether
        more are due.
        """
        heap = self._heap
        now = time.monotonic()
        ran = 0
        while heap and heap[0][0] <= now:
            if (limit is not None and ran >= limit) or (
                until is not None and ran and time.monotonic() >= until
            ):
                return True
            entry = heapq.heappop(heap)
            fn, arg = entry[2], entry[3]
            if fn is None:
                self._stale -= 1
                continue
            entry[2] = entry[3] = None
            run(fn, arg)
            ran += 1
        return False
