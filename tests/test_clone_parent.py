"""A leader's ``clone(CLONE_PARENT)`` child is stopped with it: left behind at a
natural exit, or still running at a timeout.

Such a child is in the leader's session and process group, but its parent is
the leader's parent: the host. A host that adopts no orphans does not list its
own children when it searches a session (see ``ralph_reaper.lineage``), so the
search alone misses it; what catches it is the leader's process group, asked
right after the leader is reaped (by pidfd, so that the group is the leader's
own). The test process is a subreaper, which would list its children and
find the child anyway: the host here is a child Python that is none, and it
drives the natural end through each face that sweeps a session (the blocking
wait, the monitor, asyncio). The command line is a subreaper: it lists its
children (and under the keeper the clone is the keeper's child), and its case
checks that it stops the clone on every backend.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

import procs
from ralph_reaper import containment
from ralph_reaper.backends import get as get_backend
from ralph_reaper.containment import Members

RUN = [sys.executable, "-m", "ralph_reaper", "run", "--"]
#: clone(2) by number: flags come first on every architecture listed here.
SYS_CLONE = {"x86_64": 56, "aarch64": 220}.get(os.uname().machine)

#: The leader: clones a child with CLONE_PARENT (it becomes its parent's child, in
#: this session and process group) that ignores SIGTERM (so that only a stop that
#: found it ends it, with SIGKILL), prints its pid, waits for EOF, exits 0.
_LEADER = """
import ctypes, os, signal, sys
libc = ctypes.CDLL(None, use_errno=True)
pid = libc.syscall(int(sys.argv[1]), 0x00008000 | 17, 0, 0, 0, 0)  # CLONE_PARENT | SIGCHLD
if pid == 0:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.execv(sys.argv[2], [sys.argv[2], "300"])
if pid < 0:
    sys.exit("clone: " + os.strerror(ctypes.get_errno()))
print(pid, flush=True)
sys.stdin.read()
"""

#: The host (no subreaper): starts the leader, waits for it through one face, reports
#: whether its clone was stopped, and kills and reaps the clone if it was not.
_HOST = """
import asyncio, json, os, signal, subprocess, sys
from ralph_reaper import DispatchMonitor, DispatchResult, wait_for_dispatch_completion
from ralph_reaper import aio
from ralph_reaper.lineage import adopts_orphans
from ralph_reaper.backends import get

face, end, leader_code, sys_clone, sleep = sys.argv[1:6]
limit = {"graceful_shutdown_ms": 200, **({"timeout_ms": 300} if end == "timeout" else {})}
assert not adopts_orphans(get())
proc = subprocess.Popen(
    [sys.executable, "-c", leader_code, sys_clone, sleep],
    stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True,
)
clone = int(proc.stdout.readline())
st = open(f"/proc/{clone}/stat").read().rsplit(")", 1)[1].split()
assert int(st[1]) == os.getpid() and int(st[3]) == proc.pid, st  # our child, its session
dispatch = DispatchResult("s-1", "t-1", "running", proc.pid)
if end == "natural":
    proc.stdin.close()  # the leader exits now
if face == "wait":
    result = wait_for_dispatch_completion(dispatch, "t-1", **limit)
elif face == "monitor":
    with DispatchMonitor() as monitor:
        result = monitor.watch(dispatch, ticket_id="t-1", **limit).result(timeout=60)
else:
    result = asyncio.run(aio.wait_for_dispatch_completion(dispatch, "t-1", **limit))
if proc.stdin:
    proc.stdin.close()
try:
    os.kill(clone, 0)  # our child: its pid is its own until we reap it
    left = True
except ProcessLookupError:
    left = False
if left:
    left = open(f"/proc/{clone}/stat").read().rsplit(")", 1)[1].split()[0]  # its state
    os.kill(clone, signal.SIGKILL)
    os.waitpid(clone, 0)
proc.wait()
print(json.dumps({
    "left": left, "status": result.status.value, "method": result.termination_method,
    "killed": result.descendants_killed, "return_code": result.return_code,
}), flush=True)
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("end", ["natural", "timeout"])
@pytest.mark.parametrize("face", ["wait", "monitor", "asyncio"])
def test_a_clone_parent_child_is_stopped_with_its_leader(backend: str, face: str, end: str) -> None:
    if SYS_CLONE is None:
        pytest.skip(f"no clone(2) number known here for {os.uname().machine}")
    if backend == "polling":
        pytest.skip("without pidfds the group of a reaped leader cannot be asked (no such API)")
    sleep = shutil.which("sleep")
    assert sleep is not None
    out = subprocess.run(
        [sys.executable, "-c", _HOST, face, end, _LEADER, str(SYS_CLONE), sleep],
        env=procs.child_env(RALPH_REAPER_BACKEND=backend),
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.splitlines()[-1])
    assert result["left"] is False, result  # neither running nor a zombie of the host's
    assert result["killed"] == 1, result
    if end == "natural":
        assert result["status"] == "completed" and result["return_code"] == 0, result
    else:
        assert result["status"] == "timeout" and result["method"] == "sigterm", result


@pytest.mark.timeout(120)
def test_the_command_line_stops_a_clone_parent_child_left_at_a_natural_exit(backend: str) -> None:
    if SYS_CLONE is None:
        pytest.skip(f"no clone(2) number known here for {os.uname().machine}")
    sleep = shutil.which("sleep")
    assert sleep is not None
    out = subprocess.run(
        [*RUN, sys.executable, "-c", _LEADER, str(SYS_CLONE), sleep],
        env=procs.child_env(RALPH_REAPER_BACKEND=backend),
        stdin=subprocess.DEVNULL,  # the leader's EOF: it exits at once
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert out.returncode == 0, out.stderr
    clone = int(out.stdout.split()[0])
    assert not procs.alive(clone), f"clone {clone} left running"
    assert "1 descendant(s) stopped" in out.stderr, out.stderr


def test_what_a_read_of_the_session_found_is_kept_only_while_the_group_lives(
    backend: str, kids: procs.Kids, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Once the leader's group is empty, its number (the session's) is free for a
    # newcomer's setsid, so a read of every process for that session may find a
    # stranger: what the read found is kept only if the group still has a process
    # after it. The group emptying between the read and that check cannot be
    # produced on demand, so that answer alone is mocked in the second half; the
    # session, its processes, the read, the pins and the first answer are real.
    if backend == "polling":
        pytest.skip("without pidfds the group of a reaped leader cannot be asked (no such API)")
    proc = kids.sh("sleep 300 & echo $!; wait", stdout=subprocess.PIPE)
    (member,) = procs.read_pids(proc, 1)
    found = []
    try:
        for emptied in (False, True):
            if emptied:
                monkeypatch.setattr(containment, "group_has_members", lambda _fd: False)
            members = Members(
                get_backend(), None, "session", session=proc.pid, group_fd=os.pidfd_open(proc.pid)
            )
            try:
                added = members._scan_while_group_lives()
                found.append((added, sorted(members.pins)))
            finally:
                members.close()
    finally:
        os.kill(member, signal.SIGKILL)  # sh's child, alive until sh (alive) reaps it
        proc.wait(timeout=30)  # its wait returns then, and it exits
    assert found == [(2, sorted([proc.pid, member])), (0, [])]
