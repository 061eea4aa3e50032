"""Conformance: every scenario, through every face, on every backend, gives one correct result.

The contract (design.md, section 3) says "every face (blocking, monitor,
asyncio, CLI) gives the same result for the same dispatch". This file holds
that to the letter: one table of scenarios, each with the result the contract
requires, and one driver per face that runs the scenario and returns what
``DispatchCompletionResult.to_dict()`` (or the CLI's ``--json`` line) says.
A single parametrized test compares the two, field by field, and reports every
field that differs at once, so a failure reads as a list of drifts.

The faces:

* ``blocking``: :func:`ralph_reaper.wait_for_dispatch_completion`
* ``monitor``: :meth:`ralph_reaper.DispatchMonitor.watch`
* ``aio``: :func:`ralph_reaper.aio.wait_for_dispatch_completion`
* ``aio_monitor``: :meth:`ralph_reaper.aio.AsyncDispatchMonitor.watch`
* ``cli``: ``python -m ralph_reaper run --json ... -- CMD``

The four Python faces start their dispatch with :func:`spawn_dispatch`
(``stdin="pipe"``: the package holds the write end, so the command sees EOF
only when a stop begins). The CLI gets a stdin pipe that the test keeps open
for the same reason (``Popen.communicate`` would close it, so it is not used).

Timers that a scenario needs to run out are short (tenths of a second);
timers that it expects never to run out (a reader answering EOF, a sleep dying
of SIGTERM) are long, so a loaded machine cannot change which stage ended a
dispatch. No upper bound on any duration is asserted; a few lower bounds are
(a stage given 200 ms must have lasted about that long, else something else
cut it short), and load can only lengthen those. The autouse ``no_leftovers``
fixture (conftest.py) fails any test that leaves a process, a zombie or an fd.

Several faces may also watch ONE dispatch at once (the last test): only one can
reap it and only one can run its stop, and every one must report the same end.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextlib
import functools
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import pytest

import procs
from procs import Kids
from ralph_reaper import (
    DispatchMonitor,
    DispatchResult,
    aio,
    graceful_terminate_dispatch,
    spawn_dispatch,
    wait_for_dispatch_completion,
)
from ralph_reaper.keeper_path import keeper_path

TIMEOUT_MS = 300
#: The timers a scenario needs to run out (EOF that a sleep ignores, a grace
#: period that a TERM-ignoring tree sits through): short, they cost their length.
GRACE_MS = 300
EOF_WAIT_MS = 200
#: The timers a scenario expects NOT to run out (a reader answering EOF, a sleep
#: dying of SIGTERM): long, so that a loaded machine cannot turn "EOF was enough"
#: into "needed SIGTERM"; they cost nothing when the process reacts.
SLACK_MS = 3000
IDLE_MS = 400
IDLE_BUSY_MS = 300
#: A stage given ``X`` ms must last at least 90% of it (timers never fire early;
#: the margin only absorbs clock granularity).
EOF_MIN_MS = 0.9 * EOF_WAIT_MS
GRACE_MIN_MS = 0.9 * GRACE_MS
#: How long a test lets the wait run before it asks for a stop (set-up only).
SETTLE_S = 0.2
#: Upper bound on any one face's wait (a hang fails the test, it does not stall the run).
RESULT_TIMEOUT_S = 30.0

FACES = ["blocking", "monitor", "aio", "aio_monitor", "cli"]

#: Scenario field meaning "the kernel's own answer" (resolved by the ``kernel_core`` fixture).
KERNEL = object()
#: Expected value meaning "not checked for this face".
ANY = object()


def sh(script: str) -> list[str]:
    return ["/bin/sh", "-c", script]


@dataclass(frozen=True)
class Scenario:
    name: str
    argv: list[str]
    #: The face's own options (0 = not given).
    timeout_ms: float = 0
    idle_timeout_ms: float = 0
    #: Given to spawn_dispatch itself (the faces are then called without a timeout).
    spawn_timeout_ms: float = 0
    #: "terminate": the test asks for a stop while the wait runs.
    action: Optional[str] = None
    #: Fields of to_dict() and the value every face must report.
    expected: dict[str, Any] = field(default_factory=dict)
    #: Per-face overrides of ``expected``.
    per_face: dict[str, dict[str, Any]] = field(default_factory=dict)
    stage_has: tuple[str, ...] = ()
    stage_lacks: tuple[str, ...] = ()
    #: Stages that must have lasted at least this long (ms): a stage cut short
    #: means something else ended the leader. Lower bounds only, which load
    #: cannot break.
    stage_min: dict[str, float] = field(default_factory=dict)
    #: The stop's timers: SIGTERM -> SIGKILL, and EOF -> SIGTERM.
    grace_ms: float = SLACK_MS
    eof_wait_ms: float = EOF_WAIT_MS
    #: False only where nothing was started.
    launched: bool = True
    #: The exit status of ``ralph-reaper run`` as ``Popen.wait`` sees it (coreutils
    #: timeout's conventions: -N when it ended by signal N, as the command did).
    cli_exit: int = 0

    def __str__(self) -> str:
        return self.name


def natural(rc: int, **more: Any) -> dict[str, Any]:
    """The fields of a dispatch that ended by itself with exit status ``rc``."""
    return {
        "status": "completed" if rc == 0 else "error",
        "termination_method": "natural",
        "return_code": rc,
        "signal": None,
        "core_dumped": False,
        "stop_reason": None,
        "timed_out": False,
        **more,
    }


def timed_out(method: str, rc: int, sig: Optional[int]) -> dict[str, Any]:
    """The fields of a dispatch stopped by its TIMEOUT_MS timeout."""
    return {
        "status": "timeout",
        # The configured limit, wherever it was given (spawn_dispatch or the face).
        "error": f"Timed out after {TIMEOUT_MS}ms",
        "termination_method": method,
        "return_code": rc,
        "signal": sig,
        "core_dumped": False,
        "stop_reason": "timeout",
        "timed_out": True,
    }


#: A command whose main thread exits first, leaving a thread and a child running.
LEADER_THREAD_GONE = (
    "import ctypes, subprocess, threading, time\n"
    "subprocess.Popen(['sleep', '30'])\n"
    "threading.Thread(target=time.sleep, args=(30,)).start()\n"
    "ctypes.CDLL(None).pthread_exit(None)\n"
)
BUSY_LOOP = "i=0; while [ $i -lt 400000 ]; do i=$((i+1)); done; exit 0"

SCENARIOS = [
    Scenario(
        "exit0",
        sh("exit 0"),
        expected=natural(0, error=None),
    ),
    Scenario(
        "exit3",
        sh("exit 3"),
        expected=natural(3, error="Process exited with code 3"),
        cli_exit=3,
    ),
    Scenario(
        "killed",
        sh("kill -USR1 $$"),
        expected={
            "status": "terminated",
            "termination_method": "natural",
            "return_code": -10,
            "signal": 10,
            "core_dumped": False,
            "stop_reason": None,
            "timed_out": False,
        },
        # As timeout(1): a command killed by signal N, run ends by N itself.
        cli_exit=-10,
    ),
    Scenario(
        "core",
        sh("ulimit -c unlimited; kill -SEGV $$"),
        expected={
            "status": "terminated",
            "termination_method": "natural",
            "return_code": -11,
            "signal": 11,
            "core_dumped": KERNEL,
            "stop_reason": None,
            "timed_out": False,
        },
        cli_exit=-11,
    ),
    Scenario(
        "timeout_cooperative",
        sh("sleep 30"),
        timeout_ms=TIMEOUT_MS,
        expected=timed_out("sigterm", -15, 15),
        stage_has=("sigterm",),
        stage_lacks=("sigkill",),
        # sleep ignores EOF: the EOF stage must get its whole EOF_WAIT_MS first.
        stage_min={"eof": EOF_MIN_MS},
        cli_exit=124,
    ),
    Scenario(
        "timeout_ignores_term",
        sh("trap '' TERM; sleep 30"),
        timeout_ms=TIMEOUT_MS,
        expected=timed_out("sigkill", -9, 9),
        stage_has=("sigterm", "sigkill"),
        stage_min={"eof": EOF_MIN_MS, "sigterm": GRACE_MIN_MS},
        grace_ms=GRACE_MS,
        cli_exit=137,  # as timeout(1) when it had to send SIGKILL
    ),
    Scenario(
        "timeout_eof",
        sh("read x; exit 0"),
        timeout_ms=TIMEOUT_MS,
        expected=timed_out("eof", 0, None),
        stage_has=("eof",),
        stage_lacks=("sigterm", "sigkill"),
        eof_wait_ms=SLACK_MS,
        cli_exit=124,
    ),
    Scenario(
        # The CLI has no spawn-level timeout: it gets the same one through --timeout.
        "spawn_timeout",
        sh("sleep 30"),
        spawn_timeout_ms=TIMEOUT_MS,
        expected=timed_out("sigterm", -15, 15),
        stage_has=("sigterm",),
        stage_lacks=("sigkill",),
        # sleep ignores EOF: the EOF stage must get its whole EOF_WAIT_MS first.
        stage_min={"eof": EOF_MIN_MS},
        cli_exit=124,
    ),
    Scenario(
        "idle_prompt",
        sh("read x; exit 0"),
        idle_timeout_ms=IDLE_MS,
        expected={
            "status": "completed",
            "termination_method": "eof",
            "return_code": 0,
            "signal": None,
            "core_dumped": False,
            "stop_reason": "idle",
            "timed_out": False,
            "error": None,
        },
        stage_has=("eof",),
        stage_lacks=("sigterm", "sigkill"),
        eof_wait_ms=SLACK_MS,
    ),
    Scenario(
        "idle_busy",
        sh(BUSY_LOOP),
        idle_timeout_ms=IDLE_BUSY_MS,
        expected=natural(0, error=None),
    ),
    Scenario(
        "terminate",
        sh("sleep 30"),
        action="terminate",
        expected={
            "status": "terminated",
            "termination_method": "sigterm",
            "return_code": -15,
            "signal": 15,
            "core_dumped": False,
            "stop_reason": "terminate",
            "timed_out": False,
        },
        per_face={"cli": {"stop_reason": "signal"}},
        stage_has=("sigterm",),
        stage_lacks=("sigkill",),
        stage_min={"eof": EOF_MIN_MS},
        cli_exit=-15,
    ),
    Scenario(
        # The main thread exits while another thread runs: /proc shows the
        # leader as a zombie, yet the process runs on, and so does its child.
        "timeout_leader_thread_gone",
        [sys.executable, "-c", LEADER_THREAD_GONE],
        timeout_ms=TIMEOUT_MS,
        expected=timed_out("sigterm", -15, 15),
        stage_has=("sigterm",),
        stage_lacks=("sigkill",),
        cli_exit=124,
    ),
    Scenario(
        "leftovers",
        sh("sleep 30 & exit 0"),
        expected=natural(0, error=None, descendants_killed=1),
        # The stop of what the leader left ran (SIGTERM was enough): stage_ms lists
        # the stages that ran, also when a keeper ran them.
        stage_has=("sigterm",),
        stage_lacks=("sigkill",),
    ),
    Scenario(
        "launch_failure",
        ["/nonexistent/cmd"],
        expected={
            "status": "error",
            "error": "No PID available",
            "return_code": None,
            "pid": None,
            "signal": None,
            "core_dumped": False,
            "stop_reason": None,
            "timed_out": False,
            "termination_method": "natural",
            "descendants_killed": 0,
        },
        # The CLI names the reason the launch failed, not the missing pid.
        per_face={"cli": {"error": ANY}},
        launched=False,
        cli_exit=127,
    ),
]


def containment_for(backend: str) -> str:
    return "keeper" if backend == "native" and keeper_path() is not None else "session"


# --------------------------------------------------------------------------------------
# The kernel's truth about the core dump


def _clean_cores(where: Path) -> None:
    for path in where.glob("core*"):
        with contextlib.suppress(OSError):
            path.unlink()


@pytest.fixture(scope="module")
def kernel_core(tmp_path_factory: pytest.TempPathFactory) -> bool:
    """Whether the kernel dumps a core for the ``core`` scenario's command, here.

    Asked the kernel directly: the same command, started by the test, reaped
    with ``os.waitpid`` and read with ``os.WCOREDUMP``. Where no core can be
    dumped (a zero hard limit, a core_pattern that refuses), this is False and
    every face must say False too.
    """
    where = tmp_path_factory.mktemp("kernel-core")
    core = next(s for s in SCENARIOS if s.name == "core")
    proc = subprocess.Popen(core.argv, cwd=where, stdin=subprocess.DEVNULL)
    try:
        _, status = os.waitpid(proc.pid, 0)
    finally:
        proc.returncode = -999  # reaped above: subprocess must not wait on the pid again
    _clean_cores(where)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSEGV, status
    return os.WCOREDUMP(status)


# --------------------------------------------------------------------------------------
# The faces


@dataclass
class Run:
    """What one test needs to drive one face."""

    backend: str
    scenario: Scenario
    cwd: Path
    kids: Kids
    #: Anything a driver observed besides the result (a terminate call's answer).
    notes: dict[str, Any] = field(default_factory=dict)


def _spawn(run: Run) -> DispatchResult:
    s = run.scenario
    dispatch = spawn_dispatch(
        s.argv,
        ticket_id="t",
        stdin="pipe",
        grace_ms=s.grace_ms,
        timeout_ms=s.spawn_timeout_ms,
        cwd=run.cwd,
    )
    if s.launched:
        assert dispatch.status == "launched", dispatch.error
        assert dispatch.pid is not None
    else:
        assert dispatch.status == "failed", dispatch
        assert dispatch.pid is None
        assert dispatch.error
    return dispatch


def _options(s: Scenario) -> dict[str, float]:
    return {
        "timeout_ms": s.timeout_ms,
        "graceful_shutdown_ms": s.grace_ms,
        "idle_timeout_ms": s.idle_timeout_ms,
        "eof_wait_ms": s.eof_wait_ms,
    }


def _terminate_call(pid: int, s: Scenario) -> tuple[bool, str]:
    return graceful_terminate_dispatch(pid, kill_wait_ms=s.grace_ms, eof_wait_ms=s.eof_wait_ms)


def face_blocking(run: Run) -> dict[str, Any]:
    dispatch = _spawn(run)
    stopper: Optional[threading.Thread] = None
    if run.scenario.action == "terminate":
        assert dispatch.pid is not None
        pid = dispatch.pid

        def stop() -> None:
            time.sleep(SETTLE_S)
            run.notes["terminate"] = _terminate_call(pid, run.scenario)

        stopper = threading.Thread(target=stop, name="conformance-terminate")
        stopper.start()
    try:
        result = wait_for_dispatch_completion(dispatch, "t", **_options(run.scenario))
    finally:
        if stopper is not None:
            stopper.join(RESULT_TIMEOUT_S)
    return result.to_dict()


def face_monitor(run: Run) -> dict[str, Any]:
    dispatch = _spawn(run)
    with DispatchMonitor() as monitor:
        future = monitor.watch(dispatch, "t", **_options(run.scenario))
        if run.scenario.action == "terminate":
            time.sleep(SETTLE_S)
            monitor.terminate(future)
        result = future.result(timeout=RESULT_TIMEOUT_S)
    return result.to_dict()


def face_aio(run: Run) -> dict[str, Any]:
    dispatch = _spawn(run)

    async def main() -> dict[str, Any]:
        task = asyncio.ensure_future(
            aio.wait_for_dispatch_completion(dispatch, "t", **_options(run.scenario))
        )
        if run.scenario.action == "terminate":
            assert dispatch.pid is not None
            await asyncio.sleep(SETTLE_S)
            loop = asyncio.get_running_loop()
            run.notes["terminate"] = await loop.run_in_executor(
                None, functools.partial(_terminate_call, dispatch.pid, run.scenario)
            )
        result = await asyncio.wait_for(task, RESULT_TIMEOUT_S)
        return result.to_dict()

    return asyncio.run(main())


def face_aio_monitor(run: Run) -> dict[str, Any]:
    dispatch = _spawn(run)

    async def main() -> dict[str, Any]:
        monitor = aio.AsyncDispatchMonitor()
        try:
            future = monitor.watch(dispatch, "t", **_options(run.scenario))
            if run.scenario.action == "terminate":
                await asyncio.sleep(SETTLE_S)
                monitor.terminate(future)
            result = await asyncio.wait_for(future, RESULT_TIMEOUT_S)
        finally:
            await monitor.aclose()
        return result.to_dict()

    return asyncio.run(main())


def _ms(value: float) -> str:
    return f"{value:g}ms"


def _runs_the_command(runner: int) -> bool:
    """True once a ``sleep`` is running below the ``run`` process."""
    for pid in procs.descendants_of(runner):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"sleep"):
            return True
    return False


def face_cli(run: Run) -> dict[str, Any]:
    s = run.scenario
    timeout_ms = s.timeout_ms or s.spawn_timeout_ms
    cmd = [
        sys.executable,
        "-m",
        "ralph_reaper",
        "run",
        "--json=-",
        "--ticket",
        "t",
        "--timeout",
        _ms(timeout_ms),
        "--grace",
        _ms(s.grace_ms),
        "--eof-wait",
        _ms(s.eof_wait_ms),
        "--idle-timeout",
        _ms(s.idle_timeout_ms),
        "--",
        *s.argv,
    ]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        runner = run.kids.argv(
            cmd,
            env=procs.child_env(RALPH_REAPER_BACKEND=run.backend),
            cwd=run.cwd,
            stdin=subprocess.PIPE,  # kept open: EOF reaches the command only when a stop begins
            stdout=out,
            stderr=err,
        )
        try:
            if s.action == "terminate":
                assert procs.wait_until(lambda: _runs_the_command(runner.pid)), "never started"
                time.sleep(SETTLE_S)
                runner.send_signal(signal.SIGTERM)
            status = runner.wait(timeout=RESULT_TIMEOUT_S)
        finally:
            if runner.returncode is None:  # hung: stop our own child, then fail below
                runner.kill()
                runner.wait()
            assert runner.stdin is not None
            runner.stdin.close()
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode(errors="replace")
        stderr = err.read().decode(errors="replace")
    lines = stdout.strip().splitlines()
    assert lines, f"no JSON on stdout (exit {status}); stderr: {stderr!r}"
    record: dict[str, Any] = json.loads(lines[-1])
    run.notes["exit_status"] = status
    run.notes["stderr"] = stderr
    return record


DRIVERS: dict[str, Callable[[Run], dict[str, Any]]] = {
    "blocking": face_blocking,
    "monitor": face_monitor,
    "aio": face_aio,
    "aio_monitor": face_aio_monitor,
    "cli": face_cli,
}


# --------------------------------------------------------------------------------------
# Comparing


def expected_for(scenario: Scenario, face: str, backend: str, kernel_core: bool) -> dict[str, Any]:
    expected = {
        **scenario.expected,
        "backend": backend,
        **scenario.per_face.get(face, {}),
    }
    if scenario.launched:  # a command that never started has no containment to report
        expected["containment"] = containment_for(backend)
    return {k: (kernel_core if v is KERNEL else v) for k, v in expected.items() if v is not ANY}


RUSAGE = ("user_time_s", "system_time_s", "max_rss_kb")


def mismatches(
    scenario: Scenario,
    expected: dict[str, Any],
    got: dict[str, Any],
    notes: dict[str, Any],
    *,
    cli: bool = False,
    rusage: bool = True,
) -> list[str]:
    """Every way ``got`` differs from the contract, one line each."""
    out = []
    for key, want in expected.items():
        if key not in got:
            out.append(f"{key}: missing, expected {want!r}")
        elif got[key] != want or type(got[key]) is not type(want):
            out.append(f"{key}: observed {got[key]!r}, expected {want!r}")
    stages = got.get("stage_ms") or {}
    for stage in scenario.stage_has:
        if stage not in stages:
            out.append(f"stage_ms: {stage!r} missing (observed {stages!r})")
    for stage in scenario.stage_lacks:
        if stage in stages:
            out.append(f"stage_ms: {stage!r} present (observed {stages!r})")
    for stage, least in scenario.stage_min.items():
        if stage in stages and stages[stage] < least:
            out.append(
                f"stage_ms[{stage!r}]: observed {stages[stage]:.1f} ms, expected >= {least:g}"
            )
        elif stage not in stages:
            out.append(f"stage_ms: {stage!r} missing (observed {stages!r})")
    if scenario.launched:
        if not (got.get("duration_ms") or 0) > 0:
            out.append(f"duration_ms: observed {got.get('duration_ms')!r}, expected > 0")
        # The kernel's account of the command (wait4/waitid rusage, or the keeper's report).
        missing = [k for k in RUSAGE if got.get(k) is None]
        if missing and rusage:
            out.append(f"rusage: {', '.join(missing)} observed None, expected values")
    if "terminate" in notes and notes["terminate"] != (True, "sigterm"):
        answer = notes["terminate"]
        out.append(f"graceful_terminate_dispatch: returned {answer!r}, expected (True, 'sigterm')")
    if cli and notes.get("exit_status") != scenario.cli_exit:
        out.append(
            f"exit status: observed {notes.get('exit_status')!r}, expected {scenario.cli_exit}"
        )
    return out


# --------------------------------------------------------------------------------------
# The tests


@pytest.mark.timeout(60)
@pytest.mark.parametrize("scenario", SCENARIOS, ids=str)
@pytest.mark.parametrize("face", FACES)
def test_conformance(
    backend: str,
    face: str,
    scenario: Scenario,
    kernel_core: bool,
    kids: Kids,
    tmp_path: Path,
) -> None:
    run = Run(backend=backend, scenario=scenario, cwd=tmp_path, kids=kids)
    if scenario.action == "terminate" and face in ("blocking", "aio"):
        run.notes["terminate"] = "never returned"  # the driver replaces it with the answer
    try:
        got = DRIVERS[face](run)
    finally:
        _clean_cores(tmp_path)
    expected = expected_for(scenario, face, backend, kernel_core)
    problems = mismatches(scenario, expected, got, run.notes, cli=face == "cli")
    if problems:
        detail = "\n  ".join(problems)
        extra = f"\n  stderr: {run.notes['stderr']!r}" if run.notes.get("stderr") else ""
        pytest.fail(f"{scenario.name} / {face} / {backend}:\n  {detail}{extra}\n  result: {got}")


# --------------------------------------------------------------------------------------
# Several faces on the same dispatch at once
#
# Only one of them can reap the leader, and only one can run the stop; the
# others must learn the same answer (the package remembers exits, and lists
# stops in progress), not a guess: "a wait that sees its leader die while
# another call is stopping it reports that stop".

SHARED = [
    Scenario(
        "natural",
        sh("sleep 0.3; exit 3"),
        expected=natural(3, error="Process exited with code 3", descendants_killed=0),
    ),
    Scenario(
        # A third party (graceful_terminate_dispatch) stops it while all of them wait.
        "terminate",
        sh("sleep 30"),
        action="terminate",
        expected={
            "status": "terminated",
            "termination_method": "sigterm",
            "return_code": -15,
            "signal": 15,
            "core_dumped": False,
            "stop_reason": "terminate",
            "timed_out": False,
            "error": "Terminated on request",
        },
        stage_has=("sigterm",),
        stage_lacks=("sigkill",),
        stage_min={"eof": EOF_MIN_MS},
    ),
    Scenario(
        # Every face was given the same timeout: one of them stops it, all report that stop.
        "timeout",
        sh("sleep 30"),
        timeout_ms=TIMEOUT_MS,
        expected=timed_out("sigterm", -15, 15),
        stage_has=("sigterm",),
        stage_lacks=("sigkill",),
        stage_min={"eof": EOF_MIN_MS},
    ),
]

#: Fields that depend on when a face looked, not on how the dispatch ended.
_TIMING = ("duration_ms", "stage_ms", *RUSAGE)  # when each face looked, and who reaped


@pytest.mark.timeout(60)
@pytest.mark.parametrize("scenario", SHARED, ids=str)
def test_faces_on_one_dispatch_agree(backend: str, scenario: Scenario) -> None:
    """The blocking wait, a monitor and the aio wait, all on ONE dispatch, report one end."""
    dispatch = spawn_dispatch(
        scenario.argv, ticket_id="t", stdin="pipe", grace_ms=scenario.grace_ms
    )
    assert dispatch.status == "launched", dispatch.error
    assert dispatch.pid is not None
    options = _options(scenario)
    notes: dict[str, Any] = {}
    with DispatchMonitor() as monitor, cf.ThreadPoolExecutor(2) as pool:
        watched = monitor.watch(dispatch, "t", **options)
        waited = pool.submit(wait_for_dispatch_completion, dispatch, "t", **options)
        awaited = pool.submit(
            asyncio.run, aio.wait_for_dispatch_completion(dispatch, "t", **options)
        )
        if scenario.action == "terminate":
            time.sleep(SETTLE_S)
            notes["terminate"] = _terminate_call(dispatch.pid, scenario)
        results = {
            "monitor": watched.result(timeout=RESULT_TIMEOUT_S).to_dict(),
            "blocking": waited.result(timeout=RESULT_TIMEOUT_S).to_dict(),
            "aio": awaited.result(timeout=RESULT_TIMEOUT_S).to_dict(),
        }
    expected = expected_for(scenario, "blocking", backend, False)
    problems = []
    for face, got in results.items():
        # Only the face that reaped the leader can have its rusage when each face
        # waits on its own (a stop is shared, and with it its account).
        found = mismatches(scenario, expected, got, notes, rusage=False)
        problems += [f"{face}: {p}" for p in found]
    if not any(all(got.get(k) is not None for k in RUSAGE) for got in results.values()):
        problems.append("rusage: no face reports it")
    # Beyond the contract's values: the faces agree with each other on every field
    # that does not depend on when they looked (rusage, descendants_killed, stage names).
    first, *others = results
    for face in others:
        for key in results[first]:
            a, b = results[first][key], results[face][key]
            if key == "stage_ms":
                a, b = sorted(a), sorted(b)
            elif key in _TIMING:
                continue
            if a != b:
                problems.append(f"{first} vs {face}: {key} {a!r} != {b!r}")
    if problems:
        detail = "\n  ".join(dict.fromkeys(problems))
        pytest.fail(f"{scenario.name} / {backend}:\n  {detail}\n  results: {results}")
