"""Drop-in compatibility with ``tf.ralph_completion`` and ``tf.ralph.DispatchResult``.

Calls are written exactly as the old module's users wrote them (positional and
keyword forms), with the kind of logger ``tf`` hands in: ``info``, ``debug``,
``error`` and ``warn``, but no ``warning`` (the old module crashed on that in
its timeout path).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import math
import os
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Optional

import pytest

import procs
import ralph_reaper
from ralph_reaper import (
    BackendUnavailableError,
    DispatchCompletionResult,
    DispatchCompletionStatus,
    DispatchResult,
    __version__,
    backend_info,
    cleanup_dispatch_tracking,
    graceful_terminate_dispatch,
    poll_dispatch_status,
    update_dispatch_tracking_status,
    wait_for_dispatch_completion,
)

TERM_IGNORING = (
    "import signal, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "print(1, flush=True)\n"
    "time.sleep(60)\n"
)


class TfLogger:
    """Like the ``tf`` logger: ``info``, ``debug``, ``error`` and ``warn`` only."""

    def __init__(self) -> None:
        self.records: list[tuple[str, str]] = []

    def info(self, msg: str) -> None:
        self.records.append(("info", msg))

    def debug(self, msg: str) -> None:
        self.records.append(("debug", msg))

    def error(self, msg: str) -> None:
        self.records.append(("error", msg))

    def warn(self, msg: str) -> None:
        self.records.append(("warn", msg))

    def levels(self) -> set[str]:
        return {level for level, _ in self.records}


@dataclass
class ForeignDispatchResult:
    """A ``DispatchResult`` of another module, shaped like ``tf.ralph.DispatchResult``."""

    session_id: str
    ticket_id: str
    status: str
    pid: Optional[int] = None
    error: Optional[str] = None


class Started:
    """Children of one test; their Popen objects are told when the package reaped them."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def sh(self, script: str, **kwargs: Any) -> subprocess.Popen[bytes]:
        proc = procs.spawn(script, **kwargs)
        self.procs.append(proc)
        return proc

    def py(self, code: str, **kwargs: Any) -> subprocess.Popen[bytes]:
        proc = procs.python_child(code, **kwargs)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.procs:
            if proc.stdout is not None:
                proc.stdout.close()
            if proc.returncode is None and procs.state(proc.pid) is None:
                proc.returncode = -999  # reaped by the package: nothing left to wait for


@pytest.fixture
def started() -> Iterator[Started]:
    s = Started()
    try:
        yield s
    finally:
        s.close()


OLD_FIELDS = [
    "ticket_id",
    "session_id",
    "status",
    "return_code",
    "pid",
    "duration_ms",
    "termination_method",
    "error",
]


def check_common(result: DispatchCompletionResult, backend: str, pid: int) -> None:
    """Fields whose values do not depend on how the dispatch ended."""
    assert result.ticket_id == "pt-123"
    assert result.session_id == "sess-1"
    assert result.pid == pid
    assert isinstance(result.duration_ms, float)
    assert result.duration_ms > 0 and math.isfinite(result.duration_ms)
    assert result.backend == backend
    assert result.containment == "session"
    rusage = (result.user_time_s, result.system_time_s, result.max_rss_kb)
    assert rusage == (None, None, None) or all(v is not None and v >= 0 for v in rusage)
    data = result.to_dict()
    assert data["status"] == result.status.value
    assert [k for k in data if k in OLD_FIELDS] == OLD_FIELDS
    json.dumps(data)
    assert procs.state(pid) is None  # reaped


# --------------------------------------------------------------------------------------
# The four outcomes, every field


def test_completed_result_fields(backend: str, started: Started) -> None:
    proc = started.sh("exit 0")
    dispatch = ForeignDispatchResult("sess-1", "pt-123", "launched", proc.pid)
    result = wait_for_dispatch_completion(dispatch, "pt-123", 600000)
    check_common(result, backend, proc.pid)
    assert result.status is DispatchCompletionStatus.COMPLETED
    assert result.return_code == 0
    assert result.termination_method == "natural"
    assert result.error is None
    assert result.signal is None
    assert result.core_dumped is False
    assert result.descendants_killed == 0
    assert result.timed_out is False
    assert result.stage_ms == {}  # nothing had to be stopped


def test_error_result_fields(backend: str, started: Started) -> None:
    proc = started.sh("exit 3")
    dispatch = ForeignDispatchResult("sess-1", "pt-123", "launched", proc.pid)
    log = TfLogger()
    result = wait_for_dispatch_completion(
        dispatch_result=dispatch,
        ticket_id="pt-123",
        timeout_ms=600000,
        poll_interval_ms=1000,
        logger=log,
        graceful_shutdown_ms=5000,
    )
    check_common(result, backend, proc.pid)
    assert result.status is DispatchCompletionStatus.ERROR
    assert result.return_code == 3
    assert result.termination_method == "natural"
    assert result.error == "Process exited with code 3"
    assert result.signal is None
    assert result.core_dumped is False
    assert result.descendants_killed == 0
    assert result.timed_out is False
    assert result.stage_ms == {}
    assert "info" in log.levels()


def test_timeout_result_fields_and_warn_only_logger(backend: str, started: Started) -> None:
    """The old module crashed here (AttributeError: no ``warning``); this logs through ``warn``."""
    proc = started.sh("exec sleep 60")
    dispatch = ForeignDispatchResult("sess-1", "pt-123", "launched", proc.pid)
    log = TfLogger()
    result = wait_for_dispatch_completion(
        dispatch, "pt-123", timeout_ms=100, logger=log, graceful_shutdown_ms=5000.0
    )
    check_common(result, backend, proc.pid)
    assert result.status is DispatchCompletionStatus.TIMEOUT
    assert result.return_code == -15
    assert result.termination_method == "sigterm"
    assert isinstance(result.error, str) and result.error
    assert result.signal == 15
    assert result.core_dumped is False
    assert result.descendants_killed == 0
    assert result.timed_out is True
    assert set(result.stage_ms) == {"sigterm"}
    assert all(v >= 0 and math.isfinite(v) for v in result.stage_ms.values())
    warned = [msg for level, msg in log.records if level == "warn"]
    assert warned, f"no warn() call on the timeout path: {log.records}"
    assert all(isinstance(msg, str) for _, msg in log.records)


def test_timeout_with_sigkill_result_fields(backend: str, started: Started) -> None:
    proc = started.py(TERM_IGNORING, stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline()
    dispatch = ForeignDispatchResult("sess-1", "pt-123", "launched", proc.pid)
    result = wait_for_dispatch_completion(
        dispatch, "pt-123", timeout_ms=100, logger=TfLogger(), graceful_shutdown_ms=200
    )
    check_common(result, backend, proc.pid)
    assert result.status is DispatchCompletionStatus.TIMEOUT
    assert (result.return_code, result.signal) == (-9, 9)
    assert result.termination_method == "sigkill"
    assert result.timed_out is True
    assert set(result.stage_ms) == {"sigterm", "sigkill"}


def test_terminated_result_fields(backend: str, started: Started) -> None:
    proc = started.sh("exec sleep 60")
    os.kill(proc.pid, signal.SIGKILL)  # our own child, killed by "someone else"
    dispatch = ForeignDispatchResult("sess-1", "pt-123", "launched", proc.pid)
    result = wait_for_dispatch_completion(dispatch, "pt-123", 600000, 1000.0, TfLogger(), 5000.0)
    check_common(result, backend, proc.pid)
    assert result.status is DispatchCompletionStatus.TERMINATED
    assert result.return_code == -9
    assert result.termination_method == "natural"
    assert result.error is None or isinstance(result.error, str)
    assert result.signal == 9
    assert result.core_dumped is False
    assert result.descendants_killed == 0
    assert result.timed_out is False
    assert result.stage_ms == {}


def test_package_dispatch_result_is_accepted(backend: str, started: Started) -> None:
    proc = started.sh("exit 0")
    dispatch = DispatchResult("sess-1", "pt-123", "launched", proc.pid)
    result = wait_for_dispatch_completion(dispatch, "pt-123", timeout_ms=600000)
    check_common(result, backend, proc.pid)
    assert result.status is DispatchCompletionStatus.COMPLETED


def test_failed_launch_without_pid(backend: str) -> None:
    """A ``status="failed"`` dispatch has no pid: an ERROR result, not an exception."""
    dispatch = ForeignDispatchResult("sess-1", "pt-123", "failed", None, "spawn failed")
    log = TfLogger()
    result = wait_for_dispatch_completion(dispatch, "pt-123", 600000, logger=log)
    assert result.status is DispatchCompletionStatus.ERROR
    assert result.error == "No PID available"
    assert (result.ticket_id, result.session_id, result.pid) == ("pt-123", "sess-1", None)
    assert "error" in log.levels()


# --------------------------------------------------------------------------------------
# The other two functions, called the old way


def test_graceful_terminate_positional(backend: str, started: Started) -> None:
    proc = started.sh("exec sleep 60")
    log = TfLogger()
    assert graceful_terminate_dispatch(proc.pid, "sess-1", log, 5000.0, True) == (True, "sigterm")
    assert procs.state(proc.pid) is None
    assert log.records and all(isinstance(m, str) for _, m in log.records)
    assert graceful_terminate_dispatch(proc.pid, "sess-1", log, 5000.0, True) == (
        True,
        "not_running",
    )


def test_graceful_terminate_keywords(backend: str, started: Started) -> None:
    proc = started.py(TERM_IGNORING, stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline()
    got = graceful_terminate_dispatch(
        pid=proc.pid,
        session_id="sess-1",
        logger=TfLogger(),
        kill_wait_ms=200,
        use_process_group=True,
    )
    assert got == (True, "sigkill")
    assert procs.state(proc.pid) is None


def test_poll_dispatch_status_positional(backend: str, started: Started) -> None:
    proc = started.py(
        "import sys\nprint(1, flush=True)\nsys.stdin.readline()\nsys.exit(2)\n",
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stdout.readline()
    is_running, return_code = poll_dispatch_status(proc.pid)
    assert (is_running, return_code) == (True, None)
    assert proc.stdin is not None
    proc.stdin.close()  # EOF: the child exits 2
    assert procs.wait_until(lambda: not procs.alive(proc.pid))
    assert poll_dispatch_status(pid=proc.pid) == (False, 2)


# --------------------------------------------------------------------------------------
# Types and names


def test_enum_values() -> None:
    assert {s.name: s.value for s in DispatchCompletionStatus} == {
        "RUNNING": "running",
        "COMPLETED": "completed",
        "TIMEOUT": "timeout",
        "TERMINATED": "terminated",
        "ERROR": "error",
    }
    assert DispatchCompletionStatus("timeout") is DispatchCompletionStatus.TIMEOUT


def test_completion_result_positional_construction() -> None:
    r = DispatchCompletionResult(
        "t", "s", DispatchCompletionStatus.COMPLETED, 0, 123, 1.0, "natural", None
    )
    assert [f.name for f in dataclasses.fields(r)][:8] == OLD_FIELDS
    assert (r.ticket_id, r.session_id, r.status) == ("t", "s", DispatchCompletionStatus.COMPLETED)
    assert (r.return_code, r.pid, r.duration_ms) == (0, 123, 1.0)
    assert (r.termination_method, r.error) == ("natural", None)
    # New fields all have defaults.
    assert r.signal is None and r.core_dumped is False and r.descendants_killed == 0
    assert r.timed_out is False and r.stage_ms == {}
    minimal = DispatchCompletionResult("t", "s", DispatchCompletionStatus.ERROR)
    assert (minimal.return_code, minimal.pid, minimal.duration_ms) == (None, None, 0.0)
    assert (minimal.termination_method, minimal.error) == ("natural", None)


def test_dispatch_result_positional_construction() -> None:
    d = DispatchResult("s", "t", "launched", 123)
    assert (d.session_id, d.ticket_id, d.status, d.pid, d.error) == (
        "s",
        "t",
        "launched",
        123,
        None,
    )
    assert [f.name for f in dataclasses.fields(DispatchResult)] == [
        "session_id",
        "ticket_id",
        "status",
        "pid",
        "error",
    ]
    assert DispatchResult("s", "t", "failed").pid is None


def _params(func: Any) -> list[tuple[str, Any, Any]]:
    return [(p.name, p.kind, p.default) for p in inspect.signature(func).parameters.values()]


def test_signatures_keep_the_old_names_and_defaults() -> None:
    pos = inspect.Parameter.POSITIONAL_OR_KEYWORD
    empty = inspect.Parameter.empty
    assert _params(poll_dispatch_status) == [("pid", pos, empty)]
    assert _params(graceful_terminate_dispatch)[:5] == [
        ("pid", pos, empty),
        ("session_id", pos, None),
        ("logger", pos, None),
        ("kill_wait_ms", pos, 5000.0),
        ("use_process_group", pos, True),
    ]
    assert _params(wait_for_dispatch_completion)[:6] == [
        ("dispatch_result", pos, empty),
        ("ticket_id", pos, empty),
        ("timeout_ms", pos, 0),
        ("poll_interval_ms", pos, 1000.0),
        ("logger", pos, None),
        ("graceful_shutdown_ms", pos, 5000.0),
    ]
    assert _params(cleanup_dispatch_tracking)[:3] == [
        ("ralph_dir", pos, empty),
        ("ticket", pos, empty),
        ("logger", pos, None),
    ]
    assert _params(update_dispatch_tracking_status)[:4] == [
        ("ralph_dir", pos, empty),
        ("ticket", pos, empty),
        ("completion_result", pos, empty),
        ("logger", pos, None),
    ]
    # Anything added after the old parameters is keyword-only.
    for func, old in [(graceful_terminate_dispatch, 5), (wait_for_dispatch_completion, 6)]:
        extra = list(inspect.signature(func).parameters.values())[old:]
        assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in extra)


def test_documented_names_are_importable() -> None:
    documented = {
        "DispatchCompletionStatus",
        "DispatchCompletionResult",
        "DispatchResult",
        "poll_dispatch_status",
        "graceful_terminate_dispatch",
        "wait_for_dispatch_completion",
        "cleanup_dispatch_tracking",
        "update_dispatch_tracking_status",
        "backend_info",
        "BackendUnavailableError",
    }
    assert documented <= set(ralph_reaper.__all__)
    for name in ralph_reaper.__all__:
        assert getattr(ralph_reaper, name) is not None, name
    assert issubclass(BackendUnavailableError, Exception)
    assert isinstance(__version__, str)
    assert callable(backend_info)


# --------------------------------------------------------------------------------------
# Durations mean what they meant upstream


def test_negative_timeout_is_no_timeout(backend: str, started: Started) -> None:
    """The loop passes -1 when its attempt timeout is configured as -1."""
    proc = started.sh("sleep 0.2; exit 0")
    dispatch = ForeignDispatchResult("sess-1", "pt-123", "launched", proc.pid)
    result = wait_for_dispatch_completion(dispatch, "pt-123", -1, -1, TfLogger(), -1)
    check_common(result, backend, proc.pid)
    assert result.status is DispatchCompletionStatus.COMPLETED
    assert result.timed_out is False


def test_negative_grace_is_no_grace(backend: str, started: Started) -> None:
    proc = started.py(TERM_IGNORING, stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline()
    dispatch = ForeignDispatchResult("sess-1", "pt-123", "launched", proc.pid)
    result = wait_for_dispatch_completion(
        dispatch, "pt-123", timeout_ms=100, graceful_shutdown_ms=-1
    )
    check_common(result, backend, proc.pid)
    assert result.status is DispatchCompletionStatus.TIMEOUT
    assert (result.termination_method, result.return_code) == ("sigkill", -9)


def test_negative_kill_wait_is_no_wait(backend: str, started: Started) -> None:
    proc = started.py(TERM_IGNORING, stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline()
    assert graceful_terminate_dispatch(proc.pid, "sess-1", None, -1) == (True, "sigkill")
    assert procs.state(proc.pid) is None


@pytest.mark.parametrize("value", [math.nan, math.inf, "600000", None], ids=repr)
def test_durations_upstream_never_meant_still_raise(
    backend: str, started: Started, value: Any
) -> None:
    proc = started.sh("exit 0")
    dispatch = ForeignDispatchResult("sess-1", "pt-123", "launched", proc.pid)
    with pytest.raises((TypeError, ValueError)):
        wait_for_dispatch_completion(dispatch, "pt-123", timeout_ms=value)
    assert procs.alive(proc.pid) or procs.state(proc.pid) == "Z"  # not reaped, not waited
    assert proc.wait() == 0


# --------------------------------------------------------------------------------------
# The loop's logger, and stdlib records


class RalphLogger:
    """Like the loop's ``RalphLogger``: a ``ticket=`` keyword on every method, no ``warning``."""

    def __init__(self) -> None:
        self.records: list[tuple[str, str, Optional[str]]] = []

    def info(self, msg: str, ticket: Optional[str] = None) -> None:
        self.records.append(("info", msg, ticket))

    def debug(self, msg: str, ticket: Optional[str] = None) -> None:
        self.records.append(("debug", msg, ticket))

    def warn(self, msg: str, ticket: Optional[str] = None) -> None:
        self.records.append(("warn", msg, ticket))

    def error(self, msg: str, ticket: Optional[str] = None) -> None:
        self.records.append(("error", msg, ticket))


def test_a_ticket_logger_gets_the_ticket_on_every_line(backend: str, started: Started) -> None:
    proc = started.sh("exec sleep 60")
    dispatch = ForeignDispatchResult("sess-1", "pt-123", "launched", proc.pid)
    log = RalphLogger()
    result = wait_for_dispatch_completion(dispatch, "pt-123", timeout_ms=100, logger=log)
    assert result.status is DispatchCompletionStatus.TIMEOUT
    assert {level for level, _, _ in log.records} >= {"info", "warn"}
    assert all(ticket == "pt-123" for _, _, ticket in log.records), log.records
    assert all("%" not in msg for _, msg, _ in log.records)  # formatted for it


def test_stdlib_records_name_the_dispatch_and_the_caller(
    backend: str, started: Started, caplog: pytest.LogCaptureFixture
) -> None:
    proc = started.sh("exit 3")
    dispatch = ForeignDispatchResult("sess-1", "pt-123", "launched", proc.pid)
    with caplog.at_level(logging.DEBUG, logger="ralph_reaper"):
        wait_for_dispatch_completion(dispatch, "pt-123", 600000)
    assert caplog.records
    for record in caplog.records:
        assert not record.pathname.endswith("logs.py"), record.pathname
        context = (record.ticket_id, record.session_id, record.pid)  # type: ignore[attr-defined]
        assert context == ("pt-123", "sess-1", proc.pid)
    assert any(record.args for record in caplog.records)  # lazy: formatted by the handler
