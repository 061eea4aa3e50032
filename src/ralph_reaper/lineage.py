"""Where the processes of a session can be, so that finding them never reads all of ``/proc``.

A session's processes descend from its leader. While their parent lives they
are in the leader's tree; an orphan is reparented to the nearest child
subreaper among its ancestors, or to the init of its PID namespace, and every
one of those is in the leader's tree or is one of the leader's own ancestors.
So every process of the session is in the subtree of a child of one of those
ancestors, a child born no earlier than the leader (the leader is one). The
ancestors are recorded when the dispatch is first pinned; none can be added
later (a process gains ancestors only by being forked).

Reading ``/proc/<pid>/stat`` is what costs (the kernel builds the file), so the
start times of the ancestors' children are cached by pid and a child born
before the leader is skipped unread. A start time never changes, but a pid can
be handed out again: :class:`PidClock` follows the allocator (``ns_last_pid``),
which hands pids out in increasing order modulo ``pid_max``, and an entry is
trusted only while the allocator has not come round to its pid since it was
read. The clock is read at every search; a gap of more than
:data:`MAX_GAP_S` between two readings, or a move it cannot follow, forgets
every entry.

A search costs the region it walks: the dispatch's own processes, plus what its
ancestors started after it, minus the trees of this process's other
dispatches (a session leader started by us is never in another session's
tree, see :meth:`Lineage.members`), never the rest of the host.
:func:`full_scan_members` keeps the old way, one read of every process: the
fallback without a record, and the oracle the tests hold the search to.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Optional

from .backends.base import Backend
from .backends.procfs import children_of

#: pids below this are not handed out again once the allocator has wrapped.
RESERVED_PIDS = 300
#: More ancestors than this: a loop in what /proc said (a recycled pid), stop.
MAX_DEPTH = 4096
#: Between two readings of the allocator, longer than this: it may have gone round.
MAX_GAP_S = 1.0
_LAST_PID = "/proc/sys/kernel/ns_last_pid"
_PID_MAX = "/proc/sys/kernel/pid_max"


def _read_int(path: str) -> Optional[int]:
    try:
        with open(path, "rb") as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


class PidClock:
    """The pid allocator's position, and which cached start times it leaves valid."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last = -1
        self._pid_max = 0
        self._at = 0.0
        #: pid -> (start time, allocator position when it was read, epoch)
        self._starts: dict[int, tuple[int, int, int]] = {}
        self._epoch = 0  # bumped when every entry is forgotten
        #: cumulative moves: the allocator handed out at most this many pids so far
        self._travel = 0
        self._travel_at: dict[int, int] = {}

    def tick(self) -> None:
        """Read the allocator; forget what it may have invalidated."""
        last, pid_max = _read_int(_LAST_PID), _read_int(_PID_MAX)
        now = time.monotonic()
        with self._lock:
            if (
                last is None
                or pid_max is None
                or pid_max != self._pid_max
                or now - self._at > MAX_GAP_S
            ):
                self._forget(last if last is not None else -1, pid_max or 0)
            else:
                self._travel += (last - self._last) % pid_max
                self._last = last
            self._at = now

    def _forget(self, last: int, pid_max: int) -> None:
        self._starts.clear()
        self._travel_at.clear()
        self._epoch += 1
        self._last, self._pid_max, self._travel = last, pid_max, 0

    def start_of(self, pid: int, read: Callable[[int], Optional[int]]) -> Optional[int]:
        """The start time of ``pid``: cached while no later process can have that pid."""
        with self._lock:
            entry = self._starts.get(pid)
            if entry is not None and self._valid(pid, entry):
                return entry[0]
        start = read(pid)
        with self._lock:
            if start is None or self._last < 0:
                self._starts.pop(pid, None)
            else:
                self._starts[pid] = (start, self._last, self._epoch)
                self._travel_at[pid] = self._travel
        return start

    def _valid(self, pid: int, entry: tuple[int, int, int]) -> bool:
        _start, last_then, epoch = entry
        if epoch != self._epoch:
            return False
        moved = self._travel - self._travel_at.get(pid, self._travel)
        if moved >= self._pid_max - RESERVED_PIDS:
            return False  # the allocator may have handed out every pid since
        # Handed out since: the arc (last_then, last_then + moved], modulo pid_max.
        return not (0 < (pid - last_then) % self._pid_max <= moved)


CLOCK = PidClock()


def _ancestry(backend: Backend, pid: int, start: int, ppid: int) -> tuple[tuple[int, int], ...]:
    chain: list[tuple[int, int]] = []
    seen = {pid}
    child_start, pid = start, ppid
    while pid > 0 and pid not in seen and len(chain) < MAX_DEPTH:
        parent = backend.proc_stat(pid)
        if parent is None or parent.starttime > child_start:
            break  # gone, or a recycled pid younger than its "child"
        chain.append((pid, parent.starttime))
        seen.add(pid)
        child_start, pid = parent.starttime, parent.ppid
    return tuple(chain)


_OWN: dict[int, tuple[tuple[int, int], ...]] = {}


def _own_lineage(backend: Backend) -> tuple[tuple[int, int], ...]:
    """This process and its ancestors. Kept: if one of them dies, this process is
    reparented to another of them, and a search skips the dead one."""
    own = os.getpid()
    chain = _OWN.get(own)
    if chain is None:
        st = backend.proc_stat(own)
        if st is None:
            return ()
        chain = ((own, st.starttime), *_ancestry(backend, own, st.starttime, st.ppid))
        _OWN.clear()  # a forked child's copy holds its parent's entry
        _OWN[own] = chain
    return chain


@dataclass(frozen=True)
class Lineage:
    """A session leader's ancestors, as (pid, start time), nearest first."""

    leader: int
    starttime: int
    ancestors: tuple[tuple[int, int], ...]

    @classmethod
    def record(cls, backend: Backend, leader: int) -> Optional[Lineage]:
        """Read the leader's ancestry now (a zombie's too); None if the leader is gone."""
        st = backend.proc_stat(leader)
        if st is None:
            return None
        if st.ppid == os.getpid():
            return cls(leader, st.starttime, _own_lineage(backend))
        return cls(leader, st.starttime, _ancestry(backend, leader, st.starttime, st.ppid))

    @classmethod
    def of_child(cls, backend: Backend, pid: int, starttime: int) -> Lineage:
        """The lineage of a child this process just forked (our own ancestry, cached)."""
        return cls(pid, starttime, _own_lineage(backend))

    def members(
        self,
        backend: Backend,
        sid: int,
        skip: Iterable[int] = (),
        others: Optional[Callable[[int, int], bool]] = None,
        stop_at_first: bool = False,
    ) -> list[int]:
        """The processes of session ``sid`` (the leader's), found in the region alone.

        ``skip``: pids not to report (pinned already); their subtrees are
        searched all the same. ``others(pid, start_time)``: whether a child of
        this process is another dispatch this process started (forked, not
        inherited); its tree is left out, since no process of ``sid`` can be in
        it: those are forked by processes of ``sid`` and reparented only to
        their own ancestors, and that child is neither. With ``stop_at_first``
        the first member found is enough.
        """
        CLOCK.tick()
        own = os.getpid()
        skipped = set(skip)
        found: list[int] = []
        seen: set[int] = {pid for pid, _ in self.ancestors}

        def start_of(pid: int) -> Optional[int]:
            st = backend.proc_stat(pid)
            return None if st is None else st.starttime

        frontier: list[int] = []
        for pid, start in self.ancestors:
            if start_of(pid) != start:
                continue  # gone: its children went to an ancestor further up, recorded too
            for child in children_of(pid):
                if child in seen:
                    continue
                seen.add(child)
                born = CLOCK.start_of(child, start_of)
                if born is None or born < self.starttime:
                    continue
                if (
                    others is not None
                    and pid == own
                    and child != self.leader
                    and others(child, born)
                ):
                    continue
                frontier.append(child)
        while frontier:  # everything below is born after its parent: no start times needed
            nxt: list[int] = []
            for pid in frontier:
                st = backend.proc_stat(pid)
                if st is None:
                    continue
                if st.session == sid and pid not in skipped:
                    found.append(pid)
                    if stop_at_first:
                        return found
                for child in children_of(pid):
                    if child not in seen:
                        seen.add(child)
                        nxt.append(child)
            frontier = nxt
        return found


def full_scan_members(backend: Backend, sid: int) -> list[int]:
    """Every process of session ``sid``, by reading all of ``/proc`` (the oracle)."""
    return backend.session_members(sid)
