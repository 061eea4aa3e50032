"""asyncio faces of the package: an awaitable wait, and the monitor.

:func:`wait_for_dispatch_completion` is the coroutine twin of
:func:`ralph_reaper.wait_for_dispatch_completion`: same parameters, same
results, because it drives the same objects: the prepared
:class:`~ralph_reaper.watches.Watch` while the leader runs, the
:class:`~ralph_reaper.engine.Stop` of a timeout, idle stop or leftovers, and
:func:`~ralph_reaper.ending.finish` for the result. It uses no thread while
it waits: pidfds are handed to the event loop with ``loop.add_reader``, so
the task wakes on an exit itself. Without pidfds (polling backend, or a pin
degraded after EMFILE) it checks with ``asyncio.sleep`` and a backoff from
0.1 ms doubling to 50 ms (capped by ``poll_interval_ms``). Reading ``/proc``
to find what an exited leader left in its session runs in the loop's default
thread pool.

Cancelling a task that awaits :func:`wait_for_dispatch_completion` while it
waits removes the reader and closes the pidfd: nothing is signalled and no fd
is left. Cancelled once a stop has begun (of a timeout, or of what an exited
leader left), the stop runs to its end on a thread of its own, with its own
timers, and then releases what the dispatch held: a cancel never leaves a
half-stopped tree. For many dispatches at once,
:class:`AsyncDispatchMonitor` runs everything on the single monitor thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Optional, Union

from .ending import finish, joinable, stop_for, sweep_for
from .engine import ONGOING, Stop, StopOutcome, not_running, resume
from .engine import drive as engine_drive
from .logs import resolve_logger
from .monitor import DispatchMonitor
from .pins import Pin
from .plan import DEFAULT_EOF_WAIT_MS
from .results import DispatchCompletionResult
from .waiting import FIRST_STEP_S, MAX_STEP_S, poll_step_cap
from .watches import Watch, prepare

__all__ = ["AsyncDispatchMonitor", "wait_for_dispatch_completion"]


async def wait_for_dispatch_completion(
    dispatch_result: Any,
    ticket_id: str,
    timeout_ms: float = 0,
    poll_interval_ms: float = 1000.0,
    logger: Any = None,
    graceful_shutdown_ms: float = 5000.0,
    *,
    stop_leftovers: bool = True,
    idle_timeout_ms: float = 0.0,
    eof_wait_ms: float = DEFAULT_EOF_WAIT_MS,
) -> DispatchCompletionResult:
    """Await the end of a dispatch; stop it (whole tree) when ``timeout_ms`` passes.

    Same parameters and results as :func:`ralph_reaper.wait_for_dispatch_completion`.
    """
    started = time.monotonic()
    step_cap = poll_step_cap(poll_interval_ms)
    prepared = prepare(
        dispatch_result,
        ticket_id,
        log=resolve_logger(logger),
        timeout_ms=timeout_ms,
        graceful_shutdown_ms=graceful_shutdown_ms,
        idle_timeout_ms=idle_timeout_ms,
        eof_wait_ms=eof_wait_ms,
        stop_leftovers=stop_leftovers,
        started=started,
    )
    if isinstance(prepared, DispatchCompletionResult):
        return prepared
    return await _run_watch(prepared, step_cap)


async def _run_watch(w: Watch, step_cap: float) -> DispatchCompletionResult:
    if w.leader is not None:
        w.log.info(f"Waiting for dispatch of {w.ticket_id} (pid {w.pid})")
        try:
            reason = await _wait_leader(w, step_cap)
        except BaseException:  # cancelled while waiting: nothing to stop, nothing kept
            _drop_leader(w)
            raise
        joined = None if reason is None else joinable(w)
        if joined is not None:
            w.reason = reason
            return finish(w, await _await_shared(w, joined))
        stop = None if reason is None else stop_for(w, reason)
        if stop is not None:
            return await _run_stop(w, stop, reason or "terminate", step_cap)
        ongoing = ONGOING.get(w.leader)
        if ongoing is not None:  # another call is stopping it: report that stop
            w.reason, future = ongoing
            return finish(w, await _await_shared(w, future))
    return await _run_sweep(w, step_cap)


def _drop_leader(w: Watch) -> None:
    if w.leader is not None:
        w.leader.close()
        w.leader = None


async def _await_shared(w: Watch, future: cf.Future[StopOutcome]) -> StopOutcome:
    """The outcome of another call's stop; cancelling this wait leaves that stop alone."""
    try:
        return await asyncio.wrap_future(future)
    except BaseException:
        _drop_leader(w)
        raise


async def _run_stop(w: Watch, stop: Stop, reason: str, step_cap: float) -> DispatchCompletionResult:
    """Drive a stop of the tree on the loop; if the task is cancelled, a thread finishes it.

    A stop that has begun is never abandoned half-way: its pins would stay
    open, the tree half-signalled, the dispatch (and its stdin) registered.
    """
    leader = stop.leader
    assert leader is not None
    future, mine = ONGOING.claim(leader, reason)
    if not mine:  # another call is stopping it: its outcome is ours
        stop.members.close_others()
        return finish(w, await _await_shared(w, future))

    def ended(outcome: StopOutcome) -> None:
        ONGOING.end(leader, future, outcome)
        finish(w, outcome)

    try:
        outcome = await drive(stop, step_cap)
    except asyncio.CancelledError:
        _finish_in_thread(stop, ended)
        raise
    except BaseException:
        ONGOING.end(leader, future, StopOutcome(False, "failed"))
        raise
    ONGOING.end(leader, future, outcome)
    return finish(w, outcome)


async def _run_sweep(w: Watch, step_cap: float) -> DispatchCompletionResult:
    """After a natural exit: stop what the leader left (``/proc`` read off the loop).

    Cancelled during the read, the read goes on (shielded) and its stop is
    handed to a thread; cancelled during the stop, a thread finishes it.
    """
    reading = _SWEEPS.submit(sweep_for, w)

    def ended(outcome: Optional[StopOutcome]) -> None:
        finish(w, not_running(outcome))

    try:
        sweep = await asyncio.shield(asyncio.wrap_future(reading))
    except asyncio.CancelledError:
        # Called on the reading thread, so it holds even once the loop is gone.
        reading.add_done_callback(
            lambda done: _finish_in_thread(None if done.exception() else done.result(), ended)
        )
        raise
    if sweep is None:
        return finish(w, None)
    try:
        outcome = await drive(sweep, step_cap)
    except asyncio.CancelledError:
        _finish_in_thread(sweep, ended)
        raise
    return finish(w, not_running(outcome))


#: The threads that read ``/proc`` for a sweep, off the event loop. Not the
#: loop's default executor: a read must outlive a loop that closes under it.
_SWEEPS = cf.ThreadPoolExecutor(max_workers=4, thread_name_prefix="ralph-reaper-sweep")


def _finish_in_thread(stop: Optional[Stop], ended: Callable[[StopOutcome], None]) -> None:
    """Run ``stop`` (begun or not) to its end on a thread of its own, then ``ended``.

    Not a daemon: an interpreter that exits waits for the stop, as it would
    for the blocking face's.
    """

    def run() -> None:
        if stop is None:
            ended(not_running())
            return
        outcome = StopOutcome(False, "failed")
        try:
            outcome = resume(stop) if stop.begun else engine_drive(stop)
        finally:
            ended(outcome)

    threading.Thread(target=run, name="ralph-reaper-stop").start()


async def _wait_leader(w: Watch, step_cap: float) -> Optional[str]:
    """Until the leader exits (None) or a limit runs out (its name)."""
    leader = w.leader
    assert leader is not None
    while True:
        now = time.monotonic()
        if await _any_exit([leader], w.wake_at(now) - now, step_cap):
            return None
        reason = w.due(time.monotonic())
        if reason is not None:
            return reason


async def _any_exit(pins: Sequence[Pin], timeout_s: float, step_cap: float) -> list[Pin]:
    """Wait until some pin has exited or ``timeout_s`` passes; return the exited.

    Pins with a pidfd wake the loop through ``add_reader``; the rest are
    polled with a backoff. Exited children are reaped (statuses in the pins).
    """
    loop = asyncio.get_running_loop()
    deadline = time.monotonic() + max(0.0, timeout_s)
    step = FIRST_STEP_S
    woken: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        if not woken.done():
            woken.set_result(None)

    fds = [p.fd for p in pins if p.fd >= 0 and p.status is None]
    for fd in fds:
        loop.add_reader(fd, readable)
    try:
        while True:
            gone = [p for p in pins if p.status is not None or p.exited()]
            if gone:
                for pin in gone:
                    if pin.status is None:
                        pin.collect()
                return gone
            left = deadline - time.monotonic()
            if left <= 0:
                return []
            if len(fds) < len(pins):
                left = min(left, step)
                step = min(step * 2, step_cap)
            await asyncio.wait({woken}, timeout=left)
            if woken.done():
                woken = loop.create_future()
    finally:
        for fd in fds:
            loop.remove_reader(fd)


async def drive(stop: Stop, step_cap: float = MAX_STEP_S) -> StopOutcome:
    """Run ``stop`` to its end on the event loop (the asyncio twin of ``engine.drive``)."""
    stop.begin(time.monotonic())
    while stop.outcome is None:
        pins = list(stop.awaited.values())
        gone = await _any_exit(pins, stop.deadline - time.monotonic(), step_cap)
        now = time.monotonic()
        if gone:
            stop.exited(gone, now)
        elif now >= stop.deadline:
            stop.due(now)
    return stop.outcome


class AsyncDispatchMonitor:
    """The asyncio face of :class:`~ralph_reaper.monitor.DispatchMonitor`.

    One monitor thread does the watching for every dispatch; :meth:`watch`
    returns an :class:`asyncio.Future` chained to the monitor's future (with
    :func:`asyncio.wrap_future`), so it can be awaited, gathered or passed to
    :func:`asyncio.wait`. Cancelling it stops watching that dispatch, as
    cancelling the monitor's future does.
    """

    def __init__(self, logger: Any = None, *, max_workers: int = 4) -> None:
        self._monitor = DispatchMonitor(logger, max_workers=max_workers)
        self._links: dict[
            asyncio.Future[DispatchCompletionResult], cf.Future[DispatchCompletionResult]
        ] = {}

    @property
    def monitor(self) -> DispatchMonitor:
        """The thread-based monitor underneath."""
        return self._monitor

    def watch(
        self,
        dispatch_result: Any,
        ticket_id: str,
        timeout_ms: float = 0,
        graceful_shutdown_ms: float = 5000.0,
        idle_timeout_ms: float = 0,
        *,
        stop_leftovers: bool = True,
        eof_wait_ms: float = DEFAULT_EOF_WAIT_MS,
    ) -> asyncio.Future[DispatchCompletionResult]:
        """Like :meth:`DispatchMonitor.watch`; call it with the event loop running."""
        loop = asyncio.get_running_loop()
        inner = self._monitor.watch(
            dispatch_result,
            ticket_id,
            timeout_ms,
            graceful_shutdown_ms,
            idle_timeout_ms,
            stop_leftovers=stop_leftovers,
            eof_wait_ms=eof_wait_ms,
        )
        outer = asyncio.wrap_future(inner, loop=loop)
        self._links[outer] = inner
        outer.add_done_callback(self._unlink)
        return outer

    def _unlink(self, outer: asyncio.Future[DispatchCompletionResult]) -> None:
        self._links.pop(outer, None)

    def terminate(
        self,
        target: Union[
            int, asyncio.Future[DispatchCompletionResult], cf.Future[DispatchCompletionResult]
        ],
    ) -> None:
        """Stop a watched dispatch now (see :meth:`DispatchMonitor.terminate`)."""
        if isinstance(target, asyncio.Future):
            inner = self._links.get(target)
            if inner is None:
                if target.done():
                    return
                raise ValueError("this future was not returned by this monitor's watch()")
            self._monitor.terminate(inner)
        else:
            self._monitor.terminate(target)

    def __len__(self) -> int:
        return len(self._monitor)

    async def aclose(self, terminate: bool = True) -> None:
        """:meth:`DispatchMonitor.close` without blocking the event loop.

        Futures cancelled before this call are not stopped: cancellation of
        an asyncio future reaches the monitor's future on the next turn of the
        loop, which this waits for first.
        """
        loop = asyncio.get_running_loop()
        await asyncio.sleep(0)
        await loop.run_in_executor(None, self._monitor.close, terminate)

    def close(self, terminate: bool = True) -> None:
        """Blocking close, for use outside a running loop."""
        self._monitor.close(terminate)

    async def __aenter__(self) -> AsyncDispatchMonitor:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose(terminate=True)
