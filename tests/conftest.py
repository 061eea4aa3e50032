"""Shared fixtures: every behavioural test runs on every backend, and leaves nothing behind.

The test process makes itself a child subreaper for the whole session, so
every process orphaned by a test comes back to it: the leak check can then see
(and stop, and reap) anything a test left, instead of losing it to init,
which on some machines never reaps.
"""

from __future__ import annotations

import ctypes
import os
import signal
import time
from collections.abc import Iterator

import pytest

from procs import Kids, alive, descendants_of, state
from ralph_reaper import backends
from ralph_reaper.exits import BOOK

PR_SET_CHILD_SUBREAPER = 36


def _set_subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def _fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


def _kill_and_reap(me: int) -> None:
    """SIGKILL every descendant of ``me`` (through pidfds) and reap until none is left."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for pid in descendants_of(me):
            if alive(pid):
                try:
                    fd = os.pidfd_open(pid)
                except OSError:
                    continue
                try:
                    signal.pidfd_send_signal(fd, signal.SIGKILL)
                except OSError:
                    pass
                finally:
                    os.close(fd)
        try:
            while os.waitpid(-1, os.WNOHANG)[0] > 0:
                pass
        except ChildProcessError:
            pass
        if not descendants_of(me):
            return
        time.sleep(0.01)


@pytest.fixture(scope="session", autouse=True)
def _subreaper() -> None:
    _set_subreaper()


@pytest.fixture(autouse=True)
def monitor_slices(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """DispatchMonitor takes its stop work a slice at a time, in slices of 3 here, so that
    a test with a few dispatches already crosses slices. It runs as in a process that
    adopts no orphans, as a loop's host does (each slice walks its own sessions), though
    this test process is a subreaper (above); tests marked ``adopting`` keep the
    subreaper's way (the slices of a batch share its walk, exits wait behind timers)."""
    from ralph_reaper import monitor

    monkeypatch.setattr(monitor, "SLICE", 3)
    if request.node.get_closest_marker("adopting") is None:
        monkeypatch.setattr(monitor, "adopts_orphans", lambda _backend: False)


@pytest.fixture(autouse=True)
def no_leftovers() -> Iterator[None]:
    """Fail the test if it left a process, a zombie or an fd behind; clean up either way."""
    me = os.getpid()
    before_fds = _fds()
    before = set(descendants_of(me))
    yield
    BOOK.prune()
    leftovers = [p for p in descendants_of(me) if p not in before]
    problems = []
    if leftovers:
        states = {p: state(p) for p in leftovers}
        problems.append(f"processes left behind (pid: state): {states}")
        _kill_and_reap(me)
    leaked = _fds() - before_fds
    leaked = {fd for fd in leaked if os.path.exists(f"/proc/self/fd/{fd}")}
    if leaked:
        targets = {}
        for fd in leaked:
            try:
                targets[fd] = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                targets[fd] = "?"
        problems.append(f"file descriptors leaked: {targets}")
    if problems:
        pytest.fail("; ".join(problems))


def _backend_names() -> list[str]:
    forced = os.environ.get(backends.ENV_VAR, "").strip()
    if forced:
        return [forced]
    return list(backends.NAMES)


@pytest.fixture(params=_backend_names())
def backend(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run the test with each backend active in turn (skipped where one cannot run)."""
    name: str = request.param
    problem = backends.problems().get(name)
    if problem is not None and not os.environ.get(backends.ENV_VAR):
        pytest.skip(f"backend {name} unavailable here: {problem}")
    with backends.using(name):
        yield name


@pytest.fixture
def kids() -> Iterator[Kids]:
    """The processes a test starts itself; their Popen objects are settled afterwards."""
    k = Kids()
    try:
        yield k
    finally:
        k.close()
