"""The stop sequence: EOF, then SIGTERM + SIGCONT, then SIGKILL, each stage bounded.

Every stage waits on the pinned members' pidfds, so it ends the moment the
last member exits; a member that cannot die (uninterruptible sleep) makes the
sequence give up after the SIGKILL wait instead of hanging the caller.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Optional

from .backends import get as get_backend
from .backends.base import Rusage
from .containment import Members
from .dispatches import Dispatch
from .exits import BOOK
from .exitstatus import ExitStatus
from .logs import LogSink
from .pins import Pin
from .waiting import wait_all, wait_any

KILL_WAIT_S = 2.0
#: After SIGKILL, members that forked in the meantime are looked for this many times.
KILL_ROUNDS = 5


@dataclass
class StopOutcome:
    """Everything a stop sequence learned; the public API reports parts of it."""

    success: bool
    method: str
    leader_status: Optional[ExitStatus] = None
    descendants_killed: int = 0
    containment: str = "session"
    stage_ms: dict[str, float] = field(default_factory=dict)
    survivors: list[int] = field(default_factory=list)
    #: Under keeper containment: why and how the keeper itself stopped the tree.
    keeper_reason: Optional[str] = None
    keeper_method: Optional[str] = None


def _signal_all(pins: list[Pin], sig: int) -> list[Pin]:
    """Signal each live pin; return those the signal reached."""
    return [p for p in pins if p.signal(sig)]


def stop_members(
    members: Members,
    *,
    kill_wait_s: float,
    eof: Optional[Callable[[], bool]] = None,
    eof_wait_s: float = 0.0,
    log: LogSink,
) -> StopOutcome:
    """Run the stop sequence on ``members`` (already holding the pinned leader)."""
    stage_ms: dict[str, float] = {}
    signalled: set[int] = set()
    method = "failed"
    members.discover()

    def stage(name: str, wait_s: float, action: Callable[[], object]) -> bool:
        """Act, then wait; a member forked meanwhile gets the same action and wait."""
        t0 = time.monotonic()
        deadline = t0 + wait_s
        action()
        settled = False
        for _ in range(KILL_ROUNDS):
            left = wait_all(members.live(), max(0.0, deadline - time.monotonic()))
            if left:
                break
            if not (members.discover() and members.live()):
                settled = True
                break
            action()
        stage_ms[name] = (time.monotonic() - t0) * 1000.0
        return settled

    def send(*sigs: int) -> Callable[[], None]:
        def action() -> None:
            members.discover()
            live = members.live()
            for sig in sigs:
                signalled.update(p.pid for p in _signal_all(live, sig))

        return action

    done = False
    if eof is not None and eof_wait_s > 0 and eof():
        done = stage("eof", eof_wait_s, members.discover)
        method = "eof" if done else method
    if not done:
        done = stage("sigterm", kill_wait_s, send(signal.SIGTERM, signal.SIGCONT))
        method = "sigterm" if done else method
    if not done:
        t0 = time.monotonic()
        deadline = t0 + KILL_WAIT_S
        for _ in range(KILL_ROUNDS):
            send(signal.SIGKILL)()
            left = wait_all(members.live(), max(0.0, deadline - time.monotonic()))
            if left or time.monotonic() >= deadline:
                break
            if not members.discover():
                done = True
                break
        stage_ms["sigkill"] = (time.monotonic() - t0) * 1000.0
        method = "sigkill" if done else "failed"
        if not done:
            survivors = [p.pid for p in members.live()]
            log.error(f"stop failed: members survive SIGKILL: {survivors}")
    return _finish(members, done, method, signalled, stage_ms)


def _finish(
    members: Members, done: bool, method: str, signalled: set[int], stage_ms: dict[str, float]
) -> StopOutcome:
    """Collect exits (reaping our children), remember the leader's, close every pin."""
    survivors = []
    killed = 0
    for pin in members.pins.values():
        exited = pin.exited()
        if exited:
            pin.collect()
            pin.reap_if_child()
        else:
            survivors.append(pin.pid)
        if pin is not members.leader and exited and pin.pid in signalled:
            killed += 1
    leader = members.leader
    if leader is not None and leader.status is not None:
        BOOK.remember(leader.pid, leader.starttime, leader.status)
    members.close()
    return StopOutcome(
        success=done,
        method=method,
        leader_status=None if leader is None else leader.status,
        descendants_killed=killed,
        containment=members.containment,
        stage_ms=stage_ms,
        survivors=survivors,
    )


def stop_pid(
    pid: int,
    *,
    containment: str,
    kill_wait_s: float,
    eof: Optional[Callable[[], bool]] = None,
    eof_wait_s: float = 0.0,
    log: LogSink,
    leader: Optional[Pin] = None,
) -> StopOutcome:
    """Stop the dispatch led by ``pid``; a leader that already exited is ``not_running``.

    Members of its session that outlived an exited leader are still stopped:
    they are what "nothing left behind" is about.
    """
    backend = get_backend()
    if leader is None:
        leader = BOOK.take(pid) or Pin.open(backend, pid)
    if leader is None:
        # Reaped already; the session it led may still hold what it left behind.
        status = BOOK.lookup(backend, pid)
        members = Members(backend, None, containment, session=pid)
        if members.discover() and members.live():
            log.info(f"pid {pid} already reaped; stopping what it left in its session")
            outcome = stop_members(members, kill_wait_s=kill_wait_s, log=log)
        else:
            outcome = _finish(members, True, "not_running", set(), {})
        outcome.method = "not_running"
        outcome.success = not outcome.survivors
        outcome.leader_status = status
        return outcome
    members = Members(backend, leader, containment)
    if leader.exited():
        if members.discover() and members.live():
            log.info(f"pid {pid} already exited; stopping what it left behind")
            outcome = stop_members(members, kill_wait_s=kill_wait_s, log=log)
            outcome.method = "not_running"
            outcome.success = not outcome.survivors
            return outcome
        return _finish(members, True, "not_running", set(), {})
    return stop_members(members, kill_wait_s=kill_wait_s, eof=eof, eof_wait_s=eof_wait_s, log=log)


def stop_orphans(kill_wait_s: float, log: LogSink) -> StopOutcome:
    """Stop every process below this one (a dedicated supervisor and subreaper).

    Only for a process whose children all belong to one dispatch, such as
    ``ralph-reaper run``: as a subreaper it inherits the orphans of the tree,
    and this sweeps them up once the command has ended.
    """
    members = Members(get_backend(), None, "session", extra_roots=[os.getpid()])
    if not members.discover():
        return StopOutcome(True, "not_running")
    return stop_members(members, kill_wait_s=kill_wait_s, log=log)


#: Beyond the keeper's own SIGTERM grace and SIGKILL wait, how long the host
#: waits for a keeper before stopping the tree itself.
KEEPER_SLACK_S = 1.0


def keeper_details(dispatch: Dispatch, outcome: StopOutcome) -> StopOutcome:
    """Fold the keeper's final report into ``outcome``: what only the keeper saw."""
    dispatch.read_reports()
    report = dispatch.final_report
    if report is None:
        return outcome
    outcome.containment = "keeper"
    outcome.keeper_reason = str(report.get("reason") or "") or None
    outcome.keeper_method = str(report.get("method") or "") or None
    outcome.descendants_killed = max(
        outcome.descendants_killed, int(report.get("descendants_killed") or 0)
    )
    survivors = report.get("survivors")
    if isinstance(survivors, list):
        known = set(outcome.survivors)
        outcome.survivors += [p for p in survivors if isinstance(p, int) and p not in known]
    stages = report.get("stage_ms")
    if isinstance(stages, dict):
        outcome.stage_ms.update({str(k): float(v) for k, v in stages.items() if v is not None})
    status = outcome.leader_status
    raw = report.get("status")
    if isinstance(raw, int) and (status is None or status.status == raw):
        outcome.leader_status = ExitStatus(
            raw,
            Rusage(
                float(report.get("utime_s") or 0.0),
                float(report.get("stime_s") or 0.0),
                int(report.get("maxrss_kb") or 0),
            ),
        )
    return outcome


def stop_keeper(
    dispatch: Dispatch,
    *,
    kill_wait_s: float,
    eof_wait_s: float,
    log: LogSink,
    leader: Optional[Pin] = None,
) -> StopOutcome:
    """Stop a keeper-contained dispatch: EOF from here, the rest by the keeper's own timers.

    The keeper pins and signals its whole tree itself (everything orphaned in
    it was reparented to the keeper), so this only asks and waits. A keeper
    that does not answer in time is stopped from here like any session.
    """
    backend = get_backend()
    pid = dispatch.pid
    leader = leader or BOOK.take(pid) or Pin.open(backend, pid)
    if leader is None or leader.exited():
        outcome = stop_pid(
            pid, containment="session", kill_wait_s=kill_wait_s, log=log, leader=leader
        )
        return keeper_details(dispatch, outcome)
    stage_ms: dict[str, float] = {}
    t0 = time.monotonic()
    if eof_wait_s > 0 and dispatch.send_eof():
        exited = bool(wait_any([leader], eof_wait_s))
        stage_ms["eof"] = (time.monotonic() - t0) * 1000.0
        if exited:
            outcome = _finish(Members(backend, leader, "pid"), True, "eof", set(), stage_ms)
            return keeper_details(dispatch, outcome)
    if not dispatch.request_stop(kill_wait_s * 1000.0):
        leader.signal(signal.SIGTERM)
    if wait_any([leader], kill_wait_s + KILL_WAIT_S + KEEPER_SLACK_S):
        dispatch.read_reports()
        report = dispatch.final_report or {}
        method = str(report.get("method") or "sigterm")
        if method == "natural":  # the command ended on its own as we asked
            method = "eof" if "eof" in stage_ms else "sigterm"
        outcome = _finish(
            Members(backend, leader, "pid"), method != "failed", method, set(), stage_ms
        )
        return keeper_details(dispatch, outcome)
    log.error(f"keeper {pid} did not stop its dispatch in time; stopping the tree from here")
    outcome = stop_pid(pid, containment="session", kill_wait_s=0.0, log=log, leader=leader)
    outcome.stage_ms.update(stage_ms)
    return keeper_details(dispatch, outcome)
