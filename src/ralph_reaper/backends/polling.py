"""The backend for kernels or sandboxes without pidfds.

Exits are found by a ``waitid(WNOWAIT)`` peek at our children, ``waitpid(WNOHANG)``
and ``/proc``, with a backoff (see :mod:`ralph_reaper.polled`); a pid is
signalled only after checking that the process start time still matches the
one pinned, which narrows pid-reuse races to the few microseconds between that
check and ``kill`` (without pidfds the kernel offers nothing tighter).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from typing import NoReturn, Optional

from ._stdlib_ops import StdlibProcOps
from .base import EpollSet, ExitStatus, Rusage


def _no_pidfd() -> NoReturn:
    raise OSError(errno.ENOSYS, "the polling backend has no pidfds")


class PollingBackend(StdlibProcOps):
    name = "polling"
    has_pidfd = False

    def pidfd_open(self, pid: int) -> int:
        _no_pidfd()

    def pidfd_send_signal(self, fd: int, sig: int) -> None:
        _no_pidfd()

    def pidfd_send_signal_many(self, fds: Sequence[int], sig: int) -> list[int]:
        _no_pidfd()

    def waitid_pidfd(self, fd: int, nohang: bool = True) -> Optional[ExitStatus]:
        _no_pidfd()

    def pidfd_exit_status(self, fd: int) -> Optional[int]:
        _no_pidfd()

    def wait_readable(self, fds: Sequence[int], timeout_s: Optional[float]) -> list[int]:
        _no_pidfd()

    def epoll_set(self) -> EpollSet:
        _no_pidfd()


def wait4_nohang(pid: int) -> Optional[ExitStatus]:
    """Reap ``pid`` if it is our exited child; None while it runs.

    Raises ``ChildProcessError`` when it is not our child. Only call it for a
    pid whose start time was just checked: until a child is reaped its pid
    cannot be reused, so the check pins the right process.
    """
    while True:
        try:
            got, status, ru = os.wait4(pid, os.WNOHANG)
        except InterruptedError:
            continue
        break
    if got == 0:
        return None
    return ExitStatus(status, Rusage(ru.ru_utime, ru.ru_stime, int(ru.ru_maxrss)))


#: Look at exits without reaping: the zombie stays for whoever reaps it.
_PEEK = os.WEXITED | os.WNOHANG | os.WNOWAIT


def exited_child() -> Optional[int]:
    """The pid of a child of this process that has exited, left unreaped; None: none has.

    One call covers every child (of every thread), which is what lets polled
    pins skip their ``/proc`` reads; the kernel walks its list of our children
    for it and returns the first zombie there, the same one each time until
    someone reaps it. Raises ``ChildProcessError`` when there is no child at all.
    """
    while True:
        try:
            got = os.waitid(os.P_ALL, 0, _PEEK)
        except InterruptedError:
            continue
        return None if got is None else got.si_pid


def child_state(pid: int) -> Optional[bool]:
    """For an unreaped child ``pid`` of ours: True once it has exited, else False.

    None when ``pid`` is no child of ours (or no longer: it was reaped). While
    a child stays unreaped its pid cannot pass to another process, so False
    from two calls in a row means the same child ran all along, unless it was
    reaped and its pid reused by a new child of ours in between. One syscall,
    no file: far cheaper than reading ``/proc/<pid>/stat``.
    """
    while True:
        try:
            got = os.waitid(os.P_PID, pid, _PEEK)
        except InterruptedError:
            continue
        except ChildProcessError:
            return None
        return got is not None
