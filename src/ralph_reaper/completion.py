"""The drop-in API: poll, stop and wait for one dispatch.

Names, parameters, defaults and return shapes are those of
``tf.ralph_completion``; the behaviour is what that module promised and did
not do (see the project's design notes): waits end on the exit event itself,
stops reach the whole tree, exit codes are never lost.
"""

from __future__ import annotations

import signal
import threading
import time
from typing import Optional

from .backends import get as get_backend
from .backends.base import Backend
from .containment import Members
from .dispatches import REGISTRY
from .ending import finish, joinable, stop_for, sweep_for
from .engine import (
    ONGOING,
    StopOutcome,
    dispatch_stop,
    drive,
    fold_keeper_report,
    leftovers_stop,
    not_running,
    run_registered,
)
from .exits import BOOK
from .logs import LogSink, resolve_logger
from .pins import Pin
from .plan import DEFAULT_EOF_WAIT_MS
from .results import DispatchCompletionResult, DispatchLike, LoggerLike
from .validation import check_ms, check_pid, check_signal_target, check_upstream_ms
from .waiting import MAX_STEP_S, poll_step_cap, wait_any
from .watches import Watch, prepare


def poll_dispatch_status(pid: int) -> tuple[bool, Optional[int]]:
    """``(True, None)`` while ``pid`` runs, else ``(False, return_code_or_None)``; never blocks.

    An exited child is reaped; its code is remembered and given again by later
    polls until a new process with the same pid appears.
    """
    pid = check_pid(pid)
    backend = get_backend()
    with _POLLS:
        return _poll(backend, pid)


#: Polls are short and never block; taking them one at a time means a poll
#: never holds a pin that a concurrent poll has already settled.
_POLLS = threading.Lock()


def _poll(backend: Backend, pid: int) -> tuple[bool, Optional[int]]:
    known = BOOK.lookup(backend, pid)
    if known is not None:
        BOOK.drop_exited(pid)
        return False, known.return_code
    pin = BOOK.take(pid) or Pin.open(backend, pid)
    if pin is None:  # gone: perhaps reaped by a wait on another thread just now
        known = BOOK.lookup(backend, pid)
        return False, None if known is None else known.return_code
    if not pin.exited():
        BOOK.hold(pin)
        return True, None
    status = pin.collect()
    pin.close()
    if status is not None:  # before the release: a dispatch's exit file reads it
        BOOK.remember(pid, pin.starttime, status)
    REGISTRY.release(pid)
    return False, None if status is None else status.return_code


def graceful_terminate_dispatch(
    pid: int,
    session_id: Optional[str] = None,
    logger: Optional[LoggerLike] = None,
    kill_wait_ms: float = 5000.0,
    use_process_group: bool = True,
    *,
    eof_wait_ms: float = DEFAULT_EOF_WAIT_MS,
) -> tuple[bool, str]:
    """Stop a dispatch: EOF (where we hold its stdin), SIGTERM+SIGCONT, then SIGKILL.

    Returns ``(success, method)`` with method ``not_running``, ``eof``,
    ``sigterm``, ``sigkill`` or ``failed``. With ``use_process_group`` the
    whole tree is stopped (descendants and the leader's own session), not just
    the leader. A negative ``kill_wait_ms`` is no wait, as upstream.
    """
    outcome = terminate(
        pid,
        session_id=session_id,
        logger=logger,
        kill_wait_ms=kill_wait_ms,
        use_process_group=use_process_group,
        eof_wait_ms=eof_wait_ms,
    )
    return outcome.success, outcome.method


def terminate(
    pid: int,
    *,
    session_id: Optional[str] = None,
    logger: Optional[LoggerLike] = None,
    kill_wait_ms: float = 5000.0,
    use_process_group: bool = True,
    eof_wait_ms: float = DEFAULT_EOF_WAIT_MS,
    first_signal: int = int(signal.SIGTERM),
    reason: str = "terminate",
) -> StopOutcome:
    """:func:`graceful_terminate_dispatch` with the full outcome (stage times, kills).

    ``reason`` is what a wait that sees the leader end meanwhile reports as its
    ``stop_reason``.
    """
    pid = check_signal_target(pid)
    grace_s = check_upstream_ms("kill_wait_ms", kill_wait_ms) / 1000.0
    eof_wait_s = check_ms("eof_wait_ms", eof_wait_ms) / 1000.0
    containment = "session" if use_process_group else "pid"
    label = f"dispatch {session_id} (pid {pid})" if session_id else f"pid {pid}"
    dispatch = REGISTRY.get(pid)
    log = resolve_logger(logger).bind(
        ticket_id=None if dispatch is None else dispatch.ticket_id or None,
        session_id=session_id or (None if dispatch is None else dispatch.session_id or None),
        pid=pid,
    )
    shown = "keeper" if dispatch is not None and dispatch.keeper is not None else containment
    log.info("Stopping %s (%s containment)", label, shown)
    backend = get_backend()
    leader = BOOK.take(pid) or Pin.open(backend, pid)
    if leader is None or leader.exited():
        outcome = _already_ended(pid, leader, containment, grace_s, log)
    else:
        stop = dispatch_stop(
            leader,
            dispatch,
            containment=containment,
            grace_s=grace_s,
            eof_wait_s=eof_wait_s,
            log=log,
            first_signal=first_signal,
        )
        outcome = run_registered(stop, reason)
        leader.close()  # closed by the stop already, unless it joined another one
    if dispatch is not None:
        if outcome.method == "not_running":
            fold_keeper_report(dispatch, outcome)
        if not outcome.survivors:
            REGISTRY.release(pid)
    if outcome.success:
        log.info("Stopped %s: %s", label, outcome.method)
    else:
        log.error("Could not stop %s; survivors: %s", label, outcome.survivors)
    return outcome


def _already_ended(
    pid: int, leader: Optional[Pin], containment: str, grace_s: float, log: LogSink
) -> StopOutcome:
    """A leader that exited before the stop: collect it, still stop what it left behind.

    Members of its session that outlived it are what "nothing left behind" is about.
    """
    backend = get_backend()
    status = BOOK.lookup(backend, pid)
    sid: Optional[int] = pid
    if leader is not None:
        st = backend.proc_stat(pid)
        sid = pid if st is None or st.session == pid else None
        status = leader.collect() or status
        leader.reap_if_child()
        if status is not None:
            BOOK.remember(pid, leader.starttime, status)
        leader.close()
    stop = None
    if containment == "session" and sid is not None:
        stop = leftovers_stop(
            Members(backend, None, "session", session=sid), grace_s=grace_s, log=log
        )
    if stop is not None:
        log.info("pid %d already exited; stopping what it left behind", pid)
    outcome = not_running(None if stop is None else drive(stop))
    outcome.leader_status = status
    return outcome


def wait_for_dispatch_completion(
    dispatch_result: DispatchLike,
    ticket_id: str,
    timeout_ms: float = 0,
    poll_interval_ms: float = 1000.0,
    logger: Optional[LoggerLike] = None,
    graceful_shutdown_ms: float = 5000.0,
    *,
    stop_leftovers: bool = True,
    idle_timeout_ms: float = 0.0,
    eof_wait_ms: float = DEFAULT_EOF_WAIT_MS,
) -> DispatchCompletionResult:
    """Wait for a dispatch to end; stop it (whole tree) when ``timeout_ms`` passes.

    ``timeout_ms <= 0`` waits for ever, and a negative
    ``graceful_shutdown_ms`` or ``poll_interval_ms`` is no wait, as upstream
    (NaN, infinities and non-numbers raise). ``poll_interval_ms`` caps the
    backoff of the polling backend only; the others are woken by the exit
    itself. With
    ``stop_leftovers`` (the default), processes of the leader's own session
    that outlive a natural exit are stopped too, and counted in
    ``descendants_killed``. With ``idle_timeout_ms`` a dispatch that sits
    blocked on its stdin, using no CPU, for that long is stopped as idle
    (EOF first where the package holds its stdin). Dispatches started by
    :func:`spawn_dispatch` bring their own timeout and idle timeout; for them
    a stop begins with EOF on their stdin and waits up to ``eof_wait_ms``
    before SIGTERM (0 skips the EOF stage).
    """
    started = time.monotonic()
    step_s = poll_step_cap(poll_interval_ms)
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
    return run_watch(prepared, step_s)


def run_watch(w: Watch, step_s: float = MAX_STEP_S) -> DispatchCompletionResult:
    """Drive a prepared watch to its result, blocking (the blocking face and the CLI)."""
    if w.leader is not None:
        w.log.info("Waiting for dispatch of %s (pid %d)", w.ticket_id, w.pid)
        reason = w.reason or _wait(w, step_s)
        other = None if reason is None else joinable(w)
        if other is not None:
            w.reason = reason
            return finish(w, other.result())
        stop = None if reason is None else stop_for(w, reason)
        if stop is not None:
            return finish(w, run_registered(stop, reason or "terminate"))
        ongoing = ONGOING.get(w.leader)
        if ongoing is not None:  # another call is stopping it: report that stop
            w.reason, future = ongoing
            return finish(w, future.result())
    stop = sweep_for(w)
    return finish(w, None if stop is None else not_running(drive(stop)))


def _wait(w: Watch, step_s: float) -> Optional[str]:
    """Until the leader exits (None) or a limit runs out (its name)."""
    leader = w.leader
    assert leader is not None
    while True:
        now = time.monotonic()
        if wait_any([leader], max(0.0, w.wake_at(now) - now), step_s):
            return None
        reason = w.due(time.monotonic())
        if reason is not None:
            return reason
