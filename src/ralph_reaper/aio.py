"""asyncio faces of the package: an awaitable wait, and the monitor.

:func:`wait_for_dispatch_completion` is the coroutine twin of
:func:`ralph_reaper.wait_for_dispatch_completion`: same parameters, same
results. It uses no thread while it waits: the leader's pidfd is handed to the
event loop with ``loop.add_reader``, so the task wakes on the exit itself.
Without pidfds (polling backend, or a pin degraded after EMFILE) it checks
with ``asyncio.sleep`` and a backoff from 0.1 ms doubling to 50 ms (capped
by ``poll_interval_ms``).

What happens *after* the wait may block (stopping the tree on a timeout,
stopping leftovers of the leader's session, scanning ``/proc``), so it runs
in the loop's default executor with the package's ordinary stop sequence
(``loop.run_in_executor``): one executor thread per stop in progress, none
while waiting. For many dispatches at once, :class:`AsyncDispatchMonitor`
runs every stop on the single monitor thread instead.

Cancelling a task that awaits :func:`wait_for_dispatch_completion` while it
waits removes the reader and closes the pidfd: nothing is signalled and no fd
is left. Cancelled once the stop has begun, the stop still runs to its end in
its executor thread (and closes its own fds).
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import functools
import time
import weakref
from typing import Any, Optional, Union

from .backends import get as get_backend
from .backends.base import Backend
from .completion import DEFAULT_EOF_WAIT_MS, PROGRESS_EVERY_S, _ended, stopped_result
from .completion import terminate as _blocking_terminate
from .logs import LogSink, resolve_logger
from .monitor import (
    DispatchMonitor,
    _idle_sample_s,
    _leader_status,
    _limit,
    _natural_end,
    _prepare,
    _sessions_in_use,
    _stop_leftovers,
    _Watch,
)
from .results import DispatchCompletionResult
from .stopping import StopOutcome
from .validation import check_ms
from .waiting import FIRST_STEP_S, MAX_STEP_S

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
    loop = asyncio.get_running_loop()
    step_cap = min(check_ms("poll_interval_ms", poll_interval_ms) / 1000.0, MAX_STEP_S)
    eof_wait_ms = check_ms("eof_wait_ms", eof_wait_ms)
    log = resolve_logger(logger)
    backend = get_backend()
    prepared = _prepare(
        backend,
        log,
        dispatch_result,
        ticket_id,
        timeout_ms,
        graceful_shutdown_ms,
        idle_timeout_ms,
        stop_leftovers,
        started,
    )
    if isinstance(prepared, DispatchCompletionResult):
        return prepared
    w = prepared
    owned = w.leader  # closed here unless a stop in the executor took it over
    try:
        if w.leader is not None:
            log.info(f"Waiting for dispatch of {ticket_id} (pid {w.pid})")
            reason = await _wait_leader(loop, w, step_cap, log)
        else:
            reason = None
        base = w.base()
        if reason is None:
            owned = None
            result = await _natural(loop, backend, w, log)
        else:
            if reason == "idle":
                log.warning(
                    f"Dispatch of {ticket_id} idle for {w.idle_s * 1000.0:.0f}ms; stopping it"
                )
            else:
                log.warning(
                    f"Dispatch of {ticket_id} timed out after {w.limit_s * 1000.0:.0f}ms; "
                    "stopping it"
                )
            leader, owned = w.leader, None
            outcome = await loop.run_in_executor(
                None,
                functools.partial(
                    _blocking_terminate,
                    w.pid,
                    session_id=w.session_id or None,
                    logger=log,
                    kill_wait_ms=w.grace_s * 1000.0,
                    eof_wait_ms=eof_wait_ms,
                    leader=leader,
                ),
            )
            result = _stopped_or_ended(base, outcome, reason, w)
    finally:
        if owned is not None:
            owned.close()
    result.duration_ms = (time.monotonic() - started) * 1000.0
    return result


async def _natural(
    loop: asyncio.AbstractEventLoop, backend: Backend, w: _Watch, log: LogSink
) -> DispatchCompletionResult:
    """The leader exited: reap it, then stop what it left in its session, if anything."""
    status = _leader_status(w)  # reaped first, so that the session scan does not see it
    w.known, w.leader = status, None
    outcome = StopOutcome(True, "not_running")
    if w.sid is not None and w.stop_leftovers and await _sweeper(loop, backend).busy(w.sid):
        outcome = await loop.run_in_executor(
            None, functools.partial(_stop_leftovers, backend, w.sid, w.grace_s, log)
        )
    result = _natural_end(w, outcome)
    log.info(f"Dispatch of {w.ticket_id} ended: {result.status.value} ({result.return_code})")
    return result


class _Sweeper:
    """Batches the "is anything left in this session?" scans of one event loop.

    Every exit noticed in one turn of the loop is checked by one pass over
    ``/proc`` in the default executor, so N simultaneous exits cost one scan.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, backend: Backend) -> None:
        self.loop = loop
        self.backend = backend
        self.pending: dict[int, list[asyncio.Future[bool]]] = {}

    def busy(self, sid: int) -> asyncio.Future[bool]:
        future: asyncio.Future[bool] = self.loop.create_future()
        if not self.pending:
            self.loop.call_soon(self._scan)
        self.pending.setdefault(sid, []).append(future)
        return future

    def _scan(self) -> None:
        batch, self.pending = self.pending, {}
        job = self.loop.run_in_executor(None, _sessions_in_use, self.backend, set(batch))

        def answer(done: asyncio.Future[set[int]]) -> None:
            error = None if done.cancelled() else done.exception()
            found = set(batch) if done.cancelled() or error is not None else done.result()
            for sid, futures in batch.items():
                for future in futures:
                    if not future.done():
                        future.set_result(sid in found)

        job.add_done_callback(answer)


_sweepers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Sweeper] = (
    weakref.WeakKeyDictionary()
)


def _sweeper(loop: asyncio.AbstractEventLoop, backend: Backend) -> _Sweeper:
    try:
        sweeper = _sweepers.get(loop)
        if sweeper is None or sweeper.backend is not backend:
            sweeper = _Sweeper(loop, backend)
            _sweepers[loop] = sweeper
    except TypeError:  # a loop that cannot be weakly referenced: no batching, same answers
        sweeper = _Sweeper(loop, backend)
    return sweeper


def _stopped_or_ended(
    base: dict[str, Any], outcome: StopOutcome, reason: str, w: _Watch
) -> DispatchCompletionResult:
    if outcome.method == "not_running":  # it exited on its own just as time ran out
        return _ended(base, outcome, outcome.leader_status, w.pid)
    w.reason = reason
    return stopped_result(base, outcome, reason, _limit(w))


async def _wait_leader(
    loop: asyncio.AbstractEventLoop, w: _Watch, step_cap: float, log: LogSink
) -> Optional[str]:
    """Wait for the leader's exit (None), or say why to stop it: "timeout" or "idle"."""
    leader = w.leader
    assert leader is not None
    deadline = w.started + w.limit_s if w.limit_s > 0 else None
    next_progress = w.started + PROGRESS_EVERY_S
    idle = w.idle
    sample_s = _idle_sample_s(w.idle_s)

    def why(now: float) -> Optional[str]:
        nonlocal next_progress
        if deadline is not None and now >= deadline:
            return "timeout"
        if idle is not None and idle.idle_for() >= w.idle_s:
            return "idle"
        if now >= next_progress:
            log.info(f"Dispatch of {w.ticket_id} still running after {now - w.started:.0f}s")
            next_progress += PROGRESS_EVERY_S
        return None

    def wake_at(now: float) -> float:
        wake = next_progress if deadline is None else min(deadline, next_progress)
        if idle is not None:
            wake = min(wake, now + sample_s)
        return wake

    if leader.fd < 0:
        step = FIRST_STEP_S
        while not leader.exited():
            now = time.monotonic()
            reason = why(now)
            if reason is not None:
                return reason
            await asyncio.sleep(max(0.0, min(step, wake_at(now) - now)))
            step = min(step * 2, step_cap)
        return None

    exited: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        if not exited.done():
            exited.set_result(None)

    loop.add_reader(leader.fd, readable)
    try:
        while True:
            now = time.monotonic()
            done, _ = await asyncio.wait({exited}, timeout=max(0.0, wake_at(now) - now))
            if done:
                return None
            reason = why(time.monotonic())
            if reason is not None:
                return reason
    finally:
        loop.remove_reader(leader.fd)


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
