"""The one interface every backend offers to the rest of the package.

Backends are deliberately thin: they expose kernel primitives (open a pidfd,
signal it, reap it, wait for readiness, walk /proc) and nothing about
dispatches. Policy (containment, stop sequences, caching exit codes) lives
above them, once, so the three backends cannot drift apart in semantics.

Errors are raised as ``OSError`` with the kernel's errno, so callers can treat
``ESRCH``/``ECHILD``/``EMFILE`` alike whichever backend raised them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import NamedTuple, Optional, Protocol


class Rusage(NamedTuple):
    """Resource usage of one reaped child.

    This and the two exit types below are named tuples, not frozen
    dataclasses: one of each is made per exit, and a frozen dataclass costs
    several times as much to build (a burst of 10,000 exits pays it 30,000 times).
    """

    utime_s: float
    stime_s: float
    maxrss_kb: int


class ExitStatus(NamedTuple):
    """A wait status (``waitpid`` encoding) plus rusage when the backend had it.

    The one exit type of the package: backends return it, pins keep it, results
    are built from it, so the decoding below exists once.
    """

    status: int
    rusage: Optional[Rusage] = None

    @property
    def signal(self) -> Optional[int]:
        return os.WTERMSIG(self.status) if os.WIFSIGNALED(self.status) else None

    @property
    def return_code(self) -> int:
        """``subprocess`` convention: the exit status, or ``-N`` for death by signal N."""
        sig = self.signal
        return -sig if sig is not None else os.WEXITSTATUS(self.status)

    @property
    def core_dumped(self) -> bool:
        return os.WIFSIGNALED(self.status) and os.WCOREDUMP(self.status)


#: ``PF_EXITING`` of include/linux/sched.h: set when a thread begins to exit.
PF_EXITING = 0x4


class ProcStat(NamedTuple):
    """The fields of ``/proc/<pid>/stat`` the package relies on (a named tuple, as
    :class:`Rusage`: a search reads one per process it looks at)."""

    state: str
    ppid: int
    pgrp: int
    session: int
    starttime: int
    exit_code: int
    #: Threads in the group. A leader thread that exited shows ``Z`` while
    #: others run: the process has not exited until this is down to one.
    threads: int = 1
    #: The main thread's kernel flags (``PF_*``, field 9).
    flags: int = 0

    @property
    def main_thread_exiting(self) -> bool:
        """The main thread has begun to exit (``PF_EXITING``, never cleared once set):
        until then it is the thread that adopts every orphan the process adopts."""
        return bool(self.flags & PF_EXITING)

    @property
    def ended(self) -> bool:
        """Exited as a whole (a zombie with no thread of its group left running)."""
        return self.state in ("Z", "X") and self.threads <= 1


class DrainEvent(NamedTuple):
    """One exited pidfd taken out of an :class:`EpollSet` by ``drain``.

    ``reaped`` is True when the process was our child and was reaped here
    (``status`` and ``rusage`` then hold its exit); when it was not our child
    ``status`` is its wait status if the kernel could tell (``PIDFD_INFO_EXIT``)
    and None otherwise.
    """

    token: int
    fd: int
    reaped: bool
    status: Optional[int]
    rusage: Optional[Rusage] = None


class EpollSet(Protocol):
    """A set of pidfds that reports and reaps exits in batches."""

    def add(self, fd: int, token: int) -> None: ...

    def remove(self, fd: int) -> None: ...

    def drain(self, timeout_s: Optional[float], max_events: int = 256) -> list[DrainEvent]:
        """Wait up to ``timeout_s`` (None: forever) and return every exited pidfd.

        Each returned fd has been removed from the set (a pidfd stays readable
        for ever) but is still open: closing it is the caller's job.
        """
        ...

    def close(self) -> None: ...


class Backend(Protocol):
    """Kernel primitives; see the module docstring for the error convention."""

    name: str
    #: True when pidfds work; the polling backend says False and raises
    #: ``OSError(ENOSYS)`` from every pidfd method.
    has_pidfd: bool

    def pidfd_open(self, pid: int) -> int: ...

    def pidfd_send_signal(self, fd: int, sig: int) -> None: ...

    def pidfd_send_signal_many(self, fds: Sequence[int], sig: int) -> list[int]:
        """Signal each fd; return per-fd 0 or errno (never raises for one fd's failure)."""
        ...

    def waitid_pidfd(self, fd: int, nohang: bool = True) -> Optional[ExitStatus]:
        """Reap the child behind ``fd``: None when it has not exited yet.

        Raises ``ChildProcessError`` when the process is not our child (or was
        already reaped by someone else).
        """
        ...

    def pidfd_exit_status(self, fd: int) -> Optional[int]:
        """The wait status the kernel kept for an exited process (Linux >= 6.15), or None."""
        ...

    def wait_readable(self, fds: Sequence[int], timeout_s: Optional[float]) -> list[int]:
        """Block until at least one fd is readable or the timeout passes; return the readable."""
        ...

    def epoll_set(self) -> EpollSet: ...

    def proc_stat(self, pid: int) -> Optional[ProcStat]:
        """None when there is no such process."""
        ...

    def descendants(self, roots: Sequence[int]) -> list[int]:
        """Every process below ``roots`` (zombies included, roots excluded), breadth first."""
        ...

    def session_members(self, sid: int) -> list[int]: ...

    def get_child_subreaper(self) -> bool: ...

    def set_child_subreaper(self, on: bool) -> None: ...
