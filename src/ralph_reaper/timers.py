"""A heap of timers for one thread: schedule, cancel, run what is due.

Cancelled entries stay in the heap (removing from the middle of a heap is
O(n)) and are skipped when they come up; once they make up half of a large
heap it is rebuilt, so thousands of cancelled deadlines cost no memory for
long.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import time
from contextlib import AbstractContextManager
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

    def next_due(self) -> Optional[float]:
        """When the earliest live timer is due; None when there is none."""
        heap = self._heap
        while heap and heap[0][2] is None:
            heapq.heappop(heap)
            self._stale -= 1
        return heap[0][0] if heap else None

    def due_args(self) -> list[Any]:
        """The arguments of every live timer due now (a scan of the heap)."""
        now = time.monotonic()
        return [e[3] for e in self._heap if e[2] is not None and e[0] <= now]

    def run_due(
        self,
        run: Callable[[Callable[[Any], None], Any], None],
        limit: Optional[int] = None,
        until: Optional[float] = None,
        prepare: Optional[Callable[[list[Any]], AbstractContextManager[Any]]] = None,
    ) -> bool:
        """Run the timers due now, in order, through ``run(fn, arg)``; return whether
        more are due.

        At most ``limit`` of them, and none once the clock passes ``until``: a
        driver with other work (exits to report) takes turns. ``prepare(args)``,
        given the arguments of the batch about to run, returns a context that
        the batch runs in (one walk of their sessions, say). A timer cancelled
        by an earlier one of the batch never runs (a stale deadline would
        escalate a stop early).
        """
        heap = self._heap
        now = time.monotonic()
        batch: list[Timer] = []
        while heap and heap[0][0] <= now and (limit is None or len(batch) < limit):
            entry = heapq.heappop(heap)
            if entry[2] is None:
                self._stale -= 1
            else:
                batch.append(entry)
        ran = 0
        with prepare([e[3] for e in batch]) if prepare else contextlib.nullcontext():
            for entry in batch:
                fn, arg = entry[2], entry[3]
                if fn is None:  # cancelled while out of the heap: not counted there
                    self._stale = max(0, self._stale - 1)
                    continue
                if ran and until is not None and time.monotonic() >= until:
                    heapq.heappush(self._heap, entry)  # its turn comes again, in order
                    continue
                entry[2] = entry[3] = None
                run(fn, arg)
                ran += 1
        due = self.next_due()  # self._heap: a cancel in a callback may have rebuilt it
        return due is not None and due <= now
