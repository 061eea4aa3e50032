"""Faults from the design's test matrix: signals interrupting waits, an application
SIGCHLD handler, another thread reaping children, subprocess reaping a dispatch
behind our back, and running out of file descriptors.

Where another party reaps the dispatch first, the pidfd backends still know its
exit (PIDFD_INFO_EXIT, Linux >= 6.15, read from the pidfd pinned before the
exit); the polling backend cannot, and must say "unknown" rather than guess.
"""

from __future__ import annotations

import gc
import os
import resource
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Optional

import pytest

import procs
from ralph_reaper import (
    DispatchCompletionStatus,
    DispatchResult,
    poll_dispatch_status,
    wait_for_dispatch_completion,
)
from ralph_reaper.backends import problems

HOUR_MS = 3_600_000.0


def _exit_info_kernel() -> bool:
    return problems()["pure"] is None and os.uname().release.split(".")[:2] >= ["6", "15"]


def _dispatch(pid: int) -> DispatchResult:
    return DispatchResult("sess", "pt-1", "launched", pid)


def _assert_code_or_unknown(backend: str, result: object, code: int) -> None:
    """The right code; on the polling backend an honest 'unknown' is also right."""
    rc = getattr(result, "return_code", None)
    if rc is None and backend == "polling":
        assert result.status is DispatchCompletionStatus.ERROR  # type: ignore[attr-defined]
        assert "unknown" in (result.error or "")  # type: ignore[attr-defined]
    else:
        assert rc == code


def _run_python(code: str, backend: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a child Python (argv[1] = backend) that imports the package under test."""
    env = procs.child_env()
    return subprocess.run(
        [sys.executable, "-c", code, backend], capture_output=True, text=True, env=env, timeout=60
    )


@pytest.fixture
def sigusr1_storm() -> Iterator[threading.Event]:
    """Send SIGUSR1 to this process every millisecond while the test runs (a no-op handler)."""
    hits: list[int] = []

    def handler(signum: int, _frame: Optional[FrameType]) -> None:
        hits.append(signum)

    previous = signal.signal(signal.SIGUSR1, handler)
    stop = threading.Event()

    def storm() -> None:
        while not stop.wait(0.001):
            os.kill(os.getpid(), signal.SIGUSR1)

    thread = threading.Thread(target=storm, daemon=True)
    thread.start()
    try:
        yield stop
    finally:
        stop.set()
        thread.join()
        signal.signal(signal.SIGUSR1, previous)
    assert hits, "the storm never interrupted anything"


def test_signals_interrupting_the_wait_change_nothing(
    backend: str, kids: procs.Kids, sigusr1_storm: threading.Event
) -> None:
    proc = kids.sh("sleep 0.3; exit 4")
    result = wait_for_dispatch_completion(_dispatch(proc.pid), "pt-1", poll_interval_ms=HOUR_MS)
    assert result.return_code == 4
    stopper = kids.sh("exec sleep 60")
    result = wait_for_dispatch_completion(
        _dispatch(stopper.pid), "pt-1", timeout_ms=200, graceful_shutdown_ms=HOUR_MS
    )
    assert result.status is DispatchCompletionStatus.TIMEOUT
    assert result.termination_method == "sigterm"


def test_an_application_sigchld_handler_does_not_disturb_the_wait(
    backend: str, kids: procs.Kids
) -> None:
    seen: list[int] = []
    previous = signal.signal(signal.SIGCHLD, lambda signum, _frame: seen.append(signum))
    try:
        proc = kids.sh("sleep 0.2; exit 6")
        result = wait_for_dispatch_completion(_dispatch(proc.pid), "pt-1")
    finally:
        signal.signal(signal.SIGCHLD, previous)
    assert result.return_code == 6
    assert result.status is DispatchCompletionStatus.ERROR


def test_another_thread_reaping_every_child(backend: str, kids: procs.Kids) -> None:
    if backend != "polling" and not _exit_info_kernel():
        pytest.skip("needs PIDFD_INFO_EXIT (Linux >= 6.15) to know an exit reaped elsewhere")
    proc = kids.sh("sleep 0.2; exit 9")
    pid = proc.pid
    reaped: list[tuple[int, int]] = []

    def reaper() -> None:
        # Like an application's own reaper thread: waitpid(-1) until no child is left.
        while True:
            try:
                got, status = os.waitpid(-1, 0)
            except ChildProcessError:
                return
            reaped.append((got, status))

    result_box: list[object] = []
    waiter = threading.Thread(
        target=lambda: result_box.append(wait_for_dispatch_completion(_dispatch(pid), "pt-1"))
    )
    waiter.start()
    procs.wait_until(lambda: procs.state(pid) in ("Z", None))
    thief = threading.Thread(target=reaper)
    thief.start()
    thief.join()
    waiter.join()
    proc.returncode = 9  # reaped by one of the two; Popen must not wait for it
    _assert_code_or_unknown(backend, result_box[0], 9)


def _holds_pidfd_of(pid: int) -> bool:
    """Whether this process holds a pidfd of ``pid`` (its fdinfo names the pid)."""
    for fd in os.listdir("/proc/self/fd"):
        try:
            with open(f"/proc/self/fdinfo/{fd}") as f:
                if f"Pid:\t{pid}\n" in f.read():
                    return True
        except OSError:
            continue
    return False


def test_subprocess_cleanup_reaping_the_dispatch_first(backend: str) -> None:
    if backend != "polling" and not _exit_info_kernel():
        pytest.skip("needs PIDFD_INFO_EXIT (Linux >= 6.15) to know an exit reaped elsewhere")
    proc = subprocess.Popen(["/bin/sh", "-c", "sleep 0.5; exit 12"], start_new_session=True)
    pid = proc.pid
    del proc
    gc.collect()  # the Popen object is gone: subprocess keeps the pid in _active

    result_box: list[object] = []
    waiter = threading.Thread(
        target=lambda: result_box.append(wait_for_dispatch_completion(_dispatch(pid), "pt-1"))
    )
    waiter.start()
    if backend != "polling":  # the wait has pinned it before anyone may reap it
        assert procs.wait_until(lambda: _holds_pidfd_of(pid), timeout=30)
    procs.wait_until(lambda: procs.state(pid) in ("Z", None))
    # Any later Popen runs subprocess._cleanup, which reaps finished _active children.
    subprocess.run(["true"], check=True)
    waiter.join()
    _assert_code_or_unknown(backend, result_box[0], 12)


def test_out_of_file_descriptors_raises_the_soft_limit(backend: str) -> None:
    if backend == "polling":
        pytest.skip("the polling backend opens no pidfds, so it never meets this EMFILE")
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 64:
        pytest.skip(f"the hard open-file limit ({hard}) leaves nothing to raise to")
    # In a child Python: fill the fd table up to a lowered soft limit, then wait; the
    # package raises the soft limit to the hard one once and carries on.
    code = (
        "import os, resource, subprocess, sys\n"
        "from ralph_reaper import DispatchResult, wait_for_dispatch_completion\n"
        "from ralph_reaper.backends import using\n"
        "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
        "p = subprocess.Popen(['sh', '-c', 'sleep 0.2; exit 7'], start_new_session=True)\n"
        "with using(sys.argv[1]):\n"
        "    wait_for_dispatch_completion(DispatchResult('s', 't', 'launched', 1), 't')\n"
        "    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir('/proc/self/fd')), hard))\n"
        "    held = []\n"
        "    try:\n"
        "        while True:\n"
        "            held.append(os.open('/dev/null', os.O_RDONLY))\n"
        "    except OSError:\n"
        "        pass\n"
        "    r = wait_for_dispatch_completion(DispatchResult('s', 't', 'launched', p.pid), 't')\n"
        "print(r.return_code, resource.getrlimit(resource.RLIMIT_NOFILE)[0] == hard)\n"
    )
    done = _run_python(code, backend)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["7", "True"]


def test_with_no_fd_left_a_live_process_is_never_reported_gone(backend: str) -> None:
    # Soft and hard limit both at the fd table's size: nothing can be raised, no pidfd
    # opened, no /proc file read. The poll must fail loudly, not answer "not running".
    code = (
        "import errno, os, resource, subprocess, sys\n"
        "from ralph_reaper import poll_dispatch_status\n"
        "from ralph_reaper.backends import using\n"
        "p = subprocess.Popen(['sleep', '30'], start_new_session=True)\n"
        "with using(sys.argv[1]):\n"
        "    assert poll_dispatch_status(p.pid) == (True, None)\n"
        "    from ralph_reaper.exits import BOOK\n"
        "    BOOK.clear()\n"
        "    n = len(os.listdir('/proc/self/fd'))\n"
        "    resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))\n"
        "    held = []\n"
        "    try:\n"
        "        while True:\n"
        "            held.append(os.open('/dev/null', os.O_RDONLY))\n"
        "    except OSError:\n"
        "        pass\n"
        "    try:\n"
        "        answer = poll_dispatch_status(p.pid)\n"
        "    except OSError as exc:\n"
        "        answer = errno.errorcode[exc.errno]\n"
        "    for fd in held:\n"
        "        os.close(fd)\n"
        "    p.kill()\n"
        "    p.wait()\n"
        "print(answer)\n"
    )
    done = _run_python(code, backend)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "EMFILE", done.stdout


def test_a_member_of_another_user_is_a_survivor_not_an_exception(backend: str) -> None:
    # The host is not root (it drops to nobody, keeping root as its saved uid so
    # that it can clean up); the leader and one member run as nobody, one member
    # as root. The stop must signal what it may, name the root member as the
    # survivor, return "failed", and leak no pidfd.
    code = (
        "import json, os, subprocess, sys, time\n"
        "from ralph_reaper import DispatchResult, wait_for_dispatch_completion\n"
        "from ralph_reaper import graceful_terminate_dispatch\n"
        "from ralph_reaper.backends import using\n"
        "nobody = ['setpriv', '--reuid=65534', '--regid=65534', '--clear-groups']\n"
        "inner = ' '.join(nobody) + ' sh -c \"sleep 300 & wait\"'\n"
        "out = {}\n"
        "import ctypes\n"
        "ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # a subreaper: its orphans come back here\n"
        "with using(sys.argv[1]):\n"
        "    for face in ('terminate', 'wait'):\n"
        "        p = subprocess.Popen(['sh', '-c', 'sleep 300 & exec ' + inner],\n"
        "                             start_new_session=True, stdout=subprocess.DEVNULL,\n"
        "                             stderr=subprocess.DEVNULL)\n"
        "        time.sleep(0.3)\n"
        "        with open(f'/proc/{p.pid}/task/{p.pid}/children') as f:\n"
        "            started = [int(x) for x in f.read().split()]\n"
        "        os.setresuid(65534, 65534, 0)\n"
        "        fds = len(os.listdir('/proc/self/fd'))\n"
        "        if face == 'terminate':\n"
        "            out[face] = graceful_terminate_dispatch(p.pid, kill_wait_ms=100)\n"
        "        else:\n"
        "            d = DispatchResult('s', 't', 'launched', p.pid)\n"
        "            r = wait_for_dispatch_completion(d, 't', timeout_ms=50,\n"
        "                                             graceful_shutdown_ms=100)\n"
        "            out[face] = [r.status.value, r.termination_method, r.error]\n"
        "        out[face + '_fds'] = len(os.listdir('/proc/self/fd')) - fds\n"
        "        os.setresuid(0, 0, 0)\n"
        "        for pid in started:\n"
        "            try:\n"
        "                os.kill(pid, 9)\n"
        "            except ProcessLookupError:\n"
        "                pass\n"
        "        p.kill()\n"
        "        p.wait()\n"
        "        for _ in started:\n"
        "            try:\n"
        "                os.waitpid(-1, 0)\n"
        "            except ChildProcessError:\n"
        "                break\n"
        "print(json.dumps(out))\n"
    )
    done = _run_python(code, backend)
    assert done.returncode == 0, done.stderr
    out = __import__("json").loads(done.stdout)
    assert out["terminate"] == [False, "failed"]
    status, method, error = out["wait"]
    assert (status, method) == ("error", "failed")
    assert "survivors: [" in error and "survivors: []" not in error
    assert out["terminate_fds"] == 0 and out["wait_fds"] == 0


def test_a_reap_under_way_on_another_thread_is_waited_for(backend: str, kids: procs.Kids) -> None:
    """Two pins of one process: one thread reaps it, the other must not call it unknown.

    The kernel refuses ``waitid`` on a task that another thread has claimed
    but not yet released, and until that thread returns nothing in this
    process says how it exited. The window is a few instructions wide and
    cannot be held open from outside, so the test holds it open from inside:
    it announces its reap, reaps with ``wait4`` itself, and notes the status
    only once the second pin is seen waiting for it.
    """
    from ralph_reaper.backends import get
    from ralph_reaper.backends.base import ExitStatus, Rusage
    from ralph_reaper.pins import REAPED, Pin

    proc = kids.sh("exit 7")
    assert procs.wait_until(lambda: procs.state(proc.pid) == "Z")
    mine = Pin.open(get(), proc.pid)
    theirs = Pin.open(get(), proc.pid)
    assert mine is not None and theirs is not None
    seen: list[Optional[ExitStatus]] = []
    try:
        with REAPED.reaping(mine):
            got, status, ru = os.wait4(proc.pid, 0)
            proc.returncode = 7  # reaped here; Popen must not wait for it
            reader = threading.Thread(target=lambda: seen.append(theirs.collect()))
            reader.start()
            assert procs.wait_until(lambda: REAPED.readers_waiting > 0 or not reader.is_alive())
            assert reader.is_alive(), f"reported before the reap was noted: {seen}"
            mine.set_exit(ExitStatus(status, Rusage(ru.ru_utime, ru.ru_stime, ru.ru_maxrss)), True)
        reader.join()
    finally:
        mine.close()
        theirs.close()
    assert got == proc.pid
    assert seen[0] is not None and seen[0].status == 7 << 8
    assert seen[0].rusage is not None, "the status noted by the reaper carries its rusage"


def test_concurrent_polls_and_waits_of_one_pid_all_know_its_code(
    backend: str, kids: procs.Kids
) -> None:
    """Eight polling threads and two waits on one child: every one of them gets code 5."""
    proc = kids.sh("sleep 0.3; exit 5")
    polls: list[tuple[bool, Optional[int]]] = []
    waits: list[DispatchResult] = []

    def poller() -> None:
        while True:
            got = poll_dispatch_status(proc.pid)
            if not got[0]:
                polls.append(got)
                return

    def waiter() -> None:
        waits.append(wait_for_dispatch_completion(_dispatch(proc.pid), "pt-1"))

    threads = [threading.Thread(target=poller) for _ in range(8)]
    threads += [threading.Thread(target=waiter) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    proc.returncode = 5  # reaped by one of them; Popen must not wait for it
    assert polls == [(False, 5)] * 8
    assert [w.return_code for w in waits] == [5, 5], [w.error for w in waits]


def test_a_pin_stored_by_a_poll_that_lost_the_race_is_closed(
    backend: str, kids: procs.Kids
) -> None:
    """A poll that saw the child running stores its pin after another poll saw it exit.

    The two polls' interleaving cannot be forced from outside, so the test
    plays the late poll's part itself: it opens a pin while the child runs and
    stores it once the exit is recorded. The next poll must close it: nothing
    else would ever take it back.
    """
    from ralph_reaper.backends import get
    from ralph_reaper.exits import BOOK
    from ralph_reaper.pins import Pin

    proc = kids.sh("read _; exit 4", stdin=subprocess.PIPE)
    late = Pin.open(get(), proc.pid)
    assert late is not None
    assert proc.stdin is not None
    proc.stdin.close()
    assert procs.wait_until(lambda: procs.state(proc.pid) in ("Z", None))
    assert poll_dispatch_status(proc.pid) == (False, 4)
    proc.returncode = 4
    BOOK.hold(late)
    assert poll_dispatch_status(proc.pid) == (False, 4)
    assert BOOK.take(proc.pid) is None, "the late pin is still held"
    assert late.fd == -1, "the late pin's pidfd is still open"


@pytest.mark.timeout(240)
@pytest.mark.parametrize("face", ["monitor", "aio"])
def test_more_dispatches_than_file_descriptors(backend: str, face: str) -> None:
    """120 dispatches watched at once under a hard limit of 64 fds: every exit is reported.

    Pidfds stop short of the limit, and the dispatches past it are polled, so
    the /proc reads that polling needs still find a free descriptor.
    """
    code = (
        "import asyncio, resource, subprocess, sys\n"
        "from ralph_reaper import DispatchMonitor, DispatchResult, aio\n"
        "from ralph_reaper.backends import using\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))\n"
        "kids = [subprocess.Popen(['sh', '-c', 'sleep 0.5; exit 3'], start_new_session=True)\n"
        "        for _ in range(120)]\n"
        "ds = [DispatchResult('s', f't{i}', 'launched', p.pid) for i, p in enumerate(kids)]\n"
        "async def gather():\n"
        "    return await asyncio.gather(\n"
        "        *(aio.wait_for_dispatch_completion(d, d.ticket_id) for d in ds))\n"
        "with using(sys.argv[1]):\n"
        "    if sys.argv[2] == 'monitor':\n"
        "        with DispatchMonitor() as m:\n"
        "            futures = [m.watch(d, d.ticket_id) for d in ds]\n"
        "            results = [f.result(timeout=50) for f in futures]\n"
        "    else:\n"
        "        results = asyncio.run(gather())\n"
        "for p in kids:\n"
        "    p.returncode = 3  # reaped by the package\n"
        "print(sorted({(r.status.value, r.return_code) for r in results}))\n"
    )
    env = procs.child_env()
    done = subprocess.run(
        [sys.executable, "-c", code, backend, face],
        capture_output=True,
        text=True,
        env=env,
        timeout=200,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[('error', 3)]", done.stdout
