"""Any finite duration is a duration, on every backend and every way in.

The keeper takes milliseconds on its command line and its control pipe, and
keeps deadlines in int64 nanoseconds; epoll and poll take an int of
milliseconds. A grace of two days or a timeout of centuries is still a
duration a user may write: it must neither fail the launch nor overflow a
wait. (Waits far beyond one epoll call are under test in test_behaviour.py.)
"""

from __future__ import annotations

import subprocess
import sys

import procs
from ralph_reaper import spawn_dispatch, wait_for_dispatch_completion

CENTURIES_MS = 1e13
TWO_DAYS_MS = 2 * 86_400_000.0


def test_spawn_with_durations_of_centuries(backend: str) -> None:
    dispatch = spawn_dispatch(
        ["/bin/sh", "-c", "exit 4"],
        ticket_id="pt-1",
        timeout_ms=CENTURIES_MS,
        grace_ms=CENTURIES_MS,
    )
    assert dispatch.status == "launched", dispatch.error
    result = wait_for_dispatch_completion(dispatch, "pt-1")
    assert result.return_code == 4, result.error
    assert result.termination_method == "natural"


def test_a_stop_asked_with_a_grace_of_days_ends_on_sigterm(backend: str) -> None:
    dispatch = spawn_dispatch(["sleep", "60"], ticket_id="pt-1", grace_ms=TWO_DAYS_MS)
    assert dispatch.status == "launched", dispatch.error
    result = wait_for_dispatch_completion(
        dispatch, "pt-1", timeout_ms=100, graceful_shutdown_ms=TWO_DAYS_MS
    )
    assert result.termination_method == "sigterm", result
    assert result.return_code == -15


def test_run_with_a_grace_of_two_days(backend: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "ralph_reaper", "run", "--grace", "2d", "--", "true"],
        capture_output=True,
        text=True,
        env=procs.child_env(RALPH_REAPER_BACKEND=backend),
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
