"""Telling an idle dispatch from a busy one, by sampling /proc at a coarse interval.

A dispatch is idle when its leader is blocked reading its stdin (``read`` on
fd 0, or an epoll wait whose interest list holds fd 0) while its whole tree
has used no CPU time and, where the package owns the output files, written
nothing. Waiting on the network for a model's answer uses no CPU either, so
the stdin condition matters: it is what separates "waiting at a prompt" from
"waiting for work to come back".
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Sequence
from typing import Optional

from .backends.base import Backend
from .backends.procfs import stat_fields

#: Syscalls that read from the fd in their first argument, and epoll waits, per machine.
_READS = {"x86_64": {0, 17, 19, 295}, "aarch64": {63, 65, 67, 69}}
_EPOLL_WAITS = {"x86_64": {232, 281, 441}, "aarch64": {22, 441}}


def _cpu_ticks(pid: int) -> Optional[int]:
    """utime + stime + cutime + cstime of ``pid`` (children it reaped count too)."""
    fields = stat_fields(pid)
    return None if fields is None else sum(int(x) for x in fields[11:15])


def _epoll_watches_stdin(pid: int, epfd: int) -> bool:
    try:
        with open(f"/proc/{pid}/fdinfo/{epfd}", "rb") as f:
            info = f.read()
    except OSError:
        return False
    for line in info.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == b"tfd:" and parts[1] == b"0":
            return True
    return False


def reading_stdin(pid: int) -> bool:
    """Whether ``pid`` is blocked waiting for its stdin (False when it cannot be told)."""
    machine = platform.machine()
    reads, waits = _READS.get(machine), _EPOLL_WAITS.get(machine)
    if reads is None or waits is None:
        return False
    try:
        with open(f"/proc/{pid}/syscall", "rb") as f:
            fields = f.read().split()
    except OSError:
        return False
    if len(fields) < 2 or not fields[0].isdigit():
        return False  # "running" or a kernel without the file's details
    nr, first = int(fields[0]), int(fields[1], 16)
    if nr in reads:
        return first == 0
    if nr in waits:
        return _epoll_watches_stdin(pid, first)
    return False


class IdleWatch:
    """Samples one dispatch; says how long it has been idle."""

    def __init__(
        self, backend: Backend, root: int, leader: int, outputs: Sequence[str] = ()
    ) -> None:
        self.backend = backend
        self.root = root
        self.leader = leader
        self.outputs = list(outputs)
        self._last: Optional[tuple[int, tuple[int, ...]]] = None
        self._since = time.monotonic()

    def _activity(self) -> tuple[int, tuple[int, ...]]:
        pids = [self.root, *self.backend.descendants([self.root])]
        cpu = sum(t for t in (_cpu_ticks(p) for p in pids) if t is not None)
        sizes = []
        for path in self.outputs:
            try:
                sizes.append(os.stat(path).st_size)
            except OSError:
                sizes.append(-1)
        return cpu, tuple(sizes)

    def idle_for(self) -> float:
        """Seconds the dispatch has been idle up to now (0.0 when it is not idle)."""
        now = time.monotonic()
        activity = self._activity()
        if not reading_stdin(self.leader) or activity != self._last:
            self._last = activity
            self._since = now
            return 0.0
        return now - self._since
