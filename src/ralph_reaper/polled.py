"""Pins without a pidfd, checked together: one ``waitid`` tells whether any child exited.

Reading ``/proc/<pid>/stat`` for every such pin on every round costs a whole
core at ten thousand idle dispatches. Most of them are our own children, and
for those the kernel answers in aggregate: a ``waitid(P_ALL, WNOWAIT)`` peek
(the *gate*, :func:`~ralph_reaper.backends.polling.exited_child`) names an
exited child without reaping it, or says that none has exited. A round asks
the gate and reads ``/proc`` only for the pin it names.

What the gate cannot see is still found, more slowly:

* a pin that is not our child (a dispatch's descendants, a process pinned by
  pid) is checked on its own, with a backoff that ends at
  :data:`FOREIGN_MAX_STEP_S` rather than :data:`MAX_STEP_S`;
* a child reaped behind our back (a caller's ``os.waitpid``) never shows as a
  zombie: each child pin has a check of its own about every
  :data:`FULL_CHECK_S` (a one-syscall probe, every :data:`REAL_EVERY`-th
  time a ``/proc`` read), and one reaped through another pin of this process
  is looked at as soon as the reap is noted;
* an exited child that nobody here pins (a caller's un-waited ``Popen``) is
  what the gate returns for as long as it stays a zombie, hiding every other
  exit: a round that meets one probes each child pin instead, as every round
  did before, only cheaper.

Costs are measured (CPU time of the calling thread), not assumed: they differ
by orders of magnitude between machines, and the gate's grows with the number
of our children, since the kernel walks them all. In the steady state the gate
and the per-pin checks of children each take about :data:`IDLE_SHARE` of a
core at most (their intervals stretch past the nominal ones when that would
cost more), and no round comes back sooner than :data:`MAX_DUTY` allows.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import random
import time
from typing import Any, Generic, Optional, TypeVar

from .backends.polling import child_state, exited_child
from .pins import REAPED, Pin

#: The first step of every backoff: a process that lives a few milliseconds
#: is still seen within about its lifetime.
FIRST_STEP_S = 0.0001
#: Where the round of the gate (and of a child pin, had it none) stops doubling.
MAX_STEP_S = 0.05
#: Where a pin the gate cannot see stops doubling. Such pins are few (the
#: descendants a stop awaits after a signal, processes pinned by pid) but each
#: costs a ``/proc`` read per look; ten times the child's cap still has a stop
#: notice a member that dies late within half a second.
FOREIGN_MAX_STEP_S = 0.5
#: How often, at most, a child pin has a check of its own whatever the gate
#: says: the gate cannot see a child reaped elsewhere.
FULL_CHECK_S = 1.0
#: One check of a child pin in so many reads ``/proc`` (the start time) instead
#: of probing: a probe cannot tell a reaped child from a new child of ours
#: that got its pid.
REAL_EVERY = 8
#: The share of a core the gate, and separately the checks of child pins, may
#: take while nothing happens: a quarter of a percent each.
IDLE_SHARE = 0.0025
#: No round comes back before ten times its own cost has passed.
MAX_DUTY = 0.1
#: Once the gate has proved dearer than probing every child pin, how long
#: until it is measured again (our number of children changes).
GATE_RETRY_S = 10.0

_log = logging.getLogger("ralph_reaper")
_WEIGHT = 0.25
OwnerT = TypeVar("OwnerT")


class _Costs:
    """CPU seconds of one gate call and of one check of a child pin, as seen here.

    Shared by every poller of the process: a blocking wait starts from what
    the monitor has measured. The races between threads only blur an estimate.
    """

    __slots__ = ("check_s", "gate_at", "gate_s", "kernel_ok")

    def __init__(self) -> None:
        self.gate_s = 0.0
        self.gate_at = -math.inf
        self.check_s = 2e-6
        #: False once a peek failed otherwise than ECHILD: every look reads /proc.
        self.kernel_ok = True

    def note_gate(self, spent: float, now: float) -> None:
        first = self.gate_at == -math.inf
        self.gate_s = spent if first else self.gate_s + (spent - self.gate_s) * _WEIGHT
        self.gate_at = now

    def note_checks(self, spent: float, count: int) -> None:
        if count:
            self.check_s += (spent / count - self.check_s) * _WEIGHT

    def gate_pays(self, kids: int, now: float) -> bool:
        """Whether one gate call costs less than probing every child pin (or is due a measure)."""
        return self.gate_s <= kids * self.check_s or now - self.gate_at > GATE_RETRY_S

    def blind(self, exc: OSError) -> None:
        if self.kernel_ok:
            self.kernel_ok = False
            _log.warning(
                f"ralph-reaper: waitid(WNOWAIT) failed ({exc}); polled processes are "
                "checked one by one in /proc"
            )


COSTS = _Costs()


def _peek(pid: int) -> Optional[bool]:
    """:func:`child_state`, or None (as for a stranger) when the kernel cannot tell."""
    if not COSTS.kernel_ok:
        return None
    try:
        return child_state(pid)
    except OSError as exc:
        COSTS.blind(exc)
        return None


class _Rec(Generic[OwnerT]):
    """One polled pin: for whom, whether the gate sees it, its next check."""

    __slots__ = ("checks", "kid", "live", "owner", "pin", "step", "timer")

    def __init__(self, pin: Pin, owner: OwnerT) -> None:
        self.pin = pin
        self.owner = owner
        #: Our child: the gate sees its exit (else it has a backoff of its own).
        self.kid = False
        self.live = True
        self.step = FIRST_STEP_S
        self.checks = 0
        self.timer: Optional[list[Any]] = None


class _Heap(Generic[OwnerT]):
    """Records by due time; a cancelled one stays (marked) until it comes up or half are."""

    COMPACT_MIN = 64

    def __init__(self) -> None:
        self._heap: list[list[Any]] = []  # [when, seq, record or None]
        self._seq = itertools.count()
        self._stale = 0

    def schedule(self, when: float, rec: _Rec[OwnerT]) -> list[Any]:
        item: list[Any] = [when, next(self._seq), rec]
        heapq.heappush(self._heap, item)
        return item

    def cancel(self, item: Optional[list[Any]]) -> None:
        if item is None or item[2] is None:
            return
        item[2] = None
        self._stale += 1
        if self._stale > self.COMPACT_MIN and self._stale * 2 > len(self._heap):
            self._heap = [i for i in self._heap if i[2] is not None]
            heapq.heapify(self._heap)
            self._stale = 0

    def next_due(self) -> Optional[float]:
        heap = self._heap
        while heap and heap[0][2] is None:
            heapq.heappop(heap)
            self._stale -= 1
        return heap[0][0] if heap else None

    def pop_due(self, now: float) -> list[_Rec[OwnerT]]:
        heap = self._heap
        due: list[_Rec[OwnerT]] = []
        while heap and heap[0][0] <= now:
            item = heapq.heappop(heap)
            if item[2] is None:
                self._stale -= 1
            else:
                due.append(item[2])
                item[2] = None
        return due


class _Round(Generic[OwnerT]):
    def __init__(self, collect: bool) -> None:
        self.collect = collect
        self.found: list[_Rec[OwnerT]] = []
        self.failed: list[tuple[_Rec[OwnerT], Exception]] = []

    def __len__(self) -> int:
        return len(self.found) + len(self.failed)


class Polled(Generic[OwnerT]):
    """The pins without a pidfd of one poller (a monitor, a blocking wait), checked together.

    The poller calls :meth:`check` at :meth:`next_due`; each pin is reported
    once, with its owner, then forgotten. One thread only.
    """

    def __init__(self, max_step_s: float = MAX_STEP_S) -> None:
        self.max_step_s = max_step_s
        self._recs: dict[Pin, _Rec[OwnerT]] = {}
        self._by_pid: dict[int, list[_Rec[OwnerT]]] = {}
        self._kids: set[_Rec[OwnerT]] = set()
        #: Pins the gate cannot see (and new ones, not looked at yet), when due.
        self._foreign: _Heap[OwnerT] = _Heap()
        #: Child pins, when their own check is due (taken at the gate's rounds).
        self._full: _Heap[OwnerT] = _Heap()
        self._step = FIRST_STEP_S
        self._tick_at: Optional[float] = None
        self._floor = 0.0
        self._notes = REAPED.notes

    def __len__(self) -> int:
        return len(self._recs)

    def pins(self) -> list[Pin]:
        """The pins not reported yet, in the order they were added."""
        return list(self._recs)

    def add(self, pin: Pin, owner: OwnerT, now: float) -> None:
        """Watch ``pin`` for ``owner`` (a pin added again keeps its checks, takes the owner).

        The first look is at once: it tells whether the gate can see the pin,
        and a pin the gate sees restarts the gate's backoff, so that a
        short-lived process is noticed quickly however long the others ran.
        """
        rec = self._recs.get(pin)
        if rec is not None:
            rec.owner = owner
            return
        rec = _Rec(pin, owner)
        self._recs[pin] = rec
        self._by_pid.setdefault(pin.pid, []).append(rec)
        rec.timer = self._foreign.schedule(now, rec)

    def discard(self, pin: Pin) -> None:
        rec = self._recs.get(pin)
        if rec is not None:
            self._drop(rec)

    def next_due(self) -> Optional[float]:
        """When :meth:`check` has something to do; None when no pin is left."""
        due = self._foreign.next_due()
        tick = self._tick_at
        if tick is not None and (due is None or tick < due):
            return tick
        return due

    def check(
        self, now: float, collect: bool, last: bool = False
    ) -> tuple[list[tuple[OwnerT, Pin]], list[tuple[OwnerT, Pin, Exception]]]:
        """Look at what is due: the exited pins and the pins whose look raised, by owner.

        ``collect``: collect (reap) each exited pin as it is found, which lets
        one round take every exit the gate shows; otherwise a round reports at
        most one of those, and the next round falls back to probing.
        ``last``: look at every pin, due or not (a wait at its deadline must
        not report as running a process that has just exited).
        """
        out: _Round[OwnerT] = _Round(collect)
        if REAPED.notes != self._notes:
            self._reaped_elsewhere(out)
        if self._tick_at is not None and (last or now >= self._tick_at):
            self._tick(now, out)
        if last:
            for rec in [r for r in self._recs.values() if not r.kid]:
                self._foreign.cancel(rec.timer)
                self._check_foreign(rec, now, out)
        for rec in self._foreign.pop_due(now):
            if rec.live and not rec.kid:
                self._check_foreign(rec, now, out)
        found = [(r.owner, r.pin) for r in out.found]
        return found, [(r.owner, r.pin, exc) for r, exc in out.failed]

    # ------------------------------------------------------------------ rounds

    def _reaped_elsewhere(self, out: _Round[OwnerT]) -> None:
        """Pins of processes this process reaped through other pins: the gate never saw them."""
        self._notes, pids = REAPED.noted_since(self._notes)
        for pid in pids:
            for rec in list(self._by_pid.get(pid, ())):
                self._settle(rec, out)

    def _tick(self, now: float, out: _Round[OwnerT]) -> None:
        kids = len(self._kids)
        cost = 0.0
        cap = self.max_step_s
        probe_all = True
        if COSTS.kernel_ok and COSTS.gate_pays(kids, now):
            probe_all = self._gate(now, out, kids * COSTS.check_s)
            cost = COSTS.gate_s
            if not probe_all:
                cap = max(cap, COSTS.gate_s / IDLE_SHARE)
        if probe_all:
            started, before = time.thread_time(), len(out)
            for rec in list(self._kids):
                if rec.live and rec.kid:
                    self._check_kid(rec, now, out)
            if len(out) == before:  # exits cost what they cost: measure the idle checks
                COSTS.note_checks(time.thread_time() - started, kids)
            cost += kids * COSTS.check_s
        self._full_round(now, out)
        self._step = min(self._step * 2, cap)
        self._floor = cost / MAX_DUTY
        self._tick_at = now + max(self._step, self._floor) if self._kids else None

    def _gate(self, now: float, out: _Round[OwnerT], probing_s: float) -> bool:
        """Ask the gate until it has nothing more to show; True when every child pin must be probed.

        That is when the gate cannot vouch for them (no child at all, or an
        exited child nobody here pins), or when so many exits came at once
        that one probe round is cheaper than asking again for each.
        """
        seen: set[int] = set()
        spent = 0.0
        while True:
            started = time.thread_time()
            try:
                pid = exited_child()
            except ChildProcessError:
                pid = -1
            except OSError as exc:
                COSTS.blind(exc)
                return True
            took = time.thread_time() - started
            COSTS.note_gate(took, now)
            spent += took
            if pid is None:
                return False
            recs = self._by_pid.get(pid)
            if pid < 0 or not recs or pid in seen:
                return True
            seen.add(pid)
            if not any([self._settle(rec, out) for rec in list(recs)]):
                return True
            if not out.collect:
                return False
            if spent > probing_s:
                return True

    def _full_round(self, now: float, out: _Round[OwnerT]) -> None:
        """The checks of their own that child pins are due, whatever the gate said."""
        due = self._full.pop_due(now)
        if not due:
            return
        period = self._full_period()
        started, before, count = time.thread_time(), len(out), 0
        for rec in due:
            if not (rec.live and rec.kid):
                continue
            count += 1
            self._check_kid(rec, now, out)
            if rec.live and rec.kid:
                rec.timer = self._full.schedule(now + period, rec)
        if len(out) == before:
            COSTS.note_checks(time.thread_time() - started, count)

    def _full_period(self) -> float:
        return max(FULL_CHECK_S, len(self._kids) * COSTS.check_s / IDLE_SHARE)

    # ------------------------------------------------------------------ one pin

    def _check_kid(self, rec: _Rec[OwnerT], now: float, out: _Round[OwnerT]) -> None:
        rec.checks += 1
        pin = rec.pin
        if pin.status is None and rec.checks % REAL_EVERY and _peek(pin.pid) is False:
            return  # still our unreaped child
        if not self._settle(rec, out) and _peek(pin.pid) is None:
            self._demote(rec, now)  # alive, yet not a child the gate sees

    def _check_foreign(self, rec: _Rec[OwnerT], now: float, out: _Round[OwnerT]) -> None:
        if self._settle(rec, out):
            return
        if _peek(rec.pin.pid) is not None:  # our child (since the start, or orphaned to us)
            self._promote(rec, now)
            return
        cap = FOREIGN_MAX_STEP_S if COSTS.kernel_ok else self.max_step_s
        rec.step = min(rec.step * 2, max(cap, self.max_step_s))
        rec.timer = self._foreign.schedule(now + rec.step, rec)

    def _settle(self, rec: _Rec[OwnerT], out: _Round[OwnerT]) -> bool:
        """The ``/proc`` look: True (and the pin reported, collected if asked) once it exited."""
        pin = rec.pin
        try:
            if not pin.exited():
                return False
            if out.collect and pin.status is None:
                pin.collect()
        except Exception as exc:
            self._drop(rec)
            out.failed.append((rec, exc))
            return True
        self._drop(rec)
        out.found.append(rec)
        return True

    def _promote(self, rec: _Rec[OwnerT], now: float) -> None:
        rec.kid = True
        self._kids.add(rec)
        # Spread over the period: pins added together do not come due together.
        first = now + self._full_period() * random.uniform(0.5, 1.0)
        rec.timer = self._full.schedule(first, rec)
        self._step = FIRST_STEP_S
        tick = now + max(self._step, self._floor)
        if self._tick_at is None or tick < self._tick_at:
            self._tick_at = tick

    def _demote(self, rec: _Rec[OwnerT], now: float) -> None:
        self._unkid(rec)
        rec.timer = self._foreign.schedule(now + rec.step, rec)

    def _unkid(self, rec: _Rec[OwnerT]) -> None:
        if rec.kid:
            rec.kid = False
            self._kids.discard(rec)
            self._full.cancel(rec.timer)
            if not self._kids:
                self._tick_at = None
        else:
            self._foreign.cancel(rec.timer)
        rec.timer = None

    def _drop(self, rec: _Rec[OwnerT]) -> None:
        if not rec.live:
            return
        rec.live = False
        self._unkid(rec)
        del self._recs[rec.pin]
        same = self._by_pid[rec.pin.pid]
        same.remove(rec)
        if not same:
            del self._by_pid[rec.pin.pid]
