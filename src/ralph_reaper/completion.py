"""The drop-in API: poll, stop and wait for one dispatch.

Names, parameters, defaults and return shapes are those of
``tf.ralph_completion``; the behaviour is what that module promised and did
not do (see the project's design notes): waits end on the exit event itself,
stops reach the whole tree, exit codes are never lost.
"""

from __future__ import annotations

import time
from typing import Any, Optional

from .backends import get as get_backend
from .dispatches import REGISTRY, Dispatch
from .exits import BOOK
from .exitstatus import ExitStatus
from .idle import IdleWatch
from .logs import resolve_logger
from .pins import Pin
from .results import DispatchCompletionResult, DispatchCompletionStatus
from .stopping import StopOutcome, keeper_details, stop_keeper, stop_pid
from .validation import check_ms, check_pid, check_signal_target
from .waiting import MAX_STEP_S, wait_any

PROGRESS_EVERY_S = 30.0
DEFAULT_EOF_WAIT_MS = 1000.0


def poll_dispatch_status(pid: int) -> tuple[bool, Optional[int]]:
    """``(True, None)`` while ``pid`` runs, else ``(False, return_code_or_None)``; never blocks.

    An exited child is reaped; its code is remembered and given again by later
    polls until a new process with the same pid appears.
    """
    pid = check_pid(pid)
    backend = get_backend()
    known = BOOK.lookup(backend, pid)
    if known is not None:
        return False, known.return_code
    pin = BOOK.take(pid) or Pin.open(backend, pid)
    if pin is None:
        return False, None
    if not pin.exited():
        BOOK.hold(pin)
        return True, None
    status = pin.collect()
    pin.close()
    REGISTRY.release(pid)
    if status is None:
        return False, None
    BOOK.remember(pid, pin.starttime, status)
    return False, status.return_code


def graceful_terminate_dispatch(
    pid: int,
    session_id: Optional[str] = None,
    logger: Any = None,
    kill_wait_ms: float = 5000.0,
    use_process_group: bool = True,
    *,
    eof_wait_ms: float = DEFAULT_EOF_WAIT_MS,
) -> tuple[bool, str]:
    """Stop a dispatch: EOF (where we hold its stdin), SIGTERM+SIGCONT, then SIGKILL.

    Returns ``(success, method)`` with method ``not_running``, ``eof``,
    ``sigterm``, ``sigkill`` or ``failed``. With ``use_process_group`` the
    whole tree is stopped (descendants and the leader's own session), not just
    the leader.
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
    logger: Any = None,
    kill_wait_ms: float = 5000.0,
    use_process_group: bool = True,
    eof_wait_ms: float = DEFAULT_EOF_WAIT_MS,
    leader: Optional[Pin] = None,
) -> StopOutcome:
    """:func:`graceful_terminate_dispatch` with the full outcome (stage times, kills)."""
    pid = check_signal_target(pid)
    kill_wait_s = check_ms("kill_wait_ms", kill_wait_ms) / 1000.0
    eof_wait_s = check_ms("eof_wait_ms", eof_wait_ms) / 1000.0
    log = resolve_logger(logger)
    containment = "session" if use_process_group else "pid"
    label = f"dispatch {session_id} (pid {pid})" if session_id else f"pid {pid}"
    log.info(f"Stopping {label} ({containment} containment)")
    dispatch = REGISTRY.get(pid)
    if dispatch is not None and dispatch.containment == "keeper":
        outcome = stop_keeper(
            dispatch, kill_wait_s=kill_wait_s, eof_wait_s=eof_wait_s, log=log, leader=leader
        )
    else:
        outcome = stop_pid(
            pid,
            containment=containment,
            kill_wait_s=kill_wait_s,
            eof=None if dispatch is None else dispatch.send_eof,
            eof_wait_s=eof_wait_s,
            log=log,
            leader=leader,
        )
    if dispatch is not None and not outcome.survivors:
        REGISTRY.release(pid)
    if outcome.success:
        log.info(f"Stopped {label}: {outcome.method}")
    else:
        log.error(f"Could not stop {label}; survivors: {outcome.survivors}")
    return outcome


def _result_fields(status: Optional[ExitStatus]) -> dict[str, Any]:
    if status is None:
        return {}
    fields: dict[str, Any] = {
        "return_code": status.return_code,
        "signal": status.signal,
        "core_dumped": status.core_dumped,
    }
    if status.rusage is not None:
        fields["user_time_s"] = status.rusage.utime_s
        fields["system_time_s"] = status.rusage.stime_s
        fields["max_rss_kb"] = status.rusage.maxrss_kb
    return fields


def _natural_result(
    base: dict[str, Any], status: Optional[ExitStatus], pid: int
) -> DispatchCompletionResult:
    if status is None:
        return DispatchCompletionResult(
            **base,
            status=DispatchCompletionStatus.ERROR,
            error=f"Process {pid} exited but its exit status is unknown "
            "(not a child of this process, and reaped before it was watched)",
        )
    fields = _result_fields(status)
    if status.signal is not None:
        return DispatchCompletionResult(
            **base,
            **fields,
            status=DispatchCompletionStatus.TERMINATED,
            error=f"Process killed by signal {status.signal}",
        )
    if status.return_code == 0:
        return DispatchCompletionResult(**base, **fields, status=DispatchCompletionStatus.COMPLETED)
    return DispatchCompletionResult(
        **base,
        **fields,
        status=DispatchCompletionStatus.ERROR,
        error=f"Process exited with code {status.return_code}",
    )


def wait_for_dispatch_completion(
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
    """Wait for a dispatch to end; stop it (whole tree) when ``timeout_ms`` passes.

    ``timeout_ms=0`` waits for ever. ``poll_interval_ms`` caps the backoff of
    the polling backend only; the others are woken by the exit itself. With
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
    timeout_s = check_ms("timeout_ms", timeout_ms) / 1000.0
    step_s = min(check_ms("poll_interval_ms", poll_interval_ms) / 1000.0, MAX_STEP_S)
    grace_ms = check_ms("graceful_shutdown_ms", graceful_shutdown_ms)
    idle_s = check_ms("idle_timeout_ms", idle_timeout_ms) / 1000.0
    check_ms("eof_wait_ms", eof_wait_ms)
    log = resolve_logger(logger)
    session_id = getattr(dispatch_result, "session_id", "") or ""
    pid_value = getattr(dispatch_result, "pid", None)
    backend = get_backend()
    base: dict[str, Any] = {
        "ticket_id": ticket_id,
        "session_id": session_id,
        "pid": pid_value if type(pid_value) is int else None,
        "backend": backend.name,
    }

    def finish(result: DispatchCompletionResult) -> DispatchCompletionResult:
        result.duration_ms = (time.monotonic() - started) * 1000.0
        return result

    if pid_value is None:
        log.error(f"No PID available for dispatch of {ticket_id}")
        return finish(
            DispatchCompletionResult(
                **base, status=DispatchCompletionStatus.ERROR, error="No PID available"
            )
        )
    try:
        pid = check_signal_target(pid_value)
    except (TypeError, ValueError) as exc:
        log.error(f"Invalid PID for dispatch of {ticket_id}: {exc}")
        return finish(
            DispatchCompletionResult(**base, status=DispatchCompletionStatus.ERROR, error=str(exc))
        )

    dispatch = REGISTRY.get(pid)
    if dispatch is not None:
        base["containment"] = dispatch.containment
    if dispatch is not None:
        if timeout_s <= 0 and dispatch.timeout_ms > 0:
            timeout_s = max(0.0, dispatch.spawned_at + dispatch.timeout_ms / 1000.0 - started)
            timeout_s = timeout_s or 1e-9
        idle_s = idle_s or dispatch.idle_timeout_ms / 1000.0
    # A keeper stops what its command left before it exits itself: no sweep needed.
    keeper = dispatch is not None and dispatch.containment == "keeper"
    containment = "session" if stop_leftovers and not keeper else "pid"

    known = BOOK.lookup(backend, pid)
    leader = None if known is not None else (BOOK.take(pid) or Pin.open(backend, pid))
    if leader is None:
        # Already reaped: report what is known, and still sweep its session.
        gone = stop_pid(pid, containment=containment, kill_wait_s=grace_ms / 1000.0, log=log)
        if dispatch is not None:
            keeper_details(dispatch, gone)
            REGISTRY.release(pid)
        return finish(_ended(base, gone, known or gone.leader_status, pid))

    log.info(f"Waiting for dispatch of {ticket_id} (pid {pid})")
    deadline = started + timeout_s if timeout_s > 0 else None
    next_progress = started + PROGRESS_EVERY_S
    idle = _idle_watch(backend, dispatch, pid) if idle_s > 0 else None
    sample_s = min(max(idle_s / 4.0, 0.05), 1.0)
    reason: Optional[str] = None
    while True:
        now = time.monotonic()
        wake = next_progress if deadline is None else min(deadline, next_progress)
        if idle is not None:
            wake = min(wake, now + sample_s)
        if wait_any([leader], max(0.0, wake - now), step_s):
            break
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            reason = "timeout"
            break
        if idle is not None and idle.idle_for() >= idle_s:
            reason = "idle"
            break
        if now >= next_progress:
            log.info(f"Dispatch of {ticket_id} still running after {now - started:.0f}s")
            next_progress += PROGRESS_EVERY_S

    if reason is None:
        outcome = stop_pid(
            pid, containment=containment, kill_wait_s=grace_ms / 1000.0, log=log, leader=leader
        )
        if dispatch is not None:
            keeper_details(dispatch, outcome)
            REGISTRY.release(pid)
        result = _ended(base, outcome, outcome.leader_status, pid)
        log.info(f"Dispatch of {ticket_id} ended: {result.status.value} ({result.return_code})")
        return finish(result)

    if reason == "idle":
        log.warning(f"Dispatch of {ticket_id} idle for {idle_s * 1000.0:.0f}ms; stopping it")
    else:
        log.warning(
            f"Dispatch of {ticket_id} timed out after {timeout_s * 1000.0:.0f}ms; stopping it"
        )
    outcome = terminate(
        pid,
        session_id=session_id,
        logger=log,
        kill_wait_ms=grace_ms,
        eof_wait_ms=eof_wait_ms,
        leader=leader,
    )
    if outcome.method == "not_running":  # it exited on its own just as time ran out
        return finish(_ended(base, outcome, outcome.leader_status, pid))
    limit_s = idle_s if reason == "idle" else timeout_s
    return finish(stopped_result(base, outcome, reason, limit_s))


_WHAT = {
    "timeout": "Timed out",
    "idle": "Idle",
    "terminate": "Terminated on request",
    "close": "Terminated: the monitor was closed",
}


def stopped_result(
    base: dict[str, Any], outcome: StopOutcome, reason: str, limit_s: float
) -> DispatchCompletionResult:
    """The result of a dispatch the package stopped: for time, idleness or on request."""
    timed = reason in ("timeout", "idle")
    what = _WHAT.get(reason, "Stopped")
    if timed:
        what = f"{what} after {limit_s * 1000.0:.0f}ms"
    fields: dict[str, Any] = {
        **base,
        **_result_fields(outcome.leader_status),
        "descendants_killed": outcome.descendants_killed,
        "containment": outcome.containment,
        "stage_ms": outcome.stage_ms,
        "timed_out": timed,
        "stop_reason": reason,
    }
    if not outcome.success:
        failed = f"{what} and could not be stopped" if timed else f"{what}; could not stop it"
        return DispatchCompletionResult(
            **fields,
            status=DispatchCompletionStatus.ERROR,
            termination_method="failed",
            error=f"{failed}; survivors: {outcome.survivors}",
        )
    status = DispatchCompletionStatus.TIMEOUT if timed else DispatchCompletionStatus.TERMINATED
    return DispatchCompletionResult(
        **fields, status=status, termination_method=outcome.method, error=what
    )


def _idle_watch(backend: Any, dispatch: Optional[Dispatch], pid: int) -> IdleWatch:
    if dispatch is None:
        return IdleWatch(backend, pid, pid)
    dispatch.read_reports()
    return IdleWatch(backend, pid, dispatch.leader_pid, dispatch.output_paths)


def _ended(
    base: dict[str, Any], outcome: StopOutcome, status: Optional[ExitStatus], pid: int
) -> DispatchCompletionResult:
    """The result of a dispatch that ended without being stopped for time or idleness.

    Under keeper containment the keeper may itself have stopped it (its own
    timeout): its report says so, and the result is then a TIMEOUT.
    """
    result = _natural_result(base, status, pid)
    result.descendants_killed = outcome.descendants_killed
    result.stage_ms = outcome.stage_ms
    if outcome.containment == "keeper":
        result.containment = "keeper"
    if outcome.keeper_reason == "timeout":
        result.status = DispatchCompletionStatus.TIMEOUT
        result.timed_out = True
        result.stop_reason = "timeout"
        result.termination_method = outcome.keeper_method or "sigterm"
        result.error = "Timed out (stopped by its keeper)"
    return result
