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

This process is one of those ancestors, and usually the busiest: a loop
starts every dispatch from it. Its children are not listed at all while it
adopts no orphans (it is not a child subreaper, and never was at an earlier
search, nor the init of its PID namespace): then each of its children is one
it forked, and no process of a session started from one of them is in the
tree of another (those are forked from the leader and reparented only to its
ancestors). The leader itself is searched from, so nothing is lost, with one
exception: a child the leader makes with ``clone(CLONE_PARENT)`` is our child,
in the leader's session, and goes unfound here (the full scan finds it).
Listing our children at every walk to catch it cost the monitor's simultaneous
stops (benchmark S8) three times their time. Instead, once the leader is
reaped, a search that found nothing else asks the leader's process group
whether a process is left in it, and then reads the session whole (see
``containment.Members.discover_live``); the keeper, a subreaper, catches it
anyway.

When this process is a child subreaper and was one before the leader was
born, no orphan of the session can have gone past it: its ancestors above it
(a terminal, init) are left out unread. One that became a subreaper later
still reads them (its dispatches' earlier orphans went there), and one that is
not a subreaper at the time of a search reads them too.

A search costs the region it walks: the dispatch's own processes, plus what its
other ancestors started after it, never the rest of the host. A process that
adopts orphans (``ralph-reaper run``) lists its children, but leaves out the
trees of its other dispatches (see :meth:`Lineage.members`).
:func:`full_scan_members` keeps the old way, one read of every process: the
fallback without a record, and the oracle the tests hold the search to.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Optional, Union

from .backends.base import Backend, ProcStat
from .backends.procfs import children_of, read_short

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
        return int(read_short(path, 64))
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

    def born_since(
        self, pids: Iterable[int], threshold: int, read: Callable[[int], Optional[int]]
    ) -> list[tuple[int, int]]:
        """``(pid, start time)`` of those of ``pids`` born at ``threshold`` or later."""
        known, unknown = self.cached_born_since(pids, threshold)
        for pid in unknown:
            born = self.start_of(pid, read)
            if born is not None and born >= threshold:
                known.append((pid, born))
        return known

    def cached_born_since(
        self, pids: Iterable[int], threshold: int
    ) -> tuple[list[tuple[int, int]], list[int]]:
        """Those of ``pids`` the cache says were born at ``threshold`` or later, with
        their start times, and those it cannot tell of (to be read: :meth:`start_of`).

        Many pids under one lock: an ancestor such as init may have thousands of
        children, nearly all born long before.
        """
        known: list[tuple[int, int]] = []
        unknown: list[int] = []
        with self._lock:
            starts, travel_at = self._starts, self._travel_at
            epoch, travel, pid_max = self._epoch, self._travel, self._pid_max
            for pid in pids:
                entry = starts.get(pid)
                if entry is not None and entry[2] == epoch:
                    moved = travel - travel_at.get(pid, travel)
                    if moved < pid_max - RESERVED_PIDS and not (
                        0 < (pid - entry[1]) % pid_max <= moved
                    ):  # inline _valid: this loop is the cost of a crowded ancestor
                        if entry[0] >= threshold:
                            known.append((pid, entry[0]))
                        continue
                unknown.append(pid)
        return known, unknown

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


#: pid -> (start time, session) as last read: see Lineage.may_be_members.
_SESSION_SEEN: dict[int, tuple[int, int]] = {}
_SESSION_SEEN_MAX = 1 << 16


def note_session(pid: int, st: ProcStat) -> None:
    """Remember the session ``pid`` was seen in (keyed by its start time, so a later
    process with that pid is never taken for it)."""
    if len(_SESSION_SEEN) >= _SESSION_SEEN_MAX:
        _SESSION_SEEN.clear()
    _SESSION_SEEN[pid] = (st.starttime, st.session)


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
        fresh: bool = False,
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
        skipped = set(skip)
        walk = getattr(_SHARED, "walk", None)
        if not fresh and walk is not None and walk.covers(self):
            found = [pid for pid in walk.session(backend, sid) if pid not in skipped]
            return found[:1] if stop_at_first else found
        own = os.getpid()
        lists_own, catcher = _adopting(backend)
        thresholds = {ancestor: self.starttime for ancestor in self.region(catcher)}

        def leave_out(parent: int, child: int, born: int) -> bool:
            return (
                others is not None
                and parent == own
                and child != self.leader
                and others(child, born)
            )

        found = []
        for item in _walk(backend, (self,), thresholds, lists_own, leave_out):
            if item is None:
                continue
            pid, st = item
            if st.session == sid and pid not in skipped:
                found.append(pid)
                if stop_at_first:
                    break
        return found

    def region(self, catcher: Catcher) -> tuple[tuple[int, int], ...]:
        """The ancestors among whose children the session's processes can be.

        Every one, unless ``catcher`` (see :func:`_adopting`) is one of them and
        was catching orphans before the leader was born: then no orphan of the
        session went past it (the kernel hands an orphan to its nearest
        subreaper, and those below it are recorded too), and the ones above it
        are left out unread.
        """
        if catcher is None:
            return self.ancestors
        me, since = catcher
        if since >= self.starttime:  # the same tick may be later: not before the birth
            return self.ancestors
        for i, ancestor in enumerate(self.ancestors):
            if ancestor == me:
                return self.ancestors[: i + 1]
        return self.ancestors

    def may_be_members(self, backend: Backend, pids: Iterable[int]) -> list[int]:
        """Those of ``pids`` that may be processes of the leader's session now: not
        those born before the leader (start times read once, then cached), nor those
        seen in another session (:func:`note_session`): a process changes session
        only by ``setsid``, into one of its own, so once out of this one it never
        comes back. Thousands of other dispatches' leaders cost a lookup each."""
        CLOCK.tick()
        sid = self.leader
        out = []
        for pid, born in CLOCK.born_since(pids, self.starttime, _start_reader(backend)):
            seen = _SESSION_SEEN.get(pid)
            if seen is not None and seen[0] == born and seen[1] != sid and pid != sid:
                continue
            out.append(pid)
        return out

    def shared_may_be_stale(self, sid: int) -> bool:
        """Whether a search of session ``sid`` now would use a shared walk (see
        :func:`sharing`) that saw one of its processes alive: one that may have forked
        since, then died, leaving a child that walk never saw."""
        walk = getattr(_SHARED, "walk", None)
        return walk is not None and walk.covers(self) and walk.saw_alive(sid)


#: Nanoseconds in a clock tick (the unit of /proc start times).
_TICK_NS = 1_000_000_000 // os.sysconf("SC_CLK_TCK")


class _Adopting:
    """What this process was seen doing about orphans, at each look (a prctl).

    ``ever``: it adopted at some look, so a child of it may be one it did not
    fork (an orphan it took stays its child). ``since``: the boot-time tick by
    which it was already adopting, for as long as every look since has seen it
    adopting; None after a look that did not. A flag cleared and set again
    between two looks goes unseen: only this process can change it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pid = 0  # a forked child has adopted nothing: it starts afresh
        self.ever = False
        self.since: Optional[int] = None

    def look(self, backend: Backend) -> tuple[bool, Optional[int]]:
        """Look now: ``(ever, since)``."""
        own = os.getpid()
        try:
            now: Optional[bool] = own == 1 or backend.get_child_subreaper()
        except OSError:
            now = None  # cannot tell: list our children, but never trust it to catch
        # Read after the look: the flag was set by then.
        tick = time.clock_gettime_ns(time.CLOCK_BOOTTIME) // _TICK_NS
        with self._lock:
            if own != self._pid:
                self._pid, self.ever, self.since = own, False, None
            if now is None or now:
                self.ever = True
            if not now:
                self.since = None
            elif self.since is None:
                self.since = tick
            return self.ever, self.since


_ADOPTING = _Adopting()


def adopts_orphans(backend: Backend) -> bool:
    """Whether a child of this process may be one it did not fork: it is a child
    subreaper, or the init of its PID namespace, now or at any earlier call (once
    seen, the answer stays: an orphan it adopted stays its child)."""
    return _ADOPTING.look(backend)[0]


Catcher = Optional[tuple[tuple[int, int], int]]


def _adopting(backend: Backend) -> tuple[bool, Catcher]:
    """One look: :func:`adopts_orphans`, and the catcher: this process as ``(pid,
    start time)`` with the tick since which it has caught every orphan of its
    descendants, or None while it does not."""
    ever, since = _ADOPTING.look(backend)
    own = _own_lineage(backend)
    if since is None or not own:
        return ever, None
    return ever, (own[0], since)


def _start_reader(backend: Backend) -> Callable[[int], Optional[int]]:
    def start_of(pid: int) -> Optional[int]:
        st = backend.proc_stat(pid)
        return None if st is None else st.starttime

    return start_of


def _clock_on_first_use() -> Callable[[], PidClock]:
    """:data:`CLOCK`, read once at the first call: a walk that finds nothing to look
    up (no children born since the leader) does not read the allocator."""
    ticked = False

    def clock() -> PidClock:
        nonlocal ticked
        if not ticked:
            CLOCK.tick()
            ticked = True
        return CLOCK

    return clock


def _walk(
    backend: Backend,
    seeds: Sequence[Lineage],  # read twice
    thresholds: dict[tuple[int, int], int],
    lists_own: bool,
    leave_out: Optional[Callable[[int, int, int], bool]] = None,
) -> Iterator[Optional[tuple[int, ProcStat]]]:
    """Every live process of a region, with its stat, parents before children; None
    between reads that found nothing to report, where a reader may pause.

    The region: the subtrees of the children of each ancestor ``(pid, start)``
    of ``thresholds`` born no earlier than its threshold, and the subtrees of
    the seed lineages' leaders (in case a parent could not be recorded).
    ``lists_own``: whether this process's children are listed (it may have
    adopted some, see :func:`adopts_orphans`). ``leave_out(parent, child,
    born)`` prunes a child's subtree.
    """
    clock = _clock_on_first_use()
    start_of = _start_reader(backend)
    # Our own children are the seeds' leaders, and others' (see the module's docstring).
    own = -1 if lists_own else os.getpid()
    seen: set[int] = {pid for pid, _ in thresholds}
    # (pid, its stat when already read): a seed's, read to check it is the leader.
    frontier: list[tuple[int, Optional[ProcStat]]] = []
    for seed in seeds:
        if seed.leader in seen:
            continue
        lead = backend.proc_stat(seed.leader)
        if lead is not None and lead.starttime == seed.starttime:
            seen.add(seed.leader)
            frontier.append((seed.leader, lead))
        yield None
    # The leaders' parents: a leader's clone(CLONE_PARENT) children are theirs too,
    # children of whichever of their threads forked the leader.
    parents = {seed.ancestors[0] for seed in seeds if seed.ancestors}
    for (pid, start), threshold in thresholds.items():
        if pid == own:
            continue
        kids = _ancestor_children(backend, pid, start, (pid, start) in parents, clock, start_of)
        if not kids:
            continue
        born_since, unread = clock().cached_born_since(kids, threshold)
        for child in unread:  # not cached (a cold cache: thousands): a step each
            born = clock().start_of(child, start_of)
            if born is not None and born >= threshold:
                born_since.append((child, born))
            yield None
        for child, born in born_since:
            if child in seen:
                continue
            seen.add(child)
            if leave_out is not None and leave_out(pid, child, born):
                continue
            frontier.append((child, None))
    while frontier:  # everything below is born after its parent: no start times needed
        nxt: list[tuple[int, Optional[ProcStat]]] = []
        for pid, known in frontier:
            st = known or backend.proc_stat(pid)
            if st is None:
                continue
            yield pid, st
            for child in children_of(pid, st.threads):
                if child not in seen:
                    seen.add(child)
                    nxt.append((child, None))
        frontier = nxt


def _ancestor_children(
    backend: Backend,
    pid: int,
    start: int,
    is_parent: bool,
    clock: Callable[[], PidClock],
    start_of: Callable[[int], Optional[int]],
) -> list[int]:
    """The children of ancestor ``(pid, start)`` where a process of the session can be.

    An ancestor further up than the leader's parent has session processes among
    its children only by adopting them, and the kernel gives an orphan to the
    first thread of its new parent that is not exiting: the main thread, until
    that begins to exit. So its main thread's children are read, then its stat
    (after: the flag is never cleared, so "not exiting" then means not exiting at
    any adoption before), and every thread's only if the main thread is exiting.
    That spares a multi-threaded init or terminal a read per thread.
    """
    if is_parent:
        own = _OWN.get(pid)
        this_process = own is not None and own[0][1] == start  # alive, then
        # Cached: a recycled pid is read again; one gone, not recycled, has no children.
        if not this_process and clock().start_of(pid, start_of) != start:
            return []  # gone: its children went to an ancestor further up, recorded too
        return children_of(pid)
    kids = children_of(pid, 1)
    st = backend.proc_stat(pid)
    if st is None or st.starttime != start:
        return []
    return children_of(pid) if st.main_thread_exiting else kids


class Walk:
    """One reading of the regions of several sessions, for searches made together.

    When many dispatches are searched at one moment (timeouts that fall
    together, exits drained together), each search would walk the others'
    trees as well (they are children of the same ancestors, and only those
    this process started can be left out unread): N searches of N trees. A
    walk reads the union of their regions once, on first use, and answers
    for each session from that.

    A walk tells what was there when it was taken. A session's processes are
    forked only by its own processes, so if the walk saw none of them alive,
    none can have appeared since, and "empty" is as true now as then. If it
    saw one alive, that one may have forked and died since: then a stop that
    finds nothing alive through the walk looks again afresh
    (``Members.discover_live``).
    """

    def __init__(self, lineages: Union[Iterable[Lineage], Callable[[], Iterable[Lineage]]]) -> None:
        """``lineages``, or a function giving them: called on first use, so that a
        walk set up for every turn of a loop costs nothing on turns without a search."""
        self._source = lineages
        self._keys: Optional[set[tuple[int, int]]] = None
        self._lineages: list[Lineage] = []
        self._sessions: Optional[dict[int, list[int]]] = None
        self._alive: set[int] = set()
        #: A reading under way (see advance): the walk, and what it found so far.
        self._reading: Optional[Iterator[Optional[tuple[int, ProcStat]]]] = None
        self._found: dict[int, list[int]] = {}

    def _load(self) -> set[tuple[int, int]]:
        if self._keys is None:
            source = self._source
            self._lineages = list(source() if callable(source) else source)
            self._keys = {(lin.leader, lin.starttime) for lin in self._lineages}
        return self._keys

    def covers(self, lineage: Lineage) -> bool:
        return (lineage.leader, lineage.starttime) in self._load()

    def session(self, backend: Backend, sid: int) -> list[int]:
        """The processes of session ``sid`` the walk found (read on first use)."""
        self.advance(backend)
        assert self._sessions is not None
        return self._sessions.get(sid, [])

    def advance(self, backend: Backend, until: Optional[float] = None) -> bool:
        """Read on until the clock passes ``until`` (None: to the end); whether the
        walk is read. A caller with other work (a monitor's exits) reads a long walk
        in steps: each process is read, parents before children, as in one go, only
        over a longer time (which :meth:`saw_alive` already allows for)."""
        if self._sessions is not None:
            return True
        if self._reading is None:
            self._load()
            self._reading = self._read(backend)
        found = self._found
        for item in self._reading:
            if item is not None:
                pid, st = item
                found.setdefault(st.session, []).append(pid)
                if not st.ended:
                    self._alive.add(st.session)
            if until is not None and time.monotonic() >= until:
                return False
        self._sessions, self._reading = found, None
        return True

    def _read(self, backend: Backend) -> Iterator[Optional[tuple[int, ProcStat]]]:
        """The walk of the union of the lineages' regions (see :func:`_walk`)."""
        thresholds: dict[tuple[int, int], int] = {}
        lists_own, catcher = _adopting(backend)
        for i, lin in enumerate(self._lineages):
            for ancestor in lin.region(catcher):
                thresholds[ancestor] = min(thresholds.get(ancestor, lin.starttime), lin.starttime)
            if i % 256 == 255:
                yield None
        yield from _walk(backend, self._lineages, thresholds, lists_own)

    def saw_alive(self, sid: int) -> bool:
        """Whether the walk, once taken, saw a process of session ``sid`` alive."""
        return self._sessions is None or sid in self._alive


_SHARED = threading.local()


@contextlib.contextmanager
def sharing(walk: Walk) -> Iterator[Walk]:
    """Searches on this thread of the sessions ``walk`` covers use it, until the end
    of the block (an outer block's walk stays in force)."""
    if getattr(_SHARED, "walk", None) is not None:
        yield _SHARED.walk
        return
    _SHARED.walk = walk
    try:
        yield walk
    finally:
        _SHARED.walk = None


def full_scan_members(backend: Backend, sid: int) -> list[int]:
    """Every process of session ``sid``, by reading all of ``/proc`` (the oracle)."""
    return backend.session_members(sid)
