"""Many dispatches, one thread: one epoll set, one timer heap, no thread per dispatch.

:class:`DispatchMonitor` watches any number of dispatches from a single thread.
Its results are those of :func:`~ralph_reaper.wait_for_dispatch_completion`
(the same statuses, return codes, methods and fields), delivered through
:class:`concurrent.futures.Future` objects.

How the thread waits
--------------------
Exits are reported by the backend's epoll set of pidfds, whose ``drain``
reaps every exited child of a batch in one call. That call runs ``waitid`` on
each ready fd, so nothing but pidfds may sit in that set. The thread therefore
waits on a second, tiny ``select.epoll`` that holds two fds: the backend's epoll
set itself (an epoll fd is readable while any fd in it is) and the read end of
a wake-up pipe that other threads write to when they hand the thread work
(``watch``, ``terminate``, ``close``, a future cancelled). One ``epoll_wait``
with the timeout of the earliest timer is the only place the thread blocks,
so with nothing due it uses no CPU at all.

Without pidfds (the polling backend) or for a process pinned without one
(out of file descriptors, see :mod:`ralph_reaper.pins`) the timer heap checks
the process with a per-dispatch backoff from 0.1 ms doubling to 50 ms.

How stops avoid blocking
------------------------
A timeout, an idle stop or :meth:`DispatchMonitor.terminate` never calls the
blocking stop sequence on the monitor thread. The sequence of
:mod:`ralph_reaper.stopping` (EOF where the package holds the dispatch's
stdin, then SIGTERM + SIGCONT, then SIGKILL with up to five rounds for members
forked meanwhile, then give up) is run as steps of the timer heap: each stage
discovers and pins the members, signals them, adds their pidfds to the same
epoll set and schedules the next stage; the stop ends the moment the last
member's exit is drained. Any number of stops thus run at once, interleaved
with exit detection of every other dispatch. The one exception is a dispatch
under *keeper* containment (started by ``spawn_dispatch`` with the native
backend): its keeper runs the sequence with its own timers, and asking and
waiting is done by :func:`ralph_reaper.completion.terminate` in a small worker
thread pool, again without holding up the monitor thread.

After a natural exit, what the leader left in its own session is stopped as
``wait_for_dispatch_completion`` does (``stop_leftovers=True``). Finding out
whether a session still has members means reading ``/proc``; exits drained
together are checked with one scan, so a burst of N exits costs one scan, not N.

Results of stops
----------------
* timeout, idle: ``TIMEOUT`` (``timed_out=True``, ``stop_reason`` ``"timeout"``
  or ``"idle"``), as in ``wait_for_dispatch_completion``;
* :meth:`~DispatchMonitor.terminate` or ``close(terminate=True)``:
  ``TERMINATED`` with the stage that ended it in ``termination_method`` and
  ``stop_reason`` ``"terminate"`` or ``"close"``;
* a stop that could not end the tree: ``ERROR`` with method ``"failed"``.

Futures are completed on the monitor thread: done-callbacks run there and must
not block (``asyncio.wrap_future`` and the waiting helpers here do not).
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import heapq
import itertools
import os
import select
import signal
import threading
import time
import weakref
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, Callable, Optional, Union

from .backends import get as get_backend
from .backends.base import Backend, EpollSet
from .completion import (
    DEFAULT_EOF_WAIT_MS,
    PROGRESS_EVERY_S,
    _ended,
    _idle_watch,
    stopped_result,
)
from .completion import terminate as _blocking_terminate
from .containment import Members
from .dispatches import REGISTRY, Dispatch
from .exits import BOOK
from .exitstatus import ExitStatus
from .idle import IdleWatch
from .logs import LogSink, resolve_logger
from .pins import Pin
from .results import DispatchCompletionResult, DispatchCompletionStatus
from .stopping import (
    KILL_ROUNDS,
    KILL_WAIT_S,
    StopOutcome,
    _finish,
    keeper_details,
    stop_members,
)
from .validation import check_ms, check_signal_target
from .waiting import FIRST_STEP_S, MAX_STEP_S

if TYPE_CHECKING:
    from concurrent.futures._base import DoneAndNotDoneFutures

__all__ = ["ALL_COMPLETED", "FIRST_COMPLETED", "FIRST_EXCEPTION", "DispatchMonitor"]

ALL_COMPLETED = cf.ALL_COMPLETED
FIRST_COMPLETED = cf.FIRST_COMPLETED
FIRST_EXCEPTION = cf.FIRST_EXCEPTION

#: Exits taken out of the epoll set per drain call.
DRAIN_BATCH = 1024
EOF_WAIT_S = DEFAULT_EOF_WAIT_MS / 1000.0
#: The longest single epoll wait (epoll_wait takes an int of milliseconds).
MAX_WAIT_S = 86400.0
#: Heap compaction: rebuild once this many cancelled timers make up half the heap.
_COMPACT_MIN = 64

# Watch states (owned by the monitor thread once the watch is taken in).
_NEW, _RUNNING, _STOPPING, _HANDED, _ENDING, _SWEEPING, _DONE = range(7)

# Commands posted to the monitor thread.
_CMD_WATCH, _CMD_TERMINATE, _CMD_CANCEL, _CMD_HANDED, _CMD_CLOSE = range(5)


class _Watch:
    """One watched dispatch: a pinned leader and what to do about it (a few hundred bytes)."""

    __slots__ = (
        "backend_name",
        "deadline_entry",
        "dispatch",
        "future",
        "grace_s",
        "idle",
        "idle_s",
        "known",
        "leader",
        "limit_s",
        "monitor",
        "pid",
        "reason",
        "session_id",
        "sid",
        "started",
        "state",
        "step",
        "stop",
        "stop_leftovers",
        "ticket_id",
        "token",
        "watching",
    )

    def __init__(self, ticket_id: str, session_id: str, pid: Any, backend_name: str) -> None:
        self.ticket_id = ticket_id
        self.session_id = session_id
        self.pid: Any = pid
        self.backend_name = backend_name
        self.started = 0.0
        self.state = _NEW
        self.future: Optional[cf.Future[DispatchCompletionResult]] = None
        self.monitor: Optional[DispatchMonitor] = None
        self.leader: Optional[Pin] = None
        #: The exit status, when the leader had been reaped before it was watched.
        self.known: Optional[ExitStatus] = None
        #: The session the leader leads (its pid), scanned for leftovers; None if none.
        self.sid: Optional[int] = None
        self.dispatch: Optional[Dispatch] = None
        self.limit_s = 0.0
        self.grace_s = 0.0
        self.idle_s = 0.0
        self.idle: Optional[IdleWatch] = None
        self.stop_leftovers = True
        self.deadline_entry: Optional[list[Any]] = None
        self.reason: Optional[str] = None
        self.stop: Optional[_Stop] = None
        self.token = 0
        self.watching = False
        self.step = FIRST_STEP_S

    def base(self) -> dict[str, Any]:
        base: dict[str, Any] = {
            "ticket_id": self.ticket_id,
            "session_id": self.session_id,
            "pid": self.pid if type(self.pid) is int else None,
            "backend": self.backend_name,
        }
        if self.dispatch is not None:
            base["containment"] = self.dispatch.containment
        return base

    def __call__(self, future: cf.Future[DispatchCompletionResult]) -> None:
        """Done-callback of the future: a cancelled future means "stop watching"."""
        monitor = self.monitor
        if monitor is not None and future.cancelled():
            monitor._post(_CMD_CANCEL, self)


class _Stop:
    """A stop sequence run as timer steps: the members, the stage, who is still awaited."""

    __slots__ = (
        "done",
        "entry",
        "kill_round",
        "leftovers",
        "members",
        "method",
        "ntracked",
        "polling",
        "signalled",
        "slow",
        "stage",
        "stage_ms",
        "step",
        "t0",
        "tokens",
        "waiting",
        "watch",
    )

    def __init__(self, watch: _Watch, members: Members, leftovers: bool) -> None:
        self.watch = watch
        self.members = members
        #: True when this stops what an exited leader left behind (the result stays natural).
        self.leftovers = leftovers
        self.signalled: set[int] = set()
        self.stage_ms: dict[str, float] = {}
        self.stage = ""
        self.t0 = 0.0
        self.method = "failed"
        self.kill_round = 0
        self.entry: Optional[list[Any]] = None
        #: Pinned members whose exit this stage still awaits.
        self.waiting: set[Pin] = set()
        #: How many of ``members.pins`` have been looked at (the dict only grows).
        self.ntracked = 0
        self.tokens: list[int] = []
        self.slow: list[Pin] = []
        self.polling = False
        self.step = FIRST_STEP_S
        self.done = False


_Owner = Union[_Watch, _Stop]


def _prepare(
    backend: Backend,
    log: LogSink,
    dispatch_result: Any,
    ticket_id: str,
    timeout_ms: float,
    graceful_shutdown_ms: float,
    idle_timeout_ms: float,
    stop_leftovers: bool,
    started: float,
) -> Union[_Watch, DispatchCompletionResult]:
    """Validate, look the dispatch up and pin its leader; or the immediate ERROR result.

    Shared by :class:`DispatchMonitor` and :mod:`ralph_reaper.aio`; it follows
    the prologue of ``wait_for_dispatch_completion`` step by step.
    """
    timeout_s = check_ms("timeout_ms", timeout_ms) / 1000.0
    grace_s = check_ms("graceful_shutdown_ms", graceful_shutdown_ms) / 1000.0
    idle_s = check_ms("idle_timeout_ms", idle_timeout_ms) / 1000.0
    session_id = getattr(dispatch_result, "session_id", "") or ""
    pid_value = getattr(dispatch_result, "pid", None)
    w = _Watch(ticket_id, session_id, pid_value, backend.name)
    w.started = started
    w.grace_s = grace_s
    w.stop_leftovers = stop_leftovers

    def error(message: str) -> DispatchCompletionResult:
        result = DispatchCompletionResult(
            **w.base(), status=DispatchCompletionStatus.ERROR, error=message
        )
        result.duration_ms = (time.monotonic() - started) * 1000.0
        return result

    if pid_value is None:
        log.error(f"No PID available for dispatch of {ticket_id}")
        return error("No PID available")
    try:
        pid = check_signal_target(pid_value)
    except (TypeError, ValueError) as exc:
        log.error(f"Invalid PID for dispatch of {ticket_id}: {exc}")
        return error(str(exc))
    w.pid = pid
    dispatch = REGISTRY.get(pid)
    w.dispatch = dispatch
    if dispatch is not None:
        if dispatch.containment == "keeper":
            w.stop_leftovers = False  # the keeper stopped them before it exited
        if timeout_s <= 0 and dispatch.timeout_ms > 0:
            timeout_s = max(0.0, dispatch.spawned_at + dispatch.timeout_ms / 1000.0 - started)
            timeout_s = timeout_s or 1e-9
        idle_s = idle_s or dispatch.idle_timeout_ms / 1000.0
    w.limit_s = timeout_s
    w.idle_s = idle_s
    known = BOOK.lookup(backend, pid)
    if known is not None:
        w.known = known
        w.sid = pid
        return w
    leader = BOOK.take(pid) or Pin.open(backend, pid)
    if leader is None:
        # Already reaped by someone else: report what is known, still sweep its session.
        w.sid = pid
        return w
    w.leader = leader
    st = backend.proc_stat(pid)
    if st is not None and st.session == pid:
        w.sid = pid
    if idle_s > 0:
        w.idle = _idle_watch(backend, dispatch, pid)
    return w


def _idle_sample_s(idle_s: float) -> float:
    return min(max(idle_s / 4.0, 0.05), 1.0)


def _limit(w: _Watch) -> float:
    """The limit that ran out, for the result's message."""
    return w.idle_s if w.reason == "idle" else w.limit_s


def _sessions_in_use(backend: Backend, sids: set[int]) -> set[int]:
    """Which of ``sids`` still have a process (zombies count: they may need reaping).

    One session: the backend's own scan. Several: one pass over ``/proc`` for all.
    """
    if len(sids) == 1:
        (sid,) = sids
        return {sid} if backend.session_members(sid) else set()
    try:
        names = os.listdir("/proc")
    except OSError:
        return set(sids)
    found: set[int] = set()
    for name in names:
        if not name.isdigit():
            continue
        st = backend.proc_stat(int(name))
        if st is not None and st.session in sids:
            found.add(st.session)
            if len(found) == len(sids):
                break
    return found


def _leader_status(w: _Watch) -> Optional[ExitStatus]:
    """Collect (reap) an exited leader, remember its exit, close its pin; its status."""
    status = w.known
    leader = w.leader
    if leader is not None:
        if leader.status is None:
            leader.collect()
        if leader.status is not None:
            status = leader.status
            BOOK.remember(leader.pid, leader.starttime, leader.status)
        leader.close()
    return status


def _stop_leftovers(backend: Backend, sid: int, kill_wait_s: float, log: LogSink) -> StopOutcome:
    """Blocking: stop what an exited leader left in its session ``sid`` (aio's executor)."""
    members = Members(backend, None, "session", session=sid)
    if members.discover() and members.live():
        log.info(f"session {sid}: the leader exited; stopping what it left behind")
        outcome = stop_members(members, kill_wait_s=kill_wait_s, log=log)
    else:
        outcome = _finish(members, True, "not_running", set(), {})
    outcome.method = "not_running"
    outcome.success = not outcome.survivors
    return outcome


def _natural_end(w: _Watch, outcome: StopOutcome) -> DispatchCompletionResult:
    """The result of a leader that exited by itself; ``outcome`` says what the sweep did."""
    outcome.leader_status = _leader_status(w)
    if w.dispatch is not None:
        keeper_details(w.dispatch, outcome)
        REGISTRY.release(w.pid)
    return _ended(w.base(), outcome, outcome.leader_status, w.pid)


def _watch_of(owner: Any) -> Optional[_Watch]:
    if isinstance(owner, _Watch):
        return owner
    if isinstance(owner, _Stop):
        return owner.watch
    return None


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
    way (timeouts, idle stops, leftovers) are finished first, so that no tree
    is left half-stopped. Cancelling one future likewise stops watching that
    dispatch alone (once its stop has begun, the stop still runs to its end).
    """

    def __init__(self, logger: Any = None, *, max_workers: int = 4) -> None:
        self._log = resolve_logger(logger)
        self._backend = get_backend()
        self._max_workers = max(1, int(max_workers))
        self._lock = threading.Lock()
        self._inbox: list[tuple[int, Any]] = []
        self._woken = False
        self._closing = False
        #: Set on the monitor thread when it takes the close command: terminate or not.
        self._close_mode: Optional[bool] = None
        self._watches: dict[int, _Watch] = {}
        self._futures: weakref.WeakSet[cf.Future[DispatchCompletionResult]] = weakref.WeakSet()
        # Owned by the monitor thread:
        self._heap: list[list[Any]] = []
        self._seq = itertools.count()
        self._stale = 0
        self._tokens: dict[int, tuple[_Owner, Pin]] = {}
        self._next_token = itertools.count(1)
        self._ending: list[_Watch] = []
        self._progress_entry: Optional[list[Any]] = None
        self._active = 0
        self._handed = 0
        self._pool: Optional[cf.ThreadPoolExecutor] = None
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
            return sum(1 for w in self._watches.values() if w.state != _DONE)

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
    ) -> cf.Future[DispatchCompletionResult]:
        """Watch one dispatch; its future gets what ``wait_for_dispatch_completion`` returns.

        ``duration_ms`` counts from this call. A missing or invalid pid gives a
        future already done with an ERROR result; bad durations raise
        TypeError/ValueError here; a closed monitor raises RuntimeError.
        """
        started = time.monotonic()
        if self._closing:
            raise RuntimeError("this DispatchMonitor is closed")
        prepared = _prepare(
            self._backend,
            self._log,
            dispatch_result,
            ticket_id,
            timeout_ms,
            graceful_shutdown_ms,
            idle_timeout_ms,
            stop_leftovers,
            started,
        )
        future: cf.Future[DispatchCompletionResult] = cf.Future()
        if isinstance(prepared, DispatchCompletionResult):
            future.set_result(prepared)
            with self._lock:
                self._futures.add(future)
            return future
        w = prepared
        w.future = future
        w.monitor = self
        with self._lock:
            problem = None
            if self._closing:
                problem = RuntimeError("this DispatchMonitor is closed")
            else:
                other = self._watches.get(w.pid)
                if other is not None and other.state in (_NEW, _RUNNING):
                    problem = ValueError(f"pid {w.pid} is already watched by this monitor")
            if problem is None:
                self._watches[w.pid] = w
                self._futures.add(future)
        if problem is not None:
            if w.leader is not None:
                w.leader.close()
            raise problem
        future.add_done_callback(w)
        self._post(_CMD_WATCH, w)
        return future

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
            w: Optional[_Watch] = None
            if isinstance(pid_or_future, cf.Future):
                for candidate in self._watches.values():
                    if candidate.future is pid_or_future:
                        w = candidate
                        break
                if w is None:
                    if pid_or_future.done():
                        return pid_or_future
                    raise ValueError("this future was not returned by this monitor's watch()")
            else:
                w = self._watches.get(pid_or_future)
                if w is None:
                    raise ValueError(f"pid {pid_or_future!r} is not watched by this monitor")
            future = w.future
        if future is None:  # completed meanwhile
            raise ValueError(f"pid {w.pid} is no longer watched by this monitor")
        self._post(_CMD_TERMINATE, w)
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
        if self._pool is not None:
            self._pool.shutdown(wait=self._handed == 0)

    def _schedule(self, when: float, fn: Callable[[Any], None], arg: Any) -> list[Any]:
        entry = [when, next(self._seq), fn, arg]
        heapq.heappush(self._heap, entry)
        return entry

    def _cancel_entry(self, entry: Optional[list[Any]]) -> None:
        if entry is None or entry[2] is None:
            return
        entry[2] = entry[3] = None
        self._stale += 1
        if self._stale > _COMPACT_MIN and self._stale * 2 > len(self._heap):
            self._heap = [e for e in self._heap if e[2] is not None]
            heapq.heapify(self._heap)
            self._stale = 0

    def _timeout(self) -> Optional[float]:
        if self._ending:
            return 0.0
        heap = self._heap
        while heap and heap[0][2] is None:
            heapq.heappop(heap)
            self._stale -= 1
        if not heap:
            return None
        due: float = heap[0][0]
        return min(MAX_WAIT_S, max(0.0, due - time.monotonic()))

    def _wait(self, timeout: Optional[float]) -> list[tuple[int, int]]:
        assert self._outer is not None
        if timeout is None:
            return self._outer.poll(-1)
        if timeout == 0.0 or timeout >= 0.001:
            return self._outer.poll(timeout)
        # epoll_wait counts whole milliseconds: sleep the sub-millisecond steps of polling.
        events = self._outer.poll(0)
        if not events:
            time.sleep(timeout)
            events = self._outer.poll(0)
        return events

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
            self._run_timers()
            if self._ending:
                self._sweep()
            if self._close_mode is not None and self._active == 0 and self._handed == 0:
                return

    def _take_inbox(self) -> None:
        # Empty the pipe first, then the inbox: a command posted in between
        # either is in this inbox or writes a new byte (see _post).
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wake_r, 4096):
                pass
        with self._lock:
            commands, self._inbox = self._inbox, []
            self._woken = False
        for cmd, arg in commands:
            if cmd == _CMD_WATCH:
                self._safely(arg, self._start_watch, arg)
            elif cmd == _CMD_TERMINATE:
                self._safely(arg, self._terminate, arg)
            elif cmd == _CMD_CANCEL:
                self._safely(arg, self._cancel, arg)
            elif cmd == _CMD_HANDED:
                self._safely(arg[0], self._handed_back, *arg)
            elif cmd == _CMD_CLOSE:
                self._begin_close(arg)

    def _drain_exits(self) -> None:
        epset = self._epset
        if epset is None:
            return
        touched: list[tuple[_Owner, Pin]] = []
        while True:
            events = epset.drain(0.0, DRAIN_BATCH)
            for ev in events:
                entry = self._tokens.pop(ev.token, None)
                if entry is None:
                    continue
                owner, pin = entry
                pin.reaped = ev.reaped
                if ev.status is not None:
                    pin.status = ExitStatus(ev.status, ev.rusage)
                elif not ev.reaped:
                    with contextlib.suppress(OSError):  # then its status is unknown
                        pin.collect()
                if isinstance(owner, _Watch):
                    owner.token = 0
                touched.append(entry)
            if len(events) < DRAIN_BATCH:
                break
        if not touched:
            # Readable, yet nothing exited (a pidfd of a task that is not quite
            # gone): do not spin on the level-triggered set.
            time.sleep(0.001)
        # Statuses of the whole batch are set before anyone looks at them.
        for owner, pin in touched:
            self._safely(_watch_of(owner), self._exited, owner, pin)

    def _run_timers(self) -> None:
        heap = self._heap
        now = time.monotonic()
        while heap and heap[0][0] <= now:
            entry = heapq.heappop(heap)
            fn, arg = entry[2], entry[3]
            if fn is None:
                self._stale -= 1
                continue
            entry[2] = entry[3] = None
            self._safely(_watch_of(arg), fn, arg)

    def _register(self, owner: _Owner, pin: Pin) -> int:
        """Add ``pin``'s pidfd to the epoll set; 0 when it cannot be (then it is polled)."""
        if self._epset is None or pin.fd < 0:
            return 0
        token = next(self._next_token)
        try:
            self._epset.add(pin.fd, token)
        except OSError as exc:
            self._log.warning(f"ralph-reaper: epoll add failed for pid {pin.pid} ({exc}); polling")
            return 0
        self._tokens[token] = (owner, pin)
        return token

    def _unregister(self, token: int) -> None:
        entry = self._tokens.pop(token, None)
        if entry is not None and self._epset is not None:
            self._epset.remove(entry[1].fd)

    # ------------------------------------------------------------------ watches

    def _start_watch(self, w: _Watch) -> None:
        if w.state != _NEW:  # cancelled before the thread took it
            return
        self._active += 1
        w.state = _RUNNING
        leader = w.leader
        if leader is None:
            self._natural(w)
            return
        now = time.monotonic()
        if self._progress_entry is None:
            self._progress_entry = self._schedule(now + PROGRESS_EVERY_S, self._progress, None)
        w.watching = True
        w.token = self._register(w, leader)
        if not w.token:
            w.step = FIRST_STEP_S
            self._schedule(now + w.step, self._poll_owner, w)
        if w.limit_s > 0:
            w.deadline_entry = self._schedule(w.started + w.limit_s, self._deadline, w)
        if w.idle is not None and w.idle_s > 0:
            self._schedule(now + _idle_sample_s(w.idle_s), self._idle_tick, w)

    def _progress(self, _arg: Any) -> None:
        """One line per PROGRESS_EVERY_S for the whole monitor, not one per dispatch:
        with thousands watched, per-dispatch lines (as a lone wait logs) would
        drown the log."""
        self._progress_entry = None
        with self._lock:
            running = [w for w in self._watches.values() if w.state not in (_NEW, _DONE)]
        if not running:
            return
        now = time.monotonic()
        oldest = min(running, key=lambda w: w.started)
        self._log.info(
            f"{len(running)} dispatch(es) still running; longest: {oldest.ticket_id} "
            f"after {now - oldest.started:.0f}s"
        )
        self._progress_entry = self._schedule(now + PROGRESS_EVERY_S, self._progress, None)

    def _unwatch_leader(self, w: _Watch) -> None:
        if w.token:
            self._unregister(w.token)
            w.token = 0
        w.watching = False

    def _exited(self, owner: _Owner, pin: Pin) -> None:
        if isinstance(owner, _Watch):
            owner.watching = False
            if owner.state == _RUNNING:
                self._natural(owner)
            elif owner.stop is not None and not owner.stop.done:
                self._member_gone(owner.stop, pin)
        elif not owner.done:
            self._member_gone(owner, pin)

    def _poll_owner(self, owner: _Owner) -> None:
        """Polling path: check pins without pidfd, with a doubling backoff."""
        now = time.monotonic()
        if isinstance(owner, _Watch):
            w = owner
            leader = w.leader
            if not w.watching or leader is None or w.state not in (_RUNNING, _STOPPING):
                return
            if leader.status is None and not leader.exited():
                w.step = min(w.step * 2, MAX_STEP_S)
                self._schedule(now + w.step, self._poll_owner, w)
                return
            if leader.status is None:
                leader.collect()
            self._exited(w, leader)
            return
        stop = owner
        if stop.done:
            stop.polling = False
            return
        gone = [p for p in stop.slow if p.status is not None or p.exited()]
        if gone:
            stop.slow = [p for p in stop.slow if p not in gone]
        if stop.slow:
            stop.step = min(stop.step * 2, MAX_STEP_S)
            self._schedule(now + stop.step, self._poll_owner, stop)
        else:
            stop.polling = False
        for pin in gone:
            if not stop.done:
                self._member_gone(stop, pin)

    def _deadline(self, w: _Watch) -> None:
        w.deadline_entry = None
        if w.state == _RUNNING:
            self._start_stop(w, "timeout")

    def _idle_tick(self, w: _Watch) -> None:
        if w.state != _RUNNING or w.idle is None:
            return
        if w.idle.idle_for() >= w.idle_s:
            self._start_stop(w, "idle")
        else:
            self._schedule(time.monotonic() + _idle_sample_s(w.idle_s), self._idle_tick, w)

    def _terminate(self, w: _Watch) -> None:
        if w.state == _RUNNING:
            self._start_stop(w, "terminate")
        elif w.state in (_STOPPING, _SWEEPING) and w.stop is not None:
            stop = w.stop
            if not stop.done and stop.stage in ("eof", "sigterm"):  # skip the rest of the grace
                self._cancel_entry(stop.entry)
                stop.entry = None
                self._stage_due(stop)

    def _cancel(self, w: _Watch) -> None:
        """The future was cancelled: stop watching (only before any stop began)."""
        if w.state == _NEW:
            w.state = _DONE
            self._drop(w)
        elif w.state == _RUNNING:
            self._abandon(w)

    def _abandon(self, w: _Watch) -> None:
        """Stop watching a running dispatch: nothing is signalled; its future is cancelled."""
        self._unwatch_leader(w)
        self._cancel_entry(w.deadline_entry)
        w.deadline_entry = None
        w.state = _DONE
        self._active -= 1
        self._drop(w)

    def _drop(self, w: _Watch) -> None:
        """Forget a watch whose future is (to be) cancelled; close its pin."""
        if w.leader is not None:
            w.leader.close()
        future = w.future
        self._forget(w)
        if future is not None:
            future.cancel()
            with contextlib.suppress(RuntimeError):
                future.set_running_or_notify_cancel()  # wakes wait()/as_completed()

    def _forget(self, w: _Watch) -> None:
        with self._lock:
            if self._watches.get(w.pid) is w:
                del self._watches[w.pid]
        w.future = None
        w.leader = None
        w.dispatch = None
        w.idle = None
        w.stop = None
        w.monitor = None

    def _complete(self, w: _Watch, result: DispatchCompletionResult) -> None:
        result.duration_ms = (time.monotonic() - w.started) * 1000.0
        if w.state != _DONE:
            w.state = _DONE
            self._active -= 1
        future = w.future
        self._forget(w)
        self._log.info(
            f"Dispatch of {result.ticket_id} ended: {result.status.value} ({result.return_code})"
        )
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
            watches = list(self._watches.values())
        for w in watches:
            if w.state == _RUNNING:
                if terminate:
                    self._safely(w, self._start_stop, w, "close")
                else:
                    self._safely(w, self._abandon, w)
            elif w.state == _NEW:  # cannot happen: commands are taken in order
                w.state = _DONE
                self._drop(w)

    def _safely(self, w: Optional[_Watch], fn: Callable[..., None], *args: Any) -> None:
        """Run one step for one dispatch: an unexpected error fails that dispatch only."""
        try:
            fn(*args)
        except Exception as exc:
            if w is None:
                raise
            self._fail(w, exc)

    def _fail(self, w: _Watch, exc: Exception) -> None:
        if w.state == _DONE:
            return
        self._log.error(f"DispatchMonitor: watching dispatch of {w.ticket_id} failed: {exc!r}")
        stop = w.stop
        if stop is not None and not stop.done:
            stop.done = True
            self._cancel_entry(stop.entry)
            for token in stop.tokens:
                self._unregister(token)
            stop.members.close()
        self._unwatch_leader(w)
        self._cancel_entry(w.deadline_entry)
        w.deadline_entry = None
        if w.leader is not None:
            w.leader.close()
        result = DispatchCompletionResult(
            **w.base(),
            status=DispatchCompletionStatus.ERROR,
            termination_method="failed" if w.reason else "natural",
            error=f"monitor error: {exc!r}",
        )
        self._complete(w, result)

    def _fail_all(self, exc: BaseException) -> None:
        with self._lock:
            watches = list(self._watches.values())
            self._closing = True
        error = RuntimeError(f"DispatchMonitor thread failed: {exc!r}")
        for w in watches:
            if w.stop is not None:
                w.stop.members.close()
            if w.leader is not None:
                w.leader.close()
            future = w.future
            self._forget(w)
            if future is not None and future.set_running_or_notify_cancel():
                future.set_exception(error)

    # ------------------------------------------------------------------ natural ends

    def _natural(self, w: _Watch) -> None:
        """The leader exited by itself (or was reaped before the watch): sweep its session."""
        self._cancel_entry(w.deadline_entry)
        w.deadline_entry = None
        self._unwatch_leader(w)
        w.state = _ENDING
        self._ending.append(w)

    def _sweep(self) -> None:
        batch, self._ending = self._ending, []
        sids = {w.sid for w in batch if w.sid is not None and w.stop_leftovers}
        try:
            busy = _sessions_in_use(self._backend, sids) if sids else set()
        except Exception as exc:  # cannot tell: look at each session on its own
            self._log.warning(f"ralph-reaper: session scan failed ({exc!r})")
            busy = sids
        for w in batch:
            if w.state == _ENDING:
                self._safely(w, self._sweep_one, w, busy)

    def _sweep_one(self, w: _Watch, busy: set[int]) -> None:
        outcome: Optional[StopOutcome] = None
        if w.sid is not None and w.stop_leftovers and w.sid in busy:
            members = Members(self._backend, None, "session", session=w.sid)
            if members.discover() and members.live():
                self._log.info(f"pid {w.pid} exited; stopping what it left in its session {w.sid}")
                stop = _Stop(w, members, leftovers=True)
                w.stop = stop
                w.state = _SWEEPING
                self._stage(stop, "sigterm")
                return
            outcome = _finish(members, True, "not_running", set(), {})
        self._complete_natural(w, outcome or StopOutcome(True, "not_running"))

    def _complete_natural(self, w: _Watch, outcome: StopOutcome) -> None:
        self._complete(w, _natural_end(w, outcome))

    # ------------------------------------------------------------------ stops

    def _start_stop(self, w: _Watch, reason: str) -> None:
        leader = w.leader
        assert leader is not None
        if leader.status is not None or leader.exited():  # it ended as time ran out
            if leader.status is None:
                leader.collect()
            self._natural(w)
            return
        self._cancel_entry(w.deadline_entry)
        w.deadline_entry = None
        w.reason = reason
        if reason == "timeout":
            self._log.warning(
                f"Dispatch of {w.ticket_id} timed out after {w.limit_s * 1000.0:.0f}ms; stopping it"
            )
        elif reason == "idle":
            self._log.warning(
                f"Dispatch of {w.ticket_id} idle for {w.idle_s * 1000.0:.0f}ms; stopping it"
            )
        else:
            self._log.info(f"Stopping dispatch of {w.ticket_id} (pid {w.pid}): {reason}")
        if w.dispatch is not None and w.dispatch.containment == "keeper":
            self._hand_off(w)
            return
        members = Members(self._backend, leader, "session")
        stop = _Stop(w, members, leftovers=False)
        w.stop = stop
        w.state = _STOPPING
        members.discover()
        dispatch = w.dispatch
        if dispatch is not None and EOF_WAIT_S > 0 and dispatch.send_eof():
            self._stage(stop, "eof")
        else:
            self._stage(stop, "sigterm")

    def _stage(self, stop: _Stop, name: str) -> None:
        now = time.monotonic()
        stop.stage = name
        stop.t0 = now
        if name == "eof":
            stop.members.discover()
            wait_s = EOF_WAIT_S
        elif name == "sigterm":
            self._send(stop, signal.SIGTERM, signal.SIGCONT)
            wait_s = stop.watch.grace_s
        else:
            stop.kill_round = 1
            self._send(stop, signal.SIGKILL)
            wait_s = KILL_WAIT_S
        self._track(stop)
        stop.entry = self._schedule(now + wait_s, self._stage_due, stop)
        if not stop.waiting:
            self._settled(stop)

    def _send(self, stop: _Stop, *sigs: int) -> None:
        members = stop.members
        members.discover()
        live = members.live()
        for sig in sigs:
            stop.signalled.update(p.pid for p in live if p.signal(sig))

    def _track(self, stop: _Stop) -> None:
        """Await the exit of every pin found since the last call (epoll, else polling)."""
        pins = list(stop.members.pins.values())
        leader = None if stop.leftovers else stop.watch.leader
        for pin in pins[stop.ntracked :]:
            if pin is leader:  # its exit comes through the watch's own registration
                if stop.watch.watching:
                    stop.waiting.add(pin)
                continue
            if pin.status is not None or pin.exited():
                continue  # a zombie: _finish reaps it if it is ours
            stop.waiting.add(pin)
            token = self._register(stop, pin)
            if token:
                stop.tokens.append(token)
                continue
            stop.slow.append(pin)
            if not stop.polling:
                stop.polling = True
                stop.step = FIRST_STEP_S
                self._schedule(time.monotonic() + stop.step, self._poll_owner, stop)
        stop.ntracked = len(pins)

    def _member_gone(self, stop: _Stop, pin: Pin) -> None:
        stop.waiting.discard(pin)
        if not stop.waiting:
            self._settled(stop)

    def _settled(self, stop: _Stop) -> None:
        """Every awaited member has exited: the stage succeeded (after SIGKILL: look again)."""
        while not stop.done and not stop.waiting:
            elapsed_ms = (time.monotonic() - stop.t0) * 1000.0
            if stop.stage in ("eof", "sigterm"):
                # Look once more: a member may have forked between the last
                # discovery and the signal. New ones get this stage's treatment
                # (bounded by the stage's timer like the rest).
                if stop.members.discover():
                    if stop.stage == "sigterm":
                        self._send(stop, signal.SIGTERM, signal.SIGCONT)
                    self._track(stop)
                    continue
                stop.stage_ms[stop.stage] = elapsed_ms
                stop.method = stop.stage
                self._finish_stop(stop, True)
                return
            if not stop.members.discover():
                stop.stage_ms["sigkill"] = elapsed_ms
                stop.method = "sigkill"
                self._finish_stop(stop, True)
                return
            if stop.kill_round >= KILL_ROUNDS:  # it keeps forking: give up as stopping does
                self._give_up(stop)
                return
            stop.kill_round += 1
            self._send(stop, signal.SIGKILL)
            self._track(stop)

    def _stage_due(self, stop: _Stop) -> None:
        """The current stage ran out of time: escalate (or give up after SIGKILL)."""
        stop.entry = None
        if stop.done:
            return
        stop.stage_ms[stop.stage] = (time.monotonic() - stop.t0) * 1000.0
        if stop.stage == "eof":
            self._stage(stop, "sigterm")
        elif stop.stage == "sigterm":
            self._stage(stop, "sigkill")
        else:
            self._give_up(stop)

    def _give_up(self, stop: _Stop) -> None:
        stop.stage_ms["sigkill"] = (time.monotonic() - stop.t0) * 1000.0
        stop.method = "failed"
        survivors = [p.pid for p in stop.members.live()]
        self._log.error(f"stop failed: members survive SIGKILL: {survivors}")
        self._finish_stop(stop, False)

    def _finish_stop(self, stop: _Stop, done: bool) -> None:
        stop.done = True
        self._cancel_entry(stop.entry)
        stop.entry = None
        for token in stop.tokens:
            self._unregister(token)
        stop.tokens = []
        stop.slow = []
        stop.waiting.clear()
        w = stop.watch
        if not stop.leftovers:
            self._unwatch_leader(w)
        outcome = _finish(stop.members, done, stop.method, stop.signalled, stop.stage_ms)
        w.stop = None
        if stop.leftovers:
            outcome.method = "not_running"
            outcome.success = not outcome.survivors
            self._complete_natural(w, outcome)
            return
        w.leader = None  # closed by _finish, its exit remembered
        if w.dispatch is not None and not outcome.survivors:
            REGISTRY.release(w.pid)
        self._complete(w, stopped_result(w.base(), outcome, w.reason or "terminate", _limit(w)))

    # ------------------------------------------------------------------ keeper stops

    def _hand_off(self, w: _Watch) -> None:
        """Keeper containment: the keeper runs the sequence; ask and wait in a worker."""
        self._unwatch_leader(w)
        w.state = _HANDED
        self._handed += 1
        if self._pool is None:
            self._pool = cf.ThreadPoolExecutor(
                max_workers=self._max_workers, thread_name_prefix="ralph-reaper-stop"
            )
        job = self._pool.submit(
            _blocking_terminate,
            w.pid,
            session_id=w.session_id or None,
            logger=self._log,
            kill_wait_ms=w.grace_s * 1000.0,
            leader=w.leader,
        )
        job.add_done_callback(lambda done: self._post(_CMD_HANDED, (w, done)))

    def _handed_back(self, w: _Watch, job: cf.Future[StopOutcome]) -> None:
        self._handed -= 1
        base = w.base()
        try:
            outcome = job.result()
        except Exception as exc:
            if w.leader is not None:
                w.leader.close()
            self._log.error(f"stopping dispatch of {w.ticket_id} failed: {exc!r}")
            result = DispatchCompletionResult(
                **base,
                status=DispatchCompletionStatus.ERROR,
                termination_method="failed",
                error=f"stop failed: {exc}",
            )
            self._complete(w, result)
            return
        if outcome.method == "not_running":
            result = _ended(base, outcome, outcome.leader_status, w.pid)
        else:
            result = stopped_result(base, outcome, w.reason or "terminate", _limit(w))
        self._complete(w, result)
