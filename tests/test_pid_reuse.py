"""A recycled pid is never signalled nor misreported, and the pid of an
ancestor that exited, once recycled, is no longer protected as an ancestor.

Each case runs inside a new PID namespace whose pid_max is 400 (``unshare``),
where pids come round again after a few hundred forks. Skipped where creating
a PID namespace is not permitted (it needs CAP_SYS_ADMIN).
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

import procs

# Runs as pid 1 of the new namespace; argv[1] is the backend to use.
SCRIPT = r"""
import os, subprocess, sys, time
with open("/proc/sys/kernel/pid_max", "w") as f:
    f.write("400")
from ralph_reaper import poll_dispatch_status
from ralph_reaper.backends import using
from ralph_reaper.pins import Pin

def recycle(pid, argv=("sleep", "30"), **popen):
    # Fork short-lived children until one gets `pid`; return it, still running.
    time.sleep(0.03)  # a later clock tick: start times differ (the polling guard)
    for _ in range(5000):
        child = subprocess.Popen(list(argv), **popen)
        if child.pid == pid:
            return child
        child.kill()
        child.wait()
        if child.stdin is not None:
            child.stdin.close()
    raise SystemExit(f"pid {pid} never came round again")

# Pids below 300 are never handed out again after a wrap: start above them.
while True:
    warm = subprocess.Popen(["true"])
    warm.wait()
    if warm.pid > 300:
        break

with using(sys.argv[1]) as backend:
    # 1. A reaped child's code is remembered only until a new process has its pid.
    first = subprocess.Popen(["sh", "-c", "exit 5"])
    pid = first.pid
    while poll_dispatch_status(pid) == (True, None):
        time.sleep(0.001)
    assert poll_dispatch_status(pid) == (False, 5)
    first.returncode = 5  # reaped by the package
    second = recycle(pid)
    assert poll_dispatch_status(pid) == (True, None), "reported the old exit for a new process"
    second.kill()
    second.wait()

    # 2. A pin of a process that exited never reaches the process that reuses its pid.
    third = subprocess.Popen(["sleep", "30"])
    pin = Pin.open(backend, third.pid)
    assert pin is not None
    third.kill()
    third.wait()  # reaped behind the pin's back: its pid is free again
    fourth = recycle(third.pid)
    assert pin.signal(9) is False, "a stale pin signalled a recycled pid"
    assert fourth.poll() is None, "the process that reused the pid was hit"
    assert pin.collect() is None or pin.collect().return_code == -9
    pin.close()
    fourth.kill()
    fourth.wait()

    # 3. An ancestor that exited: its pid, recycled, is a process like any other.
    from ralph_reaper import graceful_terminate_dispatch
    from ralph_reaper.validation import ancestry
    ready_r, ready_w = os.pipe()
    result_r, result_w = os.pipe()
    middle = os.fork()
    if middle == 0:
        if os.fork() == 0:  # the host: it sees its ancestry, then outlives its parent
            parent = os.getppid()
            assert parent in ancestry()
            os.write(ready_w, b"x")
            while os.getppid() == parent:
                time.sleep(0.001)
            victim = recycle(parent)
            try:
                ok, method = graceful_terminate_dispatch(victim.pid, kill_wait_ms=5000)
                message = f"{ok} {method}"
            except Exception as exc:
                message = repr(exc)
            victim.kill()  # a no-op once stopped; the cleanup when the test fails
            victim.returncode = -1  # reaped by the package (or below, by init)
            os.write(result_w, message.encode())
            os._exit(0)
        os.read(ready_r, 1)
        os._exit(0)
    os.waitpid(middle, 0)
    message = os.read(result_r, 500).decode()
    assert message == "True sigterm", "a recycled ancestor pid was refused: " + message
    os.wait()  # the host, reparented to us (pid 1 here)

    # 4. A member that exited and was reaped by its own parent: its pid, recycled by
    #    an unrelated job in a session of its own, is no root of the tree any more.
    from ralph_reaper.containment import Members
    leader = subprocess.Popen(["sh", "-c", "sleep 0.3; exec sleep 30"], start_new_session=True)
    members = Members(backend, Pin.open(backend, leader.pid), "session")
    while members.discover() == 0:
        time.sleep(0.001)
    (member,) = [p for p in members.pins.values() if p.pid != leader.pid]
    while not member.exited():  # the sleep ends; sh reaps it
        time.sleep(0.01)
    while open(f"/proc/{leader.pid}/cmdline").read() != "sleep\x0030\x00":
        time.sleep(0.01)
    # The job forks only once it has the pid: a job killed for the wrong pid would
    # leave its sleep behind, and a few hundred of those fill the namespace.
    job = recycle(
        member.pid,
        ["sh", "-c", "read go; sleep 30 & wait"],
        stdin=subprocess.PIPE,
        start_new_session=True,
    )
    job.stdin.write(b"go\n")
    job.stdin.flush()
    while not open(f"/proc/{job.pid}/task/{job.pid}/children").read().split():
        time.sleep(0.001)
    (job_child,) = [int(x) for x in open(f"/proc/{job.pid}/task/{job.pid}/children").read().split()]
    members.discover()
    assert sorted(members.pins) == sorted([leader.pid, member.pid]), (
        "discovery walked from a dead member's recycled pid: " + repr(sorted(members.pins))
    )
    members.close()
    os.kill(job_child, 9)  # started by this script, through the job
    for proc in (job, leader):
        proc.kill()
        proc.wait()
    while True:  # the job's sleep, orphaned to us (pid 1 here)
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            break
    # 5. A cached start time is trusted until the allocator comes round to its pid,
    #    and only until then. ns_last_pid places the allocator (we are root here).
    import ralph_reaper.lineage as lineage
    lineage.MAX_GAP_S = 3600.0  # the allocator's moves alone decide, not the clock

    def next_pid_after(last):
        with open("/proc/sys/kernel/ns_last_pid", "w") as f:
            f.write(str(last))

    def read(p):
        st = backend.proc_stat(p)
        return None if st is None else st.starttime

    def unread(p):
        raise AssertionError(f"pid {p} read again while its cached start time held")

    next_pid_after(349)
    old = subprocess.Popen(["sleep", "30"])
    assert old.pid == 350, old.pid
    next_pid_after(304)  # 350 is now ahead of the allocator: 46 moves away
    clock = lineage.PidClock()
    clock.tick()
    born = clock.start_of(old.pid, read)
    assert born == read(old.pid)
    for argv in (["true"], ["true"]):  # the allocator moves, not yet to 350
        subprocess.run(argv)
    clock.tick()
    assert clock.start_of(old.pid, unread) == born
    old.kill()
    old.wait()
    new = recycle(old.pid)
    clock.tick()
    assert clock.start_of(new.pid, read) == read(new.pid) != born, "a stale start time held"
    new.kill()
    new.wait()
print("ok")
"""


def _unshare_problem() -> str:
    if shutil.which("unshare") is None:
        return "unshare(1) is not installed"
    probe = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True, text=True
    )
    if probe.returncode != 0:
        return f"creating a PID namespace is not permitted here: {probe.stderr.strip()}"
    return ""


UNSHARE = ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc"]


@pytest.mark.timeout(300)
def test_recycled_pid_is_never_signalled_nor_misreported(backend: str) -> None:
    problem = _unshare_problem()
    if problem:
        pytest.skip(problem)
    env = procs.child_env()
    # --kill-child: if this test gives up on the namespace, its init dies and
    # takes every process of the namespace with it (nothing is left behind).
    done = subprocess.run(
        [*UNSHARE, sys.executable, "-c", SCRIPT, backend],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
