"""What the package knows about the dispatches it started itself.

``spawn_dispatch`` registers each one here under the pid it returned, so that
``poll``/``terminate``/``wait`` can use more than a pid: the stdin it holds
(for the EOF stage), and, under keeper containment, the keeper's control pipe
(to run the stop sequence with the keeper's own timers) and report pipe (the
command's rusage, stage timings and the descendants the keeper stopped).
"""

from __future__ import annotations

import contextlib
import os
import select
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from .keeper_client import KeeperLink
from .lineage import Lineage

EOT = b"\x04"  # ^D: end of input for a terminal in canonical mode


@dataclass
class Dispatch:
    """One dispatch started by :func:`ralph_reaper.spawn_dispatch`."""

    pid: int
    ticket_id: str
    session_id: str
    containment: str  # "keeper" or "session"
    popen: subprocess.Popen[bytes]
    stdin_kind: str  # "pipe", "pty" or "devnull"
    stdin_fd: Optional[int] = None  # write end of the stdin pipe, or the pty master
    keeper: Optional[KeeperLink] = None  # the keeper's pipes, under keeper containment
    timeout_ms: float = 0.0
    idle_timeout_ms: float = 0.0
    output_paths: list[str] = field(default_factory=list)
    spawned_at: float = field(default_factory=time.monotonic)
    #: From /proc/<pid>/stat once spawned (None: it could not be read).
    starttime: Optional[int] = None
    #: The session leader's ancestry, for bounded searches of its session.
    lineage: Optional[Lineage] = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def leader_pid(self) -> int:
        """The command itself (the keeper's child under keeper containment)."""
        if self.keeper is not None:
            self.keeper.read_reports()
            return self.keeper.command_pid or self.pid
        return self.pid

    @property
    def final_report(self) -> Optional[dict[str, Any]]:
        """The keeper's final report, once it has written it (None without a keeper)."""
        if self.keeper is None:
            return None
        self.keeper.read_reports()
        return self.keeper.final_report

    def send_eof(self) -> bool:
        """Close the command's stdin (or type ^D on its pty); False when we hold none."""
        with self._lock:
            fd = self.stdin_fd
            if fd is None:
                return False
            if self.stdin_kind == "pty":
                try:
                    os.write(fd, EOT)
                except OSError:
                    return False
                return True
            self.stdin_fd = None
        os.close(fd)
        return True

    def feed_stdin(self, data: Union[bytes, memoryview]) -> int:
        """Write what fits of ``data`` to the command's stdin; -1 once it is closed.

        For a forwarder thread: the write happens under the lock that
        :meth:`send_eof` takes, so it can never land on a closed (and reused)
        fd number; with the fd non-blocking it never holds that lock long, so
        the EOF stage of a stop is never held up by a command that stopped
        reading. 0 means "full": wait with :meth:`wait_writable` and retry.
        """
        with self._lock:
            fd = self.stdin_fd
            if fd is None:
                return -1
            try:
                return os.write(fd, data)
            except BlockingIOError:
                return 0
            except OSError:  # EPIPE: the command closed its end
                return -1

    def wait_writable(self, timeout_s: float) -> None:
        """Until the stdin pipe has room, it is closed, or ``timeout_s`` passes."""
        with self._lock:
            fd = self.stdin_fd
            if fd is None:
                return
            poller = select.poll()
            poller.register(fd, select.POLLOUT)
        # Polled outside the lock: if the fd is closed (and its number reused)
        # meanwhile, this only wakes early or late; feed_stdin checks again.
        poller.poll(timeout_s * 1000.0)

    def close(self) -> None:
        """Close every fd the package holds for this dispatch."""
        with self._lock:
            fd, self.stdin_fd = self.stdin_fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
        if self.keeper is not None:
            self.keeper.read_reports()
            self.keeper.close()
        # The package reaps the process; Popen must not wait for it again.
        if self.popen.returncode is None:
            self.popen.returncode = -1


class Registry:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_pid: dict[int, Dispatch] = {}

    def add(self, dispatch: Dispatch) -> None:
        with self._lock:
            self._by_pid[dispatch.pid] = dispatch

    def get(self, pid: int) -> Optional[Dispatch]:
        with self._lock:
            return self._by_pid.get(pid)

    def started_here(self, pid: int, starttime: int) -> bool:
        """Whether ``pid`` is a dispatch this process forked (its start time says it is
        that process, not a later one with its pid)."""
        with self._lock:
            dispatch = self._by_pid.get(pid)
        return dispatch is not None and dispatch.starttime == starttime

    def release(self, pid: int) -> None:
        """Forget a dispatch whose exit has been collected, closing its fds."""
        with self._lock:
            dispatch = self._by_pid.pop(pid, None)
        if dispatch is not None:
            dispatch.close()


REGISTRY = Registry()
