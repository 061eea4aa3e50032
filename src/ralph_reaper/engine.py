"""One stop of one dispatch: the plan of :mod:`ralph_reaper.plan` bound to real processes.

A :class:`Stop` carries out the plan's actions on the dispatch's pinned
members (discover, signal through pidfds, close stdin) or, under keeper
containment, on its keeper (a stop request on the control pipe, then the
host's own fallback if the keeper does not answer in time). It never waits:
it says which pins it awaits (:attr:`Stop.awaited`, :meth:`Stop.take_new`) and
until when (:attr:`Stop.deadline`), and a driver reports back what happened
(:meth:`Stop.exited`, :meth:`Stop.due`). :func:`drive` is the blocking driver;
the monitor thread and asyncio drive the same object with their own waits.

Stops in progress are listed in :data:`ONGOING`, so that a face which sees
a leader die while another call is stopping it reports that stop (method,
stages, reason) instead of a mysterious death by signal.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import signal
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Optional

from .backends import get as get_backend
from .backends.base import ExitStatus
from .containment import Members
from .dispatches import REGISTRY, Dispatch
from .exits import BOOK
from .keeper_client import command_status, report_stage_ms, report_survivors
from .logs import LogSink
from .pins import Pin
from .plan import (
    EOF,
    KILL_LEAD_S,
    KILL_WAIT_S,
    Action,
    Discover,
    Finish,
    Presearch,
    SendEof,
    Signal,
    StopPlan,
    WaitUntil,
)
from .waiting import wait_all

#: Beyond the keeper's own grace and SIGKILL wait, how long the host waits for
#: a keeper before stopping the tree itself.
KEEPER_SLACK_S = 1.0

#: The signals on which a keeper stops its tree, beginning with the signal received.
KEEPER_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)


@dataclass
class StopOutcome:
    """Everything a stop sequence learned; results report parts of it."""

    success: bool
    method: str
    leader_status: Optional[ExitStatus] = None
    descendants_killed: int = 0
    containment: str = "session"
    stage_ms: dict[str, float] = field(default_factory=dict)
    survivors: list[int] = field(default_factory=list)
    #: Under keeper containment: why the keeper stopped the tree (its own timeout, say).
    keeper_reason: Optional[str] = None
    keeper_method: Optional[str] = None
    #: The keeper died without its final report: the host stopped its command's session.
    keeper_lost: bool = False

    def copy(self) -> StopOutcome:
        """A copy whose containers are its own: one outcome may be shared by several
        faces, and each edits its copy. (``dataclasses.replace`` walks the fields'
        metadata at every call: a tenth of the cost of an exit in a burst.)"""
        new = StopOutcome.__new__(StopOutcome)
        new.__dict__.update(self.__dict__)
        new.stage_ms = dict(self.stage_ms)
        new.survivors = [*self.survivors]
        return new


class Stop:
    """One stop sequence of one dispatch; see the module docstring."""

    def __init__(
        self,
        members: Members,
        plan: StopPlan,
        *,
        log: LogSink,
        dispatch: Optional[Dispatch] = None,
        keeper_grace_ms: Optional[float] = None,
    ) -> None:
        """``keeper_grace_ms`` set: ``members`` holds the keeper alone, asked to stop
        its tree with that grace; the host signals the tree only if it does not."""
        self.members = members
        self.plan = plan
        self.log = log
        self.dispatch = dispatch
        self.keeper_grace_ms = keeper_grace_ms
        self.leader = members.leader
        self.signalled: set[int] = set()
        self.awaited: dict[int, Pin] = {}
        self.outcome: Optional[StopOutcome] = None
        self._new: list[Pin] = []
        self._lock = threading.Lock()
        #: The keeper was lost (see :meth:`_check_keeper`).
        self.lost = False
        self.begun = False

    @property
    def deadline(self) -> float:
        return self.plan.deadline

    @property
    def done(self) -> bool:
        return self.outcome is not None

    # ------------------------------------------------------------ driver calls

    def begin(self, now: float) -> None:
        self.begun = True
        self._run(self.plan.start(now), now)

    def exited(self, pins: list[Pin], now: float) -> None:
        """These awaited pins have exited (their statuses collected where possible)."""
        for pin in pins:
            if self.awaited.get(pin.pid) is pin:
                del self.awaited[pin.pid]
            if pin is self.leader:
                self.plan.leader_exited()
        if not self.awaited and not self.done:
            self._run(self.plan.all_exited(now), now)

    def due(self, now: float) -> None:
        """The deadline passed."""
        self._run(self.plan.due(now), now)

    def take_new(self) -> list[Pin]:
        """Pins added to :attr:`awaited` since the last call (for an event loop to watch)."""
        new, self._new = self._new, []
        return [p for p in new if self.awaited.get(p.pid) is p]

    # ------------------------------------------------------------ actions

    def _run(self, actions: list[Action], now: float) -> None:
        queue = list(actions)
        while queue and not self.done:
            action = queue.pop(0)
            if isinstance(action, SendEof):
                if self.dispatch is not None:
                    self.dispatch.send_eof()
                self._discover()
            elif isinstance(action, Signal):
                self._signal(action.signals, action.search)
            elif isinstance(action, Presearch):
                self._discover()
            elif isinstance(action, Discover):
                queue.extend(self.plan.found(now, self._discover()))
            elif isinstance(action, WaitUntil):
                if not self.awaited:
                    queue.extend(self.plan.all_exited(now))
            elif isinstance(action, Finish):
                self._finish()

    def _discover(self) -> int:
        """Pin new members; await every live one; return how many are live."""
        if self.keeper_grace_ms is not None and self.members.containment == "pid":
            self._check_keeper()
        live = self.members.discover_live()
        for pin in live:
            if pin.pid not in self.awaited:
                self.awaited[pin.pid] = pin
                self._new.append(pin)
        if self.leader is not None and self.leader not in live:
            self.plan.leader_exited()
        return len(live)

    def _signal(self, signals: tuple[int, ...], search: bool = True) -> None:
        if self.keeper_grace_ms is not None and self.members.containment == "pid":
            if self.plan.stage != "sigkill":
                self._ask_keeper()
                self._discover()
                return
            # The keeper did not stop its tree in time: the host does it, from the
            # command's session (the keeper started it in a session of its own).
            self.log.error(
                f"keeper {self.members.leader.pid if self.members.leader else '?'} did not "
                "stop its dispatch in time; stopping the tree from here"
            )
            if self.dispatch is not None:
                self.members.widen(self.dispatch.leader_pid)
        if search:
            self._discover()
        live = self.members.live()
        for sig in signals:
            grouped = self.members.signal_group(sig)
            if grouped and sig != signal.SIGKILL:
                # One catchable signal per process: a handler would run twice (a
                # trap that cleans up, a "term" logged twice). SIGKILL goes to all.
                rest = [p for p in live if not self._reached_by_group(p)]
            else:
                rest = live
            hit = {p.pid for p in rest if p.signal(sig)}
            if grouped:  # the group's signal may have ended a member before its own
                hit |= {p.pid for p in live}
            self.signalled.update(hit)

    def _reached_by_group(self, pin: Pin) -> bool:
        """Whether ``pin``, read just after :meth:`Members.signal_group`, is in the
        session leader's process group (the one signalled) or has already exited."""
        st = self.members.backend.proc_stat(pin.pid)
        return st is None or st.ended or st.pgrp == self.members.session

    def _check_keeper(self) -> None:
        """A keeper that died without its final report (SIGKILLed, say) stopped nothing:
        from now on the host stops its command's session itself."""
        leader = self.leader
        if self.dispatch is None or leader is None or not leader.exited():
            return
        if self.dispatch.final_report is not None:
            return
        self.lost = True
        self.log.error(
            f"keeper {leader.pid} died without its final report; stopping its command's "
            "session from here"
        )
        self.members.widen(self.dispatch.leader_pid)

    def _ask_keeper(self) -> None:
        keeper = None if self.dispatch is None else self.dispatch.keeper
        grace = self.keeper_grace_ms or 0.0
        first = self.plan.first_signal
        if keeper is not None and keeper.request_stop(grace, first):
            return
        if self.leader is not None:  # no control pipe: a signal the keeper stops on
            self.leader.signal(first if first in KEEPER_STOP_SIGNALS else signal.SIGTERM)

    # ------------------------------------------------------------ the end

    def _finish(self) -> None:
        members = self.members
        survivors: list[int] = []
        killed = 0
        for pin in members.pins.values():
            exited = pin.exited()
            if exited:
                pin.collect()
                pin.reap_if_child()
            else:
                survivors.append(pin.pid)
            if pin is not self.leader and exited and pin.pid in self.signalled:
                killed += 1
        leader = self.leader
        status = None if leader is None else leader.status
        if leader is not None and status is None:
            status = BOOK.lookup(members.backend, leader.pid)
        if leader is not None and status is not None:
            BOOK.remember(leader.pid, leader.starttime, status)
        members.reap_zombie_children()
        members.close()
        outcome = StopOutcome(
            success=self.plan.success and not survivors,
            method=self.plan.method(None if status is None else status.signal),
            leader_status=status,
            descendants_killed=killed,
            containment=members.containment,
            stage_ms=dict(self.plan.stage_ms),
            survivors=survivors,
        )
        if not outcome.success:
            outcome.method = "failed"
            self.log.error(f"stop failed: members survive SIGKILL: {survivors}")
        if self.dispatch is not None and self.dispatch.keeper is not None:
            fold_keeper_report(self.dispatch, outcome, self.plan)
        outcome.keeper_lost = self.lost
        with self._lock:
            self.outcome = outcome


def fold_keeper_report(
    dispatch: Dispatch, outcome: StopOutcome, plan: Optional[StopPlan] = None
) -> StopOutcome:
    """Fold the keeper's final report into ``outcome``: what only the keeper saw.

    The command's own exit (core flag and rusage included), the descendants
    the keeper stopped, its survivors, its stage timings, and how the command
    ended: the keeper knows which of its signals reached the command.
    """
    report = dispatch.final_report
    if report is None:
        return outcome
    outcome.containment = "keeper"
    outcome.keeper_reason = str(report.get("reason") or "") or None
    outcome.keeper_method = str(report.get("method") or "") or None
    outcome.descendants_killed = max(
        outcome.descendants_killed, int(report.get("descendants_killed") or 0)
    )
    known = set(outcome.survivors)
    outcome.survivors += [p for p in report_survivors(report) if p not in known]
    status = command_status(report)
    if status is not None:
        outcome.leader_status = status
    if plan is None or outcome.method == "not_running":  # what the keeper stopped itself
        outcome.stage_ms.update(report_stage_ms(report))
    else:
        _fold_keeper_stop(outcome, report, plan)
    return outcome


def _fold_keeper_stop(outcome: StopOutcome, report: dict[str, Any], plan: StopPlan) -> None:
    """A stop the keeper ran: its stages after the host's EOF, and its account of the end."""
    stages = {k: v for k, v in outcome.stage_ms.items() if k == EOF}
    stages.update(report_stage_ms(report))
    outcome.stage_ms = stages
    method = outcome.keeper_method or ""
    if method == "natural":  # the command ended on its own once asked
        method = EOF if plan.leader_stage == EOF else "sigterm"
    if method in ("sigterm", "sigkill", "failed", EOF):
        outcome.method = method
    if outcome.survivors or method == "failed":
        outcome.success = False
        outcome.method = "failed"


def drive(stop: Stop) -> StopOutcome:
    """Run ``stop`` to its end, blocking: the driver of the blocking API and the CLI."""
    stop.begin(time.monotonic())
    return resume(stop)


def resume(stop: Stop) -> StopOutcome:
    """Run a stop already begun to its end, blocking (one that another driver left)."""
    while stop.outcome is None:
        pins = list(stop.awaited.values())
        if not pins:  # cannot happen while the plan runs; never spin if it does
            stop.exited([], time.monotonic())
            if stop.outcome is None:
                stop.due(time.monotonic())
            continue
        left = wait_all(pins, max(0.0, stop.deadline - time.monotonic()))
        now = time.monotonic()
        still = {id(p) for p in left}
        gone = [p for p in pins if id(p) not in still]
        if gone:
            stop.exited(gone, now)
        if stop.outcome is None and left and now >= stop.deadline:
            stop.due(now)
    return stop.outcome


# ---------------------------------------------------------------- building stops


def tree_stop(
    members: Members,
    *,
    grace_s: float,
    log: LogSink,
    dispatch: Optional[Dispatch] = None,
    eof_wait_s: float = 0.0,
    first_signal: int = int(signal.SIGTERM),
) -> Stop:
    """A stop of ``members`` from this process (session or pid containment)."""
    eof = dispatch is not None and dispatch.stdin_fd is not None and eof_wait_s > 0
    plan = StopPlan(
        eof_wait_s=eof_wait_s,
        term_wait_s=grace_s,
        eof=eof,
        first_signal=first_signal,
        kill_lead_s=KILL_LEAD_S,
    )
    return Stop(members, plan, log=log, dispatch=dispatch)


def keeper_stop(
    dispatch: Dispatch,
    leader: Pin,
    *,
    grace_s: float,
    eof_wait_s: float,
    log: LogSink,
    first_signal: int = int(signal.SIGTERM),
) -> Stop:
    """A stop of a keeper-contained dispatch: EOF from here, the rest by the keeper
    (beginning with ``first_signal``; the host waits beyond the keeper's own grace)."""
    members = Members(get_backend(), leader, "pid")
    plan = StopPlan(
        eof_wait_s=eof_wait_s,
        term_wait_s=grace_s + KILL_WAIT_S + KEEPER_SLACK_S,
        eof=dispatch.stdin_fd is not None and eof_wait_s > 0,
        first_signal=first_signal,
    )
    return Stop(members, plan, log=log, dispatch=dispatch, keeper_grace_ms=grace_s * 1000.0)


def dispatch_stop(
    leader: Pin,
    dispatch: Optional[Dispatch],
    *,
    containment: str,
    grace_s: float,
    eof_wait_s: float,
    log: LogSink,
    first_signal: int = int(signal.SIGTERM),
) -> Stop:
    """The stop of a live leader, under the containment its dispatch has."""
    if dispatch is not None and dispatch.keeper is not None:
        return keeper_stop(
            dispatch,
            leader,
            grace_s=grace_s,
            eof_wait_s=eof_wait_s,
            log=log,
            first_signal=first_signal,
        )
    members = Members(
        get_backend(),
        leader,
        containment,
        lineage=None if dispatch is None else dispatch.lineage,
        others=REGISTRY.started_here,
    )
    return tree_stop(
        members,
        grace_s=grace_s,
        log=log,
        dispatch=dispatch,
        eof_wait_s=eof_wait_s,
        first_signal=first_signal,
    )


def leftovers_stop(members: Members, *, grace_s: float, log: LogSink) -> Optional[Stop]:
    """The stop of what an exited leader left in its session; None when nothing is left."""
    if not members.discover_live():
        members.close()
        return None
    return tree_stop(members, grace_s=grace_s, log=log)


def lost_keeper_stop(dispatch: Dispatch, *, grace_s: float, log: LogSink) -> Optional[Stop]:
    """After a keeper exited by itself: None if it reported, else the stop of what its
    command left in its session (``lost`` set either way on the returned stop)."""
    if dispatch.keeper is None or dispatch.final_report is not None:
        return None
    sid = dispatch.leader_pid
    log.error(f"keeper {dispatch.pid} died without its final report; stopping session {sid}")
    members = Members(get_backend(), None, "session", session=sid)
    stop = tree_stop(members, grace_s=grace_s, log=log)
    stop.lost = True
    return stop


def not_running(outcome: Optional[StopOutcome] = None) -> StopOutcome:
    """The outcome of a stop of a leader that had already ended (after any sweep)."""
    if outcome is None:
        return StopOutcome(True, "not_running")
    outcome.method = "not_running"
    outcome.success = not outcome.survivors
    return outcome


# ---------------------------------------------------------------- stops in progress


class Ongoing:
    """Stops by leader pid, in progress and recently ended.

    A face that sees a leader die asks here first: if the package was stopping
    it (from another call, thread or face), the result reports that stop. Ended
    stops are kept for a while (bounded), because a slow waiter, the polling
    backend's, may look only after the stop has reaped the leader. Entries carry
    the leader's start time, so a new process with the same pid is not taken
    for it.
    """

    MAX_ENDED = 1024

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._live: dict[int, tuple[int, str, cf.Future[StopOutcome]]] = {}
        self._ended: OrderedDict[int, tuple[int, str, cf.Future[StopOutcome]]] = OrderedDict()

    def claim(self, leader: Pin, reason: str) -> tuple[cf.Future[StopOutcome], bool]:
        """Register a stop of ``leader``: (its future, True), or the future of the stop
        already under way and False (then the caller reports that one, not a second)."""
        with self._lock:
            entry = self._live.get(leader.pid)
            if entry is not None and (
                not entry[0] or not leader.starttime or entry[0] == leader.starttime
            ):
                return entry[2], False
            future: cf.Future[StopOutcome] = cf.Future()
            # Running from the start: a face that stops awaiting it (an asyncio
            # task cancelled while it joins) must not cancel it for the others.
            future.set_running_or_notify_cancel()
            self._live[leader.pid] = (leader.starttime, reason, future)
            self._ended.pop(leader.pid, None)
        return future, True

    def end(self, leader: Pin, future: cf.Future[StopOutcome], outcome: StopOutcome) -> None:
        if not future.done():
            future.set_result(outcome)
        with self._lock:
            entry = self._live.get(leader.pid)
            if entry is not None and entry[2] is future:
                del self._live[leader.pid]
                self._ended[leader.pid] = entry
                while len(self._ended) > self.MAX_ENDED:
                    self._ended.popitem(last=False)

    def running(self, leader: Pin) -> Optional[cf.Future[StopOutcome]]:
        """The outcome-to-be of a stop of ``leader`` in progress, if one is."""
        with self._lock:
            entry = self._live.get(leader.pid)
        if entry is None or (entry[0] and leader.starttime and entry[0] != leader.starttime):
            return None
        return entry[2]

    def get(self, leader: Pin) -> Optional[tuple[str, cf.Future[StopOutcome]]]:
        with self._lock:
            entry = self._live.get(leader.pid) or self._ended.get(leader.pid)
        if entry is None or (entry[0] and leader.starttime and entry[0] != leader.starttime):
            return None
        return entry[1], entry[2]


ONGOING = Ongoing()


def run_registered(stop: Stop, reason: str) -> StopOutcome:
    """:func:`drive` with the stop listed in :data:`ONGOING` while it runs."""
    leader = stop.leader
    if leader is None:
        return drive(stop)
    future, mine = ONGOING.claim(leader, reason)
    if not mine:  # another call is stopping it: its outcome is ours
        stop.members.close_others()
        return future.result()
    outcome: Optional[StopOutcome] = None
    try:
        outcome = drive(stop)
        return outcome
    finally:
        ONGOING.end(leader, future, outcome or StopOutcome(False, "failed"))


def orphans_stop(*, grace_s: float, log: LogSink) -> Optional[Stop]:
    """The stop of every process below this one (a dedicated supervisor and subreaper).

    Only for a process whose children all belong to one dispatch, such as
    ``ralph-reaper run``: as a subreaper it inherits the orphans of the tree,
    and this sweeps them up once the command has ended. None: nothing is left.
    """
    members = Members(get_backend(), None, "session", extra_roots=[os.getpid()])
    return leftovers_stop(members, grace_s=grace_s, log=log)
