"""When SIGKILL does not kill: every stop sequence gives up in bounded time,
says so, and never reports the survivor as gone.

A process that survives SIGKILL is one in uninterruptible sleep, which cannot
be produced on demand. This module mocks exactly that and nothing else:
``unkillable_preload.c``, preloaded into the process that runs the stop
sequence (a child Python using the package, or the keeper), makes *its*
SIGKILL miss processes named ``rr-unkillable`` while reporting success, as the
kernel does for a process in D state. A static keeper (as builds link it)
ignores ``LD_PRELOAD``: the keeper cases then run a dynamically linked build
of the same source. The processes, pidfds, waits, /proc
reads and reports are all real. Each test then SIGKILLs the survivor itself
(unshimmed) and reaps it: the test process is a subreaper, so it inherits it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

import procs
from procs import alive, wait_until
from ralph_reaper.keeper_path import keeper_linkage, keeper_path

HERE = Path(__file__).resolve().parent
SHIM_SOURCE = HERE / "unkillable_preload.c"
CSRC = HERE.parent / "csrc"
NAME = "rr-unkillable"
SH = shutil.which("sh") or "/bin/sh"


@pytest.fixture(scope="module")
def shim(tmp_path_factory: pytest.TempPathFactory) -> str:
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build the shim that stands in for an unkillable process")
    out = tmp_path_factory.mktemp("shim") / "unkillable.so"
    flags = ["-shared", "-fPIC", "-O1", "-Wall", "-Wextra", "-Werror"]
    subprocess.run([cc, *flags, "-o", str(out), str(SHIM_SOURCE), "-ldl"], check=True)
    return str(out)


@pytest.fixture(scope="module")
def keeper(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The package's keeper if the shim can be preloaded into it, else a dynamically
    linked build of its source (csrc/), which the shim can."""
    installed = keeper_path()
    if installed is None:
        pytest.skip("ralph-reaper-keeper is not built (no C compiler at install time?)")
    if keeper_linkage(installed) == "dynamic":
        return installed
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    sources = [CSRC / "keeper.c", CSRC / "reaper.c"]
    if cc is None or not all(f.exists() for f in sources):
        pytest.skip("a static keeper, and no compiler or csrc/ to build one the shim loads into")
    out = tmp_path_factory.mktemp("keeper") / "ralph-reaper-keeper"
    flags = ["-std=gnu99", "-O1", "-Wall", "-Wextra", "-Werror", f"-I{CSRC}"]
    subprocess.run([cc, *flags, "-o", str(out), *map(str, sources)], check=True)
    return str(out)


@pytest.fixture
def stuck(tmp_path: Path) -> str:
    """A copy of sleep(1) whose command name the shim recognises."""
    sleep = shutil.which("sleep")
    assert sleep is not None
    path = tmp_path / NAME
    shutil.copy(sleep, path)
    return str(path)


@pytest.fixture
def survivors() -> Iterator[list[int]]:
    """Pids the code under test must have left alive; really killed and reaped afterwards."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue
        assert wait_until(partial(_reaped, pid)), f"survivor {pid} not reaped"


def _reaped(pid: int) -> bool:
    """Reap pid if it is our (inherited) child and has exited; True once it is gone."""
    try:
        got, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return not alive(pid)
    return got == pid


def _preload(shim: str) -> str:
    """The shim after whatever is preloaded already (a sanitizer runtime must stay first)."""
    return " ".join(filter(None, [os.environ.get("LD_PRELOAD", ""), shim]))


def _comm(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


def test_the_shim_only_spares_its_target(
    shim: str, stuck: str, survivors: list[int], tmp_path: Path
) -> None:
    # The mock itself: under the shim, SIGKILL (by kill and by pidfd) misses
    # rr-unkillable and still kills anything else.
    code = f"""
import os, signal, subprocess, sys, time
quiet = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
a = subprocess.Popen([{stuck!r}, "300"], **quiet)
b = subprocess.Popen(["sleep", "300"], **quiet)
os.kill(a.pid, signal.SIGKILL)
fd = os.pidfd_open(a.pid)
signal.pidfd_send_signal(fd, signal.SIGKILL)
os.kill(b.pid, signal.SIGKILL)
b.wait()
time.sleep(0.2)
print(a.pid, a.poll(), b.returncode, flush=True)
"""
    env = {**os.environ, "LD_PRELOAD": _preload(shim)}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    pid = int(out[0])
    survivors.append(pid)
    assert out[1:] == ["None", str(-signal.SIGKILL)]
    assert alive(pid) and _comm(pid) == NAME


_HOST = """
import json, os, subprocess, sys, time
from ralph_reaper import (
    DispatchResult, backend_info, graceful_terminate_dispatch, spawn_dispatch,
    wait_for_dispatch_completion,
)
stuck, how, out, keeper = sys.argv[1:5]
script = "trap '' TERM; " + stuck + " 300 >/dev/null 2>&1 & echo $! > " + out + "; exec sleep 300"
if how == "spawn":
    import ralph_reaper.spawning
    ralph_reaper.spawning.keeper_path = lambda: keeper  # one the shim is loaded into
    dispatch = spawn_dispatch(["sh", "-c", script], ticket_id="t-1", stdin="devnull")
else:
    proc = subprocess.Popen(["sh", "-c", script], start_new_session=True)
    dispatch = DispatchResult("s-1", "t-1", "running", proc.pid)
while not (os.path.exists(out) and open(out).read().endswith("\\n")):
    time.sleep(0.001)
if how == "terminate":
    ok, method = graceful_terminate_dispatch(dispatch.pid, kill_wait_ms=100)
    result = {"ok": ok, "method": method}
else:
    r = wait_for_dispatch_completion(
        dispatch, "t-1", timeout_ms=100, graceful_shutdown_ms=100
    )
    result = {
        "status": r.status.value, "method": r.termination_method, "error": r.error,
        "containment": r.containment, "timed_out": r.timed_out,
    }
result["backend"] = backend_info()["backend"]
print(json.dumps(result), flush=True)
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["wait", "terminate", "spawn"])
def test_host_gives_up_and_names_the_survivor(
    backend: str,
    how: str,
    shim: str,
    stuck: str,
    survivors: list[int],
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    out = tmp_path / "stuck.pid"
    # Only a spawn on the native backend runs a keeper.
    keeper = request.getfixturevalue("keeper") if how == "spawn" and backend == "native" else ""
    env = procs.child_env(LD_PRELOAD=_preload(shim), RALPH_REAPER_BACKEND=backend)
    # Files, not pipes: a crash must not leave the test reading a pipe that
    # the tree still holds open.
    stdout, stderr = tmp_path / "stdout", tmp_path / "stderr"
    with stdout.open("w") as o, stderr.open("w") as e:
        code = subprocess.call(
            [sys.executable, "-c", _HOST, stuck, how, str(out), keeper],
            env=env,
            stdout=o,
            stderr=e,
            timeout=40,
        )
    pid = int(out.read_text())
    survivors.append(pid)
    assert code == 0, stderr.read_text()
    result = json.loads(stdout.read_text())
    assert result["backend"] == backend
    # Still alive, still the same process: nothing claimed it was stopped.
    assert alive(pid) and _comm(pid) == NAME
    if how == "terminate":
        assert result == {"ok": False, "method": "failed", "backend": backend}
        return
    assert result["status"] == "error" and result["method"] == "failed"
    assert result["timed_out"] is True
    assert "could not be stopped" in result["error"], result
    # Whoever ran the stop (the host, or the keeper in its report) names the survivor.
    assert f"survivors: [{pid}]" in result["error"], result


@pytest.mark.timeout(60)
@pytest.mark.parametrize("which", ["command", "descendant"])
def test_keeper_gives_up_and_says_so(
    which: str, shim: str, keeper: str, stuck: str, survivors: list[int], tmp_path: Path
) -> None:
    pidfile = tmp_path / "stuck.pid"
    if which == "command":
        script = f"trap '' TERM; echo $$ > {pidfile}; exec {stuck} 300"
    else:
        script = f"trap '' TERM; {stuck} 300 & echo $! > {pidfile}; exec sleep 300"
    report_r, report_w = os.pipe()
    env = {**os.environ, "LD_PRELOAD": _preload(shim)}
    proc = subprocess.Popen(
        [keeper, "--report-fd", str(report_w), "--grace-ms", "100", "--", SH, "-c", script],
        pass_fds=[report_w],
        env=env,
    )
    os.close(report_w)
    try:
        assert wait_until(lambda: pidfile.exists() and pidfile.read_text().endswith("\n"))
        pid = int(pidfile.read_text())
        survivors.append(pid)
        assert wait_until(lambda: alive(pid) and _comm(pid) == NAME)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
        with os.fdopen(report_r, closefd=False) as f:
            events = [json.loads(line) for line in f.read().splitlines()]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(report_r)
    final = events[-1]
    assert final["event"] == "exit" and final["method"] == "failed", events
    assert final["reason"] == "signal", final
    assert final["survivors"] == [pid], final
    assert alive(pid) and _comm(pid) == NAME
    if which == "command":
        # Its command never ended: nothing to mirror, the keeper's own failure code.
        assert code == 125
    else:
        # The command itself was killed: mirrored, though a member survived.
        assert code == -signal.SIGKILL
