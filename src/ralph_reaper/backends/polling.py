"""The backend for kernels or sandboxes without pidfds.

Exits are found by ``waitpid(WNOHANG)`` and ``/proc`` with a backoff (see
:mod:`ralph_reaper.waiting`); a pid is signalled only after checking that the
process start time still matches the one pinned, which narrows pid-reuse races
to the few microseconds between that check and ``kill`` (without pidfds the
kernel offers nothing tighter).
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
