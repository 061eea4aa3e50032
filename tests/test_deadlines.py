"""A timed wait ends at its deadline, not at the next whole millisecond after it.

The rule (``backends.deadlines``): whole milliseconds go to the kernel, never
more than are left, and the last fraction is slept. The first test checks the
rule itself against a recording ``poll``; the second checks, on real pidfds,
the half of it that a test can check without timing the machine: a wait never
ends before its deadline.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from ralph_reaper import backends
from ralph_reaper.backends.deadlines import wait_until


def test_the_kernel_is_never_handed_more_milliseconds_than_are_left() -> None:
    calls: list[tuple[int, float]] = []
    deadline = time.monotonic() + 0.0123

    def poll_ms(ms: int) -> list[int]:
        calls.append((ms, deadline - time.monotonic()))
        if ms > 0:
            time.sleep(ms / 1000.0)
        return []

    assert wait_until(poll_ms, deadline) == []
    assert time.monotonic() >= deadline
    assert calls[0][0] == 12  # 12.3 ms: 12 to the kernel (12.012 at worst), the rest slept
    assert all(ms == 0 or ms / 1000.0 <= left for ms, left in calls)
    assert calls[-1][0] == 0  # the deadline's own look


def test_an_answer_returns_at_once_and_no_deadline_means_none() -> None:
    answers = iter([[], [], [7]])
    seen: list[int] = []

    def poll_ms(ms: int) -> list[int]:
        seen.append(ms)
        return next(answers)

    assert wait_until(poll_ms, None) == [7]
    assert all(ms > 0 for ms in seen)  # no deadline: slices of time, never a spin
    # A wait of two hours goes to the kernel an hour at a time.
    assert wait_until(lambda ms: [ms], time.monotonic() + 7200.0) == [3_600_000]


@pytest.mark.parametrize("timeout_s", [0.0003, 0.0013, 0.0207])
def test_a_timed_drain_or_wait_of_a_running_child_never_ends_early(
    backend: str, timeout_s: float
) -> None:
    b = backends.get()
    if not b.has_pidfd:
        pytest.skip(f"backend {backend} has no pidfds: it waits by polling")
    pid = os.posix_spawn("/bin/sleep", ["sleep", "30"], dict(os.environ))
    fd = b.pidfd_open(pid)
    epset = b.epoll_set()
    try:
        epset.add(fd, 1)
        t0 = time.monotonic()
        assert epset.drain(timeout_s) == []
        assert time.monotonic() - t0 >= timeout_s
        t0 = time.monotonic()
        assert b.wait_readable([fd], timeout_s) == []
        assert time.monotonic() - t0 >= timeout_s
    finally:
        epset.close()
        signal.pidfd_send_signal(fd, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(fd)
