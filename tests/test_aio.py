"""ralph_reaper.aio: the awaitable wait and the asyncio monitor, for every backend.

Each test drives its own event loop with ``asyncio.run``. No duration is
asserted: waits that must end on the exit itself get an hour-long poll
interval, so a timer-driven implementation would hit pytest-timeout instead.
The autouse ``no_leftovers`` fixture (conftest.py) fails any test that leaves
a process, a zombie or an fd (a pidfd, the loop's own fds) behind.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
from types import SimpleNamespace
from typing import Optional

import pytest

import procs
from procs import Kids
from ralph_reaper import (
    DispatchCompletionResult,
    DispatchCompletionStatus,
    aio,
    graceful_terminate_dispatch,
    spawn_dispatch,
)

HOUR_MS = 3_600_000.0


def dispatch(pid: Optional[int]) -> SimpleNamespace:
    return SimpleNamespace(pid=pid, session_id="sess")


def pidfds() -> list[int]:
    """The pidfds this process holds."""
    out = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if "pidfd" in os.readlink(f"/proc/self/fd/{name}"):
                out.append(int(name))
        except OSError:
            continue
    return out


def assert_exit(result: DispatchCompletionResult, code: int) -> None:
    assert result.return_code == code, result
    assert result.termination_method == "natural"
    expected = DispatchCompletionStatus.COMPLETED if code == 0 else DispatchCompletionStatus.ERROR
    assert result.status is expected


# --------------------------------------------------------------------------------------
# aio.wait_for_dispatch_completion


@pytest.mark.parametrize("code", [0, 3, 255])
def test_wait_exit_code(backend: str, kids: Kids, code: int) -> None:
    proc = kids.sh(f"sleep 0.05; exit {code}")
    result = asyncio.run(
        aio.wait_for_dispatch_completion(dispatch(proc.pid), "pt-1", poll_interval_ms=HOUR_MS)
    )
    assert_exit(result, code)
    assert result.pid == proc.pid
    assert result.backend == backend
    assert procs.state(proc.pid) is None


def test_wait_death_by_signal(backend: str, kids: Kids) -> None:
    proc = kids.sh("kill -9 $$")
    result = asyncio.run(aio.wait_for_dispatch_completion(dispatch(proc.pid), "pt-1"))
    assert result.status is DispatchCompletionStatus.TERMINATED
    assert result.return_code == -signal.SIGKILL
    assert result.termination_method == "natural"


def test_wait_timeout_stops_the_tree(backend: str, kids: Kids) -> None:
    proc = kids.sh("sleep 60 & echo $!; sleep 60 & echo $!; wait", stdout=subprocess.PIPE)
    assert proc.stdout is not None
    children = [int(proc.stdout.readline()), int(proc.stdout.readline())]
    result = asyncio.run(
        aio.wait_for_dispatch_completion(
            dispatch(proc.pid), "pt-1", timeout_ms=1, poll_interval_ms=HOUR_MS
        )
    )
    assert result.status is DispatchCompletionStatus.TIMEOUT
    assert result.termination_method == "sigterm"
    assert result.return_code == -signal.SIGTERM
    assert result.timed_out and result.stop_reason == "timeout"
    assert result.descendants_killed == 2
    for pid in [proc.pid, *children]:
        assert procs.state(pid) is None


def test_wait_idle_dispatch_is_stopped(backend: str, kids: Kids) -> None:
    proc = kids.sh("read x", stdin=subprocess.PIPE)
    result = asyncio.run(
        aio.wait_for_dispatch_completion(dispatch(proc.pid), "pt-1", idle_timeout_ms=200)
    )
    # An idle stop that needed signals: TERMINATED (only a timeout is TIMEOUT).
    assert result.status is DispatchCompletionStatus.TERMINATED
    assert result.stop_reason == "idle"
    assert result.termination_method == "sigterm"
    assert result.error == "Idle after 200ms"


def test_wait_bad_input(backend: str) -> None:
    async def main() -> list[DispatchCompletionResult]:
        return [
            await aio.wait_for_dispatch_completion(dispatch(pid), "pt-1")
            for pid in (None, 0, -1, 1, os.getpid())
        ]

    for result in asyncio.run(main()):
        assert result.status is DispatchCompletionStatus.ERROR
        assert result.error
    with pytest.raises(ValueError):
        asyncio.run(
            aio.wait_for_dispatch_completion(dispatch(12345), "pt-1", timeout_ms=float("nan"))
        )
    with pytest.raises(ValueError):
        asyncio.run(aio.wait_for_dispatch_completion(dispatch(12345), "pt-1", eof_wait_ms=-1))


@pytest.mark.parametrize("eof_wait_ms, method", [(HOUR_MS, "eof"), (0, "sigterm")])
def test_wait_timeout_begins_with_eof_unless_told_not_to(
    backend: str, eof_wait_ms: float, method: str
) -> None:
    spawned = spawn_dispatch(["sh", "-c", "read line; exit 0"], ticket_id="pt-1", stdin="pipe")
    result = asyncio.run(
        aio.wait_for_dispatch_completion(
            spawned, "pt-1", timeout_ms=100, graceful_shutdown_ms=HOUR_MS, eof_wait_ms=eof_wait_ms
        )
    )
    assert result.status is DispatchCompletionStatus.TIMEOUT
    assert result.termination_method == method


def test_wait_many_concurrently(backend: str, kids: Kids) -> None:
    rng = random.Random(99)
    codes = [rng.randrange(256) for _ in range(200)]
    r, w = os.pipe()
    try:
        started = [kids.sh(f"read x; exit {code}", stdin=r) for code in codes]
    finally:
        os.close(r)

    async def main() -> list[DispatchCompletionResult]:
        waits = [
            aio.wait_for_dispatch_completion(dispatch(p.pid), "pt-1", poll_interval_ms=HOUR_MS)
            for p in started
        ]
        gathered = asyncio.gather(*waits)
        await asyncio.sleep(0)
        os.close(w)  # every dispatch reads EOF and exits with its code
        return await gathered

    results = asyncio.run(main())
    for proc, code, result in zip(started, codes, results):
        assert result.pid == proc.pid
        assert_exit(result, code)


def test_cancelled_wait_leaves_no_fd(backend: str, kids: Kids) -> None:
    proc = kids.sh("sleep 60")
    before = pidfds()

    async def main() -> None:
        task = asyncio.ensure_future(
            aio.wait_for_dispatch_completion(dispatch(proc.pid), "pt-1", timeout_ms=HOUR_MS)
        )
        if backend != "polling":  # wait until the task holds the leader's pidfd
            while len(pidfds()) == len(before):
                await asyncio.sleep(0.001)
        else:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert pidfds() == before
    assert procs.alive(proc.pid)  # nothing was signalled
    assert graceful_terminate_dispatch(proc.pid) == (True, "sigterm")


# --------------------------------------------------------------------------------------
# AsyncDispatchMonitor


def test_async_monitor(backend: str, kids: Kids) -> None:
    quick = [kids.sh(f"exit {code}") for code in range(5)]
    slow = kids.sh("sleep 60")
    stuck = kids.sh("sleep 60")

    async def main() -> None:
        async with aio.AsyncDispatchMonitor() as monitor:
            assert monitor.monitor.backend == backend
            futures = [monitor.watch(dispatch(p.pid), "pt-1") for p in quick]
            f_slow = monitor.watch(dispatch(slow.pid), "pt-1", timeout_ms=1)
            f_stuck = monitor.watch(dispatch(stuck.pid), "pt-1")
            for code, result in enumerate(await asyncio.gather(*futures)):
                assert_exit(result, code)
            result = await f_slow
            assert result.status is DispatchCompletionStatus.TIMEOUT
            assert result.termination_method == "sigterm"
            assert not f_stuck.done()
            monitor.terminate(f_stuck)
            result = await f_stuck
            assert result.status is DispatchCompletionStatus.TERMINATED
            assert result.stop_reason == "terminate"
            assert len(monitor) == 0
            last = kids.sh("sleep 60")
            f_last = monitor.watch(dispatch(last.pid), "pt-1")
        # Leaving the block closed the monitor, which stopped the last one.
        result = await f_last
        assert result.status is DispatchCompletionStatus.TERMINATED
        assert result.stop_reason == "close"

    asyncio.run(main())
    for proc in [*quick, slow, stuck]:
        assert procs.state(proc.pid) is None


def test_async_monitor_cancel_stops_watching(backend: str, kids: Kids) -> None:
    proc = kids.sh("sleep 60")

    async def main() -> None:
        monitor = aio.AsyncDispatchMonitor()
        future = monitor.watch(dispatch(proc.pid), "pt-1")
        future.cancel()
        await monitor.aclose(terminate=True)  # nothing watched any more: nothing stopped

    asyncio.run(main())
    assert procs.alive(proc.pid)
    assert graceful_terminate_dispatch(proc.pid) == (True, "sigterm")
