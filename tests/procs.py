"""Helpers for tests that start real processes (set-up only: nothing here asserts timing)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import ralph_reaper

#: Where the package under test was imported from (a source tree, an installed
#: wheel, a sanitizer build): child Pythons get it first on their path, so
#: that they run the same build as the test process.
PACKAGE_ROOT = str(Path(ralph_reaper.__file__).resolve().parent.parent)


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a child Python that imports the package under test."""
    path = os.pathsep.join(p for p in (PACKAGE_ROOT, os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


def _fields(pid: int) -> Optional[list[bytes]]:
    """The fields of /proc/<pid>/stat after the command name, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rfind(b")") + 2 :].split()


def _stat(pid: int) -> Optional[tuple[str, int, int]]:
    """(state, ppid, session) of pid, or None when it is gone."""
    fields = _fields(pid)
    if fields is None:
        return None
    return fields[0].decode(), int(fields[1]), int(fields[3])


def starttime(pid: int) -> Optional[int]:
    """Start time of pid (clock ticks after boot), or None when it is gone."""
    fields = _fields(pid)
    return None if fields is None else int(fields[19])


def alive(pid: int) -> bool:
    """True while pid names a process that has not exited (a zombie has exited)."""
    st = _stat(pid)
    return st is not None and st[0] not in ("Z", "X")


def state(pid: int) -> Optional[str]:
    st = _stat(pid)
    return None if st is None else st[0]


def parent(pid: int) -> int:
    """The parent of pid, or -1 when it is gone."""
    st = _stat(pid)
    return -1 if st is None else st[1]


def session(pid: int) -> int:
    """The session of pid, or -1 when it is gone."""
    st = _stat(pid)
    return -1 if st is None else st[2]


def descendants_of(root: int) -> list[int]:
    """Every process below ``root`` (zombies included), from one scan of /proc."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _stat(int(name))
            if st is not None:
                children.setdefault(st[1], []).append(int(name))
    out: list[int] = []
    frontier = [root]
    while frontier:
        nxt = []
        for pid in frontier:
            for child in children.get(pid, ()):
                out.append(child)
                nxt.append(child)
        frontier = nxt
    return out


def session_pids(sid: int) -> list[int]:
    """Live (non-zombie) members of session ``sid``."""
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _stat(int(name))
            if st is not None and st[2] == sid and st[0] not in ("Z", "X"):
                out.append(int(name))
    return out


def spawn(script: str, *, new_session: bool = True, **kwargs: object) -> subprocess.Popen[bytes]:
    """Start ``sh -c script`` the way the Ralph loop starts a dispatch."""
    return subprocess.Popen(  # type: ignore[call-overload,no-any-return]
        ["/bin/sh", "-c", script], start_new_session=new_session, **kwargs
    )


def python_child(code: str, **kwargs: object) -> subprocess.Popen[bytes]:
    return subprocess.Popen(  # type: ignore[call-overload,no-any-return]
        [sys.executable, "-c", code], start_new_session=True, **kwargs
    )


def read_pids(proc: subprocess.Popen[bytes], count: int) -> list[int]:
    """Read ``count`` pids the child printed one per line on its stdout."""
    assert proc.stdout is not None
    pids = []
    for _ in range(count):
        line = proc.stdout.readline()
        assert line, "child closed stdout before printing its pids"
        pids.append(int(line))
    return pids


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0) -> bool:
    """Poll a condition for up to ``timeout`` s (set-up only: never a timing assertion)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return bool(predicate())


class Kids:
    """The processes one test started directly (its own children).

    At the end of the test it closes their pipes and, for a child that the
    package reaped, tells the ``Popen`` object so, so that ``subprocess`` never
    calls ``waitpid`` on a pid that may since have been reused. A child still
    present is left alone: the ``no_leftovers`` check must see it.
    """

    def __init__(self) -> None:
        self.started: list[tuple[subprocess.Popen[bytes], Optional[int]]] = []

    def _track(self, proc: subprocess.Popen[bytes]) -> subprocess.Popen[bytes]:
        self.started.append((proc, starttime(proc.pid)))
        return proc

    def sh(self, script: str, **kwargs: Any) -> subprocess.Popen[bytes]:
        """``sh -c script`` in a new session (unless ``new_session=False``)."""
        return self._track(spawn(script, **kwargs))

    def py(self, code: str, **kwargs: Any) -> subprocess.Popen[bytes]:
        """A Python child in a new session, without faulthandler (it would catch SIGSEGV)."""
        env = {k: v for k, v in os.environ.items() if k != "PYTHONFAULTHANDLER"}
        return self._track(python_child(code, env=env, **kwargs))

    def argv(self, argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        kwargs.setdefault("start_new_session", True)
        return self._track(subprocess.Popen(argv, **kwargs))

    def close(self) -> None:
        for proc, started_at in self.started:
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
            if proc.returncode is None and starttime(proc.pid) != started_at:
                proc.returncode = -999  # reaped by the package (or the test): nothing to wait for
