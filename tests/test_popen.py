"""``ralph_reaper.Popen``: ``subprocess.Popen``'s API, with the command under a keeper.

Each test runs on every backend: under ``native`` the command runs under a
keeper, under ``pure`` and ``polling`` in a session of its own (no keeper
then), and the object says which. What only a keeper can do (catch a daemon
that double-forked and called ``setsid``) is asserted on native and skipped
elsewhere, for that reason. Nothing asserts timing; ``pytest-timeout``
turns a hang into a failure.
"""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
from typing import Any

import pytest

import procs
from ralph_reaper import (
    DispatchCompletionStatus,
    DispatchResult,
    Popen,
    graceful_terminate_dispatch,
    poll_dispatch_status,
    wait_for_dispatch_completion,
)
from ralph_reaper.dispatches import REGISTRY
from ralph_reaper.keeper_path import keeper_path

pytestmark = pytest.mark.timeout(60)

PY = sys.executable
HOUR_MS = 3_600_000.0

#: Ignores SIGTERM, says so, then sleeps: only SIGKILL ends it.
TERM_IGNORING = (
    "import signal, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "print('ready', flush=True)\n"
    "time.sleep(60)\n"
)

#: Prints the pid of a daemon that double-forked and called setsid, then its own pid.
DAEMON = (
    "import os, sys, time\n"
    "r, w = os.pipe()\n"
    "mid = os.fork()\n"
    "if mid == 0:\n"
    "    os.setsid()\n"
    "    if os.fork() == 0:\n"
    "        os.write(w, b'%d\\n' % os.getpid())\n"
    "        time.sleep(60)\n"
    "    os._exit(0)\n"
    "os.waitpid(mid, 0)\n"
    "print(os.read(r, 64).decode().strip(), os.getpid(), flush=True)\n"
)


def expected_containment(backend: str) -> str:
    return "keeper" if backend == "native" and keeper_path() else "session"


def sh(script: str, **kwargs: Any) -> Popen[bytes]:
    return Popen(["/bin/sh", "-c", script], **kwargs)


def test_is_a_subprocess_popen_and_says_its_containment(backend: str) -> None:
    p = sh("exit 0")
    assert isinstance(p, subprocess.Popen)
    assert p.containment == expected_containment(backend)
    assert p.backend == backend
    assert p.wait() == 0
    assert p.returncode == 0


def test_returncode_mirrors_the_command(backend: str) -> None:
    assert sh("exit 3").wait() == 3
    assert sh("kill -9 $$").wait() == -9
    p = sh("exit 5")
    assert procs.wait_until(lambda: p.poll() is not None)
    assert (p.poll(), p.returncode) == (5, 5)


def test_command_pid_is_the_command(backend: str) -> None:
    p = Popen([PY, "-c", "import os; print(os.getpid(), flush=True)"], stdout=subprocess.PIPE)
    out, _ = p.communicate()
    assert int(out) == p.command_pid
    if p.containment == "keeper":
        assert p.command_pid != p.pid  # the keeper is the child; the command is its child
    else:
        assert p.command_pid == p.pid


def test_communicate_text_mode_and_pipes(backend: str) -> None:
    p = Popen(
        [
            PY,
            "-c",
            "import sys; d = sys.stdin.read(); print(d.upper()); print('e', file=sys.stderr)",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = p.communicate("hello")
    assert (out, err) == ("HELLO\n", "e\n")
    assert p.returncode == 0


def test_communicate_timeout_then_terminate(backend: str) -> None:
    p = sh("exec sleep 60", stdout=subprocess.PIPE)
    with pytest.raises(subprocess.TimeoutExpired) as info:
        p.communicate(timeout=0.2)
    assert info.value.cmd == ["/bin/sh", "-c", "exec sleep 60"]  # the command, not the keeper
    p.terminate()
    out, _ = p.communicate()
    assert out == b""
    assert p.returncode == -signal.SIGTERM


def test_wait_timeout_is_timeout_expired(backend: str) -> None:
    p = sh("exec sleep 60")
    with pytest.raises(subprocess.TimeoutExpired):
        p.wait(timeout=0.1)
    assert p.poll() is None
    p.kill()
    assert p.wait() == -signal.SIGKILL


def test_context_manager_waits_and_closes_pipes(backend: str) -> None:
    with Popen([PY, "-c", "print('x')"], stdout=subprocess.PIPE) as p:
        assert p.stdout is not None
        assert p.stdout.read() == b"x\n"
    assert p.returncode == 0
    assert p.stdout.closed


def test_terminate_sends_eof_first_where_it_holds_stdin(backend: str) -> None:
    # cat ends by itself on EOF: no signal was needed.
    p = Popen(["cat"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    p.terminate(grace_ms=HOUR_MS)
    assert p.wait() == 0
    assert p.stdin is not None and p.stdin.closed


def test_terminate_escalates_after_the_grace_keyword(backend: str) -> None:
    p = Popen([PY, "-c", TERM_IGNORING], stdout=subprocess.PIPE)
    assert p.stdout is not None and p.stdout.readline() == b"ready\n"
    p.terminate(grace_ms=200)
    assert p.wait() == -signal.SIGKILL
    p.stdout.close()


def test_terminate_stops_the_whole_tree(backend: str) -> None:
    p = sh("sleep 60 & echo $!; exec sleep 60", stdout=subprocess.PIPE)
    assert p.stdout is not None
    child = int(p.stdout.readline())
    assert procs.alive(child)
    p.terminate()
    assert p.wait() == -signal.SIGTERM
    assert not procs.alive(child)
    p.stdout.close()


def test_kill_kills_the_whole_tree(backend: str) -> None:
    p = sh("trap '' TERM; sleep 60 & echo $!; wait", stdout=subprocess.PIPE)
    assert p.stdout is not None
    child = int(p.stdout.readline())
    p.kill()
    assert p.wait() == -signal.SIGKILL
    assert not procs.alive(child)
    p.stdout.close()


def test_send_signal_reaches_the_command(backend: str) -> None:
    # The command turns SIGUSR1 into exit 7; the keeper would have died of it (-10).
    code = (
        "import signal, sys, time\n"
        "signal.signal(signal.SIGUSR1, lambda *a: sys.exit(7))\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    p = Popen([PY, "-c", code], stdout=subprocess.PIPE)
    assert p.stdout is not None and p.stdout.readline() == b"ready\n"
    p.send_signal(signal.SIGUSR1)
    assert p.wait() == 7
    p.send_signal(signal.SIGUSR1)  # after the exit: nothing, as subprocess
    p.stdout.close()


def test_missing_program_raises_as_subprocess_does(backend: str) -> None:
    with pytest.raises(FileNotFoundError) as info:
        Popen(["/nonexistent/program"], stdout=subprocess.PIPE)
    assert info.value.filename == "/nonexistent/program"
    with pytest.raises(FileNotFoundError):
        Popen(["true"], cwd="/nonexistent/dir")


def test_shell_and_executable(backend: str) -> None:
    assert Popen("exit $((2 + 3))", shell=True).wait() == 5
    p = Popen(["ignored", "-c", "print('via executable')"], executable=PY, stdout=subprocess.PIPE)
    assert p.communicate()[0] == b"via executable\n"


def test_bad_arguments_raise_before_anything_starts(backend: str) -> None:
    with pytest.raises(TypeError):
        Popen(["true"], no_such_argument=1)  # type: ignore[call-overload]


# ------------------------------------------------------------------ exact containment


def test_a_setsid_double_fork_daemon_is_stopped_with_the_command(backend: str) -> None:
    if expected_containment(backend) != "keeper":
        pytest.skip("only a keeper (native backend) catches a daemon that left tree and session")
    p = Popen([PY, "-c", DAEMON], stdout=subprocess.PIPE)
    assert p.stdout is not None
    daemon, command = (int(x) for x in p.stdout.readline().split())
    assert os.getsid(daemon) != os.getsid(command)  # it left the session, and the tree
    assert p.wait() == 0  # the command ended by itself; the keeper stopped the daemon
    assert not procs.alive(daemon)
    p.stdout.close()


def test_terminate_reaches_a_detached_daemon(backend: str) -> None:
    if expected_containment(backend) != "keeper":
        pytest.skip("only a keeper (native backend) catches a daemon that left tree and session")
    p = Popen([PY, "-c", DAEMON + "import time; time.sleep(60)\n"], stdout=subprocess.PIPE)
    assert p.stdout is not None
    daemon, _ = (int(x) for x in p.stdout.readline().split())
    p.terminate()
    assert p.wait() == -signal.SIGTERM
    assert not procs.alive(daemon)
    p.stdout.close()


# ------------------------------------------------------------------ the drop-in functions


def test_wait_for_dispatch_completion_on_a_popen_pid(backend: str) -> None:
    p = sh("sleep 60 & exit 4", start_new_session=True)
    dispatch = DispatchResult("s-1", "pt-1", "launched", p.pid)
    result = wait_for_dispatch_completion(dispatch, "pt-1", timeout_ms=HOUR_MS)
    assert result.status is DispatchCompletionStatus.ERROR
    assert result.return_code == 4
    assert result.containment == expected_containment(backend)
    assert result.descendants_killed == 1  # the background sleep, stopped either way
    assert p.wait() == 4  # the Popen knows, though the package reaped it
    assert poll_dispatch_status(p.pid) == (False, 4)
    assert REGISTRY.get(p.pid) is None


def test_timeout_of_a_popen_dispatch(backend: str) -> None:
    p = sh("exec sleep 60", start_new_session=True)
    result = wait_for_dispatch_completion(
        DispatchResult("s-1", "pt-1", "launched", p.pid), "pt-1", timeout_ms=100
    )
    assert result.status is DispatchCompletionStatus.TIMEOUT
    assert result.return_code == -signal.SIGTERM
    assert result.containment == expected_containment(backend)
    assert p.returncode == -signal.SIGTERM


def test_graceful_terminate_dispatch_on_a_popen_pid(backend: str) -> None:
    p = Popen(["cat"], stdin=subprocess.PIPE)
    assert graceful_terminate_dispatch(p.pid, kill_wait_ms=HOUR_MS) == (True, "eof")
    assert p.wait() == 0


def test_a_dropped_popen_is_still_waited_for_by_pid(backend: str) -> None:
    """The loop keeps only the pid; the package keeps the dispatch (and its keeper)."""
    pid = sh("exit 6").pid
    gc.collect()
    result = wait_for_dispatch_completion(DispatchResult("s", "pt-1", "launched", pid), "pt-1")
    assert (result.status, result.return_code) == (DispatchCompletionStatus.ERROR, 6)
    assert result.containment == expected_containment(backend)


def test_own_keywords_and_their_checks(backend: str) -> None:
    p = Popen([PY, "-c", TERM_IGNORING], stdout=subprocess.PIPE, grace_ms=100, eof_wait_ms=0)
    assert (p.grace_ms, p.eof_wait_ms, p.die_with_parent) == (100, 0, True)
    assert p.stdout is not None and p.stdout.readline() == b"ready\n"
    p.terminate()  # the grace given to the constructor
    assert p.wait() == -signal.SIGKILL
    p.stdout.close()
    for bad in ({"grace_ms": -1}, {"eof_wait_ms": float("nan")}, {"die_with_parent": 1}):
        with pytest.raises((TypeError, ValueError)):
            Popen(["true"], **bad)  # type: ignore[call-overload]


def test_a_lost_keeper_still_leaves_nothing_behind(backend: str) -> None:
    """A keeper SIGKILLed (by someone else) stopped nothing: ``wait`` stops what it kept."""
    if expected_containment(backend) != "keeper":
        pytest.skip("only a dispatch under a keeper (native backend) can lose its keeper")
    p = sh("sleep 60 & echo $!; echo $$; wait", stdout=subprocess.PIPE)
    assert p.stdout is not None
    child, command = int(p.stdout.readline()), int(p.stdout.readline())
    assert command == p.command_pid
    fd = os.pidfd_open(p.pid)  # the keeper: this test's own child
    try:
        signal.pidfd_send_signal(fd, signal.SIGKILL)
    finally:
        os.close(fd)
    assert p.wait() == -signal.SIGKILL  # the keeper's own death, as subprocess reports it
    assert not procs.alive(child) and not procs.alive(command)
    p.stdout.close()
