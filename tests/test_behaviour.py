"""Behaviour of the drop-in API on real processes, for every backend.

Every test starts its own processes, lets the package wait for, poll or stop
them, and then checks the real outcome in ``/proc`` and in the exit statuses.
Nothing here asserts a duration: a wait that must be event-driven is given a
huge interval (an hour), so an implementation that sleeps through it would hit
pytest-timeout instead.

The test process is a child subreaper (see conftest.py), so every orphan of a
tree comes back to it; "no zombie" below means that the package reaped what
came back, i.e. ``/proc/<pid>`` no longer exists for any process of the tree.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from types import SimpleNamespace
from typing import Any, Optional

import pytest

import procs
from procs import Kids
from ralph_reaper import (
    DispatchCompletionResult,
    DispatchCompletionStatus,
    graceful_terminate_dispatch,
    poll_dispatch_status,
    wait_for_dispatch_completion,
)

HOUR_MS = 3_600_000
#: A short timeout for the timeout tests: the processes sleep for a minute.
SHORT_MS = 100

TERM_IGNORING = (
    "import signal, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "print(1, flush=True)\n"
    "time.sleep(60)\n"
)


def _stat_fields(pid: int) -> Optional[list[bytes]]:
    """The fields of /proc/<pid>/stat after the command name (state first), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rfind(b")") + 2 :].split()


def _session(pid: int) -> Optional[int]:
    fields = _stat_fields(pid)
    return None if fields is None else int(fields[3])


def _ppid(pid: int) -> Optional[int]:
    fields = _stat_fields(pid)
    return None if fields is None else int(fields[1])


def assert_no_trace(*pids: int) -> None:
    """Every pid is gone from /proc: not running and not a zombie (it was reaped)."""
    states = {pid: procs.state(pid) for pid in pids}
    assert all(s is None for s in states.values()), f"left behind (pid: state): {states}"


def kill_own_orphan(pid: int) -> None:
    """SIGKILL and reap ``pid`` if it is a process of this test's tree now parented to us.

    Only for tests that expect the package to have stopped ``pid``: when it did
    not, the test fails on its own assertion and cleans up here.
    """
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return
    try:
        if _ppid(pid) != os.getpid():
            return
        signal.pidfd_send_signal(fd, signal.SIGKILL)
        os.waitid(os.P_PIDFD, fd, os.WEXITED)  # type: ignore[attr-defined,unused-ignore]
    finally:
        os.close(fd)


def dispatch(pid: int, session_id: str = "sess") -> SimpleNamespace:
    return SimpleNamespace(pid=pid, session_id=session_id)


def wait(pid: int, **kwargs: Any) -> DispatchCompletionResult:
    return wait_for_dispatch_completion(dispatch(pid), "pt-1", **kwargs)


def read_line(proc: subprocess.Popen[bytes]) -> bytes:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line, "the child closed its stdout before it was ready"
    return line


def wait_stopped(pid: int) -> None:
    assert procs.wait_until(lambda: procs.state(pid) == "T"), f"pid {pid} never stopped"


# --------------------------------------------------------------------------------------
# Natural exits


@pytest.mark.parametrize("code", [0, 1, 42, 255])
def test_exit_code_via_wait(backend: str, kids: Kids, code: int) -> None:
    proc = kids.sh(f"exit {code}")
    result = wait(proc.pid, poll_interval_ms=HOUR_MS)
    assert result.return_code == code
    assert result.pid == proc.pid
    assert result.termination_method == "natural"
    assert result.signal is None
    assert result.timed_out is False
    assert result.backend == backend
    if code == 0:
        assert result.status is DispatchCompletionStatus.COMPLETED
        assert result.error is None
    else:
        assert result.status is DispatchCompletionStatus.ERROR
        assert result.error == f"Process exited with code {code}"
    assert_no_trace(proc.pid)


@pytest.mark.parametrize("code", [0, 1, 42, 255])
def test_exit_code_via_poll_after_exit(backend: str, kids: Kids, code: int) -> None:
    proc = kids.sh(f"exit {code}")
    assert procs.wait_until(lambda: not procs.alive(proc.pid))
    assert poll_dispatch_status(proc.pid) == (False, code)
    assert_no_trace(proc.pid)  # the poll reaped it


@pytest.mark.timeout(30)
def test_wait_ends_on_the_exit_itself(backend: str, kids: Kids) -> None:
    """With an hour-long poll interval a timer-driven wait would never return in time."""
    proc = kids.sh("sleep 0.1; exit 3")
    result = wait(proc.pid, timeout_ms=0, poll_interval_ms=HOUR_MS)
    assert result.status is DispatchCompletionStatus.ERROR
    assert result.return_code == 3
    assert_no_trace(proc.pid)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_death_by_a_signal_sent_by_someone_else(backend: str, kids: Kids, sig: int) -> None:
    proc = kids.argv(["sleep", "60"])
    os.kill(proc.pid, sig)  # our own child
    result = wait(proc.pid, poll_interval_ms=HOUR_MS)
    assert result.status is DispatchCompletionStatus.TERMINATED
    assert result.return_code == -sig
    assert result.signal == sig
    assert result.termination_method == "natural"
    assert result.timed_out is False
    assert result.core_dumped is False
    assert_no_trace(proc.pid)


class StartSignal:
    """A logger that lets the test know the wait has begun (its first ``info`` call)."""

    def __init__(self) -> None:
        self.begun = threading.Event()

    def info(self, msg: str) -> None:
        self.begun.set()

    def debug(self, msg: str) -> None:
        pass

    def warning(self, msg: str) -> None:
        pass

    def error(self, msg: str) -> None:
        pass


@pytest.mark.timeout(30)
def test_signal_sent_while_the_wait_runs(backend: str, kids: Kids) -> None:
    """The wait (no timeout, an hour-long poll interval) wakes on a kill from elsewhere."""
    proc = kids.argv(["sleep", "60"])
    log = StartSignal()
    results: list[DispatchCompletionResult] = []

    def waiter_main() -> None:
        results.append(wait(proc.pid, timeout_ms=0, poll_interval_ms=HOUR_MS, logger=log))

    waiter = threading.Thread(target=waiter_main)
    waiter.start()
    assert log.begun.wait(10), "the wait never logged that it started"
    os.kill(proc.pid, signal.SIGKILL)  # our own child
    waiter.join()
    (result,) = results
    assert result.status is DispatchCompletionStatus.TERMINATED
    assert (result.return_code, result.signal) == (-9, 9)
    assert result.termination_method == "natural"
    assert_no_trace(proc.pid)


SEGV = (
    "import os, resource, signal\n"
    "resource.setrlimit(resource.RLIMIT_CORE, ({limit}, {limit}))\n"
    "os.kill(os.getpid(), signal.SIGSEGV)\n"
)


def test_sigsegv_without_core(backend: str, kids: Kids) -> None:
    proc = kids.py(SEGV.format(limit=0))
    result = wait(proc.pid)
    assert result.status is DispatchCompletionStatus.TERMINATED
    assert result.return_code == -11
    assert result.signal == 11
    assert result.core_dumped is False
    assert result.termination_method == "natural"
    assert_no_trace(proc.pid)


def test_core_dumped_agrees_with_the_core_file(backend: str, kids: Kids, tmp_path: Any) -> None:
    """With cores allowed, ``core_dumped`` is True exactly when the kernel wrote one."""
    with open("/proc/sys/kernel/core_pattern") as f:
        pattern = f.read().strip()
    if pattern.startswith("|") or "/" in pattern:
        pytest.skip(f"cores are not written to the cwd here (core_pattern {pattern!r})")
    limit = "resource.RLIM_INFINITY"
    proc = kids.py(SEGV.format(limit=limit), cwd=str(tmp_path))
    result = wait(proc.pid)
    assert (result.status, result.return_code) == (DispatchCompletionStatus.TERMINATED, -11)
    cores = [p.name for p in tmp_path.iterdir()]
    assert result.core_dumped is bool(cores), f"core_dumped={result.core_dumped}, files: {cores}"
    for p in tmp_path.iterdir():
        p.unlink()
    assert_no_trace(proc.pid)


# --------------------------------------------------------------------------------------
# Polling


@pytest.mark.parametrize("script, code", [("exit 42", 42), ("kill -9 $$", -9)])
def test_repeated_polls_give_the_same_code(
    backend: str, kids: Kids, script: str, code: int
) -> None:
    proc = kids.sh(script)
    assert procs.wait_until(lambda: not procs.alive(proc.pid))
    assert poll_dispatch_status(proc.pid) == (False, code)
    assert poll_dispatch_status(proc.pid) == (False, code)
    assert poll_dispatch_status(proc.pid) == (False, code)
    assert_no_trace(proc.pid)


def test_poll_after_wait_gives_the_code(backend: str, kids: Kids) -> None:
    proc = kids.sh("exit 9")
    assert wait(proc.pid).return_code == 9
    assert poll_dispatch_status(proc.pid) == (False, 9)
    assert poll_dispatch_status(proc.pid) == (False, 9)


def test_polling_a_live_child_does_not_disturb_it(backend: str, kids: Kids) -> None:
    """Polls of a live child say running; the child then ends on its own terms (code 7)."""
    proc = kids.py(
        "import sys\nprint(1, flush=True)\nsys.stdin.readline()\nsys.exit(7)\n",
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    read_line(proc)
    for _ in range(5):
        assert poll_dispatch_status(proc.pid) == (True, None)
    assert procs.state(proc.pid) in ("R", "S")  # neither stopped nor killed
    assert proc.stdin is not None
    proc.stdin.write(b"go\n")
    proc.stdin.flush()
    assert procs.wait_until(lambda: not procs.alive(proc.pid))
    assert poll_dispatch_status(proc.pid) == (False, 7)
    assert poll_dispatch_status(proc.pid) == (False, 7)
    assert_no_trace(proc.pid)


# --------------------------------------------------------------------------------------
# Processes that are not our children


def test_poll_of_a_live_grandchild_is_running(backend: str, kids: Kids) -> None:
    proc = kids.sh("sleep 30 & echo $!; wait", stdout=subprocess.PIPE)
    (grandchild,) = procs.read_pids(proc, 1)
    assert poll_dispatch_status(grandchild) == (True, None)
    assert poll_dispatch_status(grandchild) == (True, None)
    assert procs.alive(grandchild)
    ok, method = graceful_terminate_dispatch(proc.pid)
    assert (ok, method) == (True, "sigterm")
    assert_no_trace(proc.pid, grandchild)


def test_wait_with_timeout_stops_a_grandchild(backend: str, kids: Kids) -> None:
    proc = kids.sh("sleep 30 & echo $!; wait", stdout=subprocess.PIPE)
    (grandchild,) = procs.read_pids(proc, 1)
    result = wait(grandchild, timeout_ms=SHORT_MS)
    assert result.status is DispatchCompletionStatus.TIMEOUT
    assert result.termination_method == "sigterm"
    assert result.timed_out is True
    assert not procs.alive(grandchild)
    if backend == "polling":
        # Without a pidfd the exit status of a non-child is readable only while it is a
        # zombie; its parent (the shell) may reap it first, and then nobody can say.
        assert result.return_code in (-15, None)
    else:
        assert result.return_code == -15
    proc.wait()  # its parent, the shell, reaped it and now exits: wait returned
    assert_no_trace(proc.pid, grandchild)


def test_exit_of_a_watched_grandchild_is_known(backend: str, kids: Kids) -> None:
    """A grandchild polled while alive: its exit code is known after its parent reaped it."""
    rfd, wfd = os.pipe()
    try:
        # A background job's stdin is /dev/null: the pipe reaches it as fd 3.
        proc = kids.sh(
            "exec 3<&0; (read x <&3; exit 5) & echo $!; wait",
            stdin=rfd,
            stdout=subprocess.PIPE,
        )
    finally:
        os.close(rfd)
    (grandchild,) = procs.read_pids(proc, 1)
    assert poll_dispatch_status(grandchild) == (True, None)  # the package pins it here
    os.write(wfd, b"go\n")
    os.close(wfd)
    assert proc.wait() == 0  # the shell reaped the grandchild before its ``wait`` returned
    assert procs.state(grandchild) is None
    if backend == "polling":
        # No pidfd was held: once its parent reaped it, its exit is unknowable.
        assert poll_dispatch_status(grandchild) == (False, None)
    else:
        # The pidfd opened by the first poll keeps the exit (PIDFD_INFO_EXIT, Linux >= 6.15).
        assert poll_dispatch_status(grandchild) == (False, 5)
        assert poll_dispatch_status(grandchild) == (False, 5)


# --------------------------------------------------------------------------------------
# Timeouts


def test_timeout_of_a_cooperative_process(backend: str, kids: Kids) -> None:
    proc = kids.argv(["sleep", "60"])
    result = wait(proc.pid, timeout_ms=SHORT_MS, graceful_shutdown_ms=HOUR_MS)
    assert result.status is DispatchCompletionStatus.TIMEOUT
    assert result.termination_method == "sigterm"
    assert result.return_code == -15
    assert result.signal == 15
    assert result.timed_out is True
    assert result.error is not None
    assert_no_trace(proc.pid)


def test_timeout_of_a_process_ignoring_sigterm(backend: str, kids: Kids) -> None:
    proc = kids.py(TERM_IGNORING, stdout=subprocess.PIPE)
    read_line(proc)  # SIGTERM is ignored from now on
    result = wait(proc.pid, timeout_ms=SHORT_MS, graceful_shutdown_ms=200)
    assert result.status is DispatchCompletionStatus.TIMEOUT
    assert result.termination_method == "sigkill"
    assert result.return_code == -9
    assert result.signal == 9
    assert result.timed_out is True
    assert_no_trace(proc.pid)


def test_timeout_of_a_stopped_process(backend: str, kids: Kids) -> None:
    """A SIGSTOPped process dies of the SIGTERM once the SIGCONT that follows it arrives."""
    proc = kids.argv(["sleep", "60"])
    os.kill(proc.pid, signal.SIGSTOP)  # our own child
    wait_stopped(proc.pid)
    result = wait(proc.pid, timeout_ms=SHORT_MS, graceful_shutdown_ms=HOUR_MS)
    assert result.status is DispatchCompletionStatus.TIMEOUT
    assert result.termination_method == "sigterm"
    assert result.return_code == -15
    assert_no_trace(proc.pid)


def test_timeout_of_a_self_stopped_process(backend: str, kids: Kids) -> None:
    proc = kids.py("import os, signal\nos.kill(os.getpid(), signal.SIGSTOP)\n")
    wait_stopped(proc.pid)
    result = wait(proc.pid, timeout_ms=SHORT_MS, graceful_shutdown_ms=HOUR_MS)
    assert (result.status, result.termination_method) == (
        DispatchCompletionStatus.TIMEOUT,
        "sigterm",
    )
    assert result.return_code == -15
    assert_no_trace(proc.pid)


def test_timeout_stops_background_children_of_the_session(backend: str, kids: Kids) -> None:
    proc = kids.sh("sleep 60 & echo $!; sleep 60 & echo $!; wait", stdout=subprocess.PIPE)
    children = procs.read_pids(proc, 2)
    sid = proc.pid
    assert sorted(procs.session_pids(sid)) == sorted([proc.pid, *children])
    result = wait(proc.pid, timeout_ms=SHORT_MS)
    assert result.status is DispatchCompletionStatus.TIMEOUT
    assert result.termination_method == "sigterm"
    assert result.return_code == -15
    assert procs.session_pids(sid) == []
    assert not any(procs.alive(pid) for pid in children)
    # Exactly the two sleeps: the shell's ``echo`` is a builtin, nothing else ran.
    assert result.descendants_killed == 2
    assert_no_trace(proc.pid, *children)


TERM_IGNORING_PARENT = (
    "import signal, subprocess, sys, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    f"kid = subprocess.Popen([sys.executable, '-c', {TERM_IGNORING!r}])\n"
    "print(1, flush=True)\n"
    "time.sleep(60)\n"
)


def test_timeout_stops_background_children_ignoring_sigterm(backend: str, kids: Kids) -> None:
    """The SIGKILL stage reaches the children too, not only the leader."""
    proc = kids.py(TERM_IGNORING_PARENT, stdout=subprocess.PIPE)
    read_line(proc)
    read_line(proc)  # both lines printed: the child and the grandchild ignore SIGTERM now
    (grandchild,) = procs.descendants_of(proc.pid)
    result = wait(proc.pid, timeout_ms=SHORT_MS, graceful_shutdown_ms=200)
    assert result.status is DispatchCompletionStatus.TIMEOUT
    assert result.termination_method == "sigkill"
    assert result.return_code == -9
    assert result.descendants_killed == 1
    assert_no_trace(proc.pid, grandchild)


SLOW_TO_DIE = (
    "import os, signal, time\n"
    "def on_term(*_):\n"
    "    time.sleep(0.05)\n"  # dies while the SIGTERM stage is already waiting for it
    "    os._exit(0)\n"
    "signal.signal(signal.SIGTERM, on_term)\n"
    "print(os.getpid(), flush=True)\n"
    "time.sleep(60)\n"
)
NEVER_REAPS = (
    "import signal, subprocess, sys, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    f"kid = subprocess.Popen([sys.executable, '-c', {SLOW_TO_DIE!r}])\n"
    "print('leader', flush=True)\n"
    "time.sleep(60)\n"  # never waits for kid
)


def test_timeout_reaps_a_member_that_died_under_a_parent_that_never_reaps(
    backend: str, kids: Kids
) -> None:
    """The kid exits during the SIGTERM stage as its parent's zombie; the parent only dies
    of SIGKILL later. The zombie is then reparented to this process (a subreaper): the
    package, which saw the kid's exit earlier, must still reap it.
    """
    proc = kids.py(NEVER_REAPS, stdout=subprocess.PIPE)
    lines = {read_line(proc), read_line(proc)}  # the kid's pid (handler set) and "leader"
    assert b"leader\n" in lines
    (kid,) = (int(line) for line in lines if line != b"leader\n")
    result = wait(proc.pid, timeout_ms=SHORT_MS, graceful_shutdown_ms=300)
    assert result.status is DispatchCompletionStatus.TIMEOUT
    assert result.termination_method == "sigkill"
    assert result.return_code == -9
    assert result.descendants_killed == 1
    assert_no_trace(proc.pid, kid)


FORKS_WHEN_SIGNALLED = (
    "import signal, subprocess, time\n"
    "def on_term(*_):\n"
    "    kid = subprocess.Popen(['sleep', '60'])\n"
    "    print(kid.pid, flush=True)\n"
    "signal.signal(signal.SIGTERM, on_term)\n"
    "print(0, flush=True)\n"
    "while True:\n"
    "    time.sleep(60)\n"
)


def test_timeout_stops_a_member_forked_in_answer_to_sigterm(backend: str, kids: Kids) -> None:
    proc = kids.py(FORKS_WHEN_SIGNALLED, stdout=subprocess.PIPE)
    assert read_line(proc) == b"0\n"
    result = wait(proc.pid, timeout_ms=SHORT_MS, graceful_shutdown_ms=300)
    assert result.status is DispatchCompletionStatus.TIMEOUT
    assert result.termination_method == "sigkill"
    forked = [int(line) for line in proc.stdout or ()]  # the leader is dead: EOF comes
    assert len(forked) >= 1  # SIGTERM and SIGCONT were both delivered at least once
    assert result.descendants_killed >= len(forked)
    assert_no_trace(proc.pid, *forked)


def test_timeout_stops_a_setsid_descendant(backend: str, kids: Kids) -> None:
    """A descendant in a session of its own is still found through the tree."""
    proc = kids.sh("setsid sleep 60 & echo $!; sleep 60", stdout=subprocess.PIPE)
    (detached,) = procs.read_pids(proc, 1)
    # A background job is not a group leader, so setsid(1) calls setsid() without forking.
    assert procs.wait_until(lambda: _session(detached) == detached), "setsid did not happen"
    result = wait(proc.pid, timeout_ms=SHORT_MS)
    assert result.status is DispatchCompletionStatus.TIMEOUT
    assert result.termination_method == "sigterm"
    assert not procs.alive(detached)
    # At least the detached sleep; the foreground one too unless the shell exec'd it.
    assert result.descendants_killed >= 1
    assert_no_trace(proc.pid, detached)


# --------------------------------------------------------------------------------------
# A leader that exits first


def test_leftovers_of_an_exited_leader_are_stopped(backend: str, kids: Kids) -> None:
    proc = kids.sh("sleep 60 & echo $!; exit 0", stdout=subprocess.PIPE)
    (leftover,) = procs.read_pids(proc, 1)
    result = wait(proc.pid, poll_interval_ms=HOUR_MS, graceful_shutdown_ms=HOUR_MS)
    assert result.status is DispatchCompletionStatus.COMPLETED
    assert result.return_code == 0
    assert result.termination_method == "natural"
    assert result.descendants_killed == 1
    assert not procs.alive(leftover)
    assert_no_trace(proc.pid, leftover)


def test_leftovers_kept_with_stop_leftovers_false(backend: str, kids: Kids) -> None:
    proc = kids.sh("sleep 60 & echo $!; exit 0", stdout=subprocess.PIPE)
    (leftover,) = procs.read_pids(proc, 1)
    result = wait_for_dispatch_completion(dispatch(proc.pid), "pt-1", stop_leftovers=False)
    assert result.status is DispatchCompletionStatus.COMPLETED
    assert result.descendants_killed == 0
    assert procs.alive(leftover)
    assert procs.state(proc.pid) is None  # the leader itself was reaped
    # The leftover came back to this process (a subreaper): stop it ourselves.
    assert graceful_terminate_dispatch(leftover) == (True, "sigterm")
    assert_no_trace(leftover)


def test_terminate_of_an_exited_leader_stops_its_leftovers(backend: str, kids: Kids) -> None:
    proc = kids.sh("sleep 60 & echo $!; exit 0", stdout=subprocess.PIPE)
    (leftover,) = procs.read_pids(proc, 1)
    assert procs.wait_until(lambda: procs.state(proc.pid) == "Z")
    assert graceful_terminate_dispatch(proc.pid, kill_wait_ms=HOUR_MS) == (True, "not_running")
    assert_no_trace(proc.pid, leftover)
    assert poll_dispatch_status(proc.pid) == (False, 0)


def test_wait_after_a_poll_reaped_the_leader_stops_its_leftovers(backend: str, kids: Kids) -> None:
    """A poll reaped the leader; its session (sid == its pid) still has a member.

    While any process is in that session the kernel cannot reuse the pid, so the
    session is unambiguously the dispatch's, and ``stop_leftovers`` should reach it.
    """
    proc = kids.sh("sleep 60 & echo $!; exit 0", stdout=subprocess.PIPE)
    (leftover,) = procs.read_pids(proc, 1)
    try:
        assert procs.wait_until(lambda: not procs.alive(proc.pid))
        assert poll_dispatch_status(proc.pid) == (False, 0)  # reaps the leader
        result = wait(proc.pid, graceful_shutdown_ms=HOUR_MS)
        assert result.status is DispatchCompletionStatus.COMPLETED
        assert result.return_code == 0
        assert procs.session_pids(proc.pid) == [], "the leader's session outlived the wait"
        assert result.descendants_killed == 1
        assert_no_trace(leftover)
    finally:
        kill_own_orphan(leftover)


def test_terminate_of_a_reaped_leader_stops_its_session(backend: str, kids: Kids) -> None:
    """Like the unreaped case above, but the caller's ``Popen.wait`` reaped the leader."""
    proc = kids.sh("sleep 60 & echo $!; exit 0", stdout=subprocess.PIPE)
    (leftover,) = procs.read_pids(proc, 1)
    try:
        assert proc.wait() == 0
        ok_method = graceful_terminate_dispatch(proc.pid, kill_wait_ms=HOUR_MS)
        assert ok_method == (True, "not_running")
        assert procs.session_pids(proc.pid) == [], "the leader's session outlived the stop"
        assert_no_trace(leftover)
    finally:
        kill_own_orphan(leftover)


# --------------------------------------------------------------------------------------
# graceful_terminate_dispatch


def test_terminate_an_exited_and_reaped_pid(backend: str, kids: Kids) -> None:
    proc = kids.sh("exit 0")
    proc.wait()
    assert graceful_terminate_dispatch(proc.pid) == (True, "not_running")


def test_terminate_an_exited_unreaped_child(backend: str, kids: Kids) -> None:
    proc = kids.sh("exit 4")
    assert procs.wait_until(lambda: procs.state(proc.pid) == "Z")
    assert graceful_terminate_dispatch(proc.pid) == (True, "not_running")
    assert_no_trace(proc.pid)
    assert poll_dispatch_status(proc.pid) == (False, 4)


def test_terminate_a_cooperative_process(backend: str, kids: Kids) -> None:
    proc = kids.argv(["sleep", "60"])
    assert graceful_terminate_dispatch(proc.pid, "sess-1") == (True, "sigterm")
    assert_no_trace(proc.pid)
    assert poll_dispatch_status(proc.pid) == (False, -15)


def test_terminate_a_process_ignoring_sigterm(backend: str, kids: Kids) -> None:
    proc = kids.py(TERM_IGNORING, stdout=subprocess.PIPE)
    read_line(proc)
    assert graceful_terminate_dispatch(proc.pid, kill_wait_ms=200) == (True, "sigkill")
    assert_no_trace(proc.pid)
    assert poll_dispatch_status(proc.pid) == (False, -9)


def test_terminate_a_stopped_process(backend: str, kids: Kids) -> None:
    proc = kids.argv(["sleep", "60"])
    os.kill(proc.pid, signal.SIGSTOP)  # our own child
    wait_stopped(proc.pid)
    assert graceful_terminate_dispatch(proc.pid, kill_wait_ms=HOUR_MS) == (True, "sigterm")
    assert_no_trace(proc.pid)


def test_terminate_whole_tree_by_default(backend: str, kids: Kids) -> None:
    proc = kids.sh("sleep 60 & echo $!; sleep 60 & echo $!; wait", stdout=subprocess.PIPE)
    children = procs.read_pids(proc, 2)
    assert graceful_terminate_dispatch(proc.pid) == (True, "sigterm")
    assert procs.session_pids(proc.pid) == []
    assert_no_trace(proc.pid, *children)


def test_terminate_leader_only(backend: str, kids: Kids) -> None:
    proc = kids.sh("sleep 60 & echo $!; wait", stdout=subprocess.PIPE)
    (child,) = procs.read_pids(proc, 1)
    assert graceful_terminate_dispatch(proc.pid, use_process_group=False) == (True, "sigterm")
    assert procs.state(proc.pid) is None
    assert procs.alive(child)  # only the leader was stopped
    # The orphan came back to this process (a subreaper); stop it on its own.
    assert graceful_terminate_dispatch(child, use_process_group=False) == (True, "sigterm")
    assert_no_trace(child)


@pytest.mark.timeout(30)
def test_terminate_wait_is_event_driven(backend: str, kids: Kids) -> None:
    """An hour-long kill wait returns as soon as the cooperative process has gone."""
    proc = kids.sh("sleep 60 & echo $!; wait", stdout=subprocess.PIPE)
    (child,) = procs.read_pids(proc, 1)
    assert graceful_terminate_dispatch(proc.pid, kill_wait_ms=HOUR_MS) == (True, "sigterm")
    assert_no_trace(proc.pid, child)


def test_terminate_does_not_touch_a_process_outside_the_tree(backend: str, kids: Kids) -> None:
    bystander = kids.argv(["sleep", "60"])
    proc = kids.sh("sleep 60 & echo $!; wait", stdout=subprocess.PIPE)
    (child,) = procs.read_pids(proc, 1)
    assert graceful_terminate_dispatch(proc.pid) == (True, "sigterm")
    assert_no_trace(proc.pid, child)
    assert procs.state(bystander.pid) == "S"
    assert graceful_terminate_dispatch(bystander.pid) == (True, "sigterm")
    assert_no_trace(bystander.pid)


LEADER_THREAD_GONE = (
    "import ctypes, subprocess, threading, time\n"
    "child = subprocess.Popen(['sleep', '60'])\n"
    "print(child.pid, flush=True)\n"
    "threading.Thread(target=time.sleep, args=(60,)).start()\n"
    "ctypes.CDLL(None).pthread_exit(None)\n"
)


def _threads(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return 0


def test_a_leader_whose_main_thread_exited_still_runs(backend: str, kids: Kids) -> None:
    """The main thread exits, another thread and a child run on: the dispatch has not ended.

    /proc shows such a leader as a zombie (``Z``); only an empty thread group
    is an exit. A timeout then stops the process and its child.
    """
    proc = kids.py(LEADER_THREAD_GONE, stdout=subprocess.PIPE)
    child = int(read_line(proc))
    assert procs.wait_until(lambda: procs.state(proc.pid) == "Z" and _threads(proc.pid) > 1)
    assert poll_dispatch_status(proc.pid) == (True, None)
    result = wait(proc.pid, timeout_ms=SHORT_MS)
    assert result.status is DispatchCompletionStatus.TIMEOUT, result.error
    assert result.return_code == -signal.SIGTERM
    assert result.descendants_killed >= 1
    kill_own_orphan(child)
    assert_no_trace(proc.pid, child)


@pytest.mark.parametrize("face", ["blocking", "monitor", "aio"])
def test_a_grace_period_of_years_is_a_duration_like_any_other(
    backend: str, kids: Kids, face: str
) -> None:
    """A grace far beyond what one epoll or poll call can wait (2**31 ms) is waited in slices.

    SIGTERM ends the sleep at once, so the grace is never used up: the point is
    that passing it to the kernel neither overflows nor leaks the stop's pins.
    """
    from ralph_reaper import DispatchMonitor, aio

    proc = kids.sh("sleep 60")
    years_ms = 1e13
    options: dict[str, Any] = {"timeout_ms": SHORT_MS, "graceful_shutdown_ms": years_ms}
    if face == "blocking":
        result = wait(proc.pid, **options)
    elif face == "monitor":
        with DispatchMonitor() as monitor:
            result = monitor.watch(dispatch(proc.pid), "pt-1", **options).result(timeout=30)
    else:
        import asyncio

        result = asyncio.run(
            aio.wait_for_dispatch_completion(dispatch(proc.pid), "pt-1", **options)
        )
    assert result.status is DispatchCompletionStatus.TIMEOUT, result.error
    assert result.termination_method == "sigterm"
    assert result.return_code == -signal.SIGTERM
    proc.returncode = -signal.SIGTERM  # reaped by the package
    assert_no_trace(proc.pid)


FORK_AND_EXIT_CHAIN = (
    "import os, signal, subprocess, sys\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "subprocess.Popen(['sleep', '60'])  # the leader's own work\n"
    "if os.fork() == 0:\n"
    "    while True:  # the chain: a new pid every few microseconds\n"
    "        if os.fork():\n"
    "            os._exit(0)\n"
    "signal.signal(signal.SIGTERM, signal.SIG_DFL)\n"
    "print('ready', flush=True)\n"
    "signal.pause()\n"
)


@pytest.mark.parametrize("face", ["wait", "terminate"])
def test_a_fork_and_exit_chain_is_stopped_and_reported_so(
    backend: str, kids: Kids, face: str
) -> None:
    """A member that forks and exits in a loop (its pid never stays) ignoring SIGTERM.

    SIGKILL ends it between two forks; the stop must say it succeeded, not
    that it "could not be stopped" with no survivor named.
    """
    proc = kids.py(FORK_AND_EXIT_CHAIN, stdout=subprocess.PIPE)
    assert read_line(proc) == b"ready\n"
    if face == "wait":
        result = wait(proc.pid, timeout_ms=SHORT_MS, graceful_shutdown_ms=300)
        assert result.status is DispatchCompletionStatus.TIMEOUT, result.error
        assert result.return_code == -signal.SIGTERM
    else:
        assert graceful_terminate_dispatch(proc.pid, kill_wait_ms=300) == (True, "sigterm")
    proc.returncode = -signal.SIGTERM  # reaped by the package
