"""The keeper without pidfds never signals a recycled pid.

On a kernel without ``pidfd_open`` (older than 5.3), or out of fds, the keeper
pins a member by pid alone. Such a member may exit and be reaped by its own
parent, and its pid handed to an unrelated process, before the keeper's next
signal: the keeper must tell the two apart (by start time) and leave the
newcomer alone.

The case runs as pid 1 of a new PID namespace (``unshare``), where the pid of
the reaped member can be handed out again on purpose (``ns_last_pid``). The
missing ``pidfd_open`` is real, not mocked: a seccomp filter makes the kernel
refuse it with ENOSYS to the keeper, as an old kernel does. Skipped where a
PID namespace cannot be created or seccomp filters are not available.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

import procs
from ralph_reaper.keeper_path import keeper_path

# argv[1]: the keeper. Prints "ok" when the newcomer survived.
SCRIPT = r"""
import ctypes, errno, json, os, signal, subprocess, sys, time

keeper = sys.argv[1]

class Insn(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte),
                ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint)]

class Prog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Insn))]

NR_PIDFD_OPEN = 434  # the same number on every architecture
FILTER = (Insn * 4)(
    Insn(0x20, 0, 0, 0),                        # A = seccomp_data.nr
    Insn(0x15, 0, 1, NR_PIDFD_OPEN),            # if A == pidfd_open
    Insn(0x06, 0, 0, 0x00050000 | errno.ENOSYS),  #   return ERRNO(ENOSYS)
    Insn(0x06, 0, 0, 0x7FFF0000),               # return ALLOW
)

def without_pidfds():
    # In the keeper's child before exec: seccomp filters survive execve.
    libc = ctypes.CDLL(None, use_errno=True)
    prog = Prog(len(FILTER), FILTER)
    if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
        os._exit(90)
    if libc.prctl(22, 2, ctypes.byref(prog), 0, 0) != 0:  # PR_SET_SECCOMP, FILTER
        os._exit(91)

# The command ignores SIGTERM; its child M does not. The keeper's SIGTERM
# ends M, whom the command reaps itself: M's pid is free while the keeper
# still holds M's pin.
TREE = '''
import os, signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
m = os.fork()
if m == 0:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    print(os.getpid(), flush=True)  # only now does SIGTERM end it
    time.sleep(600)
    os._exit(0)
os.waitpid(m, 0)
print("reaped", flush=True)
time.sleep(600)
'''

report_r, report_w = os.pipe()
control_r, control_w = os.pipe()
k = subprocess.Popen(
    [keeper, "--report-fd", str(report_w), "--control-fd", str(control_r),
     "--", sys.executable, "-c", TREE],
    pass_fds=(report_w, control_r), stdout=subprocess.PIPE, preexec_fn=without_pidfds,
)
os.close(report_w)
os.close(control_r)
report = os.fdopen(report_r)
started = json.loads(report.readline())
assert started["event"] == "started", started
member = int(k.stdout.readline())
os.write(control_w, b"stop 600000\n")  # pins the tree, SIGTERM; a long grace
assert k.stdout.readline().strip() == b"reaped"
time.sleep(0.03)  # a later clock tick: the newcomer's start time differs
newcomer = None
for _ in range(20):
    with open("/proc/sys/kernel/ns_last_pid", "w") as f:
        f.write(str(member - 1))
    candidate = subprocess.Popen(["sleep", "600"])
    if candidate.pid == member:
        newcomer = candidate
        break
    candidate.kill()
    candidate.wait()
assert newcomer is not None, f"pid {member} could not be handed out again"
os.write(control_w, b"kill\n")  # the keeper SIGKILLs what it pinned
k.wait()
final = [json.loads(line) for line in report][-1]
alive = newcomer.poll() is None
newcomer.kill()
newcomer.wait()
k.stdout.close()
report.close()
os.close(control_w)
assert final["event"] == "exit" and final["method"] == "sigkill", final
assert alive, f"the keeper SIGKILLed pid {member}, recycled by a process not of its tree"
print("ok")
"""


def _problem() -> str:
    if shutil.which("unshare") is None:
        return "unshare(1) is not installed"
    probe = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True, text=True
    )
    if probe.returncode != 0:
        return f"creating a PID namespace is not permitted here: {probe.stderr.strip()}"
    with open("/proc/self/status") as f:
        if not any(line.startswith("Seccomp:") for line in f):
            return "the kernel has no seccomp (needed to take pidfd_open away from the keeper)"
    return ""


@pytest.mark.timeout(120)
def test_keeper_without_pidfds_never_signals_a_recycled_pid() -> None:
    keeper = keeper_path()
    if keeper is None:
        pytest.skip("ralph-reaper-keeper is not built (no C compiler at install time?)")
    problem = _problem()
    if problem:
        pytest.skip(problem)
    done = subprocess.run(
        [
            "unshare",
            "--pid",
            "--fork",
            "--kill-child",
            "--mount-proc",
            sys.executable,
            "-c",
            SCRIPT,
            keeper,
        ],
        capture_output=True,
        text=True,
        env=procs.child_env(),
        timeout=90,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
