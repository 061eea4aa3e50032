"""One test per defect measured in the module this package replaces.

Each shows the package doing the opposite of the defect, on every backend.
Event-driven waits are shown without timing assertions: the poll interval or
kill wait is set to an hour, so an implementation that sleeps between checks
would hit the test timeout instead of returning.
"""

from __future__ import annotations

import subprocess

import pytest

from procs import alive, read_pids, session_pids, spawn, state, wait_until
from ralph_reaper import (
    DispatchCompletionStatus,
    DispatchResult,
    graceful_terminate_dispatch,
    poll_dispatch_status,
    wait_for_dispatch_completion,
)

HOUR_MS = 3_600_000.0


def _dispatch(proc: subprocess.Popen[bytes]) -> DispatchResult:
    return DispatchResult(session_id="sess", ticket_id="pt-1", status="launched", pid=proc.pid)


def test_exit_is_noticed_without_waiting_for_the_poll_interval(backend: str) -> None:
    # The old module found this exit at its next 1 s poll; an hour-long interval
    # would hang here if the wait depended on it.
    proc = spawn("sleep 0.3; exit 0")
    result = wait_for_dispatch_completion(_dispatch(proc), "pt-1", poll_interval_ms=HOUR_MS)
    assert result.status is DispatchCompletionStatus.COMPLETED
    assert result.return_code == 0
    assert result.termination_method == "natural"


def test_timeout_stops_background_children_too(backend: str) -> None:
    # The old module called os.killpg(-pid), got EINVAL, and left both children running.
    proc = spawn("sleep 60 & echo $!; sleep 60 & echo $!; wait", stdout=subprocess.PIPE)
    children = read_pids(proc, 2)
    assert all(alive(pid) for pid in children)
    result = wait_for_dispatch_completion(
        _dispatch(proc), "pt-1", timeout_ms=100, graceful_shutdown_ms=HOUR_MS
    )
    proc.stdout.close()  # type: ignore[union-attr]
    assert result.status is DispatchCompletionStatus.TIMEOUT
    assert result.termination_method == "sigterm"
    assert result.return_code == -15
    assert result.descendants_killed == 2
    assert not [pid for pid in children if alive(pid)]
    assert session_pids(proc.pid) == []
    assert all(state(pid) is None for pid in [proc.pid, *children]), "zombies left"


class WarnOnlyLogger:
    """The loop's logger: ``warn`` but no ``warning``."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []

    def info(self, msg: str) -> None:
        self.lines.append(("info", msg))

    def debug(self, msg: str) -> None:
        self.lines.append(("debug", msg))

    def error(self, msg: str) -> None:
        self.lines.append(("error", msg))

    def warn(self, msg: str) -> None:
        self.lines.append(("warn", msg))


def test_timeout_path_works_with_a_logger_that_only_has_warn(backend: str) -> None:
    # The old module crashed here with AttributeError: no logger.warning.
    proc = spawn("exec sleep 60")
    logger = WarnOnlyLogger()
    result = wait_for_dispatch_completion(_dispatch(proc), "pt-1", timeout_ms=50, logger=logger)
    assert result.status is DispatchCompletionStatus.TIMEOUT
    assert any(level == "warn" and "timed out" in msg for level, msg in logger.lines)
    assert not alive(proc.pid)


def test_live_process_that_is_not_our_child_is_running(backend: str) -> None:
    # The old module's waitpid failed with ECHILD and it said "not running".
    parent = spawn("sleep 60 & echo $!; wait", stdout=subprocess.PIPE)
    (grandchild,) = read_pids(parent, 1)
    assert poll_dispatch_status(grandchild) == (True, None)
    assert poll_dispatch_status(grandchild) == (True, None)
    assert alive(grandchild)
    assert graceful_terminate_dispatch(parent.pid, kill_wait_ms=HOUR_MS) == (True, "sigterm")
    parent.stdout.close()  # type: ignore[union-attr]
    assert not alive(grandchild)


def test_second_poll_after_reaping_keeps_the_exit_code(backend: str) -> None:
    # The old module reaped on the first poll and answered (False, None) after.
    proc = spawn("exit 7")
    assert wait_until(lambda: state(proc.pid) == "Z")
    assert poll_dispatch_status(proc.pid) == (False, 7)
    assert poll_dispatch_status(proc.pid) == (False, 7)
    assert poll_dispatch_status(proc.pid) == (False, 7)
    assert state(proc.pid) is None  # reaped exactly once, by the first poll


def test_cooperative_stop_returns_on_the_exit_not_on_a_sleep(backend: str) -> None:
    # The old module sleep-polled every 100 ms; an hour-long kill wait would hang
    # here unless the wait ends on the exit itself.
    proc = spawn("exec sleep 60")
    assert graceful_terminate_dispatch(proc.pid, kill_wait_ms=HOUR_MS) == (True, "sigterm")
    assert state(proc.pid) is None
    assert poll_dispatch_status(proc.pid) == (False, -15)


@pytest.mark.parametrize("bad", [0, -1])
def test_poll_of_pid_zero_or_negative_reaps_nothing(backend: str, bad: int) -> None:
    # The old module passed 0 to waitpid and reaped any child of its process group.
    proc = spawn("exit 3", new_session=False)
    assert wait_until(lambda: state(proc.pid) == "Z")
    with pytest.raises(ValueError):
        poll_dispatch_status(bad)
    assert state(proc.pid) == "Z", "a bad pid made the package reap someone else's child"
    assert proc.wait() == 3
