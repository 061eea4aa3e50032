"""Polled pins behind one ``waitid`` peek: exits the gate shows, and those it cannot.

Without pidfds, the pins that are our children are vouched for by one
``waitid(P_ALL, WNOWAIT)`` a round (ralph_reaper.polled); everything else has
checks of its own. These tests start the cases the gate cannot see (a child
reaped behind the package's back, a grandchild, a process orphaned to us, an
un-waited zombie that the gate keeps returning) and require the same answers
as before, on every backend where the scenario applies. No test asserts a
duration: a missed exit shows as a pytest-timeout.

The test process is a child subreaper (conftest.py); ``no_leftovers`` fails a
test that leaves a process, a zombie or an fd behind.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Optional

import pytest

import procs
from procs import Kids
from ralph_reaper import (
    DispatchCompletionResult,
    DispatchCompletionStatus,
    DispatchMonitor,
    backends,
    graceful_terminate_dispatch,
    wait_for_dispatch_completion,
)
from ralph_reaper.pins import Pin
from ralph_reaper.waiting import wait_all, wait_any

RESULT_S = 60.0


def dispatch(pid: int) -> SimpleNamespace:
    return SimpleNamespace(pid=pid, session_id="sess")


def read_line(proc: subprocess.Popen[bytes]) -> bytes:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line, "the child closed its stdout before it was ready"
    return line


def assert_natural(result: DispatchCompletionResult, code: Optional[int]) -> None:
    """Ended by itself with ``code``; None: the exit is known to have happened, not how."""
    assert result.termination_method == "natural", result
    if code is None:
        assert result.status is DispatchCompletionStatus.ERROR, result
        assert "unknown" in (result.error or ""), result
    else:
        assert result.return_code == code, result


def ppid(pid: int) -> Optional[int]:
    fields = procs._fields(pid)
    return None if fields is None else int(fields[1])


def gated(monitor: DispatchMonitor) -> int:
    """How many of the monitor's polled pins the gate vouches for (polling backend)."""
    return len(monitor._polled._kids)


class Pipe:
    """A pipe a child blocks on: closing the write end lets it go."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe()

    def started(self) -> None:
        """Call once every child holds the read end."""
        if self.r >= 0:
            os.close(self.r)
            self.r = -1

    def release(self) -> None:
        self.started()
        if self.w >= 0:
            os.close(self.w)
            self.w = -1


@pytest.fixture
def pipe() -> Iterator[Pipe]:
    p = Pipe()
    try:
        yield p
    finally:
        p.release()


@pytest.fixture
def zombie() -> Iterator[subprocess.Popen[bytes]]:
    """A child of ours that has exited and that nobody waits for (until the test ends).

    It is what ``waitid(P_ALL, WNOWAIT)`` returns for as long as it exists,
    whatever else exits meanwhile.
    """
    proc = subprocess.Popen(["/bin/sh", "-c", "exit 0"])
    try:
        assert procs.wait_until(lambda: procs.state(proc.pid) == "Z")
        yield proc
    finally:
        proc.wait()


def grandchild(kids: Kids, pipe: Pipe, code: int, then: str) -> tuple[subprocess.Popen[bytes], int]:
    """A leader whose background child waits on ``pipe`` and exits with ``code``.

    ``then`` is what the leader does after starting it (``wait``: reap it;
    ``read y``: wait for its own stdin to close, and orphan it).
    """
    # The pipe comes in as the leader's stderr: sh redirects only fds 0-9, and an
    # asynchronous list's stdin is /dev/null, so it moves to fd 3 for the child.
    script = f'exec 3<&2 2>/dev/null; sh -c "read x <&3; exit {code}" & echo $!; exec 3<&-; {then}'
    leader = kids.sh(script, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=pipe.r)
    pid = int(read_line(leader))
    pipe.started()
    return leader, pid


# --------------------------------------------------------------------------------------
# What the gate shows


@pytest.mark.timeout(120)
def test_one_exit_among_many_idle_children(backend: str, kids: Kids, pipe: Pipe) -> None:
    """200 idle children; one of them exits, and only its future completes, with its code."""
    own = Pipe()
    try:
        with DispatchMonitor() as monitor:
            idle = {}
            for i in range(200):
                proc = kids.sh(f"read x; exit {i % 7}", stdin=pipe.r)
                idle[monitor.watch(dispatch(proc.pid), f"pt-{i}")] = i % 7
            pipe.started()
            lone = kids.sh("read x; exit 42", stdin=own.r)
            f_lone = monitor.watch(dispatch(lone.pid), "pt-lone")
            own.started()
            if backend == "polling":
                assert procs.wait_until(lambda: gated(monitor) == 201)
            own.release()
            assert_natural(f_lone.result(timeout=RESULT_S), 42)
            assert not any(f.done() for f in idle)
            pipe.release()
            for future, code in idle.items():
                assert_natural(future.result(timeout=RESULT_S), code)
            assert len(monitor) == 0
    finally:
        own.release()


@pytest.mark.timeout(120)
def test_a_child_reaped_behind_our_back_is_still_reported(backend: str, kids: Kids) -> None:
    """The caller reaps a watched child with os.waitpid: no zombie for the gate to see."""
    proc = kids.sh("read x; exit 3", stdin=subprocess.PIPE)
    other = kids.sh("read x; exit 4", stdin=subprocess.PIPE)
    with DispatchMonitor() as monitor:
        future = monitor.watch(dispatch(proc.pid), "pt-1")
        f_other = monitor.watch(dispatch(other.pid), "pt-2")
        if backend == "polling":
            assert procs.wait_until(lambda: gated(monitor) == 2)
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            got, status = os.waitpid(proc.pid, 0)  # most often first: the monitor polls
        except ChildProcessError:  # the monitor reaped it first
            mine: Optional[int] = None
        else:
            assert got == proc.pid
            mine = os.waitstatus_to_exitcode(status)
        result = future.result(timeout=RESULT_S)
        if mine is None:
            assert_natural(result, 3)
        else:
            assert mine == 3
            assert result.termination_method == "natural"
            assert result.return_code in (None, 3), result
        assert not f_other.done()
        assert other.stdin is not None
        other.stdin.close()
        assert_natural(f_other.result(timeout=RESULT_S), 4)


@pytest.mark.timeout(120)
def test_a_stop_by_another_call_is_reported(backend: str, kids: Kids) -> None:
    """Another call stops and reaps a watched child through its own pin."""
    proc = kids.sh("sleep 60")
    with DispatchMonitor() as monitor:
        future = monitor.watch(dispatch(proc.pid), "pt-1")
        if backend == "polling":
            assert procs.wait_until(lambda: gated(monitor) == 1)
        assert graceful_terminate_dispatch(proc.pid) == (True, "sigterm")
        result = future.result(timeout=RESULT_S)
    assert result.termination_method == "sigterm", result
    assert result.stop_reason == "terminate"
    assert result.return_code == -15


# --------------------------------------------------------------------------------------
# Pins the gate cannot see


@pytest.mark.timeout(120)
def test_a_grandchild_pin_is_reported(backend: str, kids: Kids, pipe: Pipe) -> None:
    """A watched process that is not our child, reaped by its own parent."""
    leader, pid = grandchild(kids, pipe, 5, "wait")
    with DispatchMonitor() as monitor:
        future = monitor.watch(dispatch(pid), "pt-g", stop_leftovers=False)
        if backend == "polling":
            assert procs.wait_until(lambda: len(monitor._polled) == 1 and gated(monitor) == 0)
        assert not future.done()
        pipe.release()
        result = future.result(timeout=RESULT_S)
    assert result.termination_method == "natural", result
    assert result.return_code in (None, 5), result  # the kernel may not tell (no pidfd, < 6.15)
    assert leader.wait(timeout=RESULT_S) == 0


@pytest.mark.timeout(120)
def test_a_pin_orphaned_to_us_is_reported_with_its_code(
    backend: str, kids: Kids, pipe: Pipe
) -> None:
    """Watched as a grandchild; its parent dies, it becomes our child, then exits."""
    leader, pid = grandchild(kids, pipe, 5, "read y")
    with DispatchMonitor() as monitor:
        future = monitor.watch(dispatch(pid), "pt-g", stop_leftovers=False)
        if backend == "polling":
            assert procs.wait_until(lambda: len(monitor._polled) == 1)
            assert gated(monitor) == 0
        assert leader.stdin is not None
        leader.stdin.close()
        assert leader.wait(timeout=RESULT_S) == 1  # its read failed at EOF
        assert procs.wait_until(lambda: ppid(pid) == os.getpid())  # we are a subreaper
        assert not future.done()
        pipe.release()
        assert_natural(future.result(timeout=RESULT_S), 5)  # ours to reap: the code is known
    assert procs.state(pid) is None


# --------------------------------------------------------------------------------------
# A zombie nobody pins: the gate shows it, over and over


@pytest.mark.timeout(120)
def test_an_unwaited_zombie_hides_no_exit_from_the_monitor(
    backend: str, kids: Kids, pipe: Pipe, zombie: subprocess.Popen[bytes]
) -> None:
    with DispatchMonitor() as monitor:
        idle = {}
        for i in range(50):
            proc = kids.sh(f"read x; exit {i % 5}", stdin=pipe.r)
            idle[monitor.watch(dispatch(proc.pid), f"pt-{i}")] = i % 5
        pipe.started()
        lone = kids.sh("read x; exit 9", stdin=subprocess.PIPE)
        f_lone = monitor.watch(dispatch(lone.pid), "pt-lone")
        tree = kids.sh("sleep 60 & sleep 60 & echo ready; wait", stdout=subprocess.PIPE)
        assert read_line(tree) == b"ready\n"
        f_tree = monitor.watch(dispatch(tree.pid), "pt-tree", timeout_ms=1)
        assert lone.stdin is not None
        lone.stdin.close()
        assert_natural(f_lone.result(timeout=RESULT_S), 9)
        stopped = f_tree.result(timeout=RESULT_S)
        assert stopped.status is DispatchCompletionStatus.TIMEOUT, stopped
        assert stopped.termination_method == "sigterm"
        assert stopped.descendants_killed == 2
        assert not any(f.done() for f in idle)
        pipe.release()
        for future, code in idle.items():
            assert_natural(future.result(timeout=RESULT_S), code)
    assert procs.state(zombie.pid) == "Z"  # not the package's to reap


@pytest.mark.timeout(120)
def test_an_unwaited_zombie_hides_no_exit_from_blocking_waits(
    backend: str, kids: Kids, zombie: subprocess.Popen[bytes]
) -> None:
    proc = kids.sh("sleep 0.2; exit 6")
    result = wait_for_dispatch_completion(dispatch(proc.pid), "pt-1")
    assert_natural(result, 6)
    tree = kids.sh("sleep 60 & sleep 60 & echo ready; wait", stdout=subprocess.PIPE)
    assert read_line(tree) == b"ready\n"
    assert graceful_terminate_dispatch(tree.pid) == (True, "sigterm")
    assert procs.state(tree.pid) is None

    active = backends.get()
    first = kids.sh("read x; exit 3", stdin=subprocess.PIPE)
    second = kids.sh("read x; exit 4", stdin=subprocess.PIPE)
    pins = [Pin.open(active, first.pid), Pin.open(active, second.pid)]
    try:
        assert all(pin is not None for pin in pins)
        held = [pin for pin in pins if pin is not None]
        assert wait_any(held, 0.0) == []  # both block on their stdin
        assert first.stdin is not None
        first.stdin.close()
        assert wait_any(held, RESULT_S) == [held[0]]
        assert second.stdin is not None
        second.stdin.close()
        assert wait_all(held, RESULT_S) == []
        statuses = [pin.collect() for pin in held]  # polled pins are the caller's to reap
        codes = [None if status is None else status.return_code for status in statuses]
        assert codes == [3, 4]
    finally:
        for pin in pins:
            if pin is not None:
                pin.close()
    assert procs.state(zombie.pid) == "Z"


# --------------------------------------------------------------------------------------
# Who is vouched for by the gate (polling backend: no pidfd for anyone)


@pytest.mark.timeout(120)
def test_children_are_gated_and_a_grandchild_is_not(backend: str, kids: Kids, pipe: Pipe) -> None:
    if backend != "polling":
        pytest.skip("only pins without a pidfd are polled")
    other = Pipe()
    try:
        leader, pid = grandchild(kids, other, 8, "wait")
        with DispatchMonitor() as monitor:
            children = {}
            for i in range(20):
                proc = kids.sh(f"read x; exit {i}", stdin=pipe.r)
                children[monitor.watch(dispatch(proc.pid), f"pt-{i}")] = i
            pipe.started()
            f_grandchild = monitor.watch(dispatch(pid), "pt-g", stop_leftovers=False)
            # watch() hands each pin to the monitor thread, which looks at it once
            assert procs.wait_until(lambda: gated(monitor) == 20 and len(monitor._polled) == 21)
            pipe.release()
            for future, code in children.items():
                assert_natural(future.result(timeout=RESULT_S), code)
            assert len(monitor._polled) == 1 and gated(monitor) == 0
            other.release()
            result = f_grandchild.result(timeout=RESULT_S)
            assert result.termination_method == "natural"
            assert result.return_code in (None, 8)
        assert leader.wait(timeout=RESULT_S) == 0
    finally:
        other.release()
