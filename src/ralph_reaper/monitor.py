"""Many dispatches, one thread: one epoll set, one timer heap, no thread per dispatch.

:class:`DispatchMonitor` watches any number of dispatches from a single thread.
It is a driver of the same objects the blocking API drives: a
:class:`~ralph_reaper.watches.Watch` per dispatch while it runs, a
:class:`~ralph_reaper.engine.Stop` when it is stopped (timeout, idle,
:meth:`~DispatchMonitor.terminate`, close) or when its leader left something
in its session, and :func:`~ralph_reaper.ending.finish` for the result. So its
results are those of :func:`~ralph_reaper.wait_for_dispatch_completion`,
delivered through :class:`concurrent.futures.Future` objects.

How the thread waits
--------------------
Exits are reported by the backend's epoll set of pidfds, whose ``drain``
reaps every exited child of a batch in one call. That call runs ``waitid`` on
each ready fd, so nothing but pidfds may sit in that set. The thread therefore
waits on a second, tiny ``select.epoll`` that holds two fds: the backend's epoll
set itself (an epoll fd is readable while any fd in it is) and the read end of
a wake-up pipe that other threads write to when they hand the thread work.
One ``epoll_wait`` with the timeout of the earliest timer is the only place
the thread blocks, so with nothing due it uses no CPU at all.

A stop never blocks the thread: each stop's awaited members go into the same
epoll set and its deadline into the same timer heap, so any number of stops
(keeper stops too: a message on the keeper's control pipe, then its pidfd)
run at once, interleaved with exit detection of every other dispatch.
Without pidfds (the polling backend) or for a pin without one (out of file
descriptors) every such pin of the monitor is checked together
(:class:`~ralph_reaper.polled.Polled`) when its round is due, in the turn's
intake of exits, ahead of the turn's timers: a single ``waitid`` peek says
whether any of our children exited, so ten thousand idle dispatches cost one
syscall a round, not ten thousand ``/proc`` reads; pins that are not our
children have a backoff of their own.

No turn of the thread is long: when thousands of timeouts fall at once,
their stops begin a slice at a time (:data:`SLICE` of them, or
:data:`SLICE_S` of work), as do the stops that exits move on. Between two
slices the thread takes in new exits; those of dispatches still running (no
stop of theirs under way) are reported at once, ahead of the stops' work.
Searches made together share one walk of their sessions
(:class:`~ralph_reaper.lineage.Walk`). In a process that adopts no orphans
(the host as it should be: not a subreaper) a walk costs its own sessions'
trees, and each slice has one. In one that does, a walk cannot leave out the
trees of dispatches it does not know it forked, so it costs every dispatch
started after the oldest it covers: there the slices of one batch (the
timers due together, the exits drained together) share the batch's walk,
and the exits of stopping dispatches wait behind a batch of due timers (at
most :data:`BACKLOG_WAIT_S`) so that one walk tells them all; such a walk is
read a slice of time a turn. Either way a storm of stops delays the report of
another dispatch's end by about a slice.

Futures are completed on the monitor thread: done-callbacks run there and must
not block (``asyncio.wrap_future`` and the waiting helpers here do not).
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import itertools
import os
import select
import threading
import time
import weakref
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, Callable, Optional, Union

from .backends import get as get_backend
from .backends.base import EpollSet, ExitStatus
from .backends.deadlines import epoll_ms, wait_until
from .containment import sessions_in_use
from .dispatches import REGISTRY
from .ending import collect_leader, finish, joinable, needs_sweep, stop_for, sweep_for
from .engine import ONGOING, Stop, StopOutcome, not_running
from .lineage import Lineage, Walk, adopts_orphans, sharing
from .logs import resolve_logger
from .pins import Pin
from .plan import DEFAULT_EOF_WAIT_MS
from .polled import Polled
from .results import DispatchCompletionResult
from .timers import Timer, TimerHeap
from .watches import PROGRESS_EVERY_S, Watch, prepare

if TYPE_CHECKING:
    from concurrent.futures._base import DoneAndNotDoneFutures

__all__ = ["ALL_COMPLETED", "FIRST_COMPLETED", "FIRST_EXCEPTION", "DispatchMonitor"]

ALL_COMPLETED = cf.ALL_COMPLETED
FIRST_COMPLETED = cf.FIRST_COMPLETED
FIRST_EXCEPTION = cf.FIRST_EXCEPTION

#: Exits taken out of the epoll set per drain call.
DRAIN_BATCH = 1024
#: Stops begun, or moved on by exits, per turn of the thread (one walk each).
SLICE = 32
#: ... or fewer, once a turn's stop work has taken this long.
SLICE_S = 0.003
#: The longest the exits of stopping dispatches wait behind a batch of due timers.
BACKLOG_WAIT_S = 2.0
#: The longest single epoll wait (epoll_wait takes an int of milliseconds).
MAX_WAIT_S = 86400.0

# States of an entry (owned by the monitor thread once it has taken the entry in).
_NEW, _RUNNING, _STOPPING, _ENDING, _DONE = range(5)
# Commands posted to the monitor thread.
_CMD_WATCH, _CMD_TERMINATE, _CMD_CANCEL, _CMD_CLOSE, _CMD_OTHER_STOP = range(5)


class _Entry:
    """One watched dispatch on the monitor thread: its watch, its stop, its registrations."""

    __slots__ = (
        "future",
        "monitor",
        "ongoing",
        "slow",
        "state",
        "stop",
        "stop_timer",
        "sweeping",
        "tokens",
        "wake_timer",
        "watch",
    )

    def __init__(self, watch: Watch) -> None:
        self.watch = watch
        self.future: Optional[cf.Future[DispatchCompletionResult]] = None
        self.monitor: Optional[DispatchMonitor] = None
        self.state = _NEW
        self.stop: Optional[Stop] = None
        self.sweeping = False
        self.ongoing: Optional[cf.Future[StopOutcome]] = None
        #: epoll tokens of this entry's pins (the leader's while running, else the stop's).
        self.tokens: dict[int, Pin] = {}
        #: Pins without a pidfd, in the monitor's polled set.
        self.slow: list[Pin] = []
        self.wake_timer: Optional[Timer] = None
        self.stop_timer: Optional[Timer] = None

    def __call__(self, future: cf.Future[DispatchCompletionResult]) -> None:
        """Done-callback of the future: a cancelled future means "stop watching"."""
        monitor = self.monitor
        if monitor is not None and future.cancelled():
            monitor._post(_CMD_CANCEL, self)


def _epoll_fileno(epset: EpollSet) -> int:
    fileno: Optional[Callable[[], int]] = getattr(epset, "fileno", None)
    if fileno is None:
        raise RuntimeError(f"{type(epset).__name__} has no fileno(): it cannot be nested")
    return int(fileno())


class DispatchMonitor:
    """Supervise many dispatches from one thread; each :meth:`watch` gives a Future.

    ``close(terminate=True)`` (also on leaving a ``with`` block) stops every
    dispatch still running and waits for the stops to end.
    ``close(terminate=False)`` stops *watching*: the futures of dispatches
    still running are cancelled (``result()`` raises ``CancelledError``), their
    pins are closed and nothing is signalled or reaped; stops already under
    way are finished first, so that no tree is left half-stopped. Cancelling
    one future likewise stops watching that dispatch alone (once its stop has
    begun, the stop still runs to its end).
    """

    def __init__(self, logger: Any = None, *, max_workers: int = 4) -> None:
        """``max_workers`` is accepted for compatibility: stops need no worker threads."""
        self._log = resolve_logger(logger)
        self._backend = get_backend()
        self._lock = threading.Lock()
        self._inbox: list[tuple[int, Any]] = []
        self._woken = False
        self._closing = False
        #: Set on the monitor thread when it takes the close command: terminate or not.
        self._close_mode: Optional[bool] = None
        self._entries: dict[int, _Entry] = {}
        self._futures: weakref.WeakSet[cf.Future[DispatchCompletionResult]] = weakref.WeakSet()
        # Owned by the monitor thread:
        self._timers = TimerHeap()
        #: Every pin without a pidfd, checked in rounds taken in with the exits.
        self._polled: Polled[_Entry] = Polled()
        self._tokens: dict[int, _Entry] = {}
        self._next_token = 1
        self._ending: list[_Entry] = []
        #: Stopping entries whose awaited pins exited, not yet told: id -> (entry, pins).
        self._backlog: dict[int, tuple[_Entry, list[Pin]]] = {}
        self._more_due = False
        #: Where orphans are adopted: the walks of the batch of due timers, and of
        #: the backlog, worked through a slice a turn (see _batch_walks).
        self._timer_walk: Optional[Walk] = None
        self._backlog_walk: Optional[Walk] = None
        self._backlog_at = 0.0  # when the backlog last began to fill
        self._progress: Optional[Timer] = None
        self._active = 0
        self._epset: Optional[EpollSet] = None
        self._outer: Optional[select.epoll] = None
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            self._outer = select.epoll()
            self._outer.register(self._wake_r, select.EPOLLIN)
            if self._backend.has_pidfd:
                self._epset = self._backend.epoll_set()
                self._outer.register(_epoll_fileno(self._epset), select.EPOLLIN)
            self._thread = threading.Thread(
                target=self._run, name="ralph-reaper-monitor", daemon=True
            )
            self._thread.start()
        except BaseException:
            self._release()
            raise

    # ------------------------------------------------------------------ public API

    @property
    def backend(self) -> str:
        """The name of the backend this monitor uses (fixed when it was created)."""
        return self._backend.name

    @property
    def closed(self) -> bool:
        return self._closing

    def __len__(self) -> int:
        """How many dispatches are being watched (or stopped) right now."""
        with self._lock:
            return sum(1 for e in self._entries.values() if e.state != _DONE)

    def __enter__(self) -> DispatchMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(terminate=True)

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
    ) -> cf.Future[DispatchCompletionResult]:
        """Watch one dispatch; its future gets what ``wait_for_dispatch_completion`` returns.

        ``duration_ms`` counts from this call. A missing or invalid pid gives a
        future already done with an ERROR result; bad durations raise
        TypeError/ValueError here; a closed monitor raises RuntimeError.
        """
        if self._closing:
            raise RuntimeError("this DispatchMonitor is closed")
        prepared = prepare(
            dispatch_result,
            ticket_id,
            log=self._log,
            timeout_ms=timeout_ms,
            graceful_shutdown_ms=graceful_shutdown_ms,
            idle_timeout_ms=idle_timeout_ms,
            eof_wait_ms=eof_wait_ms,
            stop_leftovers=stop_leftovers,
        )
        future: cf.Future[DispatchCompletionResult] = cf.Future()
        if isinstance(prepared, DispatchCompletionResult):
            future.set_result(prepared)
            with self._lock:
                self._futures.add(future)
            return future
        # One progress line for the whole monitor, not one per dispatch.
        prepared.next_progress = float("inf")
        entry = _Entry(prepared)
        entry.future = future
        entry.monitor = self
        self._admit(entry)
        future.add_done_callback(entry)
        self._post(_CMD_WATCH, entry)
        return future

    def _admit(self, entry: _Entry) -> None:
        pid = entry.watch.pid
        assert pid is not None
        with self._lock:
            problem: Optional[Exception] = None
            if self._closing:
                problem = RuntimeError("this DispatchMonitor is closed")
            else:
                other = self._entries.get(pid)
                if other is not None and other.state in (_NEW, _RUNNING):
                    problem = ValueError(f"pid {pid} is already watched by this monitor")
            if problem is None:
                self._entries[pid] = entry
                if entry.future is not None:
                    self._futures.add(entry.future)
        if problem is not None:
            if entry.watch.leader is not None:
                entry.watch.leader.close()
            raise problem

    def terminate(
        self, pid_or_future: Union[int, cf.Future[DispatchCompletionResult]]
    ) -> cf.Future[DispatchCompletionResult]:
        """Stop a watched dispatch now; return its future.

        A running dispatch gets the whole stop sequence (EOF where held,
        SIGTERM, SIGKILL). One already being stopped (a timeout in its grace
        period, say) skips the rest of the current stage: SIGKILL follows at
        once. A future that is already done is returned as it is.
        """
        with self._lock:
            entry: Optional[_Entry] = None
            if isinstance(pid_or_future, cf.Future):
                entry = next((e for e in self._entries.values() if e.future is pid_or_future), None)
                if entry is None:
                    if pid_or_future.done():
                        return pid_or_future
                    raise ValueError("this future was not returned by this monitor's watch()")
            else:
                entry = self._entries.get(pid_or_future)
                if entry is None:
                    raise ValueError(f"pid {pid_or_future!r} is not watched by this monitor")
            future = entry.future
        if future is None:  # completed meanwhile
            raise ValueError(f"pid {entry.watch.pid} is no longer watched by this monitor")
        self._post(_CMD_TERMINATE, entry)
        return future

    def futures(self) -> list[cf.Future[DispatchCompletionResult]]:
        """Every future returned by :meth:`watch` that is still referenced somewhere."""
        with self._lock:
            return list(self._futures)

    def as_completed(
        self,
        futures: Optional[Iterable[cf.Future[DispatchCompletionResult]]] = None,
        timeout: Optional[float] = None,
    ) -> Iterator[cf.Future[DispatchCompletionResult]]:
        """:func:`concurrent.futures.as_completed` over ``futures`` (default: :meth:`futures`)."""
        return cf.as_completed(self.futures() if futures is None else list(futures), timeout)

    def wait(
        self,
        futures: Optional[Iterable[cf.Future[DispatchCompletionResult]]] = None,
        timeout: Optional[float] = None,
        return_when: str = ALL_COMPLETED,
    ) -> DoneAndNotDoneFutures[DispatchCompletionResult]:
        """:func:`concurrent.futures.wait` over ``futures`` (default: :meth:`futures`)."""
        chosen = self.futures() if futures is None else list(futures)
        return cf.wait(chosen, timeout, return_when)

    def close(self, terminate: bool = True) -> None:
        """Stop every running dispatch (or stop watching them), then end the thread.

        Idempotent; the first call decides ``terminate``. Returns once every
        future is done (or cancelled) and every fd of the monitor is closed.
        Called from the monitor thread itself (a done-callback), it only asks.
        """
        with self._lock:
            first = not self._closing
            self._closing = True
        if first:
            self._post(_CMD_CLOSE, bool(terminate))
        if threading.current_thread() is not self._thread:
            self._thread.join()

    # ------------------------------------------------------------------ plumbing

    def _post(self, cmd: int, arg: Any) -> None:
        """Hand the monitor thread a command and wake it (any thread)."""
        with self._lock:
            if self._wake_w < 0:
                return
            self._inbox.append((cmd, arg))
            wake = not self._woken
            self._woken = True
            if wake:
                with contextlib.suppress(BlockingIOError):
                    os.write(self._wake_w, b"!")

    def _release(self) -> None:
        with self._lock:
            wake_w, self._wake_w = self._wake_w, -1
            wake_r, self._wake_r = self._wake_r, -1
            self._closing = True
        if self._outer is not None:
            self._outer.close()
        if self._epset is not None:
            self._epset.close()
        for fd in (wake_r, wake_w):
            if fd >= 0:
                os.close(fd)

    def _timeout(self) -> Optional[float]:
        if self._ending or self._backlog or self._more_due:
            return 0.0
        dues = [d for d in (self._timers.next_due(), self._polled.next_due()) if d is not None]
        if not dues:
            return None
        due = min(dues)
        return min(MAX_WAIT_S, max(0.0, due - time.monotonic()))

    def _wait(self, timeout: Optional[float]) -> list[tuple[int, int]]:
        """The outer set's events, by the due time of the next timer to the microsecond
        (a stage's SIGKILL is not a millisecond late; see ``backends.deadlines``)."""
        assert self._outer is not None
        deadline = None if timeout is None else time.monotonic() + timeout
        return wait_until(epoll_ms(self._outer), deadline)

    def _register(self, entry: _Entry, pin: Pin) -> None:
        """Await ``pin``'s exit: its pidfd in the epoll set, else the polling timer."""
        if self._epset is not None and pin.fd >= 0:
            token = self._next_token
            self._next_token += 1
            try:
                self._epset.add(pin.fd, token)
            except OSError as exc:
                self._log.warning(f"ralph-reaper: epoll add failed for pid {pin.pid} ({exc})")
            else:
                self._tokens[token] = entry
                entry.tokens[token] = pin
                return
        entry.slow.append(pin)
        self._polled.add(pin, entry, time.monotonic())

    def _unregister_all(self, entry: _Entry) -> None:
        for token, pin in entry.tokens.items():
            self._tokens.pop(token, None)
            if self._epset is not None and pin.fd >= 0:
                with contextlib.suppress(OSError):
                    self._epset.remove(pin.fd)
        entry.tokens.clear()
        for pin in entry.slow:
            self._polled.discard(pin)
        entry.slow.clear()

    # ------------------------------------------------------------------ the thread

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # a bug: never leave futures hanging
            self._log.error(f"DispatchMonitor thread failed: {exc!r}")
            self._fail_all(exc)
        finally:
            self._release()

    def _loop(self) -> None:
        while True:
            woken = inner = False
            for fd, _mask in self._wait(self._timeout()):
                if fd == self._wake_r:
                    woken = True
                else:
                    inner = True
            if woken:
                self._take_inbox()
            if inner:
                self._drain_exits()
            if self._poll_due():
                self._safely(None, self._poll)
            if self._ending:  # the ends of dispatches that were running: reported first
                self._sweep()
            if self._backlog and self._backlog_due():
                self._tell_stops()
            self._run_timers()
            if self._close_mode is not None and self._active == 0:
                return

    def _run_timers(self) -> None:
        """One slice of the due timers. The stops they begin or move on share one walk
        of their sessions' regions, with the slices after it (timeouts that fall
        together: not N walks of N)."""
        until = time.monotonic() + SLICE_S
        if not self._more_due:
            self._timer_walk = None  # the last batch is done: the next one walks afresh
            due = self._timers.next_due()
            if due is not None and due <= time.monotonic() and self._batch_walks():
                self._timers_walk([])  # the new batch's
        walk = self._timer_walk
        if walk is not None and not walk.advance(self._backend, until):
            self._more_due = True  # read in steps: other exits are taken in between
            return
        self._more_due = self._timers.run_due(
            self._run_timer,
            SLICE,
            until,
            prepare=lambda args: sharing(self._timers_walk(args)),
        )

    def _timers_walk(self, args: list[Any]) -> Walk:
        """The walk for a slice of due timers: the slice's own; where orphans are
        adopted, the batch's if it covers the slice, else a new one of every timer
        due now (this slice's and the rest)."""
        if not self._batch_walks():
            return Walk(lambda: self._lineages(args))
        walk = self._timer_walk
        if walk is None or not self._covers(walk, args):
            due = [*args, *self._timers.due_args()]
            walk = self._timer_walk = Walk(lambda: self._lineages(due))
        return walk

    def _tell_stops(self) -> None:
        """One slice of the backlog: stops told of their members' exits.

        Where orphans are adopted, a walk serves the backlog as it stood when
        the walk was made, a slice a turn; entries that came in after it wait
        behind them for the next walk: one walk per generation of exits, not
        one per slice. Elsewhere each slice has a walk of its own.
        """
        until = time.monotonic() + SLICE_S
        batch_walks = self._batch_walks()
        walk = self._backlog_walk if batch_walks else None
        if walk is None or not self._covers(walk, [self._backlog[next(iter(self._backlog))][0]]):
            entries = (entry for entry, _ in self._backlog.values())
            backlog = list(entries if batch_walks else itertools.islice(entries, SLICE))
            walk = Walk(lambda: self._lineages(backlog))
            self._backlog_walk = walk if batch_walks else None
        if batch_walks and not walk.advance(self._backend, until):
            return  # read in steps: other exits are taken in between
        with sharing(walk):
            for i in range(SLICE):
                if not self._backlog or (i and time.monotonic() >= until):
                    break
                key = next(iter(self._backlog))
                entry, pins = self._backlog[key]
                if not self._covers(walk, [entry]):  # came in after the walk: the next one's
                    break
                del self._backlog[key]
                self._safely(entry, self._exited, entry, pins)
        if not self._backlog:
            self._backlog_walk = None

    def _backlog_due(self) -> bool:
        """Whether the backlog's turn has come (a slice of it each turn).

        Where orphans are adopted it waits behind a batch of due timers
        (thousands of timeouts at once): their stops begin first and their
        members' exits gather, then one walk tells them all, where telling them
        between slices would walk every dispatch again for every few exits that
        came in. Never for longer than BACKLOG_WAIT_S.
        """
        return (
            not self._more_due
            or time.monotonic() - self._backlog_at >= BACKLOG_WAIT_S
            or not self._batch_walks()
        )

    def _batch_walks(self) -> bool:
        """Whether the slices of a batch share its walk: in a process that adopts
        orphans, where any walk costs every dispatch started after the oldest it
        covers (see the module docstring); elsewhere a slice walks its own."""
        return adopts_orphans(self._backend)

    def _covers(self, walk: Walk, entries: Iterable[Any]) -> bool:
        return all(walk.covers(lineage) for lineage in self._lineages(entries))

    def _tell_stop(self, entry: _Entry) -> None:
        """Before a stop of ``entry`` acts: tell it of exits still in the backlog."""
        pending = self._backlog.pop(id(entry), None)
        if pending is not None:
            self._exited(entry, pending[1])

    def _take_inbox(self) -> None:
        # Empty the pipe first, then the inbox: a command posted in between
        # either is in this inbox or writes a new byte (see _post).
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wake_r, 4096):
                pass
        with self._lock:
            commands, self._inbox = self._inbox, []
            self._woken = False
        handlers: dict[int, Callable[[Any], None]] = {
            _CMD_WATCH: self._start,
            _CMD_TERMINATE: self._terminate,
            _CMD_CANCEL: self._cancel,
            _CMD_OTHER_STOP: self._other_stop_done,
        }
        for cmd, arg in commands:
            if cmd == _CMD_CLOSE:
                self._begin_close(arg)
            else:
                self._safely(arg, handlers[cmd], arg)

    def _drain_exits(self) -> None:
        epset = self._epset
        if epset is None:
            return
        touched: dict[int, tuple[_Entry, list[Pin]]] = {}
        while True:
            events = epset.drain(0.0, DRAIN_BATCH)
            for ev in events:
                entry = self._tokens.pop(ev.token, None)
                if entry is None:
                    continue
                pin = entry.tokens.pop(ev.token)
                pin.set_exit(
                    None if ev.status is None else ExitStatus(ev.status, ev.rusage), ev.reaped
                )
                if pin.status is None and not ev.reaped:
                    with contextlib.suppress(OSError):  # then its status is unknown
                        pin.collect()
                touched.setdefault(id(entry), (entry, []))[1].append(pin)
            if len(events) < DRAIN_BATCH:
                break
        if not touched:
            # Readable, yet nothing exited (a pidfd of a task that is not quite
            # gone): do not spin on the level-triggered set.
            time.sleep(0.001)
        # Statuses of the whole batch are set before anyone looks at them.
        for entry, pins in touched.values():
            self._took_exits(entry, pins)

    def _took_exits(self, entry: _Entry, pins: list[Pin]) -> None:
        """A running dispatch's end is taken now; a stop's members' exits wait their
        slice (:meth:`_tell_stops`)."""
        if entry.state == _STOPPING:
            held = self._backlog.get(id(entry))
            if held is None:
                if not self._backlog:
                    self._backlog_at = time.monotonic()
                self._backlog[id(entry)] = (entry, pins)
            else:
                held[1].extend(pins)
        elif entry.state != _DONE:
            self._safely(entry, self._exited, entry, pins)

    def _run_timer(self, fn: Callable[[Any], None], arg: Any) -> None:
        self._safely(arg if isinstance(arg, _Entry) else None, fn, arg)

    def _poll(self) -> None:
        """Polling path: the due checks of every pin without a pidfd, in one round.

        Taken in with the drained exits, ahead of the turn's stop work (not a
        timer behind thousands of due deadlines). Exited pins come back
        collected; each entry then hears of its own, and a pin whose check
        raised fails its entry alone.
        """
        found, failed = self._polled.check(time.monotonic(), collect=True)
        for entry, _pin, exc in failed:
            if entry.state != _DONE:
                self._fail(entry, exc)
        gone: dict[int, tuple[_Entry, list[Pin]]] = {}
        for entry, pin in found:
            gone.setdefault(id(entry), (entry, []))[1].append(pin)
        for entry, pins in gone.values():
            ids = {id(p) for p in pins}
            entry.slow = [p for p in entry.slow if id(p) not in ids]
            self._took_exits(entry, pins)

    def _poll_due(self) -> bool:
        due = self._polled.next_due()
        return due is not None and due <= time.monotonic()

    # ------------------------------------------------------------------ watches

    def _start(self, entry: _Entry) -> None:
        if entry.state != _NEW:  # cancelled before the thread took it
            return
        self._active += 1
        entry.state = _RUNNING
        w = entry.watch
        if w.leader is None:
            self._natural(entry)
            return
        if self._progress is None:
            self._progress = self._timers.schedule(
                time.monotonic() + PROGRESS_EVERY_S, self._progress_line, None
            )
        self._register(entry, w.leader)
        self._arm_wake(entry)

    def _arm_wake(self, entry: _Entry) -> None:
        now = time.monotonic()
        wake = entry.watch.wake_at(now)
        if wake != float("inf"):
            entry.wake_timer = self._timers.schedule(wake, self._wake, entry)

    def _wake(self, entry: _Entry) -> None:
        entry.wake_timer = None
        if entry.state != _RUNNING:
            return
        reason = entry.watch.due(time.monotonic())
        if reason is None:
            self._arm_wake(entry)
        else:
            self._start_stop(entry, reason)

    def _progress_line(self, _arg: Any) -> None:
        """One line per PROGRESS_EVERY_S for the whole monitor, not one per dispatch:
        with thousands watched, per-dispatch lines (as a lone wait logs) would
        drown the log."""
        self._progress = None
        with self._lock:
            running = [e.watch for e in self._entries.values() if e.state not in (_NEW, _DONE)]
        if not running:
            return
        now = time.monotonic()
        oldest = min(running, key=lambda w: w.started)
        self._log.info(
            f"{len(running)} dispatch(es) still running; longest: {oldest.ticket_id} "
            f"after {now - oldest.started:.0f}s"
        )
        self._progress = self._timers.schedule(now + PROGRESS_EVERY_S, self._progress_line, None)

    def _exited(self, entry: _Entry, pins: list[Pin]) -> None:
        if entry.state == _RUNNING:
            self._natural(entry)
        elif entry.state == _STOPPING and entry.stop is not None:
            entry.stop.exited(pins, time.monotonic())
            self._sync(entry)

    def _natural(self, entry: _Entry) -> None:
        """The leader exited by itself (or was reaped before the watch)."""
        self._timers.cancel(entry.wake_timer)
        entry.wake_timer = None
        self._unregister_all(entry)
        w = entry.watch
        other = None if w.leader is None else ONGOING.get(w.leader)
        if other is not None:  # another call is stopping it: report that stop
            entry.state = _ENDING
            w.reason, entry.ongoing = other
            entry.ongoing.add_done_callback(lambda _f: self._post(_CMD_OTHER_STOP, entry))
            return
        entry.state = _ENDING
        self._ending.append(entry)

    def _other_stop_done(self, entry: _Entry) -> None:
        assert entry.ongoing is not None
        self._complete(entry, finish(entry.watch, entry.ongoing.result()))

    def _sweep(self) -> None:
        """Natural ends of one turn: one scan says which sessions still have members."""
        batch, self._ending = self._ending, []
        sids = {
            e.watch.sid: e.watch.lineage
            for e in batch
            if needs_sweep(e.watch) and e.watch.sid is not None
        }
        for entry in batch:
            collect_leader(entry.watch)
        walk = Walk([lineage for lineage in sids.values() if lineage is not None])
        try:
            busy = (
                sessions_in_use(self._backend, sids, REGISTRY.started_here, walk=walk)
                if sids
                else set()
            )
        except Exception as exc:  # cannot tell: look at each session on its own
            self._log.warning(f"ralph-reaper: session scan failed ({exc!r})")
            busy = set(sids)
        # A process left in a leader's group that the search missed: swept all the same.
        busy |= {e.watch.sid for e in batch if e.watch.group_left and e.watch.sid in sids}
        with sharing(walk):  # the sweeps' first searches: what the scan just read
            for entry in batch:
                if entry.state == _ENDING:
                    self._safely(entry, self._sweep_one, entry, busy)

    @staticmethod
    def _lineages(entries: Iterable[Any]) -> list[Lineage]:
        """The lineages of those of ``entries`` (timer arguments, say) that are entries."""
        return [
            e.watch.lineage
            for e in entries
            if isinstance(e, _Entry) and e.watch.lineage is not None
        ]

    def _sweep_one(self, entry: _Entry, busy: set[int]) -> None:
        w = entry.watch
        stop = sweep_for(w) if w.keeper or w.sid in busy else None
        if stop is None:
            self._complete(entry, finish(w, None))
            return
        entry.sweeping = True
        self._run_stop(entry, stop)

    # ------------------------------------------------------------------ stops

    def _start_stop(self, entry: _Entry, reason: str) -> None:
        self._timers.cancel(entry.wake_timer)
        entry.wake_timer = None
        other = joinable(entry.watch)
        if other is not None:  # stopped by another call already: report that stop
            self._unregister_all(entry)
            entry.state = _ENDING
            entry.watch.reason, entry.ongoing = reason, other
            other.add_done_callback(lambda _f: self._post(_CMD_OTHER_STOP, entry))
            return
        stop = stop_for(entry.watch, reason)
        if stop is None:  # it ended as time ran out
            self._natural(entry)
            return
        self._unregister_all(entry)  # the stop awaits the leader among its members
        leader = entry.watch.leader
        if leader is not None:
            future, mine = ONGOING.claim(leader, reason)
            if not mine:  # claimed by another call meanwhile: report that stop
                stop.members.close_others()
                entry.state = _ENDING
                entry.ongoing = future
                future.add_done_callback(lambda _f: self._post(_CMD_OTHER_STOP, entry))
                return
            entry.ongoing = future
        self._run_stop(entry, stop)

    def _run_stop(self, entry: _Entry, stop: Stop) -> None:
        entry.state = _STOPPING
        entry.stop = stop
        stop.begin(time.monotonic())
        self._sync(entry)

    def _sync(self, entry: _Entry) -> None:
        """After the stop acted: watch its new pins, (re)arm its deadline, or complete."""
        stop = entry.stop
        assert stop is not None
        for pin in stop.take_new():
            self._register(entry, pin)
        if stop.outcome is not None:
            self._stop_done(entry, stop.outcome)
            return
        timer = entry.stop_timer
        if timer is None or timer[0] != stop.deadline or timer[2] is None:
            self._timers.cancel(timer)
            entry.stop_timer = self._timers.schedule(stop.deadline, self._stop_due, entry)

    def _stop_due(self, entry: _Entry) -> None:
        entry.stop_timer = None
        self._tell_stop(entry)
        if entry.state == _STOPPING and entry.stop is not None:
            entry.stop.due(time.monotonic())
            self._sync(entry)

    def _stop_done(self, entry: _Entry, outcome: StopOutcome) -> None:
        self._timers.cancel(entry.stop_timer)
        entry.stop_timer = None
        self._unregister_all(entry)
        w = entry.watch
        if entry.sweeping:
            outcome = not_running(outcome)
        elif entry.ongoing is not None and w.leader is not None:
            ONGOING.end(w.leader, entry.ongoing, outcome)
        entry.stop = None
        self._complete(entry, finish(w, outcome))

    def _terminate(self, entry: _Entry) -> None:
        if entry.state == _RUNNING:
            self._start_stop(entry, "terminate")
        elif entry.state == _STOPPING and entry.stop is not None:
            self._tell_stop(entry)
            stop = entry.stop
            if stop is None:  # the exits ended it
                return
            if not stop.done and stop.plan.stage in ("eof", "sigterm"):
                stop.due(time.monotonic())  # skip the rest of the grace
                self._sync(entry)

    # ------------------------------------------------------------------ endings

    def _cancel(self, entry: _Entry) -> None:
        """The future was cancelled: stop watching (only before any stop began)."""
        if entry.state == _NEW:
            entry.state = _DONE
            self._drop(entry)
        elif entry.state == _RUNNING:
            self._abandon(entry)

    def _abandon(self, entry: _Entry) -> None:
        """Stop watching a running dispatch: nothing is signalled; its future is cancelled."""
        self._unregister_all(entry)
        self._timers.cancel(entry.wake_timer)
        entry.wake_timer = None
        entry.state = _DONE
        self._active -= 1
        self._drop(entry)

    def _drop(self, entry: _Entry) -> None:
        """Forget an entry whose future is (to be) cancelled; close its pin."""
        if entry.watch.leader is not None:
            entry.watch.leader.close()
            entry.watch.leader = None
        future = entry.future
        self._forget(entry)
        if future is not None:
            future.cancel()
            with contextlib.suppress(RuntimeError):
                future.set_running_or_notify_cancel()  # wakes wait()/as_completed()

    def _forget(self, entry: _Entry) -> None:
        with self._lock:
            if self._entries.get(entry.watch.pid or 0) is entry:
                del self._entries[entry.watch.pid or 0]
        entry.future = None
        entry.stop = None
        entry.monitor = None

    def _complete(self, entry: _Entry, result: DispatchCompletionResult) -> None:
        if entry.state != _DONE:
            entry.state = _DONE
            self._active -= 1
        future = entry.future
        self._forget(entry)
        if future is None:
            return
        try:
            if future.set_running_or_notify_cancel():
                future.set_result(result)
        except RuntimeError:  # someone else touched the future's state
            pass

    def _begin_close(self, terminate: bool) -> None:
        self._close_mode = terminate
        with self._lock:
            entries = list(self._entries.values())
        for entry in entries:
            if entry.state == _RUNNING:
                if terminate:
                    self._safely(entry, self._start_stop, entry, "close")
                else:
                    self._safely(entry, self._abandon, entry)

    def _safely(self, entry: Optional[_Entry], fn: Callable[..., None], *args: Any) -> None:
        """Run one step for one dispatch: an unexpected error fails that dispatch only."""
        try:
            fn(*args)
        except Exception as exc:
            if entry is None:
                raise
            self._fail(entry, exc)

    def _fail(self, entry: _Entry, exc: Exception) -> None:
        if entry.state == _DONE:
            return
        w = entry.watch
        self._log.error(f"DispatchMonitor: watching dispatch of {w.ticket_id} failed: {exc!r}")
        self._release_entry(entry)
        result = w.error(f"monitor error: {exc!r}")
        result.termination_method = "failed" if w.reason else "natural"
        self._complete(entry, result)

    def _release_entry(self, entry: _Entry) -> None:
        self._backlog.pop(id(entry), None)
        self._unregister_all(entry)
        self._timers.cancel(entry.wake_timer)
        self._timers.cancel(entry.stop_timer)
        if entry.stop is not None and not entry.stop.done:
            entry.stop.members.close()
        if entry.watch.leader is not None:
            entry.watch.leader.close()
            entry.watch.leader = None

    def _fail_all(self, exc: BaseException) -> None:
        with self._lock:
            entries = list(self._entries.values())
            self._closing = True
        error = RuntimeError(f"DispatchMonitor thread failed: {exc!r}")
        for entry in entries:
            self._release_entry(entry)
            future = entry.future
            self._forget(entry)
            if future is not None and future.set_running_or_notify_cancel():
                future.set_exception(error)
