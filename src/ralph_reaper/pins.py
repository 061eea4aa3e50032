"""Pinned processes: a process held so that a later process with its pid is never mistaken for it.

With pidfds the kernel does the pinning. Without them (polling backend, or a
dispatch degraded after EMFILE) a pin is the pid plus its start time from
``/proc``, checked before every signal and reap.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import resource
import threading
import time
from collections import OrderedDict
from typing import Optional

from .backends.base import Backend, ExitStatus, ProcStat

_log = logging.getLogger("ralph_reaper")
_nofile_raised = False
_nofile_lock = threading.Lock()


def _raise_nofile_once() -> bool:
    """Raise the soft RLIMIT_NOFILE to the hard limit, once per process; True if it grew."""
    global _nofile_raised
    with _nofile_lock:
        if _nofile_raised:
            return False
        _nofile_raised = True
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard != resource.RLIM_INFINITY and soft >= hard:
            return False
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            return False
        _log.info(f"ralph-reaper: raised the open-file limit from {soft} to {hard}")
        return True


class _Reaped:
    """The exits this process reaped, by pid and start time (bounded).

    Several pins may hold one process (a wait, a monitor and a stop of the
    same dispatch): the one that reaps it gets the wait status with rusage,
    the others only what the kernel keeps for a reaped process (no rusage),
    or nothing at all without pidfds. They look here first.

    A reap in progress on another thread is announced (:meth:`reaping`): a
    pin that finds the process gone while that call has not yet returned
    waits for its note instead of reporting the exit as unknown.
    """

    MAX = 4096
    #: How long a reader waits for a reap in progress to be noted.
    WAIT_S = 2.0

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._by_pid: OrderedDict[int, tuple[int, ExitStatus]] = OrderedDict()
        self._in_flight: dict[int, int] = {}
        #: Readers now waiting for a reap in progress (seen by tests).
        self.readers_waiting = 0
        #: Reaps noted so far: a poller that keeps the count it last saw asks
        #: :meth:`noted_since` which pids to look at, instead of every pin.
        self.notes = 0

    def reaping(self, pin: Pin) -> _Reaping:
        """Mark a reaping call on ``pin`` as under way until it returns."""
        return _Reaping(self, pin.pid)

    def _enter(self, pid: int) -> None:
        with self._cond:
            self._in_flight[pid] = self._in_flight.get(pid, 0) + 1

    def _leave(self, pid: int) -> None:
        with self._cond:
            left = self._in_flight[pid] - 1
            if left:
                self._in_flight[pid] = left
            else:
                del self._in_flight[pid]
            self._cond.notify_all()

    def note(self, pin: Pin, status: ExitStatus) -> None:
        with self._cond:
            self._by_pid[pin.pid] = (pin.starttime, status)
            self._by_pid.move_to_end(pin.pid)
            while len(self._by_pid) > self.MAX:
                self._by_pid.popitem(last=False)
            self.notes += 1

    def noted_since(self, notes: int) -> tuple[int, list[int]]:
        """The count of notes now and the pids noted after the count ``notes`` (newest first).

        A pid noted twice is listed once, so the list may reach back past
        ``notes``: a caller looks at a few pins too many, never too few.
        """
        with self._cond:
            count = min(self.notes - notes, len(self._by_pid))
            return self.notes, list(itertools.islice(reversed(self._by_pid), max(0, count)))

    def get(self, pin: Pin) -> Optional[ExitStatus]:
        with self._cond:
            if pin.pid in self._in_flight:
                self.readers_waiting += 1
                try:
                    self._cond.wait_for(lambda: pin.pid not in self._in_flight, self.WAIT_S)
                finally:
                    self.readers_waiting -= 1
            entry = self._by_pid.get(pin.pid)
        if entry is None or (entry[0] and pin.starttime and entry[0] != pin.starttime):
            return None
        return entry[1]


class _Reaping:
    """``with REAPED.reaping(pin)``: a class, not a generator, since it runs at
    every reap (a ``contextlib.contextmanager`` costs several calls more)."""

    __slots__ = ("_book", "_pid")

    def __init__(self, book: _Reaped, pid: int) -> None:
        self._book = book
        self._pid = pid

    def __enter__(self) -> None:
        self._book._enter(self._pid)

    def __exit__(self, *exc: object) -> None:
        self._book._leave(self._pid)


REAPED = _Reaped()


class Pin:
    """One process of a dispatch, held for signalling, waiting and reaping."""

    __slots__ = ("backend", "denied", "fd", "pid", "reaped", "starttime", "status")

    def __init__(self, backend: Backend, pid: int, fd: int, starttime: int) -> None:
        self.backend = backend
        self.pid = pid
        self.fd = fd
        self.starttime = starttime
        #: The exit, once collected (by :meth:`collect` or a batch drain).
        self.status: Optional[ExitStatus] = None
        #: True once this process reaped it (else its parent did, or will).
        self.reaped = False
        #: True once a signal was refused with EPERM (another user's process).
        self.denied = False

    def __repr__(self) -> str:
        return f"Pin(pid={self.pid}, fd={self.fd}, starttime={self.starttime})"

    @classmethod
    def open(cls, backend: Backend, pid: int, starttime: Optional[int] = None) -> Optional[Pin]:
        """Pin ``pid``; None when no such process exists (or it is not the one expected).

        ``starttime``, when given, is the start time seen when the pid was
        discovered: a process with another start time has reused the pid and
        is not pinned.
        """
        fd = -1
        if backend.has_pidfd:
            try:
                fd = _pidfd_open(backend, pid)
            except (ProcessLookupError, PermissionError):
                return None
            except OSError as exc:
                if exc.errno == errno.EINVAL:  # a task that has just exited (6.x)
                    return None
                raise
        if fd >= 0:
            try:
                st = backend.proc_stat(pid)
            except OSError:  # out of fds, say: the pidfd alone still pins it
                return cls(backend, pid, fd, starttime or 0)
            if st is None:
                # Exited and reaped between pidfd_open and the read: keep the pin,
                # the pidfd may still tell its exit status.
                return cls(backend, pid, fd, starttime or 0)
            if starttime is not None and st.starttime != starttime:
                os.close(fd)
                return None
            return cls(backend, pid, fd, st.starttime)
        st = backend.proc_stat(pid)  # without a pidfd, a /proc failure cannot be guessed past
        if st is None or (starttime is not None and st.starttime != starttime):
            return None
        return cls(backend, pid, -1, st.starttime)

    def set_exit(self, status: Optional[ExitStatus], reaped: bool) -> None:
        """Record an exit learned elsewhere (a batch drain); None: the exit, status unknown."""
        if reaped:
            self.reaped = True
            if status is not None:
                REAPED.note(self, status)
        else:  # what this process reaped through another pin has the rusage
            booked = REAPED.get(self)
            if booked is not None and (status is None or booked.status == status.status):
                status = booked
        if status is not None:
            self.status = status

    def _same_process(self) -> Optional[ProcStat]:
        """Without a pidfd: the process's stat if the pid is still ours, else None."""
        st = self.backend.proc_stat(self.pid)
        if st is None or st.starttime != self.starttime:
            return None
        return st

    def exited(self) -> bool:
        """True once the process has exited (a zombie has exited)."""
        if self.status is not None:
            return True
        if self.fd >= 0:
            return bool(self.backend.wait_readable([self.fd], 0.0))
        st = self._same_process()
        return st is None or st.ended

    def signal(self, sig: int) -> bool:
        """Deliver ``sig``; False when the process is already gone or not ours to signal.

        A member owned by another user (an agent that ran ``sudo``) refuses
        with EPERM: that is not an error of the stop, which goes on with the
        other members; the process stays alive and is reported as a survivor.
        """
        if self.status is not None:
            return False
        try:
            if self.fd >= 0:
                self.backend.pidfd_send_signal(self.fd, sig)
                return True
            if self._same_process() is None:
                return False
            os.kill(self.pid, sig)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            if not self.denied:
                self.denied = True
                _log.warning(f"ralph-reaper: not permitted to signal pid {self.pid}")
            return False

    def collect(self) -> Optional[ExitStatus]:
        """The exit status of an exited process: reaped if it is our child.

        None while it runs, or when it exited but nobody can say how (not our
        child, reaped elsewhere, and a kernel older than 6.15).
        """
        if self.status is not None:
            return self.status
        if self.fd >= 0:
            try:
                with REAPED.reaping(self):
                    reaped = self.backend.waitid_pidfd(self.fd, True)
                    if reaped is not None:
                        self.set_exit(reaped, True)
            except ChildProcessError:
                self.set_exit(self._foreign_exit(), False)
                return self.status
            return self.status
        return self._collect_polling()

    def _foreign_exit(self) -> Optional[ExitStatus]:
        """The exit of a process someone else reaps: what the kernel kept, if anything.

        ``waitid`` refuses (ECHILD) both a process that is not our child and
        one that its reaper (our other thread, or its parent) has claimed but
        not yet released: the kernel records the exit for the pidfd only on
        release. A task in that state shows as ``X`` in ``/proc``; its record
        is a few instructions away, so it is waited for, not reported unknown.
        """
        give_up = time.monotonic() + _Reaped.WAIT_S
        while True:
            raw = self.backend.pidfd_exit_status(self.fd)
            if raw is not None:
                return ExitStatus(raw)
            st = self.backend.proc_stat(self.pid)
            if st is None or (self.starttime and st.starttime != self.starttime):
                raw = self.backend.pidfd_exit_status(self.fd)  # released: recorded by now
                return None if raw is None else ExitStatus(raw)
            if st.state == "Z" and st.ended:
                return ExitStatus(st.exit_code)
            if not st.ended or time.monotonic() >= give_up:
                return None
            time.sleep(0.0005)

    def reap_if_child(self) -> None:
        """Reap an exited process that has become our child since its exit was seen.

        A member that exited while its parent lived was a zombie of that parent;
        once the parent dies it is reparented, to us when we are a subreaper,
        and must be reaped here or it stays a zombie for good.
        """
        if self.reaped or not self.exited():
            return
        from .backends.polling import wait4_nohang

        try:
            with REAPED.reaping(self):
                if self.fd >= 0:
                    got = self.backend.waitid_pidfd(self.fd, True)
                elif self._same_process() is not None:
                    got = wait4_nohang(self.pid)
                else:
                    return
                if got is not None:
                    self.set_exit(got, True)
        except ChildProcessError:
            return

    def _zombie_code(self) -> Optional[int]:
        st = self.backend.proc_stat(self.pid)
        if st is not None and st.state == "Z" and st.ended and st.starttime == self.starttime:
            return st.exit_code
        return None

    def _collect_polling(self) -> Optional[ExitStatus]:
        from .backends.polling import wait4_nohang

        st = self._same_process()
        if st is None:  # gone: reaped, by this process perhaps
            self.status = REAPED.get(self)
            return self.status
        try:
            with REAPED.reaping(self):
                reaped = wait4_nohang(self.pid)
                if reaped is not None:
                    self.set_exit(reaped, True)
        except ChildProcessError:
            raw = self._zombie_code() if st.ended else None
            if raw is not None:
                self.status = ExitStatus(raw)
        return self.status

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)


#: File descriptors kept free for what watching needs besides pidfds (the
#: /proc reads of a polled pin, pipes, an epoll set): pidfds stop short of the
#: limit rather than take its last slot, after which nothing could be read.
FD_RESERVE = 16
_degraded_logged = False


def _near_limit(fd: int) -> bool:
    """True when ``fd`` is within the reserve of the soft limit.

    Descriptors are handed out lowest first, so a new one this high means
    every lower slot is taken: at most the reserve is left.
    """
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft != resource.RLIM_INFINITY and fd >= soft - FD_RESERVE


def _try_pidfd_open(backend: Backend, pid: int) -> int:
    """A pidfd below the reserve, or -1 when the table is full or nearly so."""
    try:
        fd = backend.pidfd_open(pid)
    except OSError as exc:
        if exc.errno not in (errno.EMFILE, errno.ENFILE):
            raise
        return -1
    if _near_limit(fd):
        os.close(fd)
        return -1
    return fd


def _pidfd_open(backend: Backend, pid: int) -> int:
    """pidfd_open with the fd policy: raise the limit once, then degrade to -1 (polling)."""
    global _degraded_logged
    fd = _try_pidfd_open(backend, pid)
    if fd < 0 and _raise_nofile_once():
        fd = _try_pidfd_open(backend, pid)
    if fd < 0 and not _degraded_logged:
        _degraded_logged = True
        _log.warning(
            "ralph-reaper: few file descriptors left; watching the processes that "
            "follow by polling /proc instead of by pidfd"
        )
    return fd
