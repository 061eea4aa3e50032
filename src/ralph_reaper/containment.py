"""Which processes belong to a dispatch, found and pinned before any signal is sent.

``session`` containment: the live descendants of the leader plus, when the
leader leads its own session (``start_new_session=True``), every process of
that session. ``pid`` containment: the leader alone.

Discovery must happen before the first signal: once the leader dies its
children are reparented and stop looking like its descendants. Each step of a
stop sequence discovers again from every pinned member, so processes forked in
the meantime are added; only pinned processes are ever signalled.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Mapping, Sequence
from typing import Optional

from .backends.base import Backend, ProcStat
from .backends.procfs import children_of
from .lineage import Lineage, Walk, adopts_orphans, full_scan_members, note_session
from .pins import Pin
from .validation import is_ancestor

CONTAINMENTS = ("session", "pid")
#: How many more searches a discovery makes while each finds only exited members.
MOVING_ROUNDS = 8
#: pidfd_send_signal flag: the process group of the pidfd's process (Linux >= 6.9).
PIDFD_SIGNAL_PROCESS_GROUP = 1 << 2


def _signal_group(fd: int, sig: int) -> bool:
    """Send ``sig`` to the process group of the process behind pidfd ``fd`` (reaped or
    not), by pidfd (Linux >= 6.9): the group that process created, never a later
    group that reuses its number. False when no process is left in it, or on an
    older kernel."""
    try:
        signal.pidfd_send_signal(fd, sig, None, PIDFD_SIGNAL_PROCESS_GROUP)
    except (OSError, AttributeError):
        return False
    return True


def group_has_members(fd: int) -> bool:
    """Whether that group still has a process (signal 0); False when the kernel cannot say."""
    return _signal_group(fd, 0)


class Members:
    """The pinned processes of one dispatch (the leader first)."""

    def __init__(
        self,
        backend: Backend,
        leader: Optional[Pin],
        containment: str,
        extra_roots: Sequence[int] = (),
        session: Optional[int] = None,
        group_fd: int = -1,
        lineage: Optional[Lineage] = None,
        others: Optional[Callable[[int, int], bool]] = None,
        group_left: bool = False,
    ) -> None:
        """``extra_roots`` are searched for descendants but never pinned or signalled:
        a dedicated supervisor passes its own pid to sweep up orphans it inherited.
        ``session`` names the session to scan when there is no leader to read it from
        (a reaped leader's session keeps its id, which no new process can take).
        ``group_fd``, owned from then on: a pidfd of that session's (former) leader,
        kept past its exit so its process group can still be signalled.
        ``lineage``: where that session's processes can be (see :mod:`.lineage`);
        without it, read from a live leader, or else every process is read.
        ``others``: which of our children are other dispatches of ours.
        ``group_left``: the leader's process group still had a process right after
        the leader was reaped (:func:`group_has_members`), so a search of the session
        that finds nothing has missed it (see :meth:`discover_live`)."""
        if containment not in CONTAINMENTS:
            raise ValueError(f"containment must be one of {CONTAINMENTS}, not {containment!r}")
        self.backend = backend
        self.leader = leader
        self.containment = containment
        self.extra_roots = list(extra_roots)
        self.pins: dict[int, Pin] = {} if leader is None else {leader.pid: leader}
        own_session = os.getsid(0)
        self._group_fd = group_fd
        #: A pidfd whose process group is the session leader's (see :meth:`signal_group`).
        self.group_fd = -1
        if leader is not None:
            st = backend.proc_stat(leader.pid)
            if st is not None and st.session == leader.pid:
                session = st.session
                self.group_fd = leader.fd
        #: The leader's session, scanned only when the leader created it and it is not ours.
        self.session = session if session != own_session and containment == "session" else None
        if self.session is None:
            self.group_fd = -1
        elif self.group_fd < 0:
            self.group_fd = group_fd
        if lineage is None and leader is not None and self.session == leader.pid:
            lineage = Lineage.record(backend, leader.pid)
        self.lineage = lineage if lineage is not None and lineage.leader == self.session else None
        self.others = others
        self.group_left = group_left

    def discover(self, fresh: bool = False, scan: bool = False) -> int:
        """Pin members not yet pinned; return how many were added.

        ``fresh``: search the session anew even inside :func:`.lineage.sharing`.
        ``scan``: read every process for the session instead of searching it.

        The tree is walked only from pins that are still alive: the pid of a
        member that exited (and that its own parent reaped) may already belong
        to an unrelated process, whose children are not ours. For the same
        reason a process found below the roots belongs only if its parent is a
        live root or a process accepted before it (the walk is breadth first).
        """
        if self.containment == "pid":
            return 0
        live = [p.pid for p in self.pins.values() if p.status is None and not p.exited()]
        accepted = set(live) | set(self.extra_roots)
        added = 0
        for pid in self.backend.descendants(live + self.extra_roots):
            st = self._candidate(pid)
            if st is not None and st.ppid in accepted:
                accepted.add(pid)
                added += self._pin(pid, st)
        if self.session is not None:
            for pid in self.session_members(fresh, scan):
                st = self._candidate(pid)
                if st is not None and st.session == self.session:
                    added += self._pin(pid, st)
        return added

    def discover_live(self) -> list[Pin]:
        """Discover, then the live members. Through a walk shared with other searches
        that saw a member alive, "none is left" is not believed: the session is
        searched again afresh (see :class:`.lineage.Walk`).

        Nor is it when the search found new members that have all exited: one
        that exits while the search passes hands its children to its reaper
        (this process, an ancestor), whose children may have been read before
        (a process that forks and exits in a loop does it all the time). Then
        the session is searched again, up to :data:`MOVING_ROUNDS` times, until
        a search adds nothing or finds one alive.

        Nor, finally, is "none alive" when the search never found anything but the
        leader, the leader has been reaped (so it is out of its process group),
        and that group still has a process (:meth:`_missed_in_group`): the search
        missed it, as it misses a child the leader made with ``clone(CLONE_PARENT)``
        (this process's own, which a host that adopts no orphans does not list,
        see :mod:`.lineage`). Then every process is read for the session.
        """
        added = self.discover()
        live = self.live()
        if not live and self._missed_in_group():
            added += self._scan_while_group_lives()
            live = self.live()
        if (
            not live
            and self.lineage is not None
            and self.session is not None
            and self.lineage.shared_may_be_stale(self.session)
        ):
            added += self.discover(fresh=True)
            live = self.live()
        rounds = 0
        while not live and added and rounds < MOVING_ROUNDS:
            added = self.discover(fresh=True)
            live = self.live()
            rounds += 1
        return live

    def _missed_in_group(self) -> bool:
        """Whether the leader's process group holds a process no search found.

        Asked only while nothing but the leader was ever found (else the group
        may hold their zombies, on their way to being reaped by their parents)
        and once the leader is reaped; with no leader pinned (a sweep after its
        reap), ``group_left`` says what the group held at the reap.
        """
        if self.session is None:
            return False
        leader = self.leader
        if leader is None:
            return not self.pins and self.group_left
        if not leader.reaped or len(self.pins) > 1 or self.group_fd < 0:
            return False
        return group_has_members(self.group_fd)

    def _scan_while_group_lives(self) -> int:
        """Read every process for the session; keep what it found only if the leader's
        group still has a process after the read (when there is a pidfd to ask).

        Then the group was never empty meanwhile (an empty group stays empty), so
        the session's number was never free for a newcomer's ``setsid``: whatever
        the read found in that session is the dispatch's.
        """
        before = set(self.pins)
        added = self.discover(scan=True)
        if added and self.group_fd >= 0 and not group_has_members(self.group_fd):
            for pid in set(self.pins) - before:
                self.pins.pop(pid).close()
            return 0
        return added

    def session_members(self, fresh: bool = False, scan: bool = False) -> list[int]:
        """The session's processes not pinned yet: searched where they can be, or,
        without a lineage (or with ``scan``), read from every process."""
        assert self.session is not None
        if self.lineage is not None and not scan:
            return self.lineage.members(
                self.backend, self.session, skip=self.pins, others=self.others, fresh=fresh
            )
        # Our own children too: as a subreaper this process inherits every
        # orphan of the session, and its small children file is read whole,
        # where a scan of /proc can miss a member that forks and exits faster
        # than the scan moves (it keeps landing on pids the scan has passed).
        found = full_scan_members(self.backend, self.session)
        return [*found, *(c for c in children_of(os.getpid()) if c not in found)]

    def _candidate(self, pid: int) -> Optional[ProcStat]:
        if pid in self.pins or is_ancestor(pid):
            return None
        return self.backend.proc_stat(pid)

    def _pin(self, pid: int, st: ProcStat) -> int:
        # Zombies are pinned too: once their parent is stopped they may be
        # reparented to this process (a subreaper), which must reap them.
        pin = Pin.open(self.backend, pid, st.starttime)
        if pin is None:
            return 0
        self.pins[pid] = pin
        return 1

    def widen(self, session: int) -> None:
        """From now on, also the members of ``session`` (a keeper that did not answer:
        its command's session is what the host stops itself)."""
        self.containment = "session"
        if session != os.getsid(0):
            self.session = session

    def reap_zombie_children(self) -> int:
        """Reap the zombies of the dispatch's session that are our own children; return count.

        A process that forks and exits in a loop leaves a zombie every few
        microseconds; as a subreaper this process inherits each one, and those
        born after the last discovery were never pinned. They are ours to reap
        (a zombie's pid cannot be reused until it is) and the dispatch's by
        their session, which a zombie keeps.
        """
        if self.session is None or not adopts_orphans(self.backend):
            return 0  # then each child of ours is one we forked: a leader, reaped by its pin
        from .backends.polling import wait4_nohang

        reaped = 0
        children = children_of(os.getpid())
        if self.lineage is not None:  # born before the leader, or seen elsewhere: not
            children = self.lineage.may_be_members(self.backend, children)
        for pid in children:
            st = self.backend.proc_stat(pid)
            if st is None:
                continue
            note_session(pid, st)
            if st.session != self.session or not st.ended:
                continue
            try:
                if wait4_nohang(pid) is not None:
                    reaped += 1
            except ChildProcessError:  # reaped meanwhile by another thread
                continue
        return reaped

    def signal_group(self, sig: int) -> bool:
        """Send ``sig`` to the session leader's process group, at once, by pidfd.

        One signal to the whole group lands on every member atomically, a
        fork under way included: a process that forks and exits in a loop
        outruns any discovery (its live pid changes faster than a pin can be
        signalled), but not this. By pidfd (Linux >= 6.9) the group is the
        one that leader created, never a later group that reuses its number;
        without it only the per-member signals are sent.
        """
        if self.group_fd < 0:
            return self._signal_group_of_child(sig)
        return _signal_group(self.group_fd, sig)

    def _signal_group_of_child(self, sig: int) -> bool:
        """Without pidfds: ``killpg`` only while the leader is our unreaped child.

        Until this process reaps it, its pid (the group's number) cannot be
        taken by anyone else, so the group signalled is the leader's own.
        """
        leader = self.leader
        if leader is None or leader.reaped or self.session != leader.pid:
            return False
        try:
            os.waitid(os.P_PID, leader.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            os.killpg(leader.pid, sig)
        except OSError:  # not our child, or no group left
            return False
        return True

    def live(self) -> list[Pin]:
        return [p for p in self.pins.values() if p.status is None and not p.exited()]

    def close_others(self) -> None:
        """Close every pin but the leader's (which belongs to whoever pinned it)."""
        for pin in self.pins.values():
            if pin is not self.leader:
                pin.close()

    def close(self) -> None:
        for pin in self.pins.values():
            pin.close()
        if self._group_fd >= 0:
            fd, self._group_fd = self._group_fd, -1
            os.close(fd)
        self.group_fd = -1


def sessions_in_use(
    backend: Backend,
    wanted: Mapping[int, Optional[Lineage]],
    others: Optional[Callable[[int, int], bool]] = None,
    walk: Optional[Walk] = None,
) -> set[int]:
    """Which sessions of ``wanted`` still have a process (zombies count: they may need
    reaping).

    Sessions with their lineage: searched where their processes can be, one
    on its own, several in one :class:`.lineage.Walk` taken now (``walk``,
    when given, must be new: an answer "empty" from an old one could be
    stale). Without: one session, the backend's own scan; several, one pass
    over ``/proc`` for all, so that N exits drained together cost one scan, not N.
    """
    lineages = {
        sid: lineage
        for sid, lineage in wanted.items()
        if lineage is not None and lineage.leader == sid
    }
    if len(lineages) > 1:
        if walk is None:
            walk = Walk(lineages.values())
        found = {sid for sid in lineages if walk.session(backend, sid)}
    else:
        found = {
            sid
            for sid, lineage in lineages.items()
            if lineage.members(backend, sid, others=others, stop_at_first=True, fresh=True)
        }
    rest = {sid for sid in wanted if sid not in lineages}
    return found | _scanned_in_use(backend, rest) if rest else found


def _scanned_in_use(backend: Backend, sids: set[int]) -> set[int]:
    if len(sids) == 1:
        (sid,) = sids
        return {sid} if backend.session_members(sid) else set()
    try:
        names = os.listdir("/proc")
    except OSError:
        return set(sids)
    found: set[int] = set()
    for name in names:
        if not name.isdigit():
            continue
        st = backend.proc_stat(int(name))
        if st is not None and st.session in sids:
            found.add(st.session)
            if len(found) == len(sids):
                break
    return found
