"""spawn_dispatch: containment, stdin and the EOF stage, idle handling, die_with_parent.

On the native backend dispatches run under a keeper; on the others under
session containment. Tree shapes that only a subreaper can catch (a daemon
that detached with setsid after its parent died) are asserted only where the
keeper claims them.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import procs
from ralph_reaper import (
    DispatchCompletionStatus,
    DispatchMonitor,
    DispatchResult,
    graceful_terminate_dispatch,
    poll_dispatch_status,
    spawn_dispatch,
    wait_for_dispatch_completion,
)
from ralph_reaper.keeper_path import keeper_path

HOUR_MS = 3_600_000.0


def containment_for(backend: str) -> str:
    return "keeper" if backend == "native" and keeper_path() is not None else "session"


def pid_of(dispatch: DispatchResult) -> int:
    assert dispatch.pid is not None
    return dispatch.pid


def spawn_sh(script: str, **kwargs: Any) -> DispatchResult:
    kwargs.setdefault("ticket_id", "pt-1")
    result = spawn_dispatch(["/bin/sh", "-c", script], **kwargs)
    assert result.status == "launched", result.error
    return result


@pytest.mark.parametrize("code", [0, 1, 42, 255])
def test_exit_code_is_reported(backend: str, code: int) -> None:
    dispatch = spawn_sh(f"exit {code}", stdin="devnull")
    result = wait_for_dispatch_completion(dispatch, "pt-1", poll_interval_ms=HOUR_MS)
    assert result.return_code == code
    assert result.status is (
        DispatchCompletionStatus.COMPLETED if code == 0 else DispatchCompletionStatus.ERROR
    )
    assert result.containment == containment_for(backend)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL, signal.SIGSEGV])
def test_death_by_signal_is_reported(backend: str, sig: int) -> None:
    dispatch = spawn_sh(f"ulimit -c 0; kill -{int(sig)} $$", stdin="devnull")
    result = wait_for_dispatch_completion(dispatch, "pt-1")
    assert result.status is DispatchCompletionStatus.TERMINATED
    assert result.return_code == -sig
    assert result.signal == sig
    assert result.core_dumped is False


def test_a_command_that_cannot_start_is_a_failed_result(backend: str, tmp_path: Path) -> None:
    missing = spawn_dispatch([str(tmp_path / "nope")], ticket_id="pt-1")
    assert missing.status == "failed"
    assert missing.pid is None
    assert "not found" in (missing.error or "")
    script = tmp_path / "noexec"
    script.write_text("#!/bin/sh\n")
    denied = spawn_dispatch([str(script)], ticket_id="pt-1")
    assert denied.status == "failed"
    assert "cannot execute" in (denied.error or "")


def test_an_output_file_that_cannot_be_opened_is_a_failed_result(
    backend: str, tmp_path: Path
) -> None:
    # A log directory that does not exist yet: a launch failure, not an exception.
    log = tmp_path / "logs" / "pt-1.log"
    result = spawn_dispatch(["sh", "-c", "exit 0"], ticket_id="pt-1", stdout=log)
    assert result.status == "failed"
    assert result.pid is None
    assert "cannot open stdout" in (result.error or "")
    assert not log.parent.exists()


@pytest.mark.parametrize("bad", [[], "sh -c true", [1, 2], ["a\0b"]])
def test_bad_argv_raises_and_starts_nothing(backend: str, bad: object) -> None:
    with pytest.raises((TypeError, ValueError)):
        spawn_dispatch(bad, ticket_id="pt-1")  # type: ignore[arg-type]


def test_bad_stdin_choice_raises(backend: str) -> None:
    with pytest.raises(ValueError):
        spawn_dispatch(["true"], ticket_id="pt-1", stdin="socket")  # type: ignore[arg-type]


@pytest.mark.parametrize("stdin", ["pipe", "pty"])
def test_eof_is_enough_for_a_process_waiting_on_stdin(backend: str, stdin: str) -> None:
    dispatch = spawn_sh("read line; exit 0", stdin=stdin)
    ok, method = graceful_terminate_dispatch(
        pid_of(dispatch), kill_wait_ms=HOUR_MS, eof_wait_ms=HOUR_MS
    )
    assert (ok, method) == (True, "eof")
    assert poll_dispatch_status(pid_of(dispatch)) == (False, 0)


def test_eof_not_enough_escalates_to_sigterm(backend: str) -> None:
    dispatch = spawn_sh("exec sleep 60", stdin="pipe")
    ok, method = graceful_terminate_dispatch(
        pid_of(dispatch), eof_wait_ms=100, kill_wait_ms=HOUR_MS
    )
    assert (ok, method) == (True, "sigterm")


@pytest.mark.parametrize("eof_wait_ms, method", [(HOUR_MS, "eof"), (0, "sigterm")])
def test_wait_timeout_begins_with_eof_unless_told_not_to(
    backend: str, eof_wait_ms: float, method: str
) -> None:
    dispatch = spawn_sh("read line; exit 0", stdin="pipe")
    result = wait_for_dispatch_completion(
        dispatch, "pt-1", timeout_ms=100, graceful_shutdown_ms=HOUR_MS, eof_wait_ms=eof_wait_ms
    )
    assert result.status is DispatchCompletionStatus.TIMEOUT
    assert result.termination_method == method
    assert ("eof" in result.stage_ms) is (method == "eof")


def test_stdout_to_a_file(backend: str, tmp_path: Path) -> None:
    out = tmp_path / "out.log"
    dispatch = spawn_sh("echo hello; echo oops >&2", stdin="devnull", stdout=out, stderr="devnull")
    result = wait_for_dispatch_completion(dispatch, "pt-1")
    assert result.return_code == 0
    assert out.read_text() == "hello\n"


def test_spawn_timeout_applies_without_a_wait_timeout(backend: str) -> None:
    dispatch = spawn_sh("sleep 60 & sleep 60 & wait", stdin="devnull", timeout_ms=200)
    result = wait_for_dispatch_completion(dispatch, "pt-1", graceful_shutdown_ms=HOUR_MS)
    assert result.status is DispatchCompletionStatus.TIMEOUT
    assert result.stop_reason == "timeout"
    assert result.termination_method == "sigterm"
    assert result.descendants_killed >= 2


def test_idle_at_a_prompt_gets_eof(backend: str) -> None:
    dispatch = spawn_sh("read answer; exit 3", stdin="pipe", idle_timeout_ms=300)
    result = wait_for_dispatch_completion(dispatch, "pt-1", graceful_shutdown_ms=HOUR_MS)
    # The session exit is authoritative: it ended by itself on EOF, with code 3.
    assert result.status is DispatchCompletionStatus.ERROR
    assert result.error == "Process exited with code 3"
    assert result.timed_out is False
    assert result.stop_reason == "idle"
    assert result.termination_method == "eof"
    assert result.return_code == 3


def test_busy_process_is_not_idle(backend: str) -> None:
    # Busy in a loop: never blocked on stdin, so only the timeout may stop it.
    dispatch = spawn_sh("while :; do :; done", stdin="pipe", idle_timeout_ms=200, timeout_ms=1500)
    result = wait_for_dispatch_completion(dispatch, "pt-1")
    assert result.stop_reason == "timeout"


def test_sleeping_but_not_on_stdin_is_not_idle(backend: str) -> None:
    # No CPU, but waiting on something other than its stdin (like a model's answer).
    dispatch = spawn_sh("exec sleep 60", stdin="pipe", idle_timeout_ms=200, timeout_ms=1500)
    result = wait_for_dispatch_completion(dispatch, "pt-1")
    assert result.stop_reason == "timeout"


def test_keeper_catches_a_daemon_that_detached(backend: str, tmp_path: Path) -> None:
    if containment_for(backend) != "keeper":
        pytest.skip("only the keeper (native backend) claims detached daemons")
    pidfile = tmp_path / "daemon.pid"
    code = (
        "import os, sys, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        f"        open({str(pidfile)!r}, 'w').write(str(os.getpid()))\n"
        "        time.sleep(60)\n"
        "    os._exit(0)\n"
        "time.sleep(60)\n"
    )
    dispatch = spawn_dispatch([sys.executable, "-c", code], ticket_id="pt-1", stdin="devnull")
    assert procs.wait_until(lambda: pidfile.exists() and pidfile.read_text() != "")
    daemon = int(pidfile.read_text())
    assert procs.alive(daemon)
    ok, method = graceful_terminate_dispatch(pid_of(dispatch), kill_wait_ms=HOUR_MS)
    assert (ok, method) == (True, "sigterm")
    assert procs.state(daemon) is None


@pytest.mark.parametrize("collector", ["wait", "poll", "terminate"])
def test_the_exit_file_is_written_on_every_backend(
    backend: str, tmp_path: Path, collector: str
) -> None:
    exit_file = tmp_path / "exit.json"
    if collector == "terminate":
        dispatch = spawn_sh("exec sleep 60", stdin="devnull", exit_file=exit_file)
        stopped = graceful_terminate_dispatch(pid_of(dispatch), kill_wait_ms=HOUR_MS)
        assert stopped == (True, "sigterm")
        expected: dict[str, Any] = {"signal": signal.SIGTERM, "exit_code": None}
    else:
        dispatch = spawn_sh("exit 9", stdin="devnull", exit_file=exit_file)
        if collector == "wait":
            assert wait_for_dispatch_completion(dispatch, "pt-1").return_code == 9
        else:
            assert procs.wait_until(lambda: poll_dispatch_status(pid_of(dispatch)) == (False, 9))
        expected = {"signal": None, "exit_code": 9}
    record = json.loads(exit_file.read_text())
    assert record["event"] == "exit"
    assert {k: record[k] for k in expected} == expected
    assert record["exec_errno"] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exit.json"]


def test_an_exit_file_with_the_longest_valid_name(backend: str, tmp_path: Path) -> None:
    exit_file = tmp_path / ("e" * 250 + ".json")  # 255 bytes: a valid name
    dispatch = spawn_sh("exit 3", stdin="devnull", exit_file=exit_file)
    assert wait_for_dispatch_completion(dispatch, "pt-1").return_code == 3
    assert json.loads(exit_file.read_text())["exit_code"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == [exit_file.name]


def test_the_exit_file_of_a_command_not_found(backend: str, tmp_path: Path) -> None:
    exit_file = tmp_path / "exit.json"
    missing = spawn_dispatch([str(tmp_path / "nope")], ticket_id="pt-1", exit_file=exit_file)
    assert missing.status == "failed"
    record = json.loads(exit_file.read_text())
    assert (record["exit_code"], record["exec_errno"]) == (127, errno.ENOENT)


@pytest.mark.parametrize("where", ["missing_dir", "dir_is_a_file", "is_a_dir"])
def test_an_exit_file_that_cannot_be_written_is_refused_before_the_start(
    backend: str, tmp_path: Path, where: str
) -> None:
    (tmp_path / "file").write_text("")
    (tmp_path / "dir").mkdir()
    exit_file = {
        "missing_dir": tmp_path / "no-such-dir" / "exit.json",
        "dir_is_a_file": tmp_path / "file" / "exit.json",
        "is_a_dir": tmp_path / "dir",
    }[where]
    marker = tmp_path / "started"
    result = spawn_dispatch(
        ["/bin/sh", "-c", f": > {marker}"], ticket_id="pt-1", stdin="devnull", exit_file=exit_file
    )
    assert result.status == "failed" and result.pid is None
    assert "cannot write exit file" in (result.error or ""), result.error
    assert str(exit_file) in (result.error or "")
    assert not marker.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "file"]
    assert list((tmp_path / "dir").iterdir()) == []


@pytest.mark.parametrize("bad", [b"/tmp/exit.json", 3, "", "a\0b"])
def test_a_bad_exit_file_argument_raises(backend: str, bad: object) -> None:
    with pytest.raises((TypeError, ValueError)):
        spawn_dispatch(["true"], ticket_id="pt-1", exit_file=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("what", ["missing", "a_file"])
def test_a_cwd_that_cannot_be_used_is_named(backend: str, tmp_path: Path, what: str) -> None:
    cwd = tmp_path / "no-such-dir"
    if what == "a_file":
        cwd.write_text("")
    result = spawn_dispatch(["true"], ticket_id="pt-1", stdin="devnull", cwd=cwd)
    assert result.status == "failed" and result.pid is None
    assert result.error == (
        f"cannot use cwd {str(cwd)!r}: "
        + os.strerror(errno.ENOENT if what == "missing" else errno.ENOTDIR)
    )


def test_a_cwd_removed_at_the_last_moment_is_still_named(
    backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Mocked: the check before the launch is made to pass, as if the directory
    # were removed between it and the exec (a race that cannot be timed).
    cwd = tmp_path / "gone"
    real_stat = os.stat
    monkeypatch.setattr(
        os, "stat", lambda p, *a, **k: real_stat(tmp_path) if p == cwd else real_stat(p, *a, **k)
    )
    result = spawn_dispatch(["true"], ticket_id="pt-1", stdin="devnull", cwd=cwd)
    monkeypatch.undo()
    assert result.status == "failed"
    assert result.error == f"cannot use cwd {str(cwd)!r}: {os.strerror(errno.ENOENT)}"


@pytest.mark.parametrize("name", ["stdout", "stderr"])
@pytest.mark.parametrize("where", ["missing_dir", "dir_is_a_file", "is_a_dir", "closed_fd"])
def test_an_output_that_cannot_be_used_is_a_failed_result(
    backend: str, tmp_path: Path, name: str, where: str
) -> None:
    (tmp_path / "file").write_text("")
    target: Any = {
        "missing_dir": tmp_path / "no-such-dir" / "out.log",
        "dir_is_a_file": tmp_path / "file" / "out.log",
        "is_a_dir": tmp_path,
    }.get(where)
    if where == "closed_fd":
        r, w = os.pipe()
        os.close(r)
        os.close(w)
        target = w
    result = spawn_dispatch(["true"], ticket_id="pt-1", stdin="devnull", **{name: target})
    assert result.status == "failed" and result.pid is None
    assert result.error is not None and result.error.startswith("cannot "), result.error
    assert name in result.error


@pytest.mark.parametrize("via_path", [False, True], ids=["by_path", "on_PATH"])
def test_a_script_without_shebang_cannot_execute_on_any_backend(
    backend: str, tmp_path: Path, via_path: bool
) -> None:
    # One behaviour for every backend, subprocess's: ENOEXEC is an error,
    # the file is not handed to /bin/sh.
    marker = tmp_path / "ran"
    script = tmp_path / "no-shebang"
    script.write_text(f": > {marker}\n")
    script.chmod(0o755)
    env = {**os.environ, "PATH": str(tmp_path)} if via_path else None
    result = spawn_dispatch(
        [script.name if via_path else str(script)], ticket_id="pt-1", stdin="devnull", env=env
    )
    assert result.status == "failed", "a file without #! was run"
    assert result.error == f"cannot execute {script.name if via_path else script}: " + (
        os.strerror(errno.ENOEXEC)
    )
    assert not marker.exists()


def test_host_killed_leaves_nothing_alive(backend: str, tmp_path: Path) -> None:
    if containment_for(backend) != "keeper":
        pytest.skip("die_with_parent needs the keeper (native backend)")
    pidfile = tmp_path / "pids"
    host_code = (
        "import sys, time\n"
        "from ralph_reaper import spawn_dispatch\n"
        "d = spawn_dispatch(['/bin/sh', '-c', sys.argv[1]], ticket_id='pt-1', stdin='devnull')\n"
        "assert d.status == 'launched', d.error\n"
        "time.sleep(60)\n"
    )
    script = f"sleep 60 & echo $$ $! > {pidfile}; trap '' TERM; wait"
    host = subprocess.Popen([sys.executable, "-c", host_code, script])
    assert procs.wait_until(lambda: pidfile.exists() and len(pidfile.read_text().split()) == 2)
    tree = [int(x) for x in pidfile.read_text().split()]
    host.send_signal(signal.SIGKILL)
    host.wait()
    assert procs.wait_until(lambda: not any(procs.alive(p) for p in tree), timeout=10)
    # Orphans came to this process (a subreaper); reap them for the leak check.
    assert procs.wait_until(lambda: not procs.descendants_of(os.getpid()) or _reap_some(), 10)


def _reap_some() -> bool:
    try:
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass
    except ChildProcessError:
        return True
    return not procs.descendants_of(os.getpid())


def test_keeper_enforces_the_timeout_when_nobody_waits(backend: str) -> None:
    if containment_for(backend) != "keeper":
        pytest.skip("only the keeper (native backend) runs its own timer")
    dispatch = spawn_sh("sleep 60 & sleep 60", stdin="devnull", timeout_ms=200)
    assert dispatch.pid is not None
    # Nobody waits: the keeper stops the tree and exits by itself.
    assert procs.wait_until(lambda: procs.state(pid_of(dispatch)) in (None, "Z"))
    result = wait_for_dispatch_completion(dispatch, "pt-1")
    assert result.status is DispatchCompletionStatus.TIMEOUT
    assert result.stop_reason == "timeout"
    assert result.termination_method == "sigterm"
    assert result.descendants_killed >= 1


def _keeper_only(backend: str) -> None:
    if backend != "native":
        pytest.skip("only the native backend runs dispatches under a keeper")


@pytest.mark.parametrize("face", ["blocking", "monitor"])
def test_a_keeper_killed_while_its_command_runs_is_reported_and_cleaned_up(
    backend: str, face: str
) -> None:
    _keeper_only(backend)
    # The command kills its own keeper (as an agent's careless pkill -f might).
    dispatch = spawn_sh("sleep 300 & sleep .2; kill -9 $PPID; sleep 300", stdin="devnull")
    if face == "blocking":
        result = wait_for_dispatch_completion(dispatch, "pt-1", graceful_shutdown_ms=500)
    else:
        with DispatchMonitor() as monitor:
            result = monitor.watch(dispatch, "pt-1", graceful_shutdown_ms=500).result(30)
    assert result.status is DispatchCompletionStatus.ERROR
    assert result.stop_reason == "keeper_lost"
    assert result.return_code == -9
    assert "died without its final report" in (result.error or "")
    # and nothing of the tree is left (the leak check of every test says so)


def test_a_keeper_killed_during_the_grace_is_never_a_success(backend: str) -> None:
    _keeper_only(backend)
    dispatch = spawn_sh("trap '' TERM; sleep 300 & wait", stdin="devnull", grace_ms=5000)
    assert dispatch.pid is not None
    keeper = os.pidfd_open(dispatch.pid)
    done: list[Any] = []
    waiter = threading.Thread(
        target=lambda: done.append(
            wait_for_dispatch_completion(
                dispatch, "pt-1", timeout_ms=100, graceful_shutdown_ms=1500, eof_wait_ms=0
            )
        )
    )
    waiter.start()
    try:
        time.sleep(0.6)  # the keeper got the stop request and is in its grace
        signal.pidfd_send_signal(keeper, signal.SIGKILL)
    finally:
        os.close(keeper)
    waiter.join(30)
    (result,) = done
    assert result.status is DispatchCompletionStatus.ERROR
    assert result.stop_reason == "keeper_lost"
    assert result.timed_out is True
