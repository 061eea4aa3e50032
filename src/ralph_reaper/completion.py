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
from .exits import BOOK
from .exitstatus import ExitStatus
from .logs import resolve_logger
from .pins import Pin
from .results import DispatchCompletionResult, DispatchCompletionStatus
from .stopping import StopOutcome, stop_pid
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
    outcome = stop_pid(
        pid,
        containment=containment,
        kill_wait_s=kill_wait_s,
        eof=None,
        eof_wait_s=eof_wait_s,
        log=log,
        leader=leader,
    )
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
) -> DispatchCompletionResult:
    """Wait for a dispatch to end; stop it (whole tree) when ``timeout_ms`` passes.

    ``timeout_ms=0`` waits for ever. ``poll_interval_ms`` caps the backoff of
    the polling backend only; the others are woken by the exit itself. With
    ``stop_leftovers`` (the default), processes of the leader's own session
    that outlive a natural exit are stopped too, and counted in
    ``descendants_killed``.
    """
    started = time.monotonic()
    timeout_s = check_ms("timeout_ms", timeout_ms) / 1000.0
    step_s = min(check_ms("poll_interval_ms", poll_interval_ms) / 1000.0, MAX_STEP_S)
    grace_ms = check_ms("graceful_shutdown_ms", graceful_shutdown_ms)
    log = resolve_logger(logger)
    session_id = getattr(dispatch_result, "session_id", "") or ""
    pid_value = getattr(dispatch_result, "pid", None)
    backend = get_backend()
    base: dict[str, Any] = {
        "ticket_id": ticket_id,
        "session_id": session_id,
        "pid": pid_value if isinstance(pid_value, int) else None,
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

    known = BOOK.lookup(backend, pid)
    leader = None if known is not None else (BOOK.take(pid) or Pin.open(backend, pid))
    if leader is None:
        # Already reaped: report what is known, and still sweep its session.
        gone = stop_pid(
            pid,
            containment="session" if stop_leftovers else "pid",
            kill_wait_s=grace_ms / 1000.0,
            log=log,
        )
        result = _natural_result(base, known or gone.leader_status, pid)
        result.descendants_killed = gone.descendants_killed
        result.stage_ms = gone.stage_ms
        return finish(result)

    log.info(f"Waiting for dispatch of {ticket_id} (pid {pid})")
    deadline = started + timeout_s if timeout_s > 0 else None
    next_progress = started + PROGRESS_EVERY_S
    exited = False
    while True:
        now = time.monotonic()
        wake = next_progress if deadline is None else min(deadline, next_progress)
        if wait_any([leader], max(0.0, wake - now), step_s):
            exited = True
            break
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            break
        if now >= next_progress:
            log.info(f"Dispatch of {ticket_id} still running after {now - started:.0f}s")
            next_progress += PROGRESS_EVERY_S

    if exited:
        outcome = stop_pid(
            pid,
            containment="session" if stop_leftovers else "pid",
            kill_wait_s=grace_ms / 1000.0,
            log=log,
            leader=leader,
        )
        result = _natural_result(base, outcome.leader_status, pid)
        result.descendants_killed = outcome.descendants_killed
        result.containment = outcome.containment
        result.stage_ms = outcome.stage_ms
        log.info(f"Dispatch of {ticket_id} ended: {result.status.value} ({result.return_code})")
        return finish(result)

    log.warning(f"Dispatch of {ticket_id} timed out after {timeout_ms}ms; stopping it")
    outcome = terminate(
        pid, session_id=session_id, logger=log, kill_wait_ms=grace_ms, leader=leader
    )
    fields = _result_fields(outcome.leader_status)
    extra: dict[str, Any] = {
        "descendants_killed": outcome.descendants_killed,
        "containment": outcome.containment,
        "stage_ms": outcome.stage_ms,
        "timed_out": True,
    }
    if not outcome.success:
        return finish(
            DispatchCompletionResult(
                **base,
                **fields,
                **extra,
                status=DispatchCompletionStatus.ERROR,
                termination_method="failed",
                error=f"Timed out after {timeout_ms}ms and could not be stopped; "
                f"survivors: {outcome.survivors}",
            )
        )
    if outcome.method == "not_running":  # it exited on its own just as time ran out
        result = _natural_result(base, outcome.leader_status, pid)
        result.descendants_killed = outcome.descendants_killed
        result.stage_ms = outcome.stage_ms
        return finish(result)
    return finish(
        DispatchCompletionResult(
            **base,
            **fields,
            **extra,
            status=DispatchCompletionStatus.TIMEOUT,
            termination_method=outcome.method,
            error=f"Timed out after {timeout_ms}ms",
        )
    )
