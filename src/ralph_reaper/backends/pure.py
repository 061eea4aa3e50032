"""The stdlib backend: pidfds through ``os``/``signal``/``select``/``fcntl``.

It keeps every semantic of the native backend; what it cannot do is return
rusage for a reaped child (``os.waitid`` does not expose it) or batch work per
event, so it costs more host CPU per exit.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import select
import signal
import struct
import time
from collections.abc import Sequence
from typing import Optional

from ._stdlib_ops import StdlibProcOps
from .base import DrainEvent, ExitStatus, Rusage
from .deadlines import epoll_ms, wait_until

# PIDFD_GET_INFO = _IOWR(0xFF, 11, struct pidfd_info) with the 64-byte first version.
PIDFD_GET_INFO = (3 << 30) | (64 << 16) | (0xFF << 8) | 11
PIDFD_INFO_EXIT = 1 << 3
_INFO_SIZE = 64
_EXIT_CODE_OFFSET = 60


def _deadline(timeout_s: Optional[float]) -> Optional[float]:
    return None if timeout_s is None else time.monotonic() + max(timeout_s, 0.0)


def status_from_siginfo(code: int, status: int) -> int:
    """Re-encode a ``waitid`` result as a ``waitpid`` status."""
    if code == os.CLD_EXITED:
        return (status & 0xFF) << 8
    if code == os.CLD_DUMPED:
        return (status & 0x7F) | 0x80
    return status & 0x7F


def pidfd_exit_status(fd: int) -> Optional[int]:
    buf = bytearray(_INFO_SIZE)
    struct.pack_into("=Q", buf, 0, PIDFD_INFO_EXIT)
    try:
        fcntl.ioctl(fd, PIDFD_GET_INFO, buf, True)
    except OSError as exc:
        if exc.errno in (errno.ENOTTY, errno.EINVAL, errno.EOPNOTSUPP, errno.ESRCH):
            return None
        raise
    (mask,) = struct.unpack_from("=Q", buf, 0)
    if not mask & PIDFD_INFO_EXIT:
        return None
    (code,) = struct.unpack_from("=i", buf, _EXIT_CODE_OFFSET)
    return int(code)


def waitid_pidfd(fd: int, nohang: bool = True) -> Optional[ExitStatus]:
    """Reap the child behind ``fd``, with its rusage.

    ``os.waitid`` drops the rusage, so the exit is first looked at without
    reaping (``WNOWAIT``: the zombie stays, and with it its pid), then reaped
    by that pid with ``os.wait4``, which returns it. Only another thread's
    ``waitpid(-1)`` landing between the two calls could take the zombie first;
    then the status seen is reported without rusage.
    """
    options = os.WEXITED | os.WNOWAIT | (os.WNOHANG if nohang else 0)
    while True:
        try:
            info = os.waitid(os.P_PIDFD, fd, options)  # type: ignore[attr-defined,unused-ignore]
        except InterruptedError:
            continue
        break
    if info is None or info.si_pid == 0:
        return None
    seen = ExitStatus(status_from_siginfo(info.si_code, info.si_status))
    try:
        pid, status, ru = os.wait4(info.si_pid, os.WNOHANG)
    except ChildProcessError:
        return seen
    if pid != info.si_pid or status != seen.status:
        return seen
    return ExitStatus(status, Rusage(ru.ru_utime, ru.ru_stime, int(ru.ru_maxrss)))


class PureEpollSet:
    """An epoll set of pidfds; ``drain`` reaps what it can, one Python call per fd."""

    def __init__(self) -> None:
        self._ep = select.epoll()
        self._tokens: dict[int, int] = {}

    def fileno(self) -> int:
        """The epoll fd (readable when a pidfd in the set is), e.g. to nest in an event loop."""
        return self._ep.fileno()

    def add(self, fd: int, token: int) -> None:
        self._ep.register(fd, select.EPOLLIN)
        self._tokens[fd] = token

    def remove(self, fd: int) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._ep.unregister(fd)
        self._tokens.pop(fd, None)

    def drain(self, timeout_s: Optional[float], max_events: int = 256) -> list[DrainEvent]:
        ready = wait_until(epoll_ms(self._ep, max_events), _deadline(timeout_s))
        out: list[DrainEvent] = []
        for fd, _mask in ready:
            token = self._tokens.get(fd)
            if token is None:
                continue
            try:
                reaped = waitid_pidfd(fd)
            except ChildProcessError:
                self.remove(fd)
                out.append(DrainEvent(token, fd, False, pidfd_exit_status(fd)))
                continue
            if reaped is None:
                continue
            self.remove(fd)
            out.append(DrainEvent(token, fd, True, reaped.status, reaped.rusage))
        return out

    def close(self) -> None:
        self._ep.close()
        self._tokens.clear()


class PureBackend(StdlibProcOps):
    name = "pure"
    has_pidfd = True

    def pidfd_open(self, pid: int) -> int:
        return os.pidfd_open(pid)

    def pidfd_send_signal(self, fd: int, sig: int) -> None:
        signal.pidfd_send_signal(fd, sig)

    def pidfd_send_signal_many(self, fds: Sequence[int], sig: int) -> list[int]:
        errs: list[int] = []
        for fd in fds:
            try:
                signal.pidfd_send_signal(fd, sig)
            except OSError as exc:
                errs.append(exc.errno or errno.EIO)
            else:
                errs.append(0)
        return errs

    def waitid_pidfd(self, fd: int, nohang: bool = True) -> Optional[ExitStatus]:
        return waitid_pidfd(fd, nohang)

    def pidfd_exit_status(self, fd: int) -> Optional[int]:
        return pidfd_exit_status(fd)

    def wait_readable(self, fds: Sequence[int], timeout_s: Optional[float]) -> list[int]:
        poller = select.poll()
        for fd in fds:
            poller.register(fd, select.POLLIN)
        ready = wait_until(poller.poll, _deadline(timeout_s))
        return [fd for fd, _ev in ready]

    def epoll_set(self) -> PureEpollSet:
        return PureEpollSet()
