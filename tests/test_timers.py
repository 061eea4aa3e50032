"""The monitor's timer heap: order, cancellation within a batch, slices (no processes)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any, Callable

from ralph_reaper.timers import TimerHeap


def _due(n: int) -> tuple[TimerHeap, list[list[Any]], list[int]]:
    heap = TimerHeap()
    ran: list[int] = []
    past = time.monotonic() - 1.0
    timers = [heap.schedule(past + i * 1e-6, ran.append, i) for i in range(n)]
    return heap, timers, ran


def _call(fn: Callable[[Any], None], arg: Any) -> None:
    fn(arg)


def test_a_slice_runs_the_earliest_in_order_and_says_more_are_due() -> None:
    heap, _timers, ran = _due(10)
    assert heap.run_due(_call, limit=4) is True
    assert ran == [0, 1, 2, 3]
    assert heap.run_due(_call) is False
    assert ran == list(range(10))


def test_one_cancelled_by_an_earlier_one_of_its_batch_never_runs() -> None:
    """Cancelling most of the heap from a callback rebuilds it mid-batch: nothing of the
    batch or the heap is lost, and nothing cancelled runs."""
    heap, timers, ran = _due(100)

    def run(fn: Callable[[Any], None], arg: Any) -> None:
        fn(arg)
        if arg == 3:
            for timer in timers[4:90]:
                heap.cancel(timer)

    assert heap.run_due(run, limit=10) is True
    assert ran == [0, 1, 2, 3]
    assert heap.run_due(run) is False
    assert ran == [0, 1, 2, 3, *range(90, 100)]
    assert heap.next_due() is None


def test_past_its_time_budget_a_slice_puts_the_rest_back_in_order() -> None:
    heap, _timers, ran = _due(6)
    assert heap.run_due(_call, until=time.monotonic() - 1.0) is True
    assert ran == [0]  # the first always runs: every slice makes progress
    assert heap.run_due(_call) is False
    assert ran == list(range(6))


def test_a_batch_runs_inside_what_prepare_gives_for_its_arguments() -> None:
    heap, _timers, ran = _due(5)
    seen: list[list[Any]] = []
    inside: list[bool] = []
    state = {"open": False}

    @contextlib.contextmanager
    def prepare(args: list[Any]) -> Iterator[None]:
        seen.append(list(args))
        state["open"] = True
        yield
        state["open"] = False

    def run(fn: Callable[[Any], None], arg: Any) -> None:
        inside.append(state["open"])
        fn(arg)

    heap.run_due(run, limit=3, prepare=prepare)
    heap.run_due(run, prepare=prepare)
    assert seen == [[0, 1, 2], [3, 4]]
    assert inside == [True] * 5 and ran == list(range(5))


def test_due_args_names_every_live_timer_due_now_and_no_other() -> None:
    """What a batch's shared walk is made of: the due timers left after a slice."""
    heap, timers, ran = _due(10)
    heap.cancel(timers[5])
    later = heap.schedule(time.monotonic() + 3600.0, ran.append, 99)
    assert heap.run_due(_call, limit=3) is True
    assert sorted(heap.due_args()) == [3, 4, 6, 7, 8, 9]
    heap.cancel(later)
    assert heap.run_due(_call) is False
    assert heap.due_args() == []
