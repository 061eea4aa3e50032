"""The native backend: the Backend protocol on top of the small C core (csrc/reaper.c).

Why it exists: the pure-Python backends pay interpreter overhead per process
and cannot get everything in one kernel round trip. The C core

* drains an epoll set of pidfds and reaps every exited child *with its
  rusage* in one call (``waitid(P_PIDFD, ..., &rusage)`` has no Python
  wrapper; ``os.waitid`` drops the rusage);
* falls back to the kernel's stored exit status (``PIDFD_GET_INFO`` /
  ``PIDFD_INFO_EXIT``, Linux >= 6.15) for processes that are not our children;
* walks ``/proc`` (descendants, session members) and signals many pidfds
  without per-item Python work.

Errors come back from C as ``-errno`` and are raised here as ``OSError``
(``OSError(errno, msg)`` picks the subclass: ``ChildProcessError`` for
``ECHILD``, ``ProcessLookupError`` for ``ESRCH`` ...). Blocking waits that the
kernel interrupts (``EINTR``) return to Python, which lets signal handlers run
and then retries with the remaining time, like the standard library does
(PEP 475).
"""

from __future__ import annotations

import errno
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, Optional

from . import load_native
from .base import DrainEvent, ExitStatus, ProcStat, Rusage

_native = load_native()
ffi: Any = _native.ffi
lib: Any = _native.lib

#: The longest single wait handed to the C core (a day); longer ones go in slices.
_MAX_TIMEOUT_US = 86_400_000_000
#: The C epoll set packs a token of at most 32 bits next to the fd.
_MAX_C_TOKEN = 2**32 - 1


def _check(ret: int) -> int:
    """Raise ``OSError`` for a ``-errno`` return of the C core, else return ``ret``."""
    if ret < 0:
        code = -ret
        raise OSError(code, os.strerror(code))
    return ret


def _deadline(timeout_s: Optional[float]) -> Optional[float]:
    if timeout_s is None:
        return None
    return time.monotonic() + max(0.0, timeout_s)


def _timeout_us(deadline: Optional[float]) -> int:
    """Microseconds left until ``deadline`` rounded up (a wait never ends early); -1 =
    forever. The C core waits to the microsecond (ppoll, epoll_pwait2): a stop's
    SIGKILL is due at its deadline, not at the next whole millisecond."""
    if deadline is None:
        return -1
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        return 0
    return min(_MAX_TIMEOUT_US, math.ceil(remaining * 1e6))


def _expired(deadline: Optional[float]) -> bool:
    return deadline is not None and time.monotonic() >= deadline


def _rusage(c_rusage: Any) -> Rusage:
    return Rusage(
        utime_s=float(c_rusage.utime_s),
        stime_s=float(c_rusage.stime_s),
        maxrss_kb=int(c_rusage.maxrss_kb),
    )


class NativeEpollSet:
    """An epoll set of pidfds drained and reaped in C (implements ``base.EpollSet``)."""

    def __init__(self, max_events: int = 256) -> None:
        self._epfd: int = _check(lib.rr_epoll_create())
        self._cap = max(1, max_events)
        self._events: Any = ffi.new("struct rr_event[]", self._cap)
        # Tokens live here, so any Python int works (the C side only has room
        # for 32 bits next to the fd; it is a fallback, never the source).
        self._tokens: dict[int, int] = {}

    def fileno(self) -> int:
        """The epoll fd (readable when a pidfd in the set is), e.g. to nest in an event loop."""
        return self._epfd

    def add(self, fd: int, token: int) -> None:
        c_token = token if 0 <= token <= _MAX_C_TOKEN else 0
        _check(lib.rr_epoll_add(self._epfd, fd, c_token))
        self._tokens[fd] = token

    def remove(self, fd: int) -> None:
        """Forget ``fd``; a no-op when it is not in the set (or already closed)."""
        self._tokens.pop(fd, None)
        r = lib.rr_epoll_del(self._epfd, fd)
        if r not in (-errno.ENOENT, -errno.EBADF):
            _check(r)

    def drain(self, timeout_s: Optional[float], max_events: int = 256) -> list[DrainEvent]:
        if self._epfd < 0:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        cap = max(1, max_events)
        if cap > self._cap:
            self._events = ffi.new("struct rr_event[]", cap)
            self._cap = cap
        deadline = _deadline(timeout_s)
        while True:
            n = lib.rr_epoll_drain(self._epfd, _timeout_us(deadline), self._events, cap)
            if n == -errno.EINTR:
                if _expired(deadline):
                    return []
                continue
            _check(n)
            if n > 0:
                return [self._event(self._events[i]) for i in range(n)]
            if _expired(deadline):
                return []

    def _event(self, ev: Any) -> DrainEvent:
        fd = int(ev.fd)
        token = self._tokens.pop(fd, int(ev.token))
        result = int(ev.result)
        if result == 1:
            return DrainEvent(
                token=token,
                fd=fd,
                reaped=True,
                status=int(ev.status),
                rusage=_rusage(ev.rusage),
            )
        # Not our child (result 0), or waitid failed otherwise (result -errno):
        # the fd is out of the set either way; report what the kernel kept.
        status = int(ev.status) if ev.have_status else None
        return DrainEvent(token=token, fd=fd, reaped=False, status=status)

    def close(self) -> None:
        if self._epfd >= 0:
            fd, self._epfd = self._epfd, -1
            self._tokens.clear()
            os.close(fd)


class NativeBackend:
    """Kernel primitives through the C core; see ``base.Backend``."""

    name: str = "native"
    has_pidfd: bool = True

    def pidfd_open(self, pid: int) -> int:
        return _check(lib.rr_pidfd_open(pid))

    def pidfd_send_signal(self, fd: int, sig: int) -> None:
        _check(lib.rr_pidfd_send_signal(fd, sig))

    def pidfd_send_signal_many(self, fds: Sequence[int], sig: int) -> list[int]:
        n = len(fds)
        if n == 0:
            return []
        c_fds = ffi.new("int[]", list(fds))
        errs = ffi.new("int[]", n)
        _check(lib.rr_pidfd_send_signal_many(c_fds, n, sig, errs))
        return [-e for e in ffi.unpack(errs, n)]

    def waitid_pidfd(self, fd: int, nohang: bool = True) -> Optional[ExitStatus]:
        status = ffi.new("int *")
        rusage = ffi.new("struct rr_rusage *")
        while True:
            r = lib.rr_waitid_pidfd(fd, 1 if nohang else 0, status, rusage)
            if r != -errno.EINTR:
                break
        if _check(r) == 0:
            return None
        return ExitStatus(status=int(status[0]), rusage=_rusage(rusage))

    def pidfd_exit_status(self, fd: int) -> Optional[int]:
        status = ffi.new("int *")
        r = lib.rr_pidfd_exit_status(fd, status)
        # ESRCH: reaped, and the kernel (6.13/6.14) kept no exit information.
        if r == -errno.ESRCH or _check(r) == 0:
            return None
        return int(status[0])

    def wait_readable(self, fds: Sequence[int], timeout_s: Optional[float]) -> list[int]:
        fd_list = list(fds)
        n = len(fd_list)
        c_fds = ffi.new("int[]", fd_list)
        ready = ffi.new("unsigned char[]", max(1, n))
        deadline = _deadline(timeout_s)
        while True:
            r = lib.rr_poll_many(c_fds, n, _timeout_us(deadline), ready)
            if r == -errno.EINTR:
                if _expired(deadline):
                    return []
                continue
            if _check(r) > 0:
                return [fd for i, fd in enumerate(fd_list) if ready[i]]
            if _expired(deadline):
                return []

    def epoll_set(self) -> NativeEpollSet:
        return NativeEpollSet()

    def proc_stat(self, pid: int) -> Optional[ProcStat]:
        out = ffi.new("struct rr_proc_stat *")
        r = lib.rr_proc_stat(pid, out)
        if r in (-errno.ENOENT, -errno.ESRCH):
            return None
        _check(r)
        return ProcStat(
            state=bytes(out.state).rstrip(b"\0").decode("ascii", "replace"),
            ppid=int(out.ppid),
            pgrp=int(out.pgrp),
            session=int(out.session),
            starttime=int(out.starttime),
            exit_code=int(out.exit_code),
            threads=int(out.threads),
            flags=int(out.flags),
        )

    def descendants(self, roots: Sequence[int]) -> list[int]:
        root_list = list(roots)
        if not root_list:
            return []
        c_roots = ffi.new("int[]", root_list)
        return _grow_list(
            lambda buf, cap: lib.rr_list_descendants(c_roots, len(root_list), buf, cap)
        )

    def session_members(self, sid: int) -> list[int]:
        return _grow_list(lambda buf, cap: lib.rr_list_session(sid, buf, cap))

    def get_child_subreaper(self) -> bool:
        return _check(lib.rr_get_child_subreaper()) == 1

    def set_child_subreaper(self, on: bool) -> None:
        _check(lib.rr_set_child_subreaper(1 if on else 0))


def _grow_list(call: Callable[[Any, int], int], cap: int = 256) -> list[int]:
    """Call ``call(buf, cap)`` (an ``rr_list_*`` function) until the buffer holds every pid."""
    while True:
        buf = ffi.new("int[]", cap)
        total = _check(call(buf, cap))
        if total <= cap:
            return list(ffi.unpack(buf, total))
        # Processes may appear between the calls: leave some room.
        cap = total + total // 8 + 16
