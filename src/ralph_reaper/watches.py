"""One watched dispatch, prepared the same way for every face.

:func:`prepare` validates a wait's arguments, looks the dispatch up, pins its
leader and works out its limits; the blocking wait, the monitor and asyncio
all start from the :class:`Watch` it returns (or from the immediate ERROR
result it gives for a missing or bad pid). While the leader runs, a face
only asks the watch when to wake next (:meth:`Watch.wake_at`) and, once
woken, whether a limit ran out (:meth:`Watch.due`); after the leader's exit
or the limit, :mod:`ralph_reaper.ending` says what happens next.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from .backends import get as get_backend
from .backends.base import Backend, ExitStatus
from .dispatches import REGISTRY, Dispatch
from .exits import BOOK
from .idle import IdleWatch
from .lineage import Lineage
from .logs import LogSink
from .pins import Pin
from .plan import DEFAULT_EOF_WAIT_MS
from .results import DispatchCompletionResult, DispatchCompletionStatus
from .validation import check_ms, check_signal_target, check_upstream_ms

#: A progress line this often while a dispatch runs.
PROGRESS_EVERY_S = 30.0


@dataclass
class Watch:
    """A dispatch being waited for: its pinned leader, its limits, its idle sampler."""

    ticket_id: str
    session_id: str
    pid: Optional[int]
    backend: Backend
    log: LogSink
    started: float
    grace_s: float = 5.0
    eof_wait_s: float = DEFAULT_EOF_WAIT_MS / 1000.0
    #: The timeout as configured (for messages); ``timeout_at`` is when it falls.
    limit_s: float = 0.0
    timeout_at: Optional[float] = None
    idle_s: float = 0.0
    stop_leftovers: bool = True
    dispatch: Optional[Dispatch] = None
    leader: Optional[Pin] = None
    #: The exit status, when the leader had been reaped before it was watched.
    known: Optional[ExitStatus] = None
    idle: Optional[IdleWatch] = None
    #: The session the leader leads (its pid), swept for leftovers; None if none.
    sid: Optional[int] = None
    #: Where the processes of that session can be (see :mod:`.lineage`).
    lineage: Optional[Lineage] = None
    #: The leader's process group still had a process when the leader was collected.
    group_left: bool = False
    #: Why the package stopped it: "timeout", "idle", "terminate", "close", "signal".
    reason: Optional[str] = None
    next_progress: float = 0.0
    base: dict[str, Any] = field(default_factory=dict)

    @property
    def keeper(self) -> bool:
        return self.dispatch is not None and self.dispatch.keeper is not None

    @property
    def deadline(self) -> Optional[float]:
        return self.timeout_at

    def idle_sample_s(self) -> float:
        return min(max(self.idle_s / 4.0, 0.05), 1.0)

    def wake_at(self, now: float) -> float:
        """When the face should look again if the leader has not exited by then."""
        wake = self.next_progress
        deadline = self.deadline
        if deadline is not None:
            wake = min(wake, deadline)
        if self.idle is not None:
            wake = min(wake, now + self.idle_sample_s())
        return wake

    def due(self, now: float) -> Optional[str]:
        """Which limit ran out ("timeout", "idle"), else None; logs progress when due."""
        deadline = self.deadline
        if deadline is not None and now >= deadline:
            return "timeout"
        if self.idle is not None and self.idle.idle_for() >= self.idle_s:
            return "idle"
        if now >= self.next_progress:
            self.log.info(
                f"Dispatch of {self.ticket_id} still running after {now - self.started:.0f}s"
            )
            self.next_progress += PROGRESS_EVERY_S
        return None

    def limit_for(self, reason: str) -> float:
        """The limit that ran out, for the result's message."""
        return self.idle_s if reason == "idle" else self.limit_s

    def error(self, message: str) -> DispatchCompletionResult:
        result = DispatchCompletionResult(
            **self.base, status=DispatchCompletionStatus.ERROR, error=message
        )
        result.duration_ms = (time.monotonic() - self.started) * 1000.0
        return result


def prepare(
    dispatch_result: Any,
    ticket_id: str,
    *,
    log: LogSink,
    timeout_ms: float = 0,
    graceful_shutdown_ms: float = 5000.0,
    idle_timeout_ms: float = 0.0,
    eof_wait_ms: float = DEFAULT_EOF_WAIT_MS,
    stop_leftovers: bool = True,
    started: Optional[float] = None,
) -> Union[Watch, DispatchCompletionResult]:
    """Validate, look the dispatch up and pin its leader; or the immediate ERROR result.

    Durations are checked first (bad ones raise TypeError/ValueError); a
    missing or bad pid is an ERROR result, as upstream reports it.
    """
    started = time.monotonic() if started is None else started
    # Upstream's durations keep upstream's meaning: <= 0 is no timeout, or no grace.
    timeout_s = check_upstream_ms("timeout_ms", timeout_ms) / 1000.0
    grace_s = check_upstream_ms("graceful_shutdown_ms", graceful_shutdown_ms) / 1000.0
    idle_s = check_ms("idle_timeout_ms", idle_timeout_ms) / 1000.0
    eof_wait_s = check_ms("eof_wait_ms", eof_wait_ms) / 1000.0
    backend = get_backend()
    pid_value = getattr(dispatch_result, "pid", None)
    session_id = getattr(dispatch_result, "session_id", "") or ""
    # Every line about this watch, from any face, names its dispatch.
    log = log.bind(
        ticket_id=ticket_id,
        session_id=session_id or None,
        pid=pid_value if type(pid_value) is int else None,
    )
    w = Watch(
        ticket_id=ticket_id,
        session_id=session_id,
        pid=None,
        backend=backend,
        log=log,
        started=started,
        grace_s=grace_s,
        eof_wait_s=eof_wait_s,
        stop_leftovers=stop_leftovers,
        next_progress=started + PROGRESS_EVERY_S,
    )
    w.base = {
        "ticket_id": ticket_id,
        "session_id": w.session_id,
        "pid": pid_value if type(pid_value) is int else None,
        "backend": backend.name,
    }
    if pid_value is None:
        log.error(f"No PID available for dispatch of {ticket_id}")
        return w.error("No PID available")
    try:
        w.pid = check_signal_target(pid_value)
    except (TypeError, ValueError) as exc:
        log.error(f"Invalid PID for dispatch of {ticket_id}: {exc}")
        return w.error(str(exc))
    _adopt(w, REGISTRY.get(w.pid), timeout_s, idle_s)
    return w


def _adopt(w: Watch, dispatch: Optional[Dispatch], timeout_s: float, idle_s: float) -> None:
    """Take what the package knows of a dispatch it spawned, then pin the leader."""
    assert w.pid is not None
    w.dispatch = dispatch
    if dispatch is not None:
        w.base["containment"] = dispatch.containment
        if dispatch.keeper is not None:
            w.stop_leftovers = False  # the keeper stops them before it exits
        idle_s = idle_s or dispatch.idle_timeout_ms / 1000.0
    if timeout_s > 0:
        w.limit_s, w.timeout_at = timeout_s, w.started + timeout_s
    elif dispatch is not None and dispatch.timeout_ms > 0:  # its own, counted from the spawn
        w.limit_s = dispatch.timeout_ms / 1000.0
        w.timeout_at = dispatch.spawned_at + w.limit_s
    w.idle_s = idle_s
    w.known = BOOK.lookup(w.backend, w.pid)
    if w.known is None:
        w.leader = BOOK.take(w.pid) or Pin.open(w.backend, w.pid)
    st = None if w.leader is None else w.backend.proc_stat(w.pid)
    if w.leader is None or (st is not None and st.session == w.pid):
        w.sid = w.pid  # a reaped leader's session keeps its id while it has members
        if dispatch is not None and dispatch.lineage is not None:
            w.lineage = dispatch.lineage
        elif w.leader is not None:
            w.lineage = Lineage.record(w.backend, w.pid)
    if w.leader is not None and idle_s > 0:
        if dispatch is None:
            w.idle = IdleWatch(w.backend, w.pid, w.pid)
        else:
            w.idle = IdleWatch(w.backend, w.pid, dispatch.leader_pid, dispatch.output_paths)
