"""DispatchMonitor: many dispatches on one thread, for every backend.

No test asserts a duration. Where a test must show that one dispatch's stop
does not hold up the others, the stuck dispatch gets an hour-long grace
period and the test waits for the others first: an implementation that ran
the stop sequence on the monitor thread would block there for an hour, and
the test would hit pytest-timeout instead of passing.

The test process is a child subreaper (conftest.py), so orphans of every tree
come back to it; the autouse ``no_leftovers`` fixture fails any test that
leaves a process, a zombie or an fd behind.
"""

from __future__ import annotations

import concurrent.futures as cf
import errno
import os
import random
import signal
import subprocess
import threading
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any, Optional

import pytest

import procs
from procs import Kids
from ralph_reaper import (
    DispatchCompletionResult,
    DispatchCompletionStatus,
    DispatchMonitor,
    backends,
    graceful_terminate_dispatch,
    poll_dispatch_status,
    spawn_dispatch,
)
from ralph_reaper import monitor as monitor_module
from ralph_reaper.keeper_path import keeper_path

HOUR_MS = 3_600_000.0

TERM_IGNORING = (
    "import signal, sys, time\n"
    "def noted(*_):\n"
    "    print('term', flush=True)\n"
    "signal.signal(signal.SIGTERM, noted)\n"
    "print('ready', flush=True)\n"
    "while True:\n"
    "    time.sleep(3600)\n"
)


def dispatch(pid: Optional[int], session_id: str = "sess") -> SimpleNamespace:
    return SimpleNamespace(pid=pid, session_id=session_id)


#: A leader with two background children; it prints once both are forked.
TREE = "sleep 60 & sleep 60 & echo ready; wait"


def tree(kids: Kids) -> subprocess.Popen[bytes]:
    """Start TREE and return once its children exist."""
    proc = kids.sh(TREE, stdout=subprocess.PIPE)
    assert read_line(proc) == b"ready\n"
    return proc


def read_line(proc: subprocess.Popen[bytes]) -> bytes:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line, "the child closed its stdout before it was ready"
    return line


def assert_exit(result: DispatchCompletionResult, code: int) -> None:
    assert result.return_code == code, result
    assert result.termination_method == "natural"
    if code == 0:
        assert result.status is DispatchCompletionStatus.COMPLETED
        assert result.error is None
    else:
        assert result.status is DispatchCompletionStatus.ERROR
        assert result.error == f"Process exited with code {code}"


class Gate:
    """A pipe the dispatches read one byte from: closing it releases them all at once."""

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
def gate() -> Iterator[Gate]:
    g = Gate()
    try:
        yield g
    finally:
        g.release()


# --------------------------------------------------------------------------------------
# Natural exits


def test_many_dispatches_exit_codes(backend: str, kids: Kids, gate: Gate) -> None:
    """1000 dispatches released at once, each exiting with its own code."""
    n = 1000
    rng = random.Random(1234)
    codes = [rng.randrange(256) for _ in range(n)]
    with DispatchMonitor() as monitor:
        assert monitor.backend == backend
        futures = {}
        for code in codes:
            proc = kids.sh(f"read x; exit {code}", stdin=gate.r)
            futures[monitor.watch(dispatch(proc.pid), f"pt-{proc.pid}")] = (proc.pid, code)
        gate.release()
        seen = 0
        for future in monitor.as_completed(list(futures)):
            pid, code = futures[future]
            result = future.result()
            assert result.pid == pid
            assert result.ticket_id == f"pt-{pid}"
            assert result.backend == backend
            assert_exit(result, code)
            seen += 1
        assert seen == n
        assert len(monitor) == 0
    for pid, _code in futures.values():
        assert procs.state(pid) is None  # reaped


def test_exit_signal_and_remembered_code(backend: str, kids: Kids) -> None:
    ok = kids.sh("exit 0")
    bad = kids.sh("exit 3")
    killed = kids.sh("kill -9 $$")
    with DispatchMonitor() as monitor:
        f_ok = monitor.watch(dispatch(ok.pid), "pt-ok")
        f_bad = monitor.watch(dispatch(bad.pid), "pt-bad")
        f_killed = monitor.watch(dispatch(killed.pid), "pt-killed")
        assert_exit(f_ok.result(), 0)
        assert_exit(f_bad.result(), 3)
        result = f_killed.result()
        assert result.status is DispatchCompletionStatus.TERMINATED
        assert result.return_code == -9
        assert result.signal == 9
        assert result.termination_method == "natural"
        # The exit is remembered: a later poll and a later watch give the same code.
        assert poll_dispatch_status(bad.pid) == (False, 3)
        assert_exit(monitor.watch(dispatch(bad.pid), "pt-bad").result(), 3)


def test_leftovers_of_a_natural_exit_are_stopped(backend: str, kids: Kids) -> None:
    proc = kids.sh("sleep 60 & echo $!", stdout=subprocess.PIPE)
    child = int(read_line(proc))
    with DispatchMonitor() as monitor:
        result = monitor.watch(dispatch(proc.pid), "pt-1", graceful_shutdown_ms=HOUR_MS).result()
    assert_exit(result, 0)
    assert result.descendants_killed == 1
    assert procs.state(child) is None


def test_bad_input(backend: str, kids: Kids) -> None:
    with DispatchMonitor() as monitor:
        missing = monitor.watch(dispatch(None), "pt-1").result()
        assert missing.status is DispatchCompletionStatus.ERROR
        assert missing.error == "No PID available"
        for bad in (0, -1, 1, os.getpid(), True, "123"):
            result = monitor.watch(dispatch(bad), "pt-1").result()  # type: ignore[arg-type]
            assert result.status is DispatchCompletionStatus.ERROR
            assert result.error
        with pytest.raises(ValueError):
            monitor.watch(dispatch(12345), "pt-1", timeout_ms=float("nan"))
        with pytest.raises(ValueError):
            monitor.terminate(os.getpid())
        proc = kids.sh("read x", stdin=subprocess.PIPE)
        future = monitor.watch(dispatch(proc.pid), "pt-1")
        with pytest.raises(ValueError):
            monitor.watch(dispatch(proc.pid), "pt-2")  # already watched
        assert proc.stdin is not None
        proc.stdin.close()
        assert_exit(future.result(), 1)  # read fails at EOF
    with pytest.raises(RuntimeError):
        monitor.watch(dispatch(proc.pid), "pt-1")
    monitor.close()  # idempotent


# --------------------------------------------------------------------------------------
# Timeouts and stops


#: The monitor of a host that adopts no orphans (a walk per slice), or of one that does
#: (the slices of a batch share its walk; stopping dispatches' exits wait behind timers).
HOSTS = [pytest.param("forks-only"), pytest.param("adopting", marks=pytest.mark.adopting)]


@pytest.mark.parametrize("host", HOSTS)
def test_timeouts_do_not_hold_up_other_dispatches(
    backend: str, kids: Kids, gate: Gate, host: str
) -> None:
    """A stop stuck in an hour-long grace period; meanwhile 20 other timeouts and 100
    exits are all handled. Only then is the stuck one escalated to SIGKILL."""
    stuck = kids.py(TERM_IGNORING, stdout=subprocess.PIPE)
    assert read_line(stuck) == b"ready\n"
    with DispatchMonitor() as monitor:
        f_stuck = monitor.watch(
            dispatch(stuck.pid), "pt-stuck", timeout_ms=1, graceful_shutdown_ms=HOUR_MS
        )
        assert read_line(stuck) == b"term\n"  # its stop has begun, and waits for an hour
        slow = {}
        quick = {}
        for i in range(120):
            if i % 6 == 0:
                proc = kids.sh("sleep 60")
                slow[monitor.watch(dispatch(proc.pid), "pt-slow", timeout_ms=200)] = proc.pid
            else:
                proc = kids.sh(f"read x; exit {i % 7}", stdin=gate.r)
                quick[monitor.watch(dispatch(proc.pid), "pt-quick")] = i % 7
        gate.release()
        _done, not_done = monitor.wait(list(slow) + list(quick))
        assert not not_done
        for future, code in quick.items():
            assert_exit(future.result(), code)
        for future in slow:
            result = future.result()
            assert result.status is DispatchCompletionStatus.TIMEOUT, result
            assert result.termination_method == "sigterm"
            assert result.return_code == -signal.SIGTERM
            assert result.timed_out and result.stop_reason == "timeout"
            assert result.error == "Timed out after 200ms"
        assert not f_stuck.done()  # still in its grace period
        assert monitor.terminate(f_stuck) is f_stuck
        result = f_stuck.result()
    assert result.status is DispatchCompletionStatus.TIMEOUT
    assert result.termination_method == "sigkill"
    assert result.return_code == -signal.SIGKILL
    assert set(result.stage_ms) == {"sigterm", "sigkill"}


def test_timeout_stops_background_children(backend: str, kids: Kids) -> None:
    proc = kids.sh("sleep 60 & echo $!; setsid sleep 60 & echo $!; wait", stdout=subprocess.PIPE)
    children = [int(read_line(proc)), int(read_line(proc))]
    with DispatchMonitor() as monitor:
        result = monitor.watch(dispatch(proc.pid), "pt-1", timeout_ms=1).result()
    assert result.status is DispatchCompletionStatus.TIMEOUT
    assert result.termination_method == "sigterm"
    assert result.descendants_killed == 2
    for pid in [proc.pid, *children]:
        assert procs.state(pid) is None


def test_terminate_a_running_dispatch(backend: str, kids: Kids) -> None:
    procs_ = [tree(kids) for _ in range(3)]
    with DispatchMonitor() as monitor:
        futures = [monitor.watch(dispatch(p.pid), "pt-1") for p in procs_]
        assert monitor.terminate(procs_[0].pid) is futures[0]
        result = futures[0].result()
        assert result.status is DispatchCompletionStatus.TERMINATED
        assert result.termination_method == "sigterm"
        assert result.stop_reason == "terminate"
        assert result.timed_out is False
        assert result.descendants_killed == 2
        assert not futures[1].done() and not futures[2].done()
        for future in futures[1:]:
            monitor.terminate(future)
        assert all(f.result().termination_method == "sigterm" for f in futures[1:])


@pytest.mark.parametrize("host", HOSTS)
def test_close_stops_every_running_tree(backend: str, kids: Kids, host: str) -> None:
    started = [tree(kids) for _ in range(10)]
    monitor = DispatchMonitor()
    futures = [monitor.watch(dispatch(p.pid), "pt-1") for p in started]
    monitor.close()
    for future in futures:
        assert future.done()
        result = future.result()
        assert result.status is DispatchCompletionStatus.TERMINATED
        assert result.termination_method == "sigterm"
        assert result.stop_reason == "close"
        assert result.descendants_killed == 2
    monitor.close()  # idempotent
    for proc in started:
        assert procs.state(proc.pid) is None


def test_close_without_terminate_cancels_and_leaves_processes_alone(
    backend: str, kids: Kids
) -> None:
    started = [kids.sh("sleep 60") for _ in range(5)]
    monitor = DispatchMonitor()
    futures = [monitor.watch(dispatch(p.pid), "pt-1") for p in started]
    monitor.close(terminate=False)
    _done, not_done = monitor.wait(futures)
    assert not not_done
    assert all(f.cancelled() for f in futures)
    with pytest.raises(cf.CancelledError):
        futures[0].result()
    for proc in started:
        assert procs.alive(proc.pid)
        assert graceful_terminate_dispatch(proc.pid) == (True, "sigterm")


def test_cancelled_future_stops_watching(backend: str, kids: Kids) -> None:
    proc = kids.sh("sleep 60")
    other = kids.sh("read x", stdin=subprocess.PIPE)
    with DispatchMonitor() as monitor:
        future = monitor.watch(dispatch(proc.pid), "pt-1")
        keep = monitor.watch(dispatch(other.pid), "pt-2")
        assert future.cancel()
        assert other.stdin is not None
        other.stdin.close()
        assert_exit(keep.result(), 1)  # the monitor thread has taken the cancel by now
        assert procs.alive(proc.pid)
        assert len(monitor) == 0
    assert procs.alive(proc.pid)  # closing did not stop what it no longer watched
    assert graceful_terminate_dispatch(proc.pid) == (True, "sigterm")


def test_watch_and_wait_from_several_threads(backend: str, kids: Kids) -> None:
    failures: list[BaseException] = []

    def worker(monitor: DispatchMonitor, seed: int) -> None:
        try:
            rng = random.Random(seed)
            futures = {}
            for _ in range(50):
                code = rng.randrange(256)
                proc = kids.sh(f"exit {code}")
                futures[monitor.watch(dispatch(proc.pid), f"pt-{seed}")] = code
            for future, code in futures.items():
                assert_exit(future.result(), code)
        except BaseException as exc:
            failures.append(exc)

    with DispatchMonitor() as monitor:
        threads = [threading.Thread(target=worker, args=(monitor, i)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not failures, failures


def test_pins_without_pidfd_are_polled(
    backend: str, kids: Kids, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After EMFILE a pin has no pidfd: exits and stops must still be seen (by polling)."""
    active = backends.get()

    def out_of_fds(pid: int) -> int:
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    monkeypatch.setattr("ralph_reaper.pins._nofile_raised", True)
    monkeypatch.setattr(active, "pidfd_open", out_of_fds)
    quick = kids.sh("read x; exit 7", stdin=subprocess.PIPE)
    slow = tree(kids)
    with DispatchMonitor() as monitor:
        f_quick = monitor.watch(dispatch(quick.pid), "pt-1")
        f_slow = monitor.watch(dispatch(slow.pid), "pt-2", timeout_ms=1)
        result = f_slow.result()
        assert result.status is DispatchCompletionStatus.TIMEOUT
        assert result.termination_method == "sigterm"
        assert result.descendants_killed == 2
        assert quick.stdin is not None
        quick.stdin.close()
        assert_exit(f_quick.result(), 7)


def test_idle_dispatch_is_stopped(backend: str, kids: Kids) -> None:
    proc = kids.sh("read x", stdin=subprocess.PIPE)
    with DispatchMonitor() as monitor:
        result = monitor.watch(dispatch(proc.pid), "pt-1", idle_timeout_ms=200).result()
    # An idle stop that needed signals: TERMINATED (only a timeout is TIMEOUT).
    assert result.status is DispatchCompletionStatus.TERMINATED
    assert result.stop_reason == "idle"
    assert result.termination_method == "sigterm"
    assert result.error == "Idle after 200ms"


def test_an_internal_error_fails_that_dispatch_only(
    backend: str, kids: Kids, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EIO, "injected")

    monkeypatch.setattr("ralph_reaper.engine.Members", broken)
    victim = kids.sh("sleep 60")
    with DispatchMonitor() as monitor:
        f_victim = monitor.watch(dispatch(victim.pid), "pt-1", timeout_ms=1)
        result = f_victim.result()
        assert result.status is DispatchCompletionStatus.ERROR
        assert result.error is not None and "injected" in result.error
        other = kids.sh("exit 4")
        assert_exit(monitor.watch(dispatch(other.pid), "pt-2").result(), 4)
    monkeypatch.undo()
    assert procs.alive(victim.pid)  # the failed stop never signalled it
    assert graceful_terminate_dispatch(victim.pid) == (True, "sigterm")


# --------------------------------------------------------------------------------------
# Dispatches started by spawn_dispatch (keeper containment on the native backend)


def _containment(backend: str) -> str:
    return "keeper" if backend == "native" and keeper_path() is not None else "session"


def _spawn(script: str, **kwargs: Any) -> Any:
    result = spawn_dispatch(["/bin/sh", "-c", script], ticket_id="pt-1", **kwargs)
    assert result.status == "launched", result.error
    return result


def test_spawned_dispatches(backend: str) -> None:
    exits = [_spawn(f"exit {code}", stdin="devnull") for code in (0, 5)]
    slow = _spawn("sleep 60 & sleep 60 & wait", stdin="devnull")
    prompt = _spawn("read answer; exit 3", stdin="pipe")
    with DispatchMonitor() as monitor:
        f_exits = [monitor.watch(d, "pt-1") for d in exits]
        f_slow = monitor.watch(slow, "pt-1", timeout_ms=200, graceful_shutdown_ms=HOUR_MS)
        f_prompt = monitor.watch(prompt, "pt-1", idle_timeout_ms=300)
        for future, code in zip(f_exits, (0, 5)):
            result = future.result()
            assert_exit(result, code)
            assert result.containment == _containment(backend)
        result = f_slow.result()
        assert result.status is DispatchCompletionStatus.TIMEOUT
        assert result.termination_method == "sigterm"
        assert result.descendants_killed >= 2
        assert result.containment == _containment(backend)
        result = f_prompt.result()
        # It answered EOF by ending by itself: mapped like a natural end.
        assert result.status is DispatchCompletionStatus.ERROR
        assert result.stop_reason == "idle"
        assert result.termination_method == "eof"
        assert result.return_code == 3


def test_progress_is_one_line_for_the_whole_monitor(
    backend: str, kids: Kids, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Shortened from 30 s so that several progress lines come during the test.
    monkeypatch.setattr(monitor_module, "PROGRESS_EVERY_S", 0.05)
    lines: list[str] = []
    three = threading.Event()

    class Logger:
        def info(self, msg: str) -> None:
            if "still running" in msg:
                lines.append(msg)
                if len(lines) >= 3:
                    three.set()

        warning = error = debug = info

    started = [tree(kids) for _ in range(5)]
    with DispatchMonitor(Logger()) as monitor:
        futures = [monitor.watch(dispatch(p.pid), f"pg-{i}") for i, p in enumerate(started)]
        assert three.wait(30), lines
        monitor.close()
    assert all(f.result().stop_reason == "close" for f in futures)
    # One line per tick for all five, naming the dispatch watched longest.
    assert all(line.startswith("5 dispatch(es) still running; longest: pg-0") for line in lines[:3])


def test_terminate_during_a_monitor_stop_reports_that_stop(backend: str, kids: Kids) -> None:
    # The monitor's timeout stop is in its grace (the tree ignores SIGTERM) when
    # another call asks to stop the same dispatch: that call reports the stop
    # under way instead of running a second one beside it, and leaks nothing.
    proc = kids.sh("trap '' TERM; sleep 60")
    started = threading.Event()

    class Logger:
        def warning(self, msg: str) -> None:
            if "timed out" in msg:
                started.set()

        def info(self, msg: str) -> None:
            pass

        error = debug = info

    with DispatchMonitor(Logger()) as monitor:
        future = monitor.watch(dispatch(proc.pid), "pt-1", timeout_ms=50, graceful_shutdown_ms=800)
        assert started.wait(30)
        joined = graceful_terminate_dispatch(proc.pid, kill_wait_ms=100)
        result = future.result(30)
    assert joined == (True, "sigkill")
    assert result.status is DispatchCompletionStatus.TIMEOUT
    assert result.termination_method == "sigkill"


@pytest.mark.parametrize("face", ["blocking", "monitor"])
def test_one_catchable_signal_per_process_of_the_leaders_group(
    backend: str, kids: Kids, monkeypatch: pytest.MonkeyPatch, face: str
) -> None:
    """The leader's group gets one SIGTERM at once (forks in flight included); its
    members are not sent another each through their pins, or a handler would run
    twice. The calls are counted as they pass through (nothing is replaced)."""
    from ralph_reaper.containment import Members
    from ralph_reaper.pins import Pin

    sent: list[tuple[str, int, int]] = []
    pin_signal, group_signal = Pin.signal, Members.signal_group

    def spy_pin(self: Pin, sig: int) -> bool:
        sent.append(("pin", self.pid, sig))
        return pin_signal(self, sig)

    def spy_group(self: Members, sig: int) -> bool:
        done = group_signal(self, sig)
        if done:
            sent.append(("group", self.session or 0, sig))
        return done

    monkeypatch.setattr(Pin, "signal", spy_pin)
    monkeypatch.setattr(Members, "signal_group", spy_group)
    proc = kids.sh("sleep 60 & echo $!; wait", stdout=subprocess.PIPE)
    child = int(read_line(proc))
    if face == "blocking":
        assert graceful_terminate_dispatch(proc.pid) == (True, "sigterm")
    else:
        with DispatchMonitor() as monitor:
            result = monitor.watch(dispatch(proc.pid), "pt-1", timeout_ms=1).result()
        assert result.termination_method == "sigterm", result
    terms = [s for s in sent if s[2] == signal.SIGTERM]
    if ("group", proc.pid, signal.SIGTERM) in terms:
        assert [s for s in terms if s[0] == "pin"] == [], terms
    else:  # no group signal here: each member by its own pin, once
        assert sorted(s[1] for s in terms) == sorted([proc.pid, child]), terms
