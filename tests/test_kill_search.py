"""The search ahead of SIGKILL, on real trees, through every face and backend.

A stop's ``sigterm`` stage searches the session a little before its deadline
(``plan.KILL_LEAD_S``) so that SIGKILL leaves at the deadline itself. That
search must signal nobody: a process of the tree hears SIGTERM once, not once
more just before SIGKILL (a handler that cleans up or logs would run twice).
And a process forked after it is still stopped, by the next round.

Each process of the counting tree blocks SIGTERM and takes it with
``sigwaitinfo``, writing one line per delivery at once, so a second SIGTERM
within the lead would be written before the SIGKILL that follows it. Nothing
here asserts a duration.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest

import procs
from procs import Kids
from ralph_reaper import (
    DispatchMonitor,
    aio,
    graceful_terminate_dispatch,
    wait_for_dispatch_completion,
)

TIMEOUT_MS = 100.0
GRACE_MS = 300.0
RESULT_TIMEOUT_S = 30.0

#: A leader and its child, each writing "ready PID" and then "term PID" per SIGTERM.
COUNTER = (
    "import os, signal, sys\n"
    "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})\n"
    "os.fork()\n"
    "fd = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND)\n"
    "os.write(fd, b'ready %d\\n' % os.getpid())\n"
    "while True:\n"
    "    signal.sigwaitinfo({signal.SIGTERM})\n"
    "    os.write(fd, b'term %d\\n' % os.getpid())\n"
)


def _dispatch(pid: int) -> SimpleNamespace:
    return SimpleNamespace(pid=pid, session_id="sess")


def _blocking(pid: int) -> str:
    result = wait_for_dispatch_completion(
        _dispatch(pid), "t", timeout_ms=TIMEOUT_MS, graceful_shutdown_ms=GRACE_MS
    )
    assert result.timed_out, result
    return result.termination_method


def _monitor(pid: int) -> str:
    with DispatchMonitor() as monitor:
        future = monitor.watch(
            _dispatch(pid), "t", timeout_ms=TIMEOUT_MS, graceful_shutdown_ms=GRACE_MS
        )
        result = future.result(timeout=RESULT_TIMEOUT_S)
    assert result.timed_out, result
    return result.termination_method


def _aio(pid: int) -> str:
    result = asyncio.run(
        aio.wait_for_dispatch_completion(
            _dispatch(pid), "t", timeout_ms=TIMEOUT_MS, graceful_shutdown_ms=GRACE_MS
        )
    )
    assert result.timed_out, result
    return result.termination_method


def _terminate(pid: int) -> str:
    ok, method = graceful_terminate_dispatch(pid, kill_wait_ms=GRACE_MS, eof_wait_ms=0)
    assert ok, method
    return method


#: The faces that are handed a running leader; the command line starts its own.
FACES: dict[str, Callable[[int], str]] = {
    "blocking": _blocking,
    "monitor": _monitor,
    "aio": _aio,
    "terminate": _terminate,
}
ALL_FACES = [*sorted(FACES), "cli"]


def _lines(path: Path) -> list[tuple[str, int]]:
    return [(w, int(p)) for w, p in (line.split() for line in path.read_text().splitlines())]


def _ready(path: Path) -> bool:
    return [word for word, _ in _lines(path)].count("ready") == 2


def _env(backend: str) -> dict[str, str]:
    env = procs.child_env(RALPH_REAPER_BACKEND=backend)
    env.pop("PYTHONFAULTHANDLER", None)
    return env


def _stop(face: str, backend: str, kids: Kids, argv: list[str], ready: Callable[[], bool]) -> int:
    """Start ``argv``, wait until ``ready()``, stop it through ``face``; the root's pid.

    The command line is stopped by SIGTERM to it once the tree is ready (a timeout
    could fall before the tree blocks SIGTERM): its stop is the same sequence, and
    it ends by the signal that ended the command, SIGKILL.
    """
    if face == "cli":
        cli = [sys.executable, "-m", "ralph_reaper", "run", "-k", f"{GRACE_MS:.0f}ms", "--"]
        proc = kids.argv([*cli, *argv], env=_env(backend), stderr=subprocess.DEVNULL)
        assert procs.wait_until(ready)
        proc.send_signal(signal.SIGTERM)  # our own child
        assert proc.wait(RESULT_TIMEOUT_S) == -signal.SIGKILL
        return proc.pid
    proc = kids.argv(argv, env=_env(backend))
    assert procs.wait_until(ready)
    assert FACES[face](proc.pid) == "sigkill"
    return proc.pid


@pytest.mark.parametrize("face", ALL_FACES)
def test_each_process_hears_sigterm_once(
    backend: str, kids: Kids, tmp_path: Path, face: str
) -> None:
    log = tmp_path / "signals"
    log.touch()
    _stop(face, backend, kids, [sys.executable, "-c", COUNTER, str(log)], lambda: _ready(log))
    members = {pid for word, pid in _lines(log) if word == "ready"}
    terms = [pid for word, pid in _lines(log) if word == "term"]
    # Both got it (the stage ran its grace), and neither got it twice.
    assert sorted(terms) == sorted(members), _lines(log)
    assert not any(procs.alive(pid) for pid in members)


@pytest.mark.parametrize("face", ALL_FACES)
def test_a_tree_forking_through_the_stop_is_stopped(
    backend: str, kids: Kids, tmp_path: Path, face: str
) -> None:
    flag = tmp_path / "go"
    script = f"trap '' TERM; : > {flag}; while :; do sleep 60 & sleep 0.001; done"
    root = _stop(face, backend, kids, ["/bin/sh", "-c", script], flag.exists)
    assert procs.descendants_of(root) == []
    assert procs.session_pids(root) == []
