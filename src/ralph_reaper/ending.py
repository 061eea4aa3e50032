"""How a watch ends, for every face: which stop follows, and the one result builder.

After a watch's leader exits, :func:`sweep_for` gives the stop of what it
left in its session (or None); after a limit runs out (or a request),
:func:`stop_for` gives the stop of the tree. Whatever stop there was, a face
drives it its own way and then calls :func:`finish`, which builds the result
with :func:`build_result`: the only place where statuses, methods and
messages are decided, so every face and the command line agree.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import time
from typing import Any, Optional

from .backends.base import ExitStatus
from .containment import Members, group_has_members
from .dispatches import REGISTRY
from .engine import (
    ONGOING,
    Stop,
    StopOutcome,
    dispatch_stop,
    fold_keeper_report,
    leftovers_stop,
    lost_keeper_stop,
)
from .exits import BOOK
from .results import DispatchCompletionResult, DispatchCompletionStatus
from .watches import Watch

_WHAT = {
    "timeout": "Timed out",
    "idle": "Idle",
    "terminate": "Terminated on request",
    "close": "Terminated: the monitor was closed",
    "signal": "Terminated: the supervisor received a signal",
}


def collect_leader(w: Watch) -> Optional[ExitStatus]:
    """Collect (reap) an exited leader, remember its exit, close its pin; its status.

    Before the pin is closed, a leader whose session is to be swept has its
    process group asked whether a process is left in it (``w.group_left``): the
    sweep's search must then find something (see ``Members.discover_live``)."""
    status = w.known
    leader = w.leader
    if leader is not None:
        if leader.status is None:
            leader.collect()
        if leader.status is not None:
            status = leader.status
            BOOK.remember(leader.pid, leader.starttime, leader.status)
        else:  # reaped meanwhile by another call of this package, which remembered it
            status = BOOK.lookup(w.backend, leader.pid) or status
        if leader.reaped and leader.fd >= 0 and w.sid == leader.pid and needs_sweep(w):
            # Reaped here, so not in its group any more (and only our own child's
            # clone(CLONE_PARENT) children are ours: see Members.discover_live).
            w.group_left = not w.keeper and group_has_members(leader.fd)
        leader.close()
        w.leader = None
    w.known = status
    return status


def joinable(w: Watch) -> Optional[cf.Future[StopOutcome]]:
    """A stop of this leader already under way (another call, face or thread): a face
    whose limit runs out then reports that stop rather than racing it with its own."""
    return None if w.leader is None else ONGOING.running(w.leader)


def needs_sweep(w: Watch) -> bool:
    return w.sid is not None and w.stop_leftovers


def sweep_for(w: Watch) -> Optional[Stop]:
    """After a natural exit: the stop of what the leader left in its session, or None.

    The leader is reaped first, so that the scan of its session does not find it.
    """
    group_fd = -1
    if needs_sweep(w) and w.leader is not None and w.leader.fd >= 0 and w.keeper is False:
        group_fd = os.dup(w.leader.fd)  # its process group outlives its pin
    collect_leader(w)
    if w.dispatch is not None and w.dispatch.keeper is not None:
        return lost_keeper_stop(w.dispatch, grace_s=w.grace_s, log=w.log)
    if not needs_sweep(w):
        return None
    assert w.sid is not None
    members = Members(
        w.backend,
        None,
        "session",
        session=w.sid,
        group_fd=group_fd,
        lineage=w.lineage,
        others=REGISTRY.started_here,
        group_left=w.group_left,
    )
    stop = leftovers_stop(members, grace_s=w.grace_s, log=w.log)
    if stop is not None:
        w.log.info(f"pid {w.pid} exited; stopping what it left in its session {w.sid}")
    return stop


def stop_for(w: Watch, reason: str) -> Optional[Stop]:
    """The stop of a running dispatch for ``reason``; None if its leader has just ended."""
    leader = w.leader
    assert leader is not None
    if leader.exited():
        return None
    w.reason = reason
    if reason in ("timeout", "idle"):
        what = "timed out after" if reason == "timeout" else "idle for"
        w.log.warning(
            f"Dispatch of {w.ticket_id} {what} {w.limit_for(reason) * 1000.0:.0f}ms; stopping it"
        )
    else:
        w.log.info(f"Stopping dispatch of {w.ticket_id} (pid {w.pid}): {reason}")
    return dispatch_stop(
        leader,
        w.dispatch,
        containment="session",
        grace_s=w.grace_s,
        eof_wait_s=w.eof_wait_s,
        log=w.log,
    )


def finish(w: Watch, outcome: Optional[StopOutcome]) -> DispatchCompletionResult:
    """The result of a watch, once its leader has ended and any stop is over
    (``outcome`` None: there was none, the leader ended by itself and left nothing)."""
    # A stop's outcome may be shared by several faces: each edits its own copy.
    outcome = StopOutcome(True, "not_running") if outcome is None else outcome.copy()
    if outcome.method == "not_running" or w.reason is None:
        w.reason = None
    own = collect_leader(w)  # this face may have reaped it first, with its rusage
    shared = outcome.leader_status
    if shared is None or (
        shared.rusage is None and own is not None and own.status == shared.status
    ):
        outcome.leader_status = own or shared
    if w.dispatch is not None:
        if outcome.method == "not_running":
            fold_keeper_report(w.dispatch, outcome)
        if not outcome.survivors:
            REGISTRY.release(w.dispatch.pid)
    if w.leader is not None:
        w.leader.close()
        w.leader = None
    result = build_result(w, outcome)
    result.duration_ms = (time.monotonic() - w.started) * 1000.0
    w.log.info(
        "Dispatch of %s ended: %s (%s)", w.ticket_id, result.status.value, result.return_code
    )
    return result


def launch_failed(dispatch: Any, ticket_id: str, backend: str) -> DispatchCompletionResult:
    """The result of a dispatch that never started (``spawn_dispatch`` said "failed")."""
    return DispatchCompletionResult(
        ticket_id=ticket_id,
        session_id=getattr(dispatch, "session_id", "") or "",
        status=DispatchCompletionStatus.ERROR,
        error=getattr(dispatch, "error", None) or "cannot start the command",
        backend=backend,
    )


def _exit_fields(status: Optional[ExitStatus]) -> dict[str, Any]:
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


def build_result(w: Watch, outcome: StopOutcome) -> DispatchCompletionResult:
    """Every result of a watched dispatch is made here (see design section 3)."""
    fields: dict[str, Any] = {
        **w.base,
        **_exit_fields(outcome.leader_status),
        "descendants_killed": outcome.descendants_killed,
        "stage_ms": dict(outcome.stage_ms),
    }
    if outcome.containment == "keeper" or "containment" not in fields:
        fields["containment"] = outcome.containment
    result = DispatchCompletionResult(**fields, status=DispatchCompletionStatus.ERROR)
    reason = w.reason
    if reason is None:
        _natural(result, outcome.leader_status, w.pid)
        if outcome.keeper_reason == "timeout":  # the keeper's own timeout stopped it
            _stopped(result, "timeout", w.limit_s, outcome.keeper_method or "sigterm")
            result.error = "Timed out (stopped by its keeper)"
    elif not outcome.success:
        _failed(result, reason, w.limit_for(reason), outcome.survivors)
    elif reason == "idle" and outcome.method == "eof":
        # It answered EOF by ending by itself: its exit is authoritative.
        _natural(result, outcome.leader_status, w.pid)
        result.termination_method = "eof"
        result.stop_reason = "idle"
    else:
        _stopped(result, reason, w.limit_for(reason), outcome.method)
    if outcome.keeper_lost:  # never a success: the keeper's guarantees did not hold
        result.status = DispatchCompletionStatus.ERROR
        result.stop_reason = "keeper_lost"
        result.error = (
            f"the keeper (pid {w.pid}) died without its final report; what its command left "
            f"was stopped from here (survivors: {outcome.survivors})"
        )
    return result


def _natural(result: DispatchCompletionResult, status: Optional[ExitStatus], pid: Any) -> None:
    result.termination_method = "natural"
    if status is None:
        result.status = DispatchCompletionStatus.ERROR
        result.error = (
            f"Process {pid} exited but its exit status is unknown "
            "(not a child of this process, and reaped before it was watched)"
        )
    elif status.signal is not None:
        result.status = DispatchCompletionStatus.TERMINATED
        result.error = f"Process killed by signal {status.signal}"
    elif status.return_code == 0:
        result.status = DispatchCompletionStatus.COMPLETED
        result.error = None
    else:
        result.status = DispatchCompletionStatus.ERROR
        result.error = f"Process exited with code {status.return_code}"


def _what(reason: str, limit_s: float) -> str:
    what = _WHAT.get(reason, "Stopped")
    if reason in ("timeout", "idle"):
        what = f"{what} after {limit_s * 1000.0:.0f}ms"
    return what


def _stopped(result: DispatchCompletionResult, reason: str, limit_s: float, method: str) -> None:
    result.status = (
        DispatchCompletionStatus.TIMEOUT
        if reason == "timeout"
        else DispatchCompletionStatus.TERMINATED
    )
    result.termination_method = method
    result.timed_out = reason in ("timeout", "idle")
    result.stop_reason = reason
    result.error = _what(reason, limit_s)


def _failed(
    result: DispatchCompletionResult, reason: str, limit_s: float, survivors: list[int]
) -> None:
    timed = reason in ("timeout", "idle")
    what = _what(reason, limit_s)
    failed = f"{what} and could not be stopped" if timed else f"{what}; could not stop it"
    result.status = DispatchCompletionStatus.ERROR
    result.termination_method = "failed"
    result.timed_out = timed
    result.stop_reason = reason
    result.error = f"{failed}; survivors: {survivors}"
