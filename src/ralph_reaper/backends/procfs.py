"""Reading process state from ``/proc`` in Python, for the pure and polling backends.

Tree discovery prefers ``/proc/<pid>/task/<tid>/children`` (one small read per
process that has children) and falls back to one scan of every
``/proc/<pid>/stat`` when the kernel was built without ``CONFIG_PROC_CHILDREN``.
A process may vanish between listing and reading: every read treats that as
"not there" rather than an error.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from typing import Optional

from .base import ProcStat

_children_files: Optional[bool] = None
_READ_FLAGS = os.O_RDONLY | os.O_CLOEXEC
#: A stat line is far shorter: one read returns it whole.
_STAT_BUF = 4096


def read_short(path: str, size: int = _STAT_BUF) -> bytes:
    """A short /proc file in one read: a buffered file object costs as much again as
    the kernel's work, and discovery reads such files (stat above all) all the time."""
    fd = os.open(path, _READ_FLAGS)
    try:
        return os.read(fd, size)
    finally:
        os.close(fd)


def _read_stat(pid: int) -> bytes:
    return read_short(f"/proc/{pid}/stat")


def _read_children(path: str) -> list[int]:
    fd = os.open(path, _READ_FLAGS)
    try:
        data = os.read(fd, 65536)
        if data:  # one child per record: a long list may come in pieces
            chunks = [data]
            while chunk := os.read(fd, 65536):
                chunks.append(chunk)
            data = b"".join(chunks)
    finally:
        os.close(fd)
    return [int(x) for x in data.split()]


def stat_fields(pid: int) -> Optional[list[bytes]]:
    """The fields of ``/proc/<pid>/stat`` after the command name (state first), or None.

    For the few readers that need a field :class:`ProcStat` does not carry
    (CPU ticks, flags); any read failure counts as "no such process" here.
    """
    try:
        data = _read_stat(pid)
    except OSError:
        return None
    return data[data.rfind(b")") + 2 :].split()


def parse_stat(data: bytes) -> Optional[ProcStat]:
    """Parse one ``/proc/<pid>/stat`` line.

    The command name sits in parentheses and may itself contain spaces and
    parentheses, so fields are counted from the last ``)``.
    """
    end = data.rfind(b")")
    if end < 0:
        return None
    fields = data[end + 2 :].split()
    if len(fields) < 20:
        return None
    exit_code = int(fields[49]) if len(fields) > 49 else 0
    return ProcStat(
        state=fields[0].decode("ascii", "replace"),
        ppid=int(fields[1]),
        pgrp=int(fields[2]),
        session=int(fields[3]),
        starttime=int(fields[19]),
        exit_code=exit_code,
        threads=int(fields[17]),
        flags=int(fields[6]),
    )


def proc_stat(pid: int) -> Optional[ProcStat]:
    """None when there is no such process; any other failure (EMFILE...) raises.

    Saying "no such process" because /proc could not be read would report a
    live process as gone.
    """
    try:
        data = _read_stat(pid)
    except (FileNotFoundError, ProcessLookupError):
        return None
    return parse_stat(data)


def all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _have_children_files() -> bool:
    global _children_files
    if _children_files is None:
        tid = os.getpid()
        _children_files = os.path.exists(f"/proc/{tid}/task/{tid}/children")
    return _children_files


def children_of(pid: int, threads: int = 0) -> list[int]:
    """The children of ``pid`` (every thread's), from ``/proc``; [] if it is gone.

    ``threads``: how many threads its stat just said it has; with one, only
    that thread's file is read (a thread started since is a fork since: what a
    read cannot see either way).
    """
    out: list[int] = []
    if threads == 1:
        try:
            return _read_children(f"/proc/{pid}/task/{pid}/children")
        except OSError:
            return out
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            out.extend(_read_children(f"/proc/{pid}/task/{tid}/children"))
        except OSError:
            continue
    return out


def _parent_table() -> dict[int, list[int]]:
    table: dict[int, list[int]] = {}
    for pid in all_pids():
        st = proc_stat(pid)
        if st is not None:
            table.setdefault(st.ppid, []).append(pid)
    return table


def descendants(roots: Sequence[int]) -> list[int]:
    """Every process below ``roots``, breadth first, without duplicates or the roots."""
    seen = set(roots)
    out: list[int] = []
    if _have_children_files():
        frontier = list(roots)
        while frontier:
            nxt: list[int] = []
            for pid in frontier:
                for child in children_of(pid):
                    if child not in seen:
                        seen.add(child)
                        out.append(child)
                        nxt.append(child)
            frontier = nxt
        return out
    table = _parent_table()
    frontier = list(roots)
    while frontier:
        nxt = []
        for pid in frontier:
            for child in table.get(pid, ()):
                if child not in seen:
                    seen.add(child)
                    out.append(child)
                    nxt.append(child)
        frontier = nxt
    return out


def session_members(sid: int) -> list[int]:
    """Live members of session ``sid``.

    ``sid`` 0 is refused (``EINVAL``, as the C core does): /proc shows 0 for
    every process whose session leader is outside this PID namespace, so
    "session 0" would be half the machine, not one session."""
    if sid <= 0:
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
    out: list[int] = []
    for pid in all_pids():
        st = proc_stat(pid)
        if st is not None and st.session == sid:
            out.append(pid)
    return out
