"""Bad input: a clear exception or an ERROR result, and nothing signalled or reaped.

The canaries are processes this test started: a live ``sleep 60`` in a new
session, and an exited child left unreaped (a zombie). After every bad call
the first must still run and the second must still wait for its parent (us),
so a bad pid handed to ``kill``/``waitpid`` (0, -1, True ...) would show.
"""

from __future__ import annotations

import errno
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

import procs
from ralph_reaper import (
    DispatchCompletionStatus,
    backends,
    graceful_terminate_dispatch,
    poll_dispatch_status,
    wait_for_dispatch_completion,
)

#: (bad pid, the exception poll_dispatch_status and graceful_terminate_dispatch raise)
BAD_PIDS: list[tuple[Any, type[Exception]]] = [
    (0, ValueError),
    (-1, ValueError),
    (-2, ValueError),
    (2**64, ValueError),
    (2**31, ValueError),
    (True, TypeError),
    (False, TypeError),
    ("123", TypeError),
    (None, TypeError),
    (1.5, TypeError),
    (123.0, TypeError),
    (b"123", TypeError),
]
BAD_PID_IDS = [repr(p) for p, _ in BAD_PIDS]

#: Values that are not a duration in milliseconds, for any duration.
BAD_MS: list[tuple[Any, type[Exception]]] = [
    (math.nan, ValueError),
    (math.inf, ValueError),
    (-math.inf, ValueError),
    (True, TypeError),
    (False, TypeError),
    ("100", TypeError),
]
#: Negative durations: refused for the package's own durations only. Upstream's
#: (``timeout_ms``, ``kill_wait_ms``...) keep upstream's meaning: no timeout, no wait.
NEGATIVE_MS: list[tuple[Any, type[Exception]]] = [(-1, ValueError), (-0.5, ValueError)]
UPSTREAM_MS = {"timeout_ms", "poll_interval_ms", "graceful_shutdown_ms", "kill_wait_ms"}


def bad_durations(*names: str) -> list[Any]:
    """(name, value, exception) for every duration named, as pytest params."""
    return [
        pytest.param(name, value, exc, id=f"{name}={value!r}")
        for name in names
        for value, exc in BAD_MS + ([] if name in UPSTREAM_MS else NEGATIVE_MS)
    ]


class Canaries:
    def __init__(self) -> None:
        self.live = procs.spawn("exec sleep 60")
        self.zombie = procs.spawn("exit 3")
        assert procs.wait_until(lambda: procs.state(self.zombie.pid) == "Z")

    def check(self) -> None:
        """Neither canary was touched: the live one runs, the zombie is still ours to reap."""
        assert procs.state(self.live.pid) in ("R", "S", "D"), "the live canary was disturbed"
        assert procs.state(self.zombie.pid) == "Z", "the zombie canary was reaped by someone"

    def close(self) -> None:
        # Cleaned up by their own Popen objects: this also proves nobody reaped them.
        if self.live.poll() is None:
            self.live.terminate()
        assert self.live.wait() == -15
        assert self.zombie.wait() == 3


@pytest.fixture
def canaries() -> Iterator[Canaries]:
    c = Canaries()
    try:
        yield c
    finally:
        c.close()


# --------------------------------------------------------------------------------------
# poll_dispatch_status


@pytest.mark.parametrize("pid, exc", BAD_PIDS, ids=BAD_PID_IDS)
def test_poll_rejects_bad_pids(backend: str, canaries: Canaries, pid: Any, exc: type) -> None:
    with pytest.raises(exc):
        poll_dispatch_status(pid)
    canaries.check()


# --------------------------------------------------------------------------------------
# graceful_terminate_dispatch


@pytest.mark.parametrize("pid, exc", BAD_PIDS, ids=BAD_PID_IDS)
def test_terminate_rejects_bad_pids(backend: str, canaries: Canaries, pid: Any, exc: type) -> None:
    with pytest.raises(exc):
        graceful_terminate_dispatch(pid, kill_wait_ms=100)
    canaries.check()


def test_terminate_refuses_init_and_itself(backend: str, canaries: Canaries) -> None:
    for pid in (1, os.getpid()):
        with pytest.raises(ValueError):
            graceful_terminate_dispatch(pid, kill_wait_ms=100)
        with pytest.raises(ValueError):
            graceful_terminate_dispatch(pid, None, None, 100.0, False)
    canaries.check()


def _kernel_threads() -> list[int]:
    """kthreadd (pid 2 where the PID namespace is the host's) and a few of its children."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    fields = f.read().rsplit(b")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[6]) & 0x00200000:  # PF_KTHREAD
                found.append(int(name))
    return found[:3]


def test_kernel_threads_are_refused_everywhere(backend: str, canaries: Canaries) -> None:
    # pid 2 is refused even where it is not kthreadd (a PID namespace): the
    # kernel's own threads are never a dispatch, and walking them means nothing.
    for pid in sorted({2, *_kernel_threads()}):
        with pytest.raises(ValueError, match="kernel thread"):
            graceful_terminate_dispatch(pid, kill_wait_ms=100)
        result = wait_for_dispatch_completion(SimpleNamespace(pid=pid, session_id="s"), "pt-1")
        assert result.status is DispatchCompletionStatus.ERROR
        assert "kernel thread" in (result.error or "")
    canaries.check()


@pytest.mark.parametrize("name, value, exc", bad_durations("kill_wait_ms", "eof_wait_ms"))
def test_terminate_rejects_bad_durations(
    backend: str, canaries: Canaries, name: str, value: Any, exc: type
) -> None:
    """Aimed at the live canary: a check made after the first signal would kill it."""
    with pytest.raises(exc):
        graceful_terminate_dispatch(canaries.live.pid, **{name: value})
    canaries.check()


# --------------------------------------------------------------------------------------
# wait_for_dispatch_completion


@pytest.mark.parametrize(
    "dispatch_result",
    [
        SimpleNamespace(pid=None, session_id="s"),
        SimpleNamespace(session_id="s"),
        object(),
        None,
    ],
    ids=["pid-None", "no-pid-attribute", "object", "None"],
)
def test_wait_without_a_pid_is_an_error_result(
    backend: str, canaries: Canaries, dispatch_result: Any
) -> None:
    result = wait_for_dispatch_completion(dispatch_result, "pt-1", timeout_ms=100)
    assert result.status is DispatchCompletionStatus.ERROR
    assert result.error == "No PID available"
    assert result.pid is None
    assert result.return_code is None
    assert result.ticket_id == "pt-1"
    assert result.backend == backend
    canaries.check()


@pytest.mark.parametrize("pid", [True, False, "123", 0, -1, 1, 2**64, 1.5, b"1"], ids=repr)
def test_wait_with_a_bad_pid_is_an_error_result(backend: str, canaries: Canaries, pid: Any) -> None:
    result = wait_for_dispatch_completion(
        SimpleNamespace(pid=pid, session_id="s"), "pt-1", timeout_ms=1, graceful_shutdown_ms=1
    )
    assert result.status is DispatchCompletionStatus.ERROR
    assert result.error
    assert result.return_code is None
    assert result.termination_method == "natural"
    assert result.timed_out is False
    canaries.check()


def test_wait_on_its_own_pid_is_an_error_result(backend: str, canaries: Canaries) -> None:
    result = wait_for_dispatch_completion(
        SimpleNamespace(pid=os.getpid(), session_id="s"), "pt-1", 1, 1000.0, None, 1
    )
    assert result.status is DispatchCompletionStatus.ERROR
    assert result.error
    assert result.timed_out is False
    canaries.check()


@pytest.mark.parametrize(
    "name, value, exc",
    bad_durations("timeout_ms", "poll_interval_ms", "graceful_shutdown_ms", "eof_wait_ms"),
)
def test_wait_rejects_bad_durations(
    backend: str, canaries: Canaries, name: str, value: Any, exc: type
) -> None:
    kwargs: dict[str, Any] = {"timeout_ms": 1, "graceful_shutdown_ms": 1, name: value}
    with pytest.raises(exc):
        wait_for_dispatch_completion(
            SimpleNamespace(pid=canaries.live.pid, session_id="s"), "pt-1", **kwargs
        )
    canaries.check()


def test_dispatch_result_from_another_module(backend: str) -> None:
    """Any object with ``.pid`` and ``.session_id`` will do; ``session_id`` may be missing."""
    for dispatch_result, session_id in [
        (lambda pid: SimpleNamespace(pid=pid, session_id="sess-9"), "sess-9"),
        (lambda pid: SimpleNamespace(pid=pid), ""),
    ]:
        proc = procs.spawn("exit 3")
        result = wait_for_dispatch_completion(dispatch_result(proc.pid), "pt-9")
        assert result.status is DispatchCompletionStatus.ERROR
        assert result.error == "Process exited with code 3"
        assert (result.return_code, result.pid) == (3, proc.pid)
        assert (result.ticket_id, result.session_id) == ("pt-9", session_id)
        assert procs.state(proc.pid) is None  # reaped by the package
        proc.returncode = 3  # tell Popen, so it never waits on a pid that may be reused


# --------------------------------------------------------------------------------------
# The caller's own session and process group


OWN_SESSION = """
import os, sys
from types import SimpleNamespace
from ralph_reaper import graceful_terminate_dispatch, wait_for_dispatch_completion
print(os.getpid(), flush=True)
leader = os.getsid(0)
assert leader == os.getpgrp() == os.getppid(), (leader, os.getpgrp(), os.getppid())
if sys.argv[1] == "terminate":
    try:
        got = graceful_terminate_dispatch(leader, kill_wait_ms=100)
        print("returned", got, flush=True)
    except (TypeError, ValueError):
        print("refused", flush=True)
else:
    result = wait_for_dispatch_completion(
        SimpleNamespace(pid=leader, session_id="s"), "t", timeout_ms=1, graceful_shutdown_ms=100
    )
    print(result.status.value, result.termination_method, flush=True)
"""


@pytest.mark.parametrize(
    "call, expected",
    [("terminate", "refused"), ("wait", "error natural")],
    ids=["terminate", "wait"],
)
def test_never_stops_the_callers_own_session_or_group(
    backend: str, call: str, expected: str
) -> None:
    """Inside a tree the test started: a caller asks to stop its own session leader.

    The leader (a shell) is also the caller's process-group leader and parent.
    The design forbids signalling the caller's own group or session: the call
    must be refused (an exception, or an ERROR result from the wait), and the
    shell must survive, print ``survived`` and exit 0.
    """
    env = procs.child_env(RALPH_REAPER_BACKEND=backend)
    proc = subprocess.Popen(
        [
            "/bin/sh",
            "-c",
            'echo $$; "$0" -c "$1" "$2"; echo survived',
            sys.executable,
            OWN_SESSION,
            call,
        ],
        stdout=subprocess.PIPE,
        env=env,
        start_new_session=True,
    )
    assert proc.stdout is not None
    with proc.stdout:
        out = proc.stdout.read().decode().splitlines()  # EOF: both have exited
    code = proc.wait()
    caller = int(out[1])
    # When the shell died first, the caller was reparented to us (a subreaper): reap it.
    assert procs.wait_until(lambda: procs.state(caller) in (None, "Z"))
    if procs.state(caller) == "Z" and caller in procs.descendants_of(os.getpid()):
        os.waitpid(caller, 0)
    assert out[0] == str(proc.pid)
    assert out[2:] == [expected, "survived"]
    assert code == 0


@pytest.mark.parametrize("sid", [0, -1])
def test_session_listing_refuses_session_zero(backend: str, sid: int) -> None:
    # /proc shows session 0 for every process whose session leader is outside
    # this PID namespace; listing "session 0" would sweep unrelated processes.
    with pytest.raises(OSError) as info:
        backends.get().session_members(sid)
    assert info.value.errno == errno.EINVAL
