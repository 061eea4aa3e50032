"""Waits that end at their deadline although the kernel call counts milliseconds.

``poll`` and ``epoll_wait`` (all that ``select`` offers) take whole
milliseconds, and Python rounds a timeout up to the next one, so a wait for
200.3 ms ends at 201 ms: a stop's SIGKILL, due at its deadline, would be
sent up to a millisecond late on every stage. And the kernel lets a poll of
t end up to t/1000 late (5 ms on a grace of 5 s). Here the kernel gets whole
milliseconds, at most 1000/1001 of what is left, and the last fraction is
slept (``clock_nanosleep`` keeps microseconds), then polled once: what becomes
ready during that last fraction (under a millisecond) is seen at the deadline,
not when it happens. The C core waits to the microsecond (``ppoll``,
``epoll_pwait2``) in the same 1000/1001 steps.
"""

from __future__ import annotations

import select
import time
from typing import Callable, Optional, TypeVar

T = TypeVar("T")

#: The longest single kernel wait (an hour): a grace period of days goes in slices.
MAX_SLICE_MS = 3_600_000


def wait_until(poll_ms: Callable[[int], list[T]], deadline: Optional[float]) -> list[T]:
    """What ``poll_ms`` (whole milliseconds, -1 forever) finds ready by ``deadline``
    (``time.monotonic``; None: no deadline): the first non-empty answer, else ``[]``
    once the deadline has passed. Never returns before it with nothing."""
    while True:
        if deadline is None:
            found = poll_ms(MAX_SLICE_MS)
            if found:
                return found
            continue
        left = deadline - time.monotonic()
        if left <= 0.0:
            return poll_ms(0)
        whole = min(MAX_SLICE_MS, int(left * 1000.0 / 1.001))
        if whole:
            found = poll_ms(whole)
            if found:
                return found
            continue
        found = poll_ms(0)
        if found:
            return found
        time.sleep(left)


def epoll_ms(ep: select.epoll, max_events: int = -1) -> Callable[[int], list[tuple[int, int]]]:
    """``ep.poll`` in whole milliseconds. (It takes seconds and rounds them up: half a
    millisecond less than ``ms`` is exactly ``ms`` to it, whatever the float error.)"""

    def poll(ms: int) -> list[tuple[int, int]]:
        return ep.poll(-1 if ms < 0 else (ms - 0.5) / 1000.0 if ms else 0, max_events)

    return poll
